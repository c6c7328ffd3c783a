"""The on-disk layout of a run: every path under ``workdir`` is spelled here and nowhere else.

::

    cohort/      cohort.csv  rejects.csv  masks-rle.h5  manifest.json
    shards/      <split>-NNNNN.h5 (+ .json sidecars)  index.csv  rejects.csv  manifest.json
    features/<model-tag>/<image-variant>.h5
    zeroshot/<model-tag>/text.npz
    finetune/<image-variant>/  last.pt  best.pt  summary.json  train_log.csv
    predictions/<arm>/<image-variant>.csv (+ .json provenance)
    probes/<arm>.npz                      the fitted linear heads (V1, V2)
    results/     table1.{md,csv,json,tex}  metrics.json  figures  saliency.{md,csv,json}  saliency/
"""
from __future__ import annotations

from pathlib import Path


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

    # embed stage
    def features_dir(self, model_tag: str) -> Path:
        return self.root / "features" / model_tag

    def features(self, model_tag: str, image_variant: str) -> Path:
        return self.features_dir(model_tag) / f"{image_variant}.h5"

    def features_partial(self, model_tag: str, image_variant: str, rank: int = 0, world: int = 1) -> Path:
        """The file a (rank's) unfinished cache is built in; renamed to ``features`` when complete."""
        name = f".{image_variant}.h5.partial" if world == 1 else f".{image_variant}.rank{rank}of{world}.partial"
        return self.features_dir(model_tag) / name

    # zero-shot
    def zeroshot_text(self, model_tag: str) -> Path:
        return self.root / "zeroshot" / model_tag / "text.npz"

    # probes: the fitted linear heads (V1, V2), for saliency
    def probe_weights(self, arm: str) -> Path:
        return self.root / "probes" / f"{arm}.npz"

    # fine-tune
    def finetune_dir(self, image_variant: str) -> Path:
        return self.root / "finetune" / image_variant

    # predictions of every arm, read by the report
    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    def predictions(self, arm: str, image_variant: str) -> Path:
        return self.predictions_dir / arm / f"{image_variant}.csv"

    # report
    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def saliency_dir(self) -> Path:
        return self.results_dir / "saliency"
