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

SHARD_VARIANTS = "variants.json"  # beside the shards (formats.shardset reads it from a bare shard folder too)


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
        return self.cohort_dir / "manifest.json"

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
        return self.shards_dir / "manifest.json"

    @property
    def shards_index(self) -> Path:
        return self.shards_dir / "index.csv"

    @property
    def shards_rejects(self) -> Path:
        return self.shards_dir / "rejects.csv"

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
        return self.features_dir(model_tag) / "manifest.json"

    # zero-shot
    def zeroshot_text(self, model_tag: str) -> Path:
        return self.root / "zeroshot" / model_tag / "text.npz"

    def zeroshot_record(self, model_tag: str) -> Path:
        return self.zeroshot_text(model_tag).with_name("manifest.json")

    # probes: the fitted linear heads (V1, V2), for saliency
    def probe_weights(self, arm: str) -> Path:
        return self.root / "probes" / f"{arm}.npz"

    @property
    def probes_record(self) -> Path:
        return self.root / "probes" / "manifest.json"

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
        return self.finetune_dir(image_variant) / "manifest.json"

    # predictions of every arm, read by the report
    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    def predictions(self, arm: str, image_variant: str) -> Path:
        return self.predictions_dir / arm / f"{image_variant}.csv"

    def predictions_record(self, arm: str) -> Path:
        return self.predictions_dir / arm / "manifest.json"

    # report
    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def report_record(self) -> Path:
        return self.results_dir / "manifest.json"

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
        return self.results_dir / "saliency-manifest.json"
