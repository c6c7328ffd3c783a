"""Full-scale rehearsal: the cohort stage and the shard plan on inputs of real MIMIC size.

Synthesises, in a temporary folder removed afterwards (no JPEGs needed):
- MIMIC-CXR-JPG tables: 377,110 images (243,334 PA/AP, the rest lateral), 65,379 patients with many
  studies each (227,827 studies), CheXpert labels at MIMIC-like frequencies (1 / 0 / -1 / blank),
  the official split (train / validate / test by patient);
- CheXmask ``OriginalResolution/MIMIC-CXR-JPG.csv``: 243,334 rows (one per PA/AP image) whose RLE
  strings have the real structure at ~3000 x 2500 px (one run per image row, 1-based starts,
  ~1,500 runs per lung: ~60 KB of text per row, ~14 GB in all) and the Landmarks column in the
  OriginalResolution NumPy-repr text form.
Then times, each in a fresh child process with its peak RSS (``os.wait4``):
cohort (goal <= 3 min, <= 3 GB), shard plan (<= 10 s), cohort rerun with nothing changed (<= 10 s).

    python benchmarks/scale.py [--fraction 0.05] [--gzip] [--keep DIR]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radacx_cache.findings import FINDINGS_ALL  # noqa: E402

IMAGES, FRONTAL, PATIENTS, STUDIES = 377_110, 243_334, 65_379, 227_827
# share of studies positive / uncertain per label, roughly MIMIC-CXR-JPG's CheXpert table
FREQ = {"Atelectasis": (0.20, 0.05), "Cardiomegaly": (0.19, 0.03), "Consolidation": (0.05, 0.02),
        "Edema": (0.12, 0.03), "Pleural Effusion": (0.24, 0.03), "No Finding": (0.33, 0.0),
        "Lung Opacity": (0.22, 0.02), "Pneumonia": (0.07, 0.05), "Support Devices": (0.29, 0.0)}


def _mask_texts(rng, height: int, width: int) -> dict[str, str]:
    """Three RLE strings of lung- and heart-shaped regions at full resolution (one run per row)."""
    out = {}
    yy = np.arange(height)
    for name, (cx, cy, rx, ry) in {"Right Lung": (0.3, 0.45, 0.14, 0.28), "Left Lung": (0.7, 0.45, 0.14, 0.27),
                                    "Heart": (0.55, 0.6, 0.12, 0.1)}.items():
        cx, cy = cx * width * rng.uniform(0.97, 1.03), cy * height * rng.uniform(0.97, 1.03)
        rx, ry = rx * width, ry * height
        t = 1 - ((yy - cy) / ry) ** 2
        rows = np.flatnonzero(t > 0)
        half = (rx * np.sqrt(t[rows])).astype(int)
        starts = rows * width + (cx - half).astype(int) + 1
        pairs = np.column_stack([starts, 2 * half + 1]).ravel()
        out[name] = " ".join(map(str, pairs))
    return out


def _landmarks(rng) -> str:
    pts = rng.integers(100, 2900, (120, 2))
    return "[" + "\n ".join(f"[{x:5d} {y:5d}]" for x, y in pts) + "]"


def synthesise(out: Path, fraction: float, gzip_csv: bool, seed: int = 0) -> dict:
    """The four MIMIC tables and the CheXmask CSV at ``fraction`` of real size under ``out``."""
    rng = np.random.default_rng(seed)
    n_img, n_front, n_pat, n_std = (max(50, int(v * fraction)) for v in (IMAGES, FRONTAL, PATIENTS, STUDIES))
    root = out / "mimic-cxr-jpg" / "2.0.0"
    root.mkdir(parents=True)
    subjects = rng.choice(np.arange(10_000_000, 20_000_000), n_pat, replace=False)
    study_subject = subjects[np.minimum(rng.zipf(1.6, n_std) - 1, n_pat - 1) % n_pat]  # many studies for some
    study_ids = rng.choice(np.arange(50_000_000, 60_000_000), n_std, replace=False)
    img_study = rng.integers(0, n_std, n_img)
    img_study[:n_std] = np.arange(n_std)  # every study has an image
    views = np.array(["LATERAL"] * n_img, object)
    views[rng.permutation(n_img)[:n_front]] = rng.choice(["PA", "AP"], n_front, p=[0.4, 0.6])
    dicom = np.array(["-".join(f"{v:08x}" for v in row) for row in rng.integers(0, 2 ** 32, (n_img, 5))])
    sizes = np.array([(3056, 2544), (2544, 3056), (2705, 2539), (3050, 2539), (2539, 3050), (3032, 2544),
                      (2500, 3050), (3056, 2496), (2866, 2548), (2992, 2544), (2544, 2992), (3000, 2500)])
    pick = rng.integers(0, len(sizes), n_img)  # a dozen of MIMIC's usual sizes (they repeat by device)
    rows_px, cols_px = sizes[pick, 0], sizes[pick, 1]
    meta = pd.DataFrame({"dicom_id": dicom, "subject_id": study_subject[img_study], "study_id": study_ids[img_study],
                         "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": views,
                         "Rows": rows_px, "Columns": cols_px, "StudyDate": 21800506, "StudyTime": 213014.531,
                         "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                         "ViewCodeSequence_CodeMeaning": "postero-anterior",
                         "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
    labels = pd.DataFrame({"subject_id": study_subject, "study_id": study_ids})
    for c in FINDINGS_ALL:
        pos, unc = FREQ.get(c, (0.03, 0.01))
        u = rng.random(n_std)
        labels[c] = np.where(u < pos, 1.0, np.where(u < pos + unc, -1.0, np.where(u < pos + unc + 0.15, 0.0, np.nan)))
    test_pat = set(rng.choice(subjects, max(1, int(0.0045 * n_pat)), replace=False))
    val_pat = set(rng.choice(sorted(set(subjects) - test_pat), max(1, int(0.0077 * n_pat)), replace=False))
    subj = meta["subject_id"].to_numpy()
    split = np.where(np.isin(subj, list(test_pat)), "test", np.where(np.isin(subj, list(val_pat)), "validate", "train"))
    for name, df in (("metadata", meta), ("chexpert", labels), ("negbio", labels),
                     ("split", meta[["dicom_id", "study_id", "subject_id"]].assign(split=split))):
        df.to_csv(root / f"mimic-cxr-2.0.0-{name}.csv.gz", index=False, compression={"method": "gzip", "compresslevel": 1})
    return {"root": str(root), "chexmask_csv": str(_chexmask(out, meta[views != "LATERAL"], rng, gzip_csv)),
            "images": n_img, "frontal": int((views != "LATERAL").sum())}


def _chexmask(out: Path, frontal: pd.DataFrame, rng, gzip_csv: bool) -> Path:
    folder = out / "chexmask-cxr-segmentation-data" / "1.0.0" / "OriginalResolution"
    folder.mkdir(parents=True)
    path = folder / ("MIMIC-CXR-JPG.csv.gz" if gzip_csv else "MIMIC-CXR-JPG.csv")
    templates = {}
    quality = np.clip(rng.normal(0.83, 0.05, len(frontal)), 0.15, 0.92)
    qmax = np.minimum(quality + np.abs(rng.normal(0.04, 0.02, len(frontal))), 0.99)
    opener = (lambda p: gzip.open(p, "wt", compresslevel=1)) if gzip_csv else (lambda p: open(p, "w", buffering=1 << 22))
    with opener(path) as f:
        f.write("dicom_id,Dice RCA (Mean),Dice RCA (Max),Landmarks,Left Lung,Right Lung,Heart,Height,Width\n")
        for i, (d, h, w) in enumerate(zip(frontal["dicom_id"], frontal["Rows"], frontal["Columns"])):
            key = (int(h), int(w), i % 8)  # a few distinct masks per size: realistic text, cheap to make
            if key not in templates:
                templates[key] = (_mask_texts(rng, int(h), int(w)), _landmarks(rng))
            m, lm = templates[key]
            f.write(f'{d},{quality[i]:.4f},{qmax[i]:.4f},"{lm}",{m["Left Lung"]},{m["Right Lung"]},{m["Heart"]},{h},{w}\n')
    return path


CHILD = """
import json, sys, time
from radacx_cache.config import load_config
cfg = load_config(None, sys.argv[2:])
t0 = time.perf_counter()
if sys.argv[1] == "cohort":
    from radacx_cache.stages.cohort import build_cohort
    out = build_cohort(cfg, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "rows": out["rows"], "rejects": out["rejects"]}))
else:
    from radacx_cache.stages.shards import plan_render
    tasks, done, pending = plan_render(cfg)
    print(json.dumps({"seconds": time.perf_counter() - t0, "shards": len(tasks), "to_render": len(pending)}))
"""


def run_child(step: str, overrides: list[str]) -> dict:
    """Run one step in a fresh Python process; its wall time, its own timing and its peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, step, *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"{step} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall=wall, peak_rss_gb=usage.ru_maxrss * 1024 / 1e9)  # ru_maxrss is KiB on Linux
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=1.0, help="of real MIMIC size (default: full)")
    ap.add_argument("--gzip", action="store_true", help="CheXmask as .csv.gz")
    ap.add_argument("--keep", default=None, help="generate into (and keep) this folder")
    args = ap.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="radacx-scale-"))
    try:
        t0 = time.perf_counter()
        data = synthesise(tmp / "data", args.fraction, args.gzip) if not (tmp / "data").exists() else \
            json.loads((tmp / "inputs.json").read_text())
        (tmp / "inputs.json").write_text(json.dumps(data))
        size = Path(data["chexmask_csv"]).stat().st_size
        print(f"inputs ({args.fraction:g} of MIMIC size): {data['images']:,} images, {data['frontal']:,} CheXmask rows, "
              f"CheXmask {'csv.gz' if args.gzip else 'csv'} {size / 1e9:.2f} GB (made in {time.perf_counter() - t0:.0f} s)")
        ov = [f"workdir={tmp / 'work'}", f"archive.root={data['root']}",
              f"archive.chexmask_csv={data['chexmask_csv']}", "shards.rows_per_shard=1024"]
        goal = args.fraction >= 1

        def verdict(value, limit, unit):
            if not goal:
                return ""
            return f"  (goal <= {limit} {unit}: " + ("met)" if value <= limit else f"missed by {value - limit:.1f} {unit})")
        c = run_child("cohort", ov)
        print(f"cohort       : {c['wall']:7.1f} s wall, peak RSS {c['peak_rss_gb']:.2f} GB, {c['rows']:,} images kept, "
              f"{c['rejects']:,} rejected" + verdict(c["wall"], 180, "s") + verdict(c["peak_rss_gb"], 3, "GB"))
        p = run_child("plan", ov)
        print(f"shard plan   : {p['wall']:7.1f} s wall ({p['seconds']:.1f} s in the plan), peak RSS "
              f"{p['peak_rss_gb']:.2f} GB, {p['shards']} shards" + verdict(p["wall"], 10, "s"))
        r = run_child("cohort", ov)
        print(f"cohort rerun : {r['wall']:7.1f} s wall, peak RSS {r['peak_rss_gb']:.2f} GB (nothing changed)"
              + verdict(r["wall"], 10, "s"))
        rle = Path(tmp / "work" / "cohort" / "masks-rle.h5").stat().st_size
        print(f"masks-rle.h5 : {rle / 1e9:.2f} GB ({rle / max(1, c['rows']):,.0f} bytes per kept image)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
