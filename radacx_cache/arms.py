"""The experiment arms of Table 1, defined once: name, method, training images, published numbers.

Two words are kept apart throughout the package: an *image variant* is ``original`` or ``masked``
(how a radiograph is stored in the shards); an *arm* is one row of Table 1 (Baseline, V1-V4), a
model trained and tested in a given way.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_VARIANTS = ("original", "masked")


@dataclass(frozen=True)
class Arm:
    name: str
    method: str  # zeroshot | probe | finetune
    trained_on: str | None  # image variant of the training images (None: no training)
    description: str
    published: tuple[float, float]  # the paper's MIMIC-CXR accuracy on (original, masked) test images
    # how the saliency stage rebuilds its network: the encoder + the saved probe head, the fine-tuned
    # checkpoint, or None (zero-shot: no trained head to explain)
    rebuild: str | None = None


ARMS = (
    Arm("Baseline", "zeroshot", None, "zero-shot", (0.2367, 0.3467)),
    Arm("V1", "probe", "original", "linear head, original", (0.4460, 0.4509), "probe_head"),
    Arm("V2", "probe", "masked", "linear head, masked", (0.4205, 0.4215), "probe_head"),
    Arm("V3", "finetune", "original", "encoder + head, original", (0.4005, 0.4039), "checkpoint"),
    Arm("V4", "finetune", "masked", "encoder + head, masked", (0.3484, 0.4318), "checkpoint"),
)
ARM_BY_NAME = {a.name: a for a in ARMS}


def arm_for(method: str, trained_on: str | None) -> Arm:
    """The arm trained by ``method`` on ``trained_on`` images (e.g. probe + masked -> V2)."""
    for arm in ARMS:
        if arm.method == method and arm.trained_on == trained_on:
            return arm
    raise KeyError(f"no arm for method {method!r} trained on {trained_on!r}")


def variant_arm(method: str, trained_on: str) -> str:
    """The arm ``method`` trains on ``trained_on`` images: Table 1's V1-V4 for the stored variants, and
    ``V2-<variant>`` (probe) or ``V4-<variant>`` (fine-tune) for an overlay ablation's derived one."""
    if trained_on in IMAGE_VARIANTS:
        return arm_for(method, trained_on).name
    return f"{arm_for(method, 'masked').name}-{trained_on}"


def trained_on(arm: str) -> str | None:
    """The training image variant of an arm (the inverse of ``variant_arm``): V1-V4's from ``ARMS``,
    ``V2-<variant>`` / ``V4-<variant>``'s variant, None for the zero-shot baseline; KeyError for an unknown arm."""
    base, _, derived = arm.partition("-")
    return derived or ARM_BY_NAME[base].trained_on


def original_counterpart(arm: str) -> str | None:
    """The same method's arm trained on original images, for an arm trained on an overlay (V2 and
    V2-<variant>: V1; V4 and V4-<variant>: V3); None for any other arm."""
    base = ARM_BY_NAME.get(arm.partition("-")[0])
    if base is None or trained_on(arm) in (None, "original"):
        return None
    return arm_for(base.method, "original").name


def finetune_test_variants(trained_on: str, variants) -> tuple[str, ...]:
    """What a fine-tuned arm is tested on: V3 (original) on every variant of the shard set (the
    test-time side of the overlay ablation), V4 on original and masked, V4-<variant> on its own."""
    if trained_on == "original":
        return tuple(variants)
    return IMAGE_VARIANTS if trained_on in IMAGE_VARIANTS else (trained_on,)


# the overlay ablation's columns (docs/pipeline.md): what is compared across variants, and the arm
# whose predictions on a variant's test images fill each cell
ABLATION_COLUMNS = (
    ("zero-shot", lambda v: "Baseline"),
    ("linear head trained on original, tested on each variant", lambda v: "V1"),
    ("linear head trained and tested on each variant", lambda v: variant_arm("probe", v)),
    ("encoder + head fine-tuned on original, tested on each variant", lambda v: "V3"),
    ("encoder + head fine-tuned and tested on each variant", lambda v: variant_arm("finetune", v)),
)
