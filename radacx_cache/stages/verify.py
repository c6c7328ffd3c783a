"""``radacx verify WORKDIR``: re-hash every stage record's files and check every chain.

Prints one line per record, upstream first: ``intact`` with its fingerprint and the number of files
it covers, or ``BROKEN`` with the reason and the command that fixes it. Nothing is written but the
verified-once caches (``.verified.json``) of the folders found intact.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..formats.records import RecordError, Verifier, rel_to
from ..workdir import RECORD_NAMES


def find_records(root: Path) -> list[Path]:
    """Every stage record under ``root``, in pipeline order. Links are not followed, but a record one
    or two folders behind a folder link is listed (as seen through the link), so that verify names it
    BROKEN instead of passing over it."""
    found = [p for p in root.rglob("*.json") if p.name in RECORD_NAMES and not p.is_symlink()]
    for folder, dirs, _ in os.walk(root):
        for d in dirs:
            link = Path(folder) / d
            if link.is_symlink():
                found += [p for pattern in ("*", "*/*") for p in link.glob(pattern) if p.name in RECORD_NAMES]

    def rank(path: Path):
        top = rel_to(root, path).split("/")[0]
        names = {"cohort": 0, "shards": 1, "features": 2, "zeroshot": 3, "probes": 4, "finetune": 5,
                 "predictions": 6, "results": 7 if path.name.startswith("saliency") else 8}
        return names.get(top, 9), rel_to(root, path)
    return sorted(found, key=rank)


def verify_workdir(root: str | Path) -> tuple[list[str], bool]:
    """(one line per record and a closing verdict line, all intact)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such workdir")
    records = find_records(root)
    if not records:
        return [f"{root}: no stage records (no stage has finished here)"], False
    verifier, lines, ok = Verifier(root, rehash=True, refuse_links=True), [], True
    for path in records:
        try:
            rec = verifier.record(path)
            n = len(rec.get("files", {}))
            lines.append(f"intact  {rel_to(root, path)}  ({rec.get('stage')}, {n} file(s), {rec.fingerprint})")
        except RecordError as exc:
            ok = False
            lines.append(f"BROKEN  {rel_to(root, path)}: {exc}")
    broken = sum(line.startswith("BROKEN") for line in lines)
    lines.append(f"verdict: {'INTACT' if ok else 'BROKEN'}: {len(lines) - broken} of {len(lines)} records intact"
                 + ("" if ok else f", {broken} broken (rerun the command each BROKEN line names)"))
    return lines, ok
