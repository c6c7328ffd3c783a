"""Run configuration: versioned data, loaded from YAML, overridable with ``--set key=value``.

Every stage reads its own section. Unknown keys and wrong types are errors that name the key,
because a typo in a config silently falling back to a default is the worst kind of bug here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ._yaml import plain_yaml as _yaml
from .findings import FINDINGS, FINDINGS_ALL
from .overlays import DEFAULT_COLORS, PAPER_STYLES, OverlaySpec, checked_colors, overlay_variants
from .sources.archive import ARCHIVES, archive

ARCHIVE_KIND = Literal[tuple(ARCHIVES)]  # type: ignore[valid-type]  # the registry's (sources/), never listed here
CONFIG_VERSION = 3  # 3: archive.kind, archive.root (was mimic_root), phantom.layout


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def _within(default, minimum, maximum):
    """A numeric field whose values outside [minimum, maximum] are refused at load time (every
    config number is bounded: a value from an untrusted file cannot ask for 10^5 processes)."""
    return field(default=default, metadata={"min": minimum, "max": maximum})


def _open_interval(key: str, value: float, low: float, high: float) -> None:
    if not low < value < high:
        raise ConfigError(f"config key '{key}': {value!r} is not in ({low}, {high})")


@dataclass
class ArchiveConfig:
    """Which archive the cohort reads (docs/archives.md): its kind, its root folder, its CheXmask file."""
    kind: ARCHIVE_KIND = "mimic"
    # the archive's folder; what it holds: the header of pipelines/<kind>.yaml and docs/archives.md
    root: str = "data/phantom/mimic-cxr-jpg/2.0.0"
    chexmask_csv: str = "data/phantom/chexmask-cxr-segmentation-data/1.0.0/OriginalResolution/MIMIC-CXR-JPG.csv"
    labeler: Literal["chexpert", "negbio"] = "chexpert"  # MIMIC only: which of its two label tables
    strict_links: bool = False  # false: links inside the archive are its owner's; true: files must resolve inside root
    options: dict = field(default_factory=dict)  # this kind's own options (its class's ``options``)

    def __post_init__(self):
        try:
            self.options = archive(self.kind).checked_options(self.options) if self.options else {}
        except (KeyError, ValueError) as exc:
            raise ConfigError(str(exc).strip('"')) from None


@dataclass
class PhantomConfig:
    out: str = "data/phantom"
    layout: ARCHIVE_KIND = "mimic"  # which archive's file and table layout
    n_patients: int = _within(300, 1, 100_000)
    long_side: int = _within(448, 64, 4096)  # scaled down for speed; real MIMIC images are ~3000 px
    faults: bool = True


@dataclass
class CohortConfig:
    views: list = field(default_factory=lambda: ["PA", "AP"])
    classes: list = field(default_factory=lambda: list(FINDINGS))
    uncertain: Literal["ignore", "zeros", "ones"] = "ignore"
    multi_positive: Literal["any", "single", "first"] = "first"  # the headline (argmax) reading's target
    priority: list = field(default_factory=lambda: list(FINDINGS))
    min_mask_quality: float = _within(0.7, 0.0, 1.0)
    split: Literal["official", "paper"] = "paper"
    val_fraction: float = 1 / 6  # paper: train:val ~ 5:1; in (0, 1)
    min_readers: int = _within(2, 1, 3)  # VinDr-CXR: readers who must mark a finding for a 1 (fewer: -1)

    def __post_init__(self):
        _open_interval("cohort.val_fraction", self.val_fraction, 0.0, 1.0)


@dataclass
class RenderConfig:
    size: int = _within(224, 16, 1024)
    overlay: Literal[PAPER_STYLES] = "boundary"  # type: ignore[valid-type]  # overlays.py owns the styles
    line_width: int = _within(2, 1, 64)
    colors: dict = field(default_factory=lambda: dict(DEFAULT_COLORS))
    fill_alpha: float = 0.35
    draft: bool = True  # reduced-size JPEG decoding where the result is equivalent at `size`
    mask_supersample: int = _within(2, 1, 8)
    variants: dict = field(default_factory=dict)  # overlay ablations: name -> settings, drawn at read time

    def __post_init__(self):
        if not 0 < self.fill_alpha <= 1:
            raise ConfigError(f"config key 'render.fill_alpha': {self.fill_alpha!r} is not in (0, 1]")
        try:  # a partial `colors` (e.g. only the heart) is merged with the defaults
            self.colors = checked_colors(self.colors, DEFAULT_COLORS, "render.colors")
            self.variants = overlay_variants(self.variants, self.paper_overlay())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def paper_overlay(self) -> OverlaySpec:
        """The full settings of the paper's overlay, the stored ``masked`` variant."""
        return OverlaySpec.paper({"overlay": self.overlay, "line_width": self.line_width, "colors": self.colors,
                              "fill_alpha": self.fill_alpha})


@dataclass
class ShardsConfig:
    rows_per_shard: int = _within(1024, 1, 1 << 20)
    n_jobs: int = _within(2, 1, 1024)
    max_reject_share: float = _within(0.05, 0.0, 1.0)  # more of the cohort rejected than this: stop, reasons counted
    backend: Literal["loky", "dask", "sequential", "threading"] = "loky"
    dask_scheduler: str = ""  # address of a running Dask scheduler; empty: start a local cluster


@dataclass
class ModelConfig:
    """The encoder every model stage loads (embed, zeroshot, probe, finetune): see docs/models.md."""
    spec: str = "tiny"  # tiny | biomedclip | biomedclip-random | a local directory | openclip:NAME


@dataclass
class RuntimeConfig:
    """Where and how models run, for every stage that runs one."""
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False


@dataclass
class EmbedConfig:
    batch_size: int = _within(256, 1, 65536)
    num_workers: int = _within(0, 0, 256)
    block_rows: int = _within(4096, 1, 1 << 20)


@dataclass
class ProbeConfig:
    feature: Literal["features", "pre_projection"] = "features"
    preprocess: Literal["standardize", "l2", "none"] = "standardize"
    c_min_log10: float = _within(-6.0, -12.0, 12.0)
    c_max_log10: float = _within(6.0, -12.0, 12.0)
    refine_steps: int = _within(4, 0, 20)
    patience: int = _within(2, 1, 100)  # grid points in a row below the best before the walk stops
    max_iter: int = _within(500, 1, 100_000)
    tol: float = _within(1e-4, 1e-12, 1.0)  # largest gradient component at convergence (scikit-learn's rule)
    sweep_max_rows: int = _within(0, 0, 1 << 32)  # >0: inexact shortcut, search C on a subsample of this many rows

    def __post_init__(self):
        if self.c_min_log10 > self.c_max_log10:
            raise ConfigError(f"config keys 'probe.c_min_log10' {self.c_min_log10} > 'probe.c_max_log10' "
                              f"{self.c_max_log10}")


@dataclass
class ZeroShotConfig:
    template: str = "this is a photo of "
    prompts: dict = field(default_factory=dict)  # class -> list of prompts (ensembled)


@dataclass
class FinetuneConfig:
    epochs: int = _within(3, 1, 1000)
    batch_size: int = _within(32, 1, 65536)
    lr_encoder: float = _within(1e-5, 0.0, 1.0)
    lr_head: float = _within(1e-3, 1e-12, 1.0)
    weight_decay: float = _within(0.05, 0.0, 10.0)
    warmup_steps: int = _within(20, 0, 10_000_000)
    grad_clip: float = _within(1.0, 1e-6, 1e6)
    accumulate: int = _within(1, 1, 4096)
    shuffle_buffer: int = _within(512, 0, 10_000_000)
    block_rows: int = _within(64, 1, 1 << 20)
    num_workers: int = _within(0, 0, 256)
    augment: bool = False  # small crop/rotation/intensity jitter; hurt the small phantom task
    patience: int = _within(3, 1, 1000)
    grad_checkpointing: bool = False
    max_steps: int = _within(0, 0, 1 << 40)  # 0: no cap (tests cap it)
    checkpoint_every: int = _within(50, 0, 1 << 40)  # optimiser steps between mid-epoch checkpoints (0: epoch ends only)
    variants: list = field(default_factory=list)  # also fine-tune on these render.variants (V4-<name>; costly)


@dataclass
class SaliencyConfig:
    methods: list = field(default_factory=lambda: ["gradcam", "integrated_gradients"])
    check_method: Literal["gradcam", "integrated_gradients"] = "integrated_gradients"  # fixed before the run
    images: int = _within(48, 2, 100_000)  # seeded test images per arm (the same for every arm and variant)
    ig_steps: int = _within(16, 2, 1024)  # Integrated Gradients path steps
    batch_size: int = _within(16, 1, 4096)
    panels: int = _within(4, 0, 64)  # images per arm in the figure (half correct, half wrong)
    variants: list = field(default_factory=list)  # overlay ablations: derived variants (render.variants) also explained
    target: Literal["contrastive", "logit"] = "contrastive"  # contrastive: the target logit - the mean logit
    baseline: Literal["blur", "black"] = "blur"  # Integrated Gradients' baseline image
    fill: Literal["blur", "mean"] = "blur"  # what occlusion and the deletion/insertion curves put in
    blur_sigma: float = _within(8.0, 0.5, 64.0)  # pixels at the shards' size, for the blurred baseline and fill
    occlusion: bool = True  # regions deleted / kept alone, beside equal-area controls (docs/saliency.md)
    curves: bool = True  # deletion and insertion curves of each map against maps made without the model
    curve_steps: int = _within(8, 2, 256)
    cascade: bool = True  # cascading encoder randomisation: rank correlation of the maps
    boxed_images: int = _within(200, 0, 100_000)  # every test image with boxes joins the sample, up to this many

    def __post_init__(self):
        unknown = sorted(set(self.methods) - {"gradcam", "integrated_gradients"})
        if unknown or not self.methods:
            raise ConfigError(f"config key 'saliency.methods': {unknown or self.methods!r}; valid: gradcam, "
                              f"integrated_gradients")
        if self.check_method not in self.methods:
            raise ConfigError(f"config key 'saliency.check_method': {self.check_method!r} is not among "
                              f"saliency.methods {self.methods}")


@dataclass
class ReportConfig:
    bootstrap: int = _within(1000, 10, 100_000)


@dataclass
class Config:
    config_version: int = CONFIG_VERSION
    seed: int = _within(0, 0, 2**32 - 1)
    workdir: str = "runs/demo"
    # who may read what the stages write (MIMIC-CXR is under a data use agreement): umask | group | private
    permissions: Literal["umask", "group", "private"] = "umask"
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    cohort: CohortConfig = field(default_factory=CohortConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, typ, key):
    origin = typing.get_origin(typ) or typ
    if origin is Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(typ, value, key + ".")
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}") from None
    if typ is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}': {value!r} is not a finite number")
        return number
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return value
    if origin is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {(prefix + str(unknown[0]))[:80]!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        kwargs[name] = _coerce(value, hints[name], key)
        low, high = fields[name].metadata.get("min"), fields[name].metadata.get("max")
        if low is not None and not low <= kwargs[name] <= high:
            raise ConfigError(f"config key '{key}': {kwargs[name]!r} is outside its range [{low}, {high}]")
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


# version 1 kept the model and runtime settings in the embed section, though five stages read them
_MOVED_IN_V2 = {"model": ("model", "spec"), "device": ("runtime", "device"),
                "precision": ("runtime", "precision"), "channels_last": ("runtime", "channels_last"),
                "compile": ("runtime", "compile")}


def _migrate(data: dict, version: int) -> dict:
    """An older config in the current version's shape: v1 kept the model and runtime keys in
    ``embed``; v2 named the archive folder ``archive.root`` (MIMIC was the only kind)."""
    data = json.loads(json.dumps(data))
    if version < 2:
        embed = data.get("embed") or {}
        for old, (section, key) in _MOVED_IN_V2.items():
            if old in embed:
                data.setdefault(section, {})[key] = embed.pop(old)
    if version < 3 and isinstance(data.get("archive"), dict) and "mimic_root" in data["archive"]:
        data["archive"]["root"] = data["archive"].pop("mimic_root")
    data["config_version"] = CONFIG_VERSION
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply ``key=value`` overrides.

    >>> load_config(None, ["seed=3"]).seed
    3
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = _yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:  # e.g. a python/object tag: safe_load refuses to build it
            raise ConfigError(f"config file {path}: not plain YAML data ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = _yaml(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: not a plain value ({str(exc).splitlines()[0]})") from None
        _set_dotted(data, key.strip(), value)
    version = data.get("config_version", CONFIG_VERSION)
    if version in (1, 2):
        data = _migrate(data, version)
    elif version != CONFIG_VERSION:
        raise ConfigError(
            f"config_version {version} is not supported (this radacx-cache reads version {CONFIG_VERSION})")
    cfg = _build(Config, data)
    unknown_classes = sorted(set(cfg.cohort.classes) - set(FINDINGS_ALL))
    if unknown_classes:
        raise ConfigError(f"config key 'cohort.classes': unknown label {unknown_classes[0]!r}; "
                          f"valid: {', '.join(FINDINGS_ALL)}")
    if cfg.archive.labeler != "chexpert" and cfg.archive.kind != "mimic":
        raise ConfigError(f"config key 'archive.labeler': {cfg.archive.labeler!r} exists only for MIMIC-CXR-JPG; "
                          f"{cfg.archive.kind} has one label table")
    for key, names in (("finetune.variants", cfg.finetune.variants), ("saliency.variants", cfg.saliency.variants)):
        unknown = [v for v in names if v not in cfg.render.variants]
        if unknown:
            raise ConfigError(f"config key '{key}': {unknown[0]!r} is not one of render.variants "
                              f"({', '.join(cfg.render.variants) or 'none defined'}); original and masked are always in")
    return cfg

