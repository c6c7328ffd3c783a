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

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import file_sha256, read_json, stable_hash, stage_run, tmp_name, write_csv, write_json
from .cohort_files import RLEStore, rle_content_hash
from .config import CohortConfig, Config
from .sources.chexmask import iter_chexmask, read_chexmask
from .sources.mimic import FINDINGS_ALL, id_problem, jpg_relpath, read_labels, read_metadata, read_split
from .workdir import Workdir

log = logging.getLogger(__name__)
REJECT_COLUMNS = ["id", "stage", "reason"]
CHEXMASK_CHUNK_ROWS = 2000  # ~100 MB of RLE text per chunk at MIMIC resolution
COHORT_VERSION = 4  # 2: positive/uncertain columns; 3: validated ids, duplicates; 4: rle_row, streamed masks


def label_columns(classes) -> list[str]:
    """target_* (what training fits), positive_* (multi-hot, for metrics), uncertain_* (label -1)."""
    return [f"{kind}_{c}" for kind in ("target", "positive", "uncertain") for c in classes]


def label_matrices(labels: pd.DataFrame, classes, uncertain: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, uncertain) (N, K) float32: positives under the uncertain policy (``ones``: -1 is
    positive), and where the label table says uncertain (-1), whatever the policy."""
    values = labels[list(classes)].to_numpy(np.float32)
    uncertain_as = {"ignore": 0.0, "zeros": 0.0, "ones": 1.0}[uncertain]
    positive = np.where(values == -1, uncertain_as, np.nan_to_num(values, nan=0.0)) == 1
    return positive.astype(np.float32), (values == -1).astype(np.float32)


def apply_label_policy(labels: pd.DataFrame, classes, uncertain: str, multi_positive: str,
                       priority) -> tuple[np.ndarray, np.ndarray]:
    """Targets (N, K) float32 and a keep mask with the policy's reason codes.

    Returns ``(targets, status)``: status 0 = keep, 1 = no positive, 2 = several positives under
    ``single``.
    """
    positive = label_matrices(labels, classes, uncertain)[0] > 0
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
    keeps the official test patients and re-splits the others by patient so that val holds about
    ``val_fraction`` of their images (train:val about 5:1, as in the paper). The paper's exact
    87,574 / 17,514 counts come from an image-level ``random_split`` of 105,088 images, which puts
    patients in both train and val; a patient-disjoint split cannot reproduce them, by design.
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


@dataclass
class ArchiveTables:
    """The archive's tables with canonical columns, as the readers in ``sources`` return them."""
    metadata: pd.DataFrame
    labels: pd.DataFrame
    split: pd.DataFrame
    chexmask: pd.DataFrame


def select_cohort(tables: ArchiveTables, policy: CohortConfig, *, seed: int,
                  labeler: str = "chexpert") -> tuple[pd.DataFrame, list[dict]]:
    """The cohort policy, pure: (cohort table, rejects) from the archive's tables.

    ``select_images`` (views, labels, label policy, split table) then ``attach_masks`` (CheXmask
    rows, quality, sizes) and the patient-level split. Every image left out gets a reject row.
    """
    df, rejects = select_images(tables, policy, labeler=labeler)
    df, more = attach_masks(df, tables.chexmask, policy, seed=seed)
    return df, rejects + more


def select_images(tables: ArchiveTables, policy: CohortConfig, *, labeler: str = "chexpert"
                  ) -> tuple[pd.DataFrame, list[dict]]:
    """Images that pass every filter before CheXmask: valid ids, view, one label row, the label
    policy, one split row. Their ids are the CheXmask rows the cohort needs."""
    rejects: list[dict] = []
    meta = _valid_metadata(tables.metadata, rejects)
    df = _frontal_with_labels(meta, tables.labels, policy, labeler, rejects)
    targets, status = apply_label_policy(df, policy.classes, policy.uncertain, policy.multi_positive,
                                         policy.priority)
    _reject(rejects, df.loc[status == 1, "dicom_id"],
            f"no positive among {', '.join(policy.classes)} (uncertain={policy.uncertain})")
    _reject(rejects, df.loc[status == 2, "dicom_id"], "several positives (multi_positive=single)")
    positives, uncertain = label_matrices(df, policy.classes, policy.uncertain)
    keep = status == 0
    df = df[keep].copy()
    df[label_columns(policy.classes)] = np.hstack([targets[keep], positives[keep], uncertain[keep]])
    df = df.merge(_unique_rows(tables.split[["dicom_id", "split"]], "split table", df["dicom_id"], rejects),
                  on="dicom_id", how="left", validate="many_to_one")
    _reject(rejects, df.loc[df["split"].isna(), "dicom_id"], "image has no row in the split table")
    return df[df["split"].notna()], rejects


def attach_masks(df: pd.DataFrame, chexmask: pd.DataFrame, policy: CohortConfig, *, seed: int
                 ) -> tuple[pd.DataFrame, list[dict]]:
    """Join the CheXmask rows (quality and sizes checked), split by patient, build the JPEG paths."""
    rejects: list[dict] = []
    df = _with_masks(df, chexmask, policy, rejects)
    df[["Rows", "Columns"]] = df[["Rows", "Columns"]].astype(np.int64)  # blank ones were rejected
    df["split"] = patient_split(df["subject_id"].to_numpy(), df["split"].to_numpy(), policy.split,
                                policy.val_fraction, seed)
    df["path"] = [jpg_relpath(s, t, d) for s, t, d in zip(df["subject_id"], df["study_id"], df["dicom_id"])]
    df = df.sort_values(["split", "subject_id", "study_id", "dicom_id"], kind="stable").reset_index(drop=True)
    return df, rejects


COHORT_COLUMNS = ["dicom_id", "subject_id", "study_id", "split", "ViewPosition", "Rows", "Columns", "path",
                  "quality_mean", "quality_max", *FINDINGS_ALL]


def _valid_metadata(meta: pd.DataFrame, rejects: list) -> pd.DataFrame:
    """Rows whose identifiers are MIMIC-CXR-JPG identifiers, with integer ids; the others rejected."""
    problems = [id_problem(d, s, t) for d, s, t in zip(meta["dicom_id"], meta["subject_id"], meta["study_id"])]
    bad = np.array([p is not None for p in problems], bool)
    rejects.extend({"id": str(i)[:80], "stage": "cohort", "reason": r}
                   for i, r, b in zip(meta["dicom_id"], problems, bad) if b)
    meta = meta[~bad].copy()
    for col in ("subject_id", "study_id"):
        meta[col] = pd.to_numeric(meta[col]).astype(np.int64)
    return meta


def _unique_rows(table: pd.DataFrame, what: str, wanted, rejects: list) -> pd.DataFrame:
    """One row per dicom_id: identical duplicates collapse; conflicting ones are rejected (the image
    is left out, with a reason), never silently resolved by taking the first."""
    content = [c for c in table.columns if c != "rle_row"]  # where a row is stored is not its content
    table = table[table["dicom_id"].isin(set(wanted))].drop_duplicates(subset=content)
    conflict = table["dicom_id"].duplicated(keep=False)
    _reject(rejects, sorted(set(table.loc[conflict, "dicom_id"])), f"conflicting duplicate rows in the {what}")
    return table[~conflict]


def _frontal_with_labels(meta: pd.DataFrame, labels: pd.DataFrame, policy: CohortConfig, labeler: str,
                         rejects: list) -> pd.DataFrame:
    """Unique frontal images joined with exactly one label row of their study."""
    dup_images = meta["dicom_id"].duplicated(keep=False)
    _reject(rejects, meta.loc[dup_images, "dicom_id"], "dicom_id appears several times in metadata")
    meta = meta[~dup_images]
    view = meta["ViewPosition"]
    frontal = view.isin(policy.views)
    for v, ids in meta.loc[~frontal].groupby(view.fillna("<blank>").loc[~frontal])["dicom_id"]:
        _reject(rejects, ids, f"view {v} is not one of {'/'.join(policy.views)}")
    meta = meta[frontal]

    key = ["subject_id", "study_id"]
    dup = labels.duplicated(key, keep=False)
    dup_studies = set(labels.loc[dup, "study_id"])
    labels = labels[~dup]
    df = meta.merge(labels, on=key, how="left", indicator=True)
    in_dup = df["study_id"].isin(dup_studies)
    _reject(rejects, df.loc[in_dup, "dicom_id"], f"study has several rows in {labeler} labels (ambiguous labels)")
    no_label = (df["_merge"] == "left_only") & ~in_dup
    _reject(rejects, df.loc[no_label, "dicom_id"], f"study has no row in {labeler} labels")
    return df[df["_merge"] == "both"].drop(columns="_merge")


def _with_masks(df: pd.DataFrame, chexmask: pd.DataFrame, policy: CohortConfig, rejects: list) -> pd.DataFrame:
    """Join the CheXmask rows; reject images without a usable mask, one reason per image."""
    masks = _unique_rows(chexmask, "CheXmask table", df["dicom_id"], rejects)
    df = df.merge(masks, on="dicom_id", how="left", indicator=True, validate="many_to_one")
    reasons = pd.Series(None, index=df.index, dtype=object)

    def flag(cond, text):
        sel = cond.fillna(False).astype(bool) & reasons.isna()
        reasons[sel] = text if isinstance(text, str) else text[sel]

    fmt = lambda col, spec: df[col].map(lambda v: _fmt(v, spec)).astype(object)  # noqa: E731
    flag(df["_merge"] == "left_only", "no CheXmask row for this image")
    flag(df["Rows"].isna() | df["Columns"].isna(), "metadata Rows x Columns is blank or not a number")
    flag(df["quality_mean"].isna(), "CheXmask Dice RCA (Mean) is blank")
    flag(df["quality_mean"] > df["quality_max"] + 1e-9,
         "CheXmask Dice RCA (Mean) > (Max): the columns look swapped")
    flag(df["quality_mean"] < policy.min_mask_quality,
         "mask quality Dice RCA (Mean) " + fmt("quality_mean", ".3f") + f" < {policy.min_mask_quality}")
    flag((df["height"] != df["Rows"]) | (df["width"] != df["Columns"]),
         "CheXmask Height x Width " + fmt("height", ".0f") + "x" + fmt("width", ".0f")
         + " != metadata Rows x Columns " + fmt("Rows", ".0f") + "x" + fmt("Columns", ".0f"))
    rejected = reasons.notna()
    rejects.extend({"id": i, "stage": "cohort", "reason": r}
                   for i, r in zip(df.loc[rejected, "dicom_id"], reasons[rejected]))
    return df[~rejected.to_numpy()].drop(columns="_merge")


def _fmt(value, spec: str) -> str:
    """A number for a reject reason; a blank or text cell never breaks the message."""
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return repr(value)


def read_archive_tables(cfg: Config, with_chexmask: bool = True) -> ArchiveTables:
    """Read the MIMIC-CXR-JPG tables (and, for small archives and tests, the whole CheXmask table)."""
    root = Path(cfg.archive.mimic_root)
    if not root.is_dir():
        raise FileNotFoundError(f"archive.mimic_root {root} is not a folder (unmounted, or a wrong path?); "
                                f"nothing was rejected or written")
    meta = read_metadata(root)
    chexmask = None
    if with_chexmask:
        frontal_ids = meta.loc[meta["ViewPosition"].isin(cfg.cohort.views), "dicom_id"]
        chexmask = read_chexmask(cfg.archive.chexmask_csv, ids=frontal_ids)
    return ArchiveTables(meta, read_labels(root, cfg.archive.labeler), read_split(root), chexmask)


def stream_masks(chexmask_csv: str | Path, wanted, store_path: Path) -> pd.DataFrame:
    """One pass over the CheXmask table: the wanted rows' RLE go to the store at ``store_path``,
    chunk by chunk; returns their small columns (ids, quality, sizes) with ``rle_row`` and
    ``rle_digest``. The caller renames the store into place when it commits the cohort."""
    small = []
    store = RLEStore(store_path)
    try:
        for chunk in iter_chexmask(chexmask_csv, ids=wanted, chunksize=CHEXMASK_CHUNK_ROWS):
            rows, digests = store.append(chunk)
            small.append(chunk[["dicom_id", "quality_mean", "quality_max", "height", "width"]]
                         .assign(rle_row=rows, rle_digest=[d.hex() for d in digests]))
    finally:
        store.close()
    cols = ["dicom_id", "quality_mean", "quality_max", "height", "width", "rle_row", "rle_digest"]
    return pd.concat(small, ignore_index=True) if small else pd.DataFrame(columns=cols)


def is_phantom(mimic_root: str | Path) -> bool:
    """True when the archive is the generated phantom (its phantom.json names this root)."""
    root = Path(mimic_root).resolve()
    marker = root.parents[1] / "phantom.json" if len(root.parents) > 1 else None
    if marker is None or not marker.exists():
        return False
    try:
        return Path(read_json(marker)["mimic_root"]).resolve() == root
    except (ValueError, KeyError, TypeError):
        return False


def build_cohort(cfg: Config, progress: bool = True) -> dict:
    """Run the cohort stage; idempotent (a rerun with the same inputs and config is a no-op)."""
    with stage_run(cfg.workdir, "cohort", cfg.permissions):
        return _build_cohort(cfg)


def _build_cohort(cfg: Config) -> dict:
    c = cfg.cohort
    work = Workdir(cfg.workdir)
    inputs_fp = stable_hash({"cohort": cfg.to_dict()["cohort"], "archive": cfg.to_dict()["archive"],
                             "seed": cfg.seed, "version": COHORT_VERSION, "inputs": _input_stamp(cfg)})
    if work.cohort_manifest.exists() and read_json(work.cohort_manifest).get("inputs_fingerprint") == inputs_fp:
        log.info("cohort: %s is up to date", work.cohort_dir)
        return read_json(work.cohort_manifest)
    images, rejects = select_images(read_archive_tables(cfg, with_chexmask=False), c, labeler=cfg.archive.labeler)
    store = tmp_name(work.masks_rle)
    work.cohort_dir.mkdir(parents=True, exist_ok=True)
    try:
        masks = stream_masks(cfg.archive.chexmask_csv, images["dicom_id"], store)
        df, more = attach_masks(images, masks, c, seed=cfg.seed)
        # from here the old cohort is replaced: withdraw its commit first, so that no later stage
        # reads a new masks-rle.h5 beside an old cohort.csv if this process dies half-way
        work.cohort_manifest.unlink(missing_ok=True)
        os.replace(store, work.masks_rle)
    finally:
        store.unlink(missing_ok=True)
    rejects += more
    cohort = df[COHORT_COLUMNS + ["rle_row"] + label_columns(c.classes)]
    rle_hash = rle_content_hash(bytes.fromhex(d) for d in df["rle_digest"])
    write_csv(work.cohort_csv, cohort)
    # the fingerprint later stages key on is of the *content*: re-running the cohort on touched but
    # unchanged inputs gives the same fingerprint, so no shard is rebuilt for nothing
    fingerprint = stable_hash([file_sha256(work.cohort_csv), rle_hash])
    rejects_df = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
    write_csv(work.cohort_rejects, rejects_df)
    counts = {s: {"images": int((cohort["split"] == s).sum()),
                  "patients": int(cohort.loc[cohort["split"] == s, "subject_id"].nunique()),
                  **{cl: int(cohort.loc[cohort["split"] == s, f"target_{cl}"].sum()) for cl in c.classes}}
              for s in ("train", "val", "test")}
    manifest = {"fingerprint": fingerprint, "inputs_fingerprint": inputs_fp, "rle_hash": rle_hash, "rows": len(cohort),
                "rejects": len(rejects_df),
                "reject_reasons": rejects_df["reason"].str.replace(r"[\d.]+", "N", regex=True)
                .value_counts().to_dict(), "counts": counts, "classes": list(c.classes),
                "policy": {"uncertain": c.uncertain, "multi_positive": c.multi_positive,
                           "split": c.split, "min_mask_quality": c.min_mask_quality},
                "synthetic_archive": is_phantom(cfg.archive.mimic_root)}
    write_json(work.cohort_manifest, manifest)  # written last: the commit point
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
