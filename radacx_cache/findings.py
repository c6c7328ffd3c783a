"""The finding lists and the target rule, defined once at the bottom of the package.

``FINDINGS_ALL`` are the 14 CheXpert-labeler columns every archive's table is mapped to (the
shards' ``labels`` in this order); ``FINDINGS`` the paper's five. ``first_positive`` is *the*
rule that makes a multi-positive image one class: the cohort stage uses it for the training
target under ``multi_positive=first``, the metrics for the headline reading, saliency for the class
it explains. It takes the order from the cohort's record (``target_order``), never from a config.
"""
from __future__ import annotations

import numpy as np

FINDINGS_ALL = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices")
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def target_order(classes, priority) -> list[int]:
    """Class indices in the order a multi-positive image's target is chosen: ``priority`` first
    (names not among ``classes`` skipped), then the remaining classes in class order."""
    classes = list(classes)
    order = [classes.index(c) for c in priority if c in classes]
    return order + [i for i in range(len(classes)) if i not in order]


def first_positive(positives, order=None) -> np.ndarray:
    """(N,) the first positive class of each row, in ``order`` (class indices; default class order).
    A row without a positive gets ``order[0]`` (callers mask such rows out)."""
    pos = np.asarray(positives) > 0
    order = np.arange(pos.shape[1]) if order is None else np.asarray(order, int)
    return order[pos[:, order].argmax(1)] if len(pos) else np.zeros(0, int)
