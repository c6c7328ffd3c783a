"""The shard schema, v2 (docs/shard-format.md): one table of what a shard file holds, read by the
writer (``writer.py``) and the reader (``reader.py``) alike.

Each dataset's tail shape is symbolic: ``"size"`` is the file's ``@size``, ``"classes"`` the length
of ``@target_names``; the rows are the file's N (``boxes`` has one row per box instead).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...findings import FINDINGS_ALL
from ...render import GEOMETRY_FIELDS
from ...sources.chexmask import MASK_NAMES
from ...workdir import SHARD_INDEX, SHARD_MANIFEST, SHARD_VARIANTS

SCHEMA, SCHEMA_VERSION = "radacx-shard", 2  # 2: geometry mask_height, mask_width; archive attribute
SPLITS = ("train", "val", "test")
# the names inside a shard folder are the format's (Workdir spells them, for readers with only the folder)
MANIFEST_NAME, INDEX_NAME, VARIANTS_NAME = SHARD_MANIFEST, SHARD_INDEX, SHARD_VARIANTS


@dataclass(frozen=True)
class Dataset:
    """One dataset of a shard file."""
    name: str
    dtype: str  # numpy dtype; "S" is a byte string of any length (ids are never truncated)
    tail: tuple  # the shape after the row axis: ints, "size" or "classes"
    storage: str = "small"  # "contiguous" (memory-mappable images), "row-chunks" (gzip 1, one chunk per row)
    per_row: bool = True  # False: a table of its own length (boxes)
    required: bool = True


DATASETS = (  # in the order the writer creates them (the byte layout of a shard follows it)
    Dataset("original", "uint8", ("size", "size"), "contiguous"),
    Dataset("masked", "uint8", ("size", "size", 3), "contiguous"),
    Dataset("masks", "uint8", (len(MASK_NAMES), "size", "size"), "row-chunks"),
    Dataset("labels", "float32", (len(FINDINGS_ALL),)),
    Dataset("targets", "float32", ("classes",)),
    Dataset("dicom_id", "S", ()),
    Dataset("subject_id", "int64", ()),
    Dataset("study_id", "int64", ()),
    Dataset("mask_quality", "float32", ()),
    Dataset("geometry", "float32", (len(GEOMETRY_FIELDS),)),
    # radiologists' boxes (archives that have them, root attribute boxes=True): row, class, x0, y0, x1, y1
    Dataset("boxes", "float32", (6,), per_row=False, required=False),
)
BY_NAME = {d.name: d for d in DATASETS}
ROW_DATASETS = tuple(d.name for d in DATASETS if d.per_row)
IMAGE_DATASETS = tuple(d.name for d in DATASETS if d.storage == "contiguous")
MAX_SIZE, MIN_SIZE = 4096, 16
MAX_BOXES = 1_000_000


def tail_shape(dataset: Dataset, size: int, classes: int | None) -> tuple | None:
    """The dataset's shape after its row axis at this ``size`` and number of classes (None where the
    number of classes is unknown)."""
    if "classes" in dataset.tail and classes is None:
        return None
    return tuple(size if t == "size" else classes if t == "classes" else t for t in dataset.tail)


def root_attributes(*, target_names, render_config: dict, render_fingerprint: str,
                    cohort_fingerprint: str, size: int, created_with: str, archive: str, scaled_copies: bool,
                    boxes: bool) -> dict:
    """A shard set's root attributes (lists and dicts are stored as JSON text); the writer adds each
    file's ``split``."""
    attrs = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "label_names": list(FINDINGS_ALL),
             "mask_names": list(MASK_NAMES), "target_names": list(target_names),
             "geometry_fields": list(GEOMETRY_FIELDS), "render_config": render_config,
             "render_fingerprint": render_fingerprint, "cohort_fingerprint": cohort_fingerprint,
             "size": size, "created_with": created_with, "archive": archive, "scaled_copies": scaled_copies}
    if boxes:
        attrs["boxes"] = True  # a format addition, only where the archive has radiologists' boxes
    return attrs
