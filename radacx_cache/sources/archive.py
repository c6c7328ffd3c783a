"""The archive contract and its registry (docs/archives.md): one class per archive, found, never listed.

Each archive is an ``Archive`` subclass in its own module of ``sources/`` that says everything the
pipeline needs to know about it: its tables (``read``), its id rule (``id_problem``), where an
image's file is (``relpath``), which files the cohort depends on (``input_files``), its CheXmask file
and that file's id column, and how its labels map onto the findings (in ``read``). Defining the
class registers it under ``kind`` (``__init_subclass__``), and ``sources/__init__.py`` imports every
module of the folder, so adding an archive is adding one module: the config's ``archive.kind`` and
``phantom.layout`` choices, the CLI's ``--layout`` and the tests all read ``ARCHIVES``. An unknown
kind is a ``KeyError`` that lists the known ones (``archive``).

``read`` returns ``ArchiveTables`` with canonical columns, so the cohort policy (views, labels,
masks, split) is written once:

- ``metadata``: one row per image: ``dicom_id`` (the image's id in its archive and in CheXmask),
  ``subject_id``, ``study_id`` (text until validated), ``ViewPosition``, ``Rows``, ``Columns`` (NaN
  where the archive's tables carry no image size) and what ``relpath`` needs;
- ``labels``: FINDINGS_ALL columns (1, 0, -1, NaN) keyed by ``label_key``, and ``label_problem``
  (None, or why the row's labels cannot be read);
- ``split``: ``dicom_id, split`` (train / validate / test: the archive's official assignment; an
  archive without a test split gets a seeded one from the cohort);
- ``rejects``: images the reader itself could not take, with their reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from .chexmask import ID_COLUMNS

ARCHIVES: dict[str, "Archive"] = {}  # kind -> the archive, in the order the modules define them


@dataclass
class ArchiveTables:
    """An archive's tables with canonical columns, as ``Archive.read`` returns them."""
    metadata: pd.DataFrame
    labels: pd.DataFrame
    split: pd.DataFrame
    chexmask: pd.DataFrame | None = None
    kind: str = "mimic"
    rejects: list = field(default_factory=list)
    image_folders: dict | None = None  # NIH Kaggle copy: the images_NNN/images folder of each file
    boxes: pd.DataFrame | None = None  # radiologists' boxes (sources.nih.BOX_COLUMNS), where the archive has them
    boxes_in_pixels: bool = False  # VinDr: the boxes are in the image's pixels (the cohort makes them fractions)


class Archive:
    """One archive's format. Subclasses set the class attributes (``id_rule`` among them) and implement
    ``read``, ``relpath`` and ``input_files``."""
    kind: ClassVar[str]  # the config's archive.kind
    id_rule: ClassVar  # staticmethod (image id, subject, study) -> why they are not this archive's ids, or None
    name: ClassVar[str]  # as people write it, in reports
    chexmask_file: ClassVar[str]  # the CheXmask file of this archive (its id column: ``chexmask_id_column``)
    id_name: ClassVar[str]  # what the archive calls an image's id, for reject reasons
    tables: ClassVar[dict]  # what each canonical table is in the archive, for reject reasons
    label_key: ClassVar[tuple] = ("dicom_id",)  # labels are per image, or per study (MIMIC)
    sizes_in_tables: ClassVar[bool] = False  # False: CheXmask's Height x Width is checked against the image
    scaled_copies: ClassVar[bool] = False  # True: a downscaled copy is read when its aspect ratio agrees
    image_formats: ClassVar[tuple] = ("JPEG",)  # the only formats its image files are opened as
    # CheXmask's Dice RCA (Mean) > (Max) read as a swapped header (PadChest's rows have no fixed order)
    mean_above_max_is_suspect: ClassVar[bool] = True
    options: ClassVar[dict] = {}  # archive.options this archive takes, with their defaults
    # CheXmask segments all three structures of every image, so a blank mask cell is a broken row; an
    # archive of one's own may have masks of some structures only (lungs, no heart): blank = none drawn
    absent_structures: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            if cls.kind in ARCHIVES:
                raise TypeError(f"archive kind {cls.kind!r} is defined twice ({type(ARCHIVES[cls.kind]).__name__}, "
                                f"{cls.__name__})")
            if cls.chexmask_file not in ID_COLUMNS:
                raise TypeError(f"{cls.__name__}: CheXmask file {cls.chexmask_file!r} is not one of {sorted(ID_COLUMNS)}")
            ARCHIVES[cls.kind] = cls()

    def read(self, cfg) -> ArchiveTables:
        """The archive's tables under ``cfg.archive.root`` (the run's config: its ``archive.options``,
        checked by ``checked_options``, and archive rules such as VinDr's ``cohort.min_readers``)."""
        raise NotImplementedError

    def id_problem(self, row) -> str | None:
        """Why a metadata row's identifiers are not this archive's, or None (then paths may be built):
        the archive's ``id_rule`` on the row's image id, subject and study."""
        return self.id_rule(row["dicom_id"], row["subject_id"], row["study_id"])

    def relpath(self, tables: ArchiveTables, row) -> str:
        """The image file of a validated row, relative to ``archive.root``."""
        raise NotImplementedError

    def input_files(self, root: Path) -> list[Path]:
        """Every table ``read`` reads (a change to any of them invalidates the cohort); FileNotFoundError
        naming what is missing."""
        raise NotImplementedError

    def policy(self, cfg) -> dict:
        """Archive-specific decisions the cohort record keeps beside the label policy."""
        return {}

    def summary(self, cohort: pd.DataFrame) -> dict:
        """Archive-specific counts of the cohort (its record keeps them)."""
        return {}

    @property
    def chexmask_id_column(self) -> str:
        return ID_COLUMNS[self.chexmask_file]

    def checked_options(self, options) -> dict:
        """``archive.options`` over this archive's defaults; ValueError naming an unknown or mistyped one."""
        options = options or {}
        if not isinstance(options, dict):
            raise ValueError("config key 'archive.options': expected a mapping")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"config key 'archive.options.{unknown[0]}': {self.name} takes "
                             f"{', '.join(self.options) or 'no options'}")
        for key, value in options.items():
            if type(value) is not type(self.options[key]):
                raise ValueError(f"config key 'archive.options.{key}': {value!r} is not a "
                                 f"{type(self.options[key]).__name__}")
        return {**self.options, **options}


def archive(kind: str) -> Archive:
    """The registered archive ``kind``; KeyError listing the known kinds."""
    try:
        return ARCHIVES[kind]
    except KeyError:
        raise KeyError(f"unknown archive kind {kind!r}; known: {', '.join(ARCHIVES)}") from None
