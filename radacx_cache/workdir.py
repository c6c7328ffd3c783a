"""The on-disk layout of a run: every path under ``workdir`` is spelled here and nowhere else.

::

    cohort/      cohort.csv  rejects.csv  masks-rle.h5  [boxes.csv]  manifest.json
    shards/      <split>-NNNNN.h5 (+ .json sidecars)  index.csv  rejects.csv  [variants.json]  manifest.json
    features/<model-tag>/  <image-variant>.h5  manifest.json
    zeroshot/<model-tag>/  text.npz  manifest.json
    probes/      <arm>.npz (the fitted linear heads V1, V2)  manifest.json
    finetune/<image-variant>/  last.pt  best.pt  summary.json  train_log.csv  manifest.json
    predictions/<arm>/  <image-variant>.csv (+ .json provenance)  manifest.json
    results/     table1.{md,csv,json,tex}  metrics.json  per_class_auroc.csv  figures  [ablation.json]  manifest.json
                 saliency.{md,csv,json}  saliency-{occlusion,curves,cascade}.csv  saliency-manifest.json  saliency/

Every ``manifest.json`` (and ``saliency-manifest.json``) is a stage record (``formats.records``):
written last, it lists the files later stages read with their sha256 and the records it was built from.
"""
from __future__ import annotations

from pathlib import Path

RECORD = "manifest.json"  # every stage folder's record (its commit point)
# the names in a shard folder (formats.shard reads them from a bare folder too, without a Workdir)
SHARD_MANIFEST, SHARD_INDEX, SHARD_REJECTS, SHARD_VARIANTS = RECORD, "index.csv", "rejects.csv", "variants.json"
SHARD_SIDECARS = "*-[0-9][0-9][0-9][0-9][0-9].json"  # the glob of shard_name(...) sidecars


def shard_name(split: str, number: int) -> str:
    """``<split>-NNNNN.h5``: the file name of a split's ``number``-th shard."""
    return f"{split}-{number:05d}.h5"


def sidecar_name(name: str) -> str:
    """The JSON sidecar beside a data file: ``<split>-NNNNN.json`` after a shard, ``<variant>.json``
    (provenance) beside an arm's ``<variant>.csv``."""
    return str(Path(name).with_suffix(".json"))


SALIENCY_RECORD = "saliency-manifest.json"  # results/ holds two records: the saliency stage's and the report's
RECORD_NAMES = (RECORD, SALIENCY_RECORD, SHARD_VARIANTS)  # what `radacx verify` looks for
VERIFIED_CACHE = ".verified.json"  # a record folder's verified-once hashes (formats.records)


class Workdir:
    """Paths of one run's outputs (mosaic streaming's ``get_index_basename`` idea, for a whole run)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Workdir({str(self.root)!r})"

    # cohort stage
    @property
    def cohort_dir(self) -> Path:
        return self.root / "cohort"

    @property
    def cohort_csv(self) -> Path:
        return self.cohort_dir / "cohort.csv"

    @property
    def cohort_manifest(self) -> Path:
        return self.cohort_dir / RECORD

    @property
    def cohort_boxes(self) -> Path:
        """Radiologists' boxes of the cohort's images (archives that have them)."""
        return self.cohort_dir / "boxes.csv"

    @property
    def cohort_rejects(self) -> Path:
        return self.cohort_dir / "rejects.csv"

    @property
    def masks_rle(self) -> Path:
        return self.cohort_dir / "masks-rle.h5"

    # shards stage
    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def shards_manifest(self) -> Path:
        return self.shards_dir / SHARD_MANIFEST

    @property
    def shards_index(self) -> Path:
        return self.shards_dir / SHARD_INDEX

    @property
    def shards_rejects(self) -> Path:
        return self.shards_dir / SHARD_REJECTS

    def shard(self, name: str) -> Path:
        return self.shards_dir / name

    def shard_sidecar(self, name: str) -> Path:
        return self.shards_dir / sidecar_name(name)

    @property
    def shards_variants(self) -> Path:
        """The derived overlay variants' record (``variants.json``; adding one rewrites only this file)."""
        return self.shards_dir / SHARD_VARIANTS

    # embed stage
    def features_dir(self, model_tag: str) -> Path:
        return self.root / "features" / model_tag

    def features(self, model_tag: str, image_variant: str) -> Path:
        return self.features_dir(model_tag) / f"{image_variant}.h5"

    def features_partial(self, model_tag: str, image_variant: str, rank: int = 0, world: int = 1) -> Path:
        """The file a (rank's) unfinished cache is built in; renamed to ``features`` when complete."""
        name = f".{image_variant}.h5.partial" if world == 1 else f".{image_variant}.rank{rank}of{world}.partial"
        return self.features_dir(model_tag) / name

    def features_record(self, model_tag: str) -> Path:
        return self.features_dir(model_tag) / RECORD

    # zero-shot
    def zeroshot_text(self, model_tag: str) -> Path:
        return self.root / "zeroshot" / model_tag / "text.npz"

    def zeroshot_record(self, model_tag: str) -> Path:
        return self.zeroshot_text(model_tag).with_name(RECORD)

    # probes: the fitted linear heads (V1, V2), for saliency
    def probe_weights(self, arm: str) -> Path:
        return self.root / "probes" / f"{arm}.npz"

    @property
    def probes_record(self) -> Path:
        return self.root / "probes" / RECORD

    # fine-tune
    def finetune_dir(self, image_variant: str) -> Path:
        return self.root / "finetune" / image_variant

    def finetune_last(self, image_variant: str) -> Path:
        return self.finetune_dir(image_variant) / "last.pt"

    def finetune_best(self, image_variant: str) -> Path:
        return self.finetune_dir(image_variant) / "best.pt"

    def finetune_summary(self, image_variant: str) -> Path:
        return self.finetune_dir(image_variant) / "summary.json"

    def finetune_log(self, image_variant: str) -> Path:
        return self.finetune_dir(image_variant) / "train_log.csv"

    def finetune_record(self, image_variant: str) -> Path:
        return self.finetune_dir(image_variant) / RECORD

    # predictions of every arm, read by the report
    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    def predictions(self, arm: str, image_variant: str) -> Path:
        return self.predictions_dir / arm / f"{image_variant}.csv"

    def predictions_meta(self, arm: str, image_variant: str) -> Path:
        """The provenance sidecar beside ``predictions(arm, image_variant)``."""
        return self.predictions(arm, image_variant).with_name(sidecar_name(f"{image_variant}.csv"))

    def predictions_record(self, arm: str) -> Path:
        return self.predictions_dir / arm / RECORD

    # report
    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def report_record(self) -> Path:
        return self.results_dir / RECORD

    # the report's files; ``result`` refuses any other name, so a new output is named here first
    RESULT_FILES = ("table1.md", "table1.tex", "table1.csv", "table1.json", "metrics.json", "per_class_auroc.csv",
                    "accuracy.png", "auroc_per_class.png", "confusion.png", "figure1_montage.png", "ablation.json",
                    "ablation_variants.png")

    def result(self, name: str) -> Path:
        """``results/<name>`` for one of ``RESULT_FILES``."""
        if name not in self.RESULT_FILES:
            raise ValueError(f"results file {name!r}: the report writes {', '.join(self.RESULT_FILES)}")
        return self.results_dir / name

    @property
    def saliency_dir(self) -> Path:
        return self.results_dir / "saliency"

    def saliency_file(self, suffix: str) -> Path:
        """``results/saliency.{json,csv,md}``."""
        return self.results_dir / f"saliency.{suffix}"

    def intervention_rows(self, kind: str) -> Path:
        """``results/saliency-{occlusion,curves,cascade}.csv``: per-image rows of the interventions."""
        if kind not in ("occlusion", "curves", "cascade"):
            raise ValueError(f"intervention rows {kind!r}: expected occlusion, curves or cascade")
        return self.results_dir / f"saliency-{kind}.csv"

    @property
    def saliency_record(self) -> Path:
        return self.results_dir / SALIENCY_RECORD
