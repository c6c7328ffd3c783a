"""Results a researcher loads: every number of a workdir's report and saliency stage as one tidy table
(docs/results-format.md).

>>> from radacx_cache import results
>>> df = results.load("runs/demo")                       # doctest: +SKIP
>>> df[(df.section == "table1") & (df.quantity == "accuracy")]   # doctest: +SKIP

One row per number: ``section`` (``table1``, ``table1_difference``, ``ablation``, ``saliency``,
``occlusion``, ``occlusion_control``, ``arm_contrast``, ``curves``, ``cascade``), ``arm``,
``trained_on``, ``tested_on``, ``quantity`` (what the value is), ``detail`` (the reading, region,
mode, control or method it is for), ``value``, ``low``, ``high`` (its 95% patient-bootstrap CI; NaN
where none), ``p`` and ``p_below`` (a paired difference's two-sided p; ``p_below`` True means
p < ``p``, the bound 2/B when no replicate crossed 0: p is never 0), ``n`` and ``n_boot``. The files
are read through their verified records (a file changed since its stage wrote it is refused).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ._io import read_json
from .arms import trained_on
from .formats.records import Verifier
from .workdir import Workdir

COLUMNS = ["section", "arm", "trained_on", "tested_on", "quantity", "detail", "value", "low", "high", "p", "p_below",
           "n", "n_boot"]
NAN = float("nan")


def load(workdir: str | Path, verify: bool = True) -> pd.DataFrame:
    """The tidy results of ``workdir`` (the report's files, and the saliency stage's where it ran)."""
    work = Workdir(workdir)
    verifier = Verifier(work.root) if verify else None
    rows: list[dict] = []
    if work.report_record.exists():
        rec = verifier.record(work.report_record, "report") if verifier else None
        n_boot = _table1(read_json(_file(rec, work.result("table1.json"))), rows)
        if work.result("ablation.json").exists() and (rec is None or "ablation.json" in rec.get("files", {})):
            _ablation(read_json(_file(rec, work.result("ablation.json"))), rows, n_boot)
    if work.saliency_record.exists():
        rec = verifier.record(work.saliency_record, "saliency") if verifier else None
        _saliency(read_json(_file(rec, work.saliency_file("json"))), rows)
    if not rows:
        raise FileNotFoundError(f"{work.root}: no report or saliency results yet (run `radacx report`)")
    return pd.DataFrame(rows, columns=COLUMNS)


def _file(record, path: Path) -> Path:
    return record.file(path.name) if record is not None else path


def _trained_on(arm: str) -> str | None:
    try:
        return trained_on(arm)
    except KeyError:  # an arm this version does not define: its training variant is unknown
        return None


def _row(section, arm, tested_on, quantity, detail, ci=(NAN, NAN, NAN), n=None, n_boot=None, diff=None) -> dict:
    row = {"section": section, "arm": arm, "trained_on": _trained_on(arm) if arm else None, "tested_on": tested_on,
           "quantity": quantity, "detail": detail, "value": ci[0], "low": ci[1], "high": ci[2], "p": NAN,
           "p_below": False, "n": n, "n_boot": n_boot}
    if diff is not None:
        row.update(value=diff["diff"], low=diff["low"], high=diff["high"], p=diff["p_value"],
                   p_below=bool(diff.get("p_below", False)), n_boot=diff.get("n_boot", n_boot))
    return row


def _table1(data: dict, rows: list) -> int | None:
    n_boot = data.get("provenance", {}).get("n_bootstrap")
    for r in data["rows"]:
        for key, value in r.items():
            parts = key.split("_")
            if key.startswith("acc_") and not key.endswith(("_low", "_high")):
                reading, variant = parts[1], parts[2]
                ci = (value, r[f"{key}_low"], r[f"{key}_high"])
                rows.append(_row("table1", r["arm"], variant, "accuracy", reading, ci, r["n_test"], n_boot))
            elif key.startswith(("balanced_accuracy_", "macro_f1_", "macro_auroc_")):
                quantity, variant = key.rsplit("_", 1)
                rows.append(_row("table1", r["arm"], variant, quantity, None, (value, NAN, NAN), r["n_test"], n_boot))
        diff = {"diff": r["diff_masked_minus_original"], "low": r["diff_low"], "high": r["diff_high"],
                "p_value": r["p_value"], "p_below": r.get("p_bound") == "<", "n_boot": n_boot}
        rows.append(_row("table1_difference", r["arm"], "masked - original", "accuracy difference", "argmax",
                         n=r["n_test"], diff=diff))
    return n_boot


def _ablation(data: dict, rows: list, n_boot) -> None:
    for r in data["rows"]:
        rows.append(_row("ablation", r["arm"], r["variant"], "accuracy", "argmax", tuple(r["accuracy"]), r["n"], n_boot))
        for ref in ("original", "masked"):
            if r.get(f"minus_{ref}"):
                rows.append(_row("ablation", r["arm"], r["variant"], f"accuracy - {ref}", "argmax", n=r["n"],
                                 diff=r[f"minus_{ref}"]))


def _saliency(data: dict, rows: list) -> None:
    for r in data.get("summary", []):
        for v in r["variants"]:
            rows.append(_row("saliency", r["arm"], v, r["metric"], r["method"], tuple(r[v]), r.get(f"{v}_n")))
    for r in data.get("occlusion", []):
        detail = f"{r['region']}/{r['mode']}"
        rows.append(_row("occlusion", r["arm"], r["tested_on"], "probability drop", detail, tuple(r["drop"]), r["n"]))
        rows.append(_row("occlusion", r["arm"], r["tested_on"], "accuracy drop", detail, tuple(r["accuracy_drop"]),
                         r["n"]))
        for control, c in r["controls"].items():
            rows.append(_row("occlusion_control", r["arm"], r["tested_on"], "probability drop",
                             f"{detail}/{control}", tuple(c["drop"]), c["n"]))
            if c.get("effect"):
                rows.append(_row("occlusion_control", r["arm"], r["tested_on"], "effect beyond control",
                                 f"{detail}/{control}", n=r["n"], diff=c["effect"]))
    for r in data.get("arm_contrasts", []):
        if r.get("difference"):
            rows.append(_row("arm_contrast", r["arm"], r["tested_on"], f"drop - drop({r['versus']})",
                             f"{r['region']}/{r['mode']}", n=r["n"], diff=r["difference"]))
    for r in data.get("curves", []):
        for name, ci in r["auc"].items():
            rows.append(_row("curves", r["arm"], r["tested_on"], f"{r['curve']} area", name, tuple(ci), r["n"]))
        for name, g in r["gain"].items():
            if g:
                rows.append(_row("curves", r["arm"], r["tested_on"], f"{r['curve']} gain", name, n=r["n"], diff=g))
    for r in data.get("cascade", []):
        rows.append(_row("cascade", r["arm"], r["tested_on"], "rank correlation", r["level"],
                         tuple(r["rank_correlation"]), r["n"]))
