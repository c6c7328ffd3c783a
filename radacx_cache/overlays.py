"""Overlay variants (issue 22, docs/pipeline.md): named overlay settings for ablations, checked once.

A variant is the paper's overlay (``render.overlay``, ``line_width``, ``colors``, ``fill_alpha``) with
some settings replaced. Its full settings, as this module returns them, are what the shard stage
records in ``variants.json`` and what ``render.draw_variant`` draws from the stored original and
masks; their hash is part of each feature cache's fingerprint.
"""
from __future__ import annotations

import re

STYLES = ("boundary", "fill", "crop", "none")  # none: nothing drawn (equals original)
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


def paper_overlay(render: dict) -> dict:
    """The full settings of the paper's overlay (the stored ``masked`` variant) from render settings
    (``render.overlay``, ``line_width``, ``colors``, ``fill_alpha``): the config's, or a shard record's."""
    return {"style": render["overlay"], "line_width": render["line_width"],
            "colors": {k: list(v) for k, v in render["colors"].items()}, "ink": None,
            "structures": list(STRUCTURES), "fill_alpha": render["fill_alpha"]}


def overlay_variants(variants, paper: dict) -> dict:
    """``render.variants`` checked: {name: full settings} (``overlay_variant`` for each)."""
    if not isinstance(variants, dict) or len(variants) > MAX_VARIANTS:
        raise ValueError(f"config key 'render.variants': expected a mapping of at most {MAX_VARIANTS} "
                         f"names to overlay settings")
    return {name: overlay_variant(name, settings, paper) for name, settings in variants.items()}


def overlay_variant(name, settings, paper: dict) -> dict:
    """The full settings of variant ``name``: ``paper`` with ``settings`` on top, each checked;
    ValueError naming the config key and what is expected."""
    key = f"config key 'render.variants.{name}"
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED:
        raise ValueError(f"config key 'render.variants': name {str(name)[:40]!r} must be lower-case letters, "
                         f"digits and _ (at most 32), and not {' or '.join(RESERVED)}")
    settings = settings or {}
    unknown = sorted(set(settings) - set(paper)) if isinstance(settings, dict) else ["(not a mapping)"]
    if unknown:
        raise ValueError(f"{key}': unknown setting {unknown[0]!r}; valid: {', '.join(paper)}")
    spec = {**paper, **settings}
    if spec["style"] not in STYLES:
        raise ValueError(f"{key}.style': {spec['style']!r}; valid: {', '.join(STYLES)}")
    width = spec["line_width"]
    if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 64:
        raise ValueError(f"{key}.line_width': {width!r} is not an integer in [1, 64]")
    spec["colors"] = checked_colors(spec["colors"], paper["colors"], f"render.variants.{name}.colors")
    if spec["ink"] is not None and not _grey(spec["ink"]):
        raise ValueError(f"{key}.ink': {spec['ink']!r} is not a grey level 0-255 (or null for the colours)")
    structures = spec["structures"]
    if not isinstance(structures, list) or not set(structures) <= set(STRUCTURES) \
            or len(set(structures)) != len(structures):
        raise ValueError(f"{key}.structures': {structures!r}; expected a list of distinct {', '.join(STRUCTURES)}")
    spec["structures"] = [s for s in STRUCTURES if s in structures]  # one order: one fingerprint
    alpha = spec["fill_alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= 1:
        raise ValueError(f"{key}.fill_alpha': {alpha!r} is not in (0, 1]")
    spec["fill_alpha"] = float(alpha)
    return spec


def checked_full_variants(variants) -> dict:
    """Variants as a record holds them (``variants.json``: full settings), each checked again on
    reading: a workdir others can write must not hand a reader a name that leaves the folder
    (``features/<tag>/<name>.h5``) or a line width that draws for hours."""
    if not isinstance(variants, dict) or len(variants) > MAX_VARIANTS:
        raise ValueError(f"'variants' is not a mapping of at most {MAX_VARIANTS} variants")
    out = {}
    for name, spec in variants.items():
        if not isinstance(spec, dict) or sorted(spec) != sorted(SETTINGS):
            raise ValueError(f"variant {str(name)[:40]!r}: expected exactly the settings {', '.join(SETTINGS)}")
        out[name] = overlay_variant(name, {}, spec)
    return out
