"""Overlay variants (issue 22, docs/pipeline.md): named overlay settings for ablations, checked once.

A variant is the paper's overlay (``render.overlay``, ``line_width``, ``colors``, ``fill_alpha``) with
some settings replaced. Its full settings, as this module returns them, are what the shard stage
records in ``variants.json`` and what ``render.draw_variant`` draws from the stored original and
masks; their hash is part of each feature cache's fingerprint.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PAPER_STYLES = ("boundary", "fill", "crop")  # what the paper's overlay (render.overlay) may be
STYLES = (*PAPER_STYLES, "none")  # a variant may also draw nothing (equals original)
# the patient's right lung red, left lung green, heart blue (docs/shard-format.md: a contract)
DEFAULT_COLORS = {"right_lung": [255, 0, 0], "left_lung": [0, 255, 0], "heart": [0, 0, 255]}
STRUCTURES = ("right_lung", "left_lung", "heart")  # the order of every mask stack (sources.chexmask.MASK_NAMES)
RESERVED = ("original", "masked")  # stored in every shard; masked is the paper's overlay
MAX_VARIANTS = 16
SETTINGS = ("style", "line_width", "colors", "ink", "structures", "fill_alpha")  # a variant's full settings
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _grey(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255


def checked_colors(colors, defaults: dict, key: str) -> dict:
    """``colors`` merged onto ``defaults`` (a partial mapping, e.g. only the heart, is fine), one RGB
    triple of 0-255 integers per structure; ValueError naming the config ``key``."""
    if colors is not None and not isinstance(colors, dict):
        raise ValueError(f"config key '{key}': expected a mapping of {', '.join(STRUCTURES)} to RGB triples")
    merged = {**defaults, **(colors or {})}
    unknown = sorted(set(merged) - set(STRUCTURES))
    if unknown:
        raise ValueError(f"config key '{key}': unknown structure {unknown[0]!r}; valid: {', '.join(STRUCTURES)}")
    for name, rgb in merged.items():
        if not (isinstance(rgb, (list, tuple)) and len(rgb) == 3 and all(_grey(v) for v in rgb)):
            raise ValueError(f"config key '{key}.{name}': {rgb!r} is not an RGB triple of 0-255 integers")
    return {k: list(merged[k]) for k in STRUCTURES}


@dataclass(frozen=True)
class OverlaySpec:
    """The full settings of one overlay: how ``render.draw_variant`` draws it from an original and its
    masks. The one type of the paper's overlay (the stored ``masked``) and of every derived variant:
    the config builds it (``RenderConfig``), records store ``as_dict()``, readers rebuild it with
    ``from_record`` (checked again: a workdir others can write is untrusted)."""
    style: str  # STYLES
    line_width: int
    colors: dict  # structure -> [r, g, b], every structure of STRUCTURES
    ink: int | None  # one grey level for every structure instead of the colours (None: the colours)
    structures: tuple  # the structures drawn, in STRUCTURES order
    fill_alpha: float

    @classmethod
    def paper(cls, render: dict) -> "OverlaySpec":
        """The paper's overlay from render settings (``overlay``, ``line_width``, ``colors``,
        ``fill_alpha``): the config's, or a shard record's ``render_config``."""
        return cls(style=render["overlay"], line_width=render["line_width"],
                   colors={k: list(v) for k, v in render["colors"].items()}, ink=None, structures=STRUCTURES,
                   fill_alpha=render["fill_alpha"])

    @classmethod
    def checked(cls, name, settings, base: "OverlaySpec") -> "OverlaySpec":
        """Variant ``name``: ``base`` with ``settings`` on top, each checked; ValueError naming the config
        key and what is expected."""
        key = f"config key 'render.variants.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED:
            raise ValueError(f"config key 'render.variants': name {str(name)[:40]!r} must be lower-case letters, "
                             f"digits and _ (at most 32), and not {' or '.join(RESERVED)}")
        settings = settings or {}
        unknown = sorted(set(settings) - set(SETTINGS)) if isinstance(settings, dict) else ["(not a mapping)"]
        if unknown:
            raise ValueError(f"{key}': unknown setting {unknown[0]!r}; valid: {', '.join(SETTINGS)}")
        spec = {**base.as_dict(), **settings}
        if spec["style"] not in STYLES:
            raise ValueError(f"{key}.style': {spec['style']!r}; valid: {', '.join(STYLES)}")
        width = spec["line_width"]
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 64:
            raise ValueError(f"{key}.line_width': {width!r} is not an integer in [1, 64]")
        colors = checked_colors(spec["colors"], base.colors, f"render.variants.{name}.colors")
        if spec["ink"] is not None and not _grey(spec["ink"]):
            raise ValueError(f"{key}.ink': {spec['ink']!r} is not a grey level 0-255 (or null for the colours)")
        structures = spec["structures"]
        if not isinstance(structures, (list, tuple)) or not set(structures) <= set(STRUCTURES) \
                or len(set(structures)) != len(structures):
            raise ValueError(f"{key}.structures': {structures!r}; expected a list of distinct {', '.join(STRUCTURES)}")
        alpha = spec["fill_alpha"]
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= 1:
            raise ValueError(f"{key}.fill_alpha': {alpha!r} is not in (0, 1]")
        return cls(style=spec["style"], line_width=width, colors=colors, ink=spec["ink"],
                   structures=tuple(s for s in STRUCTURES if s in structures),  # one order: one fingerprint
                   fill_alpha=float(alpha))

    @classmethod
    def from_record(cls, name, spec) -> "OverlaySpec":
        """A variant as a record holds it (exactly ``SETTINGS``), checked as the config's are."""
        if not isinstance(spec, dict) or sorted(spec) != sorted(SETTINGS):
            raise ValueError(f"variant {str(name)[:40]!r}: expected exactly the settings {', '.join(SETTINGS)}")
        base = cls(style="none", line_width=1, colors=dict(DEFAULT_COLORS), ink=None, structures=STRUCTURES,
                   fill_alpha=1.0)
        return cls.checked(name, spec, base)

    def as_dict(self) -> dict:
        """The settings as records store and hash them (``variants.json``, feature caches' fingerprints)."""
        return {"style": self.style, "line_width": self.line_width,
                "colors": {k: list(v) for k, v in self.colors.items()}, "ink": self.ink,
                "structures": list(self.structures), "fill_alpha": self.fill_alpha}


def overlay_variants(variants, paper: OverlaySpec) -> dict:
    """``render.variants`` checked: {name: full settings as a dict} (``OverlaySpec.checked`` for each)."""
    if not isinstance(variants, dict) or len(variants) > MAX_VARIANTS:
        raise ValueError(f"config key 'render.variants': expected a mapping of at most {MAX_VARIANTS} "
                         f"names to overlay settings")
    return {name: OverlaySpec.checked(name, settings, paper).as_dict() for name, settings in variants.items()}


def checked_full_variants(variants) -> dict:
    """Variants as a record holds them (``variants.json``: full settings), each checked again on
    reading: a workdir others can write must not hand a reader a name that leaves the folder
    (``features/<tag>/<name>.h5``) or a line width that draws for hours. {name: OverlaySpec}."""
    if not isinstance(variants, dict) or len(variants) > MAX_VARIANTS:
        raise ValueError(f"'variants' is not a mapping of at most {MAX_VARIANTS} variants")
    return {name: OverlaySpec.from_record(name, spec) for name, spec in variants.items()}
