"""Typed decisions of the records that later stages read (docs/records.md): one small frozen dataclass
per record kind, built and validated when the record is read (``records.read_record``).

A record's fingerprint proves it is the one its stage wrote, not that its values are sane: a record
handed over from elsewhere can be re-sealed. So the fields later stages act on (the cohort's classes,
target order and label policy; the shard set's class names and rules; an arm's model and test
variants) are checked here once, with one error naming the field, instead of failing deep in a stage.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass

from ..config import CohortConfig

_POLICY_CHOICES = {name: typing.get_args(hint) for name, hint in typing.get_type_hints(CohortConfig).items()
                   if typing.get_origin(hint) is typing.Literal}
MAX_CLASSES = 64


def _text(data: dict, key: str, choices=None) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > 400:
        raise ValueError(f"{key!r} is {value!r}, expected a non-empty string")
    if choices is not None and value not in choices:
        raise ValueError(f"{key!r} is {value!r}, expected one of {', '.join(choices)}")
    return value


def _names(data: dict, key: str) -> tuple[str, ...]:
    value = data.get(key)
    if (not isinstance(value, list) or not 0 < len(value) <= MAX_CLASSES
            or not all(isinstance(v, str) and v for v in value) or len(set(value)) != len(value)):
        raise ValueError(f"{key!r} is {str(value)[:120]}, expected a list of 1-{MAX_CLASSES} distinct names")
    return tuple(value)


def _count(data: dict, key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key!r} is {value!r}, expected a count")
    return value


def _order(data: dict, key: str, classes: tuple[str, ...]) -> tuple[str, ...]:
    order = _names(data, key)
    if sorted(order) != sorted(classes):
        raise ValueError(f"{key!r} {list(order)} is not an order of the classes {list(classes)}")
    return order


@dataclass(frozen=True)
class LabelPolicy:
    """The cohort's label policy (``cohort.*`` as the cohort stage applied it) and the archive's own rules."""
    uncertain: str
    multi_positive: str
    priority: tuple[str, ...]
    split: str
    val_fraction: float
    min_mask_quality: float
    views: tuple[str, ...]
    seed: int
    archive_rules: dict  # Archive.policy: e.g. PadChest's physician-only choice

    @classmethod
    def from_data(cls, data) -> "LabelPolicy":
        if not isinstance(data, dict):
            raise ValueError(f"'policy' is {data!r}, expected a mapping")
        numbers = {}
        for key, low, high in (("val_fraction", 0.0, 1.0), ("min_mask_quality", 0.0, 1.0)):
            v = data.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise ValueError(f"policy {key!r} is {v!r}, expected a number in [{low}, {high}]")
            numbers[key] = float(v)
        known = ("uncertain", "multi_positive", "priority", "split", "val_fraction", "min_mask_quality", "views",
                 "seed")
        priority = data.get("priority") or []
        if not isinstance(priority, list) or not all(isinstance(p, str) for p in priority):
            raise ValueError(f"policy 'priority' is {str(priority)[:80]}, expected a list of class names")
        return cls(uncertain=_text(data, "uncertain", _POLICY_CHOICES["uncertain"]),
                   multi_positive=_text(data, "multi_positive", _POLICY_CHOICES["multi_positive"]),
                   priority=tuple(priority), split=_text(data, "split", _POLICY_CHOICES["split"]),
                   views=_names(data, "views"), seed=_count(data, "seed"), **numbers,
                   archive_rules={k: v for k, v in data.items() if k not in known})

    def as_dict(self) -> dict:
        """The policy as the record holds it, keys sorted as every record's are (Table 1's provenance)."""
        policy = {"uncertain": self.uncertain, "multi_positive": self.multi_positive, "priority": list(self.priority),
                  "split": self.split, "val_fraction": self.val_fraction, "min_mask_quality": self.min_mask_quality,
                  "views": list(self.views), "seed": self.seed, **self.archive_rules}
        return dict(sorted(policy.items()))


@dataclass(frozen=True)
class CohortFacts:
    """What the cohort record decides for every later stage."""
    classes: tuple[str, ...]
    target_order: tuple[str, ...]  # the order that makes a multi-positive image one class (findings.first_positive)
    policy: LabelPolicy
    archive: str
    archive_name: str
    synthetic_archive: bool
    rows: int
    rejects: int

    @classmethod
    def from_data(cls, data: dict) -> "CohortFacts":
        classes = _names(data, "classes")
        return cls(classes=classes, target_order=_order(data, "target_order", classes),
                   policy=LabelPolicy.from_data(data.get("policy")), archive=_text(data, "archive"),
                   archive_name=str(data.get("archive_name", "MIMIC-CXR-JPG")),
                   synthetic_archive=bool(data.get("synthetic_archive")), rows=_count(data, "rows"),
                   rejects=_count(data, "rejects"))


@dataclass(frozen=True)
class ShardFacts:
    """What the shard record carries for readers that have only the shard folder."""
    target_names: tuple[str, ...]
    target_order: tuple[str, ...]
    multi_positive: str
    uncertain: str
    render_fingerprint: str
    archive: str
    rows: int
    rejects: int

    @classmethod
    def from_data(cls, data: dict) -> "ShardFacts":
        names = _names(data, "target_names")
        if not isinstance(data.get("render_config"), dict) or not isinstance(data.get("shards"), list):
            raise ValueError("'render_config' and 'shards' must be a mapping and a list")
        _shard_entries(data)
        return cls(target_names=names, target_order=_order(data, "target_order", names),
                   multi_positive=_text(data, "multi_positive", _POLICY_CHOICES["multi_positive"]),
                   uncertain=_text(data, "uncertain", _POLICY_CHOICES["uncertain"]),
                   render_fingerprint=_text(data, "render_fingerprint"), archive=_text(data, "archive"),
                   rows=_count(data, "rows"), rejects=_count(data, "rejects"))


@dataclass(frozen=True)
class ArmFacts:
    """An arm's predictions record: which model made them, on which test image variants."""
    arm: str
    tested_on: tuple[str, ...]
    model_spec: str
    model_fingerprint: str
    weights_seed: int | None
    training: dict | None  # the settings it was trained with (probe.*, finetune.*); None: not recorded (zero-shot)

    @classmethod
    def from_data(cls, data: dict) -> "ArmFacts":
        seed = data.get("weights_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"'weights_seed' is {seed!r}, expected an integer or null")
        return cls(arm=_text(data, "arm"), tested_on=_names(data, "tested_on"), model_spec=_text(data, "model_spec"),
                   model_fingerprint=_text(data, "model_fingerprint"), weights_seed=seed,
                   training=_settings(data.get("training")))


def _settings(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 100 or not all(isinstance(k, str) for k in value):
        raise ValueError(f"'training' is {str(value)[:80]}, expected a mapping of settings")
    return value


KINDS = {"cohort": CohortFacts, "shards": ShardFacts, "predictions": ArmFacts}


def check_listing(data: dict) -> None:
    """Every record's ``files`` ({name: {bytes, sha256}}) and ``upstream`` ({record: fingerprint}) have
    their declared shape (a record sealed elsewhere may hold anything)."""
    files, upstream = data.get("files", {}), data.get("upstream", {})
    if not isinstance(files, dict) or not isinstance(upstream, dict):
        raise ValueError("'files' and 'upstream' must be mappings")
    for name, entry in files.items():
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if (isinstance(size, bool) or not isinstance(size, int) or size < 0
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64):
            raise ValueError(f"'files' entry {str(name)[:80]!r} is {str(entry)[:80]}, expected {{bytes, sha256}}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in upstream.items()):
        raise ValueError("'upstream' must map record paths to fingerprints")


def _shard_entries(data: dict) -> None:
    for entry in data.get("shards"):
        if (not isinstance(entry, dict) or not isinstance(entry.get("name"), str)
                or not all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) and entry[k] >= 0
                           for k in ("rows", "bytes"))):
            raise ValueError(f"'shards' entry {str(entry)[:80]} is not {{name, split, rows, bytes, sha256}}")


def record_facts(stage: str, data: dict):
    """The typed facts of a record of ``stage`` (None for a kind without any); ValueError naming the field."""
    check_listing(data)
    kind = KINDS.get(stage)
    return None if kind is None else kind.from_data(data)
