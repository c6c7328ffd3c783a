"""Cohort: filter the archive to frontal images with a positive finding and a good mask; split.

Label policies (docs/cohort.md):
- ``uncertain``: ``ignore`` treats -1 as not-positive (it neither makes an image eligible nor
  enters its target), ``zeros`` maps -1 to 0, ``ones`` maps -1 to 1.
- ``multi_positive``: ``any`` keeps images with several positives, target = multi-hot, and
  accuracy counts a top-1 prediction among the positives as correct; ``single`` keeps only
  single-positive images; ``first`` keeps all and takes the first positive in ``priority``.

Outputs in ``<workdir>/cohort/``: ``cohort.csv`` (one row per image), ``rejects.csv``
(id, stage, reason), ``masks-rle.h5`` (the cohort's CheXmask RLE strings, so the shard workers
never re-read the multi-GB CheXmask CSV) and ``manifest.json`` (counts and fingerprint, written
last: the commit point).
"""
from __future__ import annotations

import hashlib
import logging
import zlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from ._io import atomic_path, file_sha256, read_json, stable_hash, write_csv, write_json
from .config import FINDINGS_ALL, Config
from .sources.chexmask import MASK_NAMES, read_chexmask
from .sources.mimic import jpg_relpath, read_labels, read_metadata, read_split

log = logging.getLogger(__name__)
REJECT_COLUMNS = ["id", "stage", "reason"]
COHORT_VERSION = 1


def target_columns(classes) -> list[str]:
    return [f"target_{c}" for c in classes]


def apply_label_policy(labels: pd.DataFrame, classes, uncertain: str, multi_positive: str,
                       priority) -> tuple[np.ndarray, np.ndarray]:
    """Targets (N, K) float32 and a keep mask with the policy's reason codes.

    Returns ``(targets, status)``: status 0 = keep, 1 = no positive, 2 = several positives under
    ``single``.
    """
    values = labels[list(classes)].to_numpy(np.float32)
    uncertain_as = {"ignore": 0.0, "zeros": 0.0, "ones": 1.0}[uncertain]
    positive = np.where(values == -1, uncertain_as, np.nan_to_num(values, nan=0.0)) == 1
    n_pos = positive.sum(1)
    status = np.where(n_pos == 0, 1, 0)
    targets = positive.astype(np.float32)
    if multi_positive == "single":
        status = np.where(n_pos > 1, 2, status)
    elif multi_positive == "first":
        order = [list(classes).index(c) for c in priority if c in classes]
        order += [i for i in range(len(classes)) if i not in order]
        first = np.zeros_like(targets)
        for i in range(len(targets)):
            hits = [j for j in order if positive[i, j]]
            if hits:
                first[i, hits[0]] = 1
        targets = first
    return targets, status


def patient_split(subjects: np.ndarray, official: np.ndarray, mode: str, val_fraction: float,
                  seed: int) -> np.ndarray:
    """Split per image, always patient-disjoint.

    ``official`` keeps the split file's assignment (checked to be patient-disjoint); ``paper``
    keeps the official test patients and re-splits the others by patient so that val holds
    ``val_fraction`` of their images (the paper's 87,574 / 17,514 / 2,045).
    """
    df = pd.DataFrame({"subject": subjects, "official": official})
    per_patient = df.groupby("subject")["official"].nunique()
    if (per_patient > 1).any():
        bad = per_patient.index[per_patient > 1][0]
        raise ValueError(f"split table puts patient {bad} in several splits; refusing a leaky split")
    if mode == "official":
        return df["official"].replace({"validate": "val"}).to_numpy(object)
    out = np.where(df["official"] == "test", "test", "train").astype(object)
    pool = df.loc[out != "test", "subject"]
    counts = pool.value_counts().sort_index()
    rng = np.random.default_rng(seed)
    order = counts.index.to_numpy()[rng.permutation(len(counts))]
    cum = np.cumsum(counts.loc[order].to_numpy())
    val_patients = set(order[cum <= val_fraction * cum[-1]]) if len(cum) else set()
    out[df["subject"].isin(val_patients).to_numpy()] = "val"
    return out


def _reject(rejects: list, ids, reason: str, stage: str = "cohort") -> None:
    rejects.extend({"id": i, "stage": stage, "reason": reason} for i in ids)


def build_cohort(cfg: Config, progress: bool = True) -> dict:
    """Run the cohort stage; idempotent (a rerun with the same inputs and config is a no-op)."""
    c = cfg.cohort
    out = cfg.work / "cohort"
    root = Path(cfg.archive.mimic_root)
    inputs_fp = stable_hash({"cohort": cfg.to_dict()["cohort"], "archive": cfg.to_dict()["archive"],
                               "seed": cfg.seed, "version": COHORT_VERSION,
                               "inputs": _input_stamp(cfg)})
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and read_json(manifest_path).get("inputs_fingerprint") == inputs_fp:
        log.info("cohort: %s is up to date", out)
        return read_json(manifest_path)
    rejects: list[dict] = []
    meta = read_metadata(root)
    dup_images = meta["dicom_id"].duplicated(keep=False)
    _reject(rejects, meta.loc[dup_images, "dicom_id"], "dicom_id appears several times in metadata")
    meta = meta[~dup_images]
    view = meta["ViewPosition"]
    frontal = view.isin(c.views)
    for v, ids in meta.loc[~frontal].groupby(view.fillna("<blank>").loc[~frontal])["dicom_id"]:
        _reject(rejects, ids, f"view {v} is not one of {'/'.join(c.views)}")
    meta = meta[frontal]

    labels = read_labels(root, cfg.archive.labeler)
    key = ["subject_id", "study_id"]
    dup = labels.duplicated(key, keep=False)
    dup_studies = set(labels.loc[dup, "study_id"])
    labels = labels[~dup]
    df = meta.merge(labels, on=key, how="left", indicator=True)
    in_dup = df["study_id"].isin(dup_studies)
    _reject(rejects, df.loc[in_dup, "dicom_id"],
            f"study has several rows in {cfg.archive.labeler} labels (ambiguous labels)")
    no_label = (df["_merge"] == "left_only") & ~in_dup
    _reject(rejects, df.loc[no_label, "dicom_id"], f"study has no row in {cfg.archive.labeler} labels")
    df = df[df["_merge"] == "both"].drop(columns="_merge")

    targets, status = apply_label_policy(df, c.classes, c.uncertain, c.multi_positive, c.priority)
    _reject(rejects, df.loc[status == 1, "dicom_id"],
            f"no positive among {', '.join(c.classes)} (uncertain={c.uncertain})")
    _reject(rejects, df.loc[status == 2, "dicom_id"], "several positives (multi_positive=single)")
    df = df[status == 0].copy()
    tcols = target_columns(c.classes)
    df[tcols] = targets[status == 0]

    split = read_split(root)[["dicom_id", "split"]]
    df = df.merge(split, on="dicom_id", how="left")
    _reject(rejects, df.loc[df["split"].isna(), "dicom_id"], "image has no row in the split table")
    df = df[df["split"].notna()]

    masks = read_chexmask(cfg.archive.chexmask_csv, ids=df["dicom_id"])
    masks = masks.drop_duplicates("dicom_id")
    df = df.merge(masks, on="dicom_id", how="left", indicator=True)
    reasons = pd.Series(None, index=df.index, dtype=object)

    def flag(cond, text):
        sel = cond.fillna(False).astype(bool) & reasons.isna()
        reasons[sel] = text if isinstance(text, str) else text[sel]

    fmt = lambda col, spec: df[col].map(lambda v: format(v, spec))
    flag(df["_merge"] == "left_only", "no CheXmask row for this image")
    flag(df["quality_mean"].isna(), "CheXmask Dice RCA (Mean) is blank")
    flag(df["quality_mean"] > df["quality_max"] + 1e-9,
         "CheXmask Dice RCA (Mean) > (Max): the columns look swapped")
    flag(df["quality_mean"] < c.min_mask_quality,
         "mask quality Dice RCA (Mean) " + fmt("quality_mean", ".3f") + f" < {c.min_mask_quality}")
    flag((df["height"] != df["Rows"]) | (df["width"] != df["Columns"]),
         "CheXmask Height x Width " + fmt("height", ".0f") + "x" + fmt("width", ".0f")
         + " != metadata Rows x Columns " + fmt("Rows", "d") + "x" + fmt("Columns", "d"))
    rejected = reasons.notna()
    rejects.extend({"id": i, "stage": "cohort", "reason": r}
                   for i, r in zip(df.loc[rejected, "dicom_id"], reasons[rejected]))
    keep = ~rejected.to_numpy()
    df = df[keep].drop(columns="_merge")

    df["split"] = patient_split(df["subject_id"].to_numpy(), df["split"].to_numpy(), c.split,
                                c.val_fraction, cfg.seed)
    df["path"] = [jpg_relpath(s, t, d) for s, t, d in zip(df["subject_id"], df["study_id"], df["dicom_id"])]
    df = df.sort_values(["split", "subject_id", "study_id", "dicom_id"], kind="stable").reset_index(drop=True)
    columns = ["dicom_id", "subject_id", "study_id", "split", "ViewPosition", "Rows", "Columns", "path",
               "quality_mean", "quality_max", *FINDINGS_ALL, *tcols]
    cohort = df[columns]
    rle_hash = _write_rle(out / "masks-rle.h5", df)
    write_csv(out / "cohort.csv", cohort)
    # the fingerprint later stages key on is of the *content*: re-running the cohort on touched but
    # unchanged inputs gives the same fingerprint, so no shard is rebuilt for nothing
    fingerprint = stable_hash([file_sha256(out / "cohort.csv"), rle_hash])
    rejects_df = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
    write_csv(out / "rejects.csv", rejects_df)
    counts = {s: {"images": int((cohort["split"] == s).sum()),
                  "patients": int(cohort.loc[cohort["split"] == s, "subject_id"].nunique()),
                  **{cl: int(cohort.loc[cohort["split"] == s, f"target_{cl}"].sum()) for cl in c.classes}}
              for s in ("train", "val", "test")}
    manifest = {"fingerprint": fingerprint, "inputs_fingerprint": inputs_fp, "rows": len(cohort), "rejects": len(rejects_df),
                "reject_reasons": rejects_df["reason"].str.replace(r"[\d.]+", "N", regex=True)
                .value_counts().to_dict(), "counts": counts, "classes": list(c.classes),
                "policy": {"uncertain": c.uncertain, "multi_positive": c.multi_positive,
                           "split": c.split, "min_mask_quality": c.min_mask_quality}}
    write_json(manifest_path, manifest)
    return manifest


def _input_stamp(cfg: Config) -> dict:
    """Size and mtime of every input table: a changed archive invalidates the cohort."""
    root = Path(cfg.archive.mimic_root)
    stamp = {}
    for p in sorted(root.glob("mimic-cxr-2.0.0-*.csv*")) + [Path(cfg.archive.chexmask_csv)]:
        if p.exists():
            st = p.stat()
            stamp[p.name] = [st.st_size, st.st_mtime_ns]
    return stamp


def _write_rle(path: Path, df: pd.DataFrame) -> str:
    """The cohort's RLE strings, zlib-compressed, row-aligned with cohort.csv; returns their hash."""
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["dicom_id"] = df["dicom_id"].to_numpy().astype("S")
        f["shape"] = df[["height", "width"]].to_numpy(np.int64)
        vlen = h5py.vlen_dtype(np.uint8)
        for name in MASK_NAMES:
            ds = f.create_dataset(name, (len(df),), dtype=vlen)
            for i, text in enumerate(df[name].astype(str)):
                digest.update(text.encode() + b"\n")
                ds[i] = np.frombuffer(zlib.compress(text.encode(), 1), np.uint8)
    return digest.hexdigest()


def read_rle_rows(path: Path, rows) -> dict[str, dict]:
    """RLE strings and mask shape of the given cohort rows, keyed by dicom_id."""
    out = {}
    rows = np.asarray(rows)
    with h5py.File(path, "r") as f:
        order = np.argsort(rows)
        sel = rows[order]
        ids = f["dicom_id"][sel]
        shapes = f["shape"][sel]
        cols = {n: f[n][sel] for n in MASK_NAMES}
    for k, i in enumerate(order):
        out[ids[k].decode()] = {"shape": tuple(int(v) for v in shapes[k]),
                                **{n: zlib.decompress(cols[n][k].tobytes()).decode() for n in MASK_NAMES}}
    return out


def load_cohort(cfg: Config) -> pd.DataFrame:
    path = cfg.work / "cohort" / "cohort.csv"
    if not (cfg.work / "cohort" / "manifest.json").exists():
        raise FileNotFoundError(f"no finished cohort in {path.parent}; run `radacx cohort` first")
    return pd.read_csv(path, dtype={"dicom_id": str})
