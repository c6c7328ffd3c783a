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
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import private_tmp, read_json, stable_hash, stage_run
from ..archives import ArchiveTables, archive, chexmask_id_column, id_problem, input_files, read_archive_tables, relpath
from ..config import CohortConfig, Config
from ..findings import FINDINGS_ALL, first_positive, target_order
from ..formats.cohort_files import (BOXES_COLUMNS, REJECT_COLUMNS, RLEStore, reason_counts, rle_content_hash,
                                    write_cohort_tables)
from ..formats.records import RecordError, read_record, write_record
from ..phantom.truth import phantom_home
from ..sources.chexmask import iter_chexmask
from ..workdir import Workdir

__all__ = ["ArchiveTables", "build_cohort", "read_archive_tables", "select_cohort", "select_images", "attach_masks"]

log = logging.getLogger(__name__)
CHEXMASK_CHUNK_ROWS = 2000  # ~100 MB of RLE text per chunk at MIMIC resolution
COHORT_VERSION = 5  # 2: positive/uncertain columns; 3: validated ids, duplicates; 4: rle_row, streamed masks; 5: archive kinds


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
        rows = np.arange(len(targets))
        first = np.zeros_like(targets)
        first[rows, first_positive(positive, target_order(classes, priority))] = 1
        targets = np.where(positive.any(1, keepdims=True), first, 0).astype(np.float32)
    return targets, status


def patient_split(subjects: np.ndarray, official: np.ndarray, mode: str, val_fraction: float,
                  seed: int) -> np.ndarray:
    """Split per image, always patient-disjoint.

    ``official`` keeps the split file's assignment (checked to be patient-disjoint); ``paper``
    keeps the official test patients and re-splits the others by patient so that val holds about
    ``val_fraction`` of their images (train:val about 5:1, as in the paper). The paper's exact
    87,574 / 17,514 counts fit an image-level ``random_split`` of 105,088 images (the paper does not
    say); a patient-disjoint split cannot reproduce them, by design.
    An archive whose tables hold no test image (PadChest; VinDr-CXR's Kaggle copy) first gets a
    seeded, patient-disjoint test split of ``val_fraction`` of its images, logged as a warning.
    """
    df = pd.DataFrame({"subject": subjects, "official": official})
    per_patient = df.groupby("subject")["official"].nunique()
    if (per_patient > 1).any():
        bad = per_patient.index[per_patient > 1][0]
        raise ValueError(f"split table puts patient {bad} in several splits; refusing a leaky split")
    if mode == "official":
        if not (df["official"] == "validate").any():
            raise ValueError("cohort.split=official: this archive has no official validation split (NIH and "
                             "CheXpert publish only train and test); use cohort.split=paper")
        return df["official"].replace({"validate": "val"}).to_numpy(object)
    out = np.where(df["official"] == "test", "test", "train").astype(object)
    if not (out == "test").any() and len(out):
        # an archive without a test split (PadChest; VinDr-CXR's Kaggle train.csv): a seeded, patient-disjoint
        # test split of the same share as val, said aloud, instead of a Table 1 with no test images
        drawn = _patients_drawn(df["subject"], val_fraction, np.random.default_rng([seed, 5]))
        out[df["subject"].isin(drawn).to_numpy()] = "test"
        log.warning("cohort: the archive's tables hold no test split (PadChest publishes none; VinDr-CXR's Kaggle "
                    "copy lacks PhysioNet's annotations_test.csv, its official test set): %d images (%d patients) "
                    "drawn as a seeded, patient-disjoint test split (seed %d)", int((out == "test").sum()),
                    int(df.loc[out == "test", "subject"].nunique()), seed)
    val_patients = _patients_drawn(df.loc[out != "test", "subject"], val_fraction, np.random.default_rng(seed))
    out[df["subject"].isin(val_patients).to_numpy()] = "val"
    return out


def _patients_drawn(subjects: pd.Series, share: float, rng: np.random.Generator) -> set:
    """Patients in a seeded random order, taken while their images stay within ``share`` of the images."""
    counts = subjects.value_counts().sort_index()
    order = counts.index.to_numpy()[rng.permutation(len(counts))]
    cum = np.cumsum(counts.loc[order].to_numpy())
    return set(order[cum <= share * cum[-1]]) if len(cum) else set()


def _reject(rejects: list, ids, reason: str, stage: str = "cohort") -> None:
    rejects.extend({"id": i, "stage": stage, "reason": reason} for i in ids)


def select_cohort(tables: ArchiveTables, policy: CohortConfig, *, seed: int,
                  labeler: str = "chexpert") -> tuple[pd.DataFrame, list[dict]]:
    """The cohort policy, pure: (cohort table, rejects) from the archive's tables.

    ``select_images`` (views, labels, label policy, split table) then ``attach_masks`` (CheXmask
    rows, quality, sizes) and the patient-level split. Every image left out gets a reject row.
    """
    df, rejects = select_images(tables, policy, labeler=labeler)
    df, more = attach_masks(df, tables.chexmask, policy, seed=seed, sizes_in_tables=archive(tables.kind).sizes_in_tables,
                            mean_above_max_is_suspect=archive(tables.kind).mean_above_max_is_suspect)
    return df, rejects + more


def select_images(tables: ArchiveTables, policy: CohortConfig, *, labeler: str = "chexpert"
                  ) -> tuple[pd.DataFrame, list[dict]]:
    """Images that pass every filter before CheXmask: valid ids, view, one label row, the label
    policy, one split row. Their ids are the CheXmask rows the cohort needs."""
    rejects: list[dict] = list(tables.rejects)
    names = {k: v.format(labeler=labeler) for k, v in archive(tables.kind).tables.items()}
    meta = _valid_metadata(tables, rejects)
    df = _frontal_with_labels(meta, tables.labels, policy, archive(tables.kind), names, rejects)
    targets, status = apply_label_policy(df, policy.classes, policy.uncertain, policy.multi_positive,
                                         policy.priority)
    _reject(rejects, df.loc[status == 1, "dicom_id"],
            f"no positive among {', '.join(policy.classes)} (uncertain={policy.uncertain})")
    _reject(rejects, df.loc[status == 2, "dicom_id"], "several positives (multi_positive=single)")
    positives, uncertain = label_matrices(df, policy.classes, policy.uncertain)
    keep = status == 0
    df = df[keep].copy()
    df[label_columns(policy.classes)] = np.hstack([targets[keep], positives[keep], uncertain[keep]])
    df = df.drop(columns=["split"], errors="ignore").merge(
        _unique_rows(tables.split[["dicom_id", "split"]], names["split"], df["dicom_id"], rejects),
                  on="dicom_id", how="left", validate="many_to_one")
    _reject(rejects, df.loc[df["split"].isna(), "dicom_id"], f"image has no row in the {names['split']}")
    return df[df["split"].notna()], rejects


def attach_masks(df: pd.DataFrame, chexmask: pd.DataFrame, policy: CohortConfig, *, seed: int,
                 sizes_in_tables: bool = True, mean_above_max_is_suspect: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """Join the CheXmask rows (quality and sizes checked), split by patient.

    ``sizes_in_tables=False`` (NIH, CheXpert: no image size in the tables): Rows x Columns become
    CheXmask's Height x Width, which the shard stage then checks against the image file itself.
    ``mean_above_max_is_suspect=False`` (PadChest, whose CheXmask rows hold Mean and Max in no fixed
    order): Dice RCA (Mean) > (Max) is not read as a swapped header.
    """
    rejects: list[dict] = []
    df = _with_masks(df, chexmask, policy, rejects, sizes_in_tables, mean_above_max_is_suspect)
    df[["Rows", "Columns"]] = df[["Rows", "Columns"]].astype(np.int64)  # blank ones were rejected
    df["split"] = patient_split(df["subject_id"].to_numpy(), df["split"].to_numpy(), policy.split,
                                policy.val_fraction, seed)
    df = df.sort_values(["split", "subject_id", "study_id", "dicom_id"], kind="stable").reset_index(drop=True)
    return df, rejects


COHORT_COLUMNS = ["dicom_id", "subject_id", "study_id", "split", "ViewPosition", "Rows", "Columns", "path",
                  "quality_mean", "quality_max", *FINDINGS_ALL]


def _valid_metadata(tables: ArchiveTables, rejects: list) -> pd.DataFrame:
    """Rows whose identifiers are the archive's, with integer ids and their file path (built only
    now, from validated ids); the others rejected with the reason."""
    meta = tables.metadata
    problems = [id_problem(tables.kind, row) for row in meta[["dicom_id", "subject_id", "study_id"]].to_dict("records")]
    bad = np.array([p is not None for p in problems], bool)
    rejects.extend({"id": str(i)[:80], "stage": "cohort", "reason": r}
                   for i, r, b in zip(meta["dicom_id"], problems, bad) if b)
    meta = meta[~bad].copy()
    for col in ("subject_id", "study_id"):
        meta[col] = pd.to_numeric(meta[col]).astype(np.int64)
    needed = [c for c in ("dicom_id", "subject_id", "study_id", "prefix") if c in meta]
    meta["path"] = [relpath(tables, row) for row in meta[needed].to_dict("records")]
    return meta


def _unique_rows(table: pd.DataFrame, what: str, wanted, rejects: list) -> pd.DataFrame:
    """One row per dicom_id: identical duplicates collapse; conflicting ones are rejected (the image
    is left out, with a reason), never silently resolved by taking the first."""
    content = [c for c in table.columns if c != "rle_row"]  # where a row is stored is not its content
    table = table[table["dicom_id"].isin(set(wanted))].drop_duplicates(subset=content)
    conflict = table["dicom_id"].duplicated(keep=False)
    _reject(rejects, sorted(set(table.loc[conflict, "dicom_id"])), f"conflicting duplicate rows in the {what}")
    return table[~conflict]


def _frontal_with_labels(meta: pd.DataFrame, labels: pd.DataFrame, policy: CohortConfig, kind,
                         names: dict, rejects: list) -> pd.DataFrame:
    """Unique frontal images joined with exactly one label row of their study (or image)."""
    dup_images = meta["dicom_id"].duplicated(keep=False)
    _reject(rejects, meta.loc[dup_images, "dicom_id"].unique(), f"{kind.id_name} appears several times in {names['metadata']}")
    meta = meta[~dup_images]
    view = meta["ViewPosition"]
    frontal = view.isin(policy.views)
    for v, ids in meta.loc[~frontal].groupby(view.fillna("<blank>").loc[~frontal])["dicom_id"]:
        _reject(rejects, ids, f"view {v} is not one of {'/'.join(policy.views)}")
    meta = meta[frontal]

    key = list(kind.label_key)
    what = "study" if "study_id" in key else "image"
    if "label_problem" not in labels:
        labels = labels.assign(label_problem=None)
    labels = labels[[*key, *FINDINGS_ALL, "label_problem"]]
    dup = labels.duplicated(key, keep=False)
    dup_keys = set(map(tuple, labels.loc[dup, key].to_numpy().tolist()))
    labels = labels[~dup]
    df = meta.drop(columns=[c for c in (*FINDINGS_ALL, "label_problem") if c in meta]).merge(labels, on=key, how="left", indicator=True)
    in_dup = pd.Series([tuple(k) in dup_keys for k in df[key].to_numpy().tolist()], index=df.index, dtype=bool)
    _reject(rejects, df.loc[in_dup, "dicom_id"], f"{what} has several rows in {names['labels']} (ambiguous labels)")
    no_label = (df["_merge"] == "left_only") & ~in_dup
    _reject(rejects, df.loc[no_label, "dicom_id"], f"{what} has no row in {names['labels']}")
    unreadable = (df["_merge"] == "both") & df["label_problem"].notna()
    rejects.extend({"id": i, "stage": "cohort", "reason": f"{what}'s row in {names['labels']}: {p}"}
                   for i, p in zip(df.loc[unreadable, "dicom_id"], df.loc[unreadable, "label_problem"]))
    return df[(df["_merge"] == "both") & ~unreadable].drop(columns=["_merge", "label_problem"])


def _with_masks(df: pd.DataFrame, chexmask: pd.DataFrame, policy: CohortConfig, rejects: list,
                sizes_in_tables: bool = True, mean_above_max_is_suspect: bool = True) -> pd.DataFrame:
    """Join the CheXmask rows; reject images without a usable mask, one reason per image."""
    masks = _unique_rows(chexmask, "CheXmask table", df["dicom_id"], rejects)
    df = df.merge(masks, on="dicom_id", how="left", indicator=True, validate="many_to_one")
    if not sizes_in_tables:  # the image's size is CheXmask's; the shard stage checks the file against it
        df["Rows"], df["Columns"] = df["height"], df["width"]
    reasons = pd.Series(None, index=df.index, dtype=object)

    def flag(cond, text):
        sel = cond.fillna(False).astype(bool) & reasons.isna()
        reasons[sel] = text if isinstance(text, str) else text[sel]

    fmt = lambda col, spec: df[col].map(lambda v: _fmt(v, spec)).astype(object)  # noqa: E731
    flag(df["_merge"] == "left_only", "no CheXmask row for this image")
    flag(df["Rows"].isna() | df["Columns"].isna(), "metadata Rows x Columns is blank or not a number")
    flag(df["quality_mean"].isna(), "CheXmask Dice RCA (Mean) is blank")
    if mean_above_max_is_suspect:  # PadChest's CheXmask rows have Mean and Max in no fixed order
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


def stream_masks(chexmask_csv: str | Path, wanted, store_path: Path, id_column: str = "dicom_id") -> pd.DataFrame:
    """One pass over the CheXmask table: the wanted rows' RLE go to the store at ``store_path``,
    chunk by chunk; returns their small columns (ids, quality, sizes) with ``rle_row`` and
    ``rle_digest``. The caller renames the store into place when it commits the cohort."""
    small = []
    store = RLEStore(store_path)
    try:
        for chunk in iter_chexmask(chexmask_csv, id_column=id_column, ids=wanted, chunksize=CHEXMASK_CHUNK_ROWS):
            rows, digests = store.append(chunk)
            small.append(chunk[["dicom_id", "quality_mean", "quality_max", "height", "width"]]
                         .assign(rle_row=rows, rle_digest=[d.hex() for d in digests]))
    finally:
        store.close()
    cols = ["dicom_id", "quality_mean", "quality_max", "height", "width", "rle_row", "rle_digest"]
    return pd.concat(small, ignore_index=True) if small else pd.DataFrame(columns=cols)


def build_cohort(cfg: Config, progress: bool = True) -> dict:
    """Run the cohort stage; idempotent (a rerun with the same inputs and config is a no-op)."""
    with stage_run(cfg.workdir, "cohort", cfg.permissions):
        return _build_cohort(cfg)


def _build_cohort(cfg: Config) -> dict:
    c = cfg.cohort
    work = Workdir(cfg.workdir)
    archive_settings = {k: v for k, v in cfg.to_dict()["archive"].items() if k != "options" or v}  # {}: as before
    inputs_fp = stable_hash({"cohort": cfg.to_dict()["cohort"], "archive": archive_settings,
                             "seed": cfg.seed, "version": COHORT_VERSION, "inputs": _input_stamp(cfg)})
    if work.cohort_manifest.exists() and read_json(work.cohort_manifest).get("inputs_fingerprint") == inputs_fp:
        try:
            record = read_record(work.cohort_manifest, "cohort")
            log.info("cohort: %s is up to date", work.cohort_dir)
            return record.data
        except RecordError as exc:  # edited or from an older version: built again
            log.warning("cohort: rebuilding (%s)", exc)
    found = archive(cfg.archive.kind)
    tables = read_archive_tables(cfg, with_chexmask=False)
    images, rejects = select_images(tables, c, labeler=cfg.archive.labeler)
    store = private_tmp(work.masks_rle)
    try:
        masks = stream_masks(cfg.archive.chexmask_csv, images["dicom_id"], store, chexmask_id_column(cfg))
        df, more = attach_masks(images, masks, c, seed=cfg.seed, sizes_in_tables=found.sizes_in_tables,
                                mean_above_max_is_suspect=found.mean_above_max_is_suspect)
        # from here the old cohort is replaced: withdraw its commit first, so that no later stage
        # reads a new masks-rle.h5 beside an old cohort.csv if this process dies half-way
        work.cohort_manifest.unlink(missing_ok=True)
        os.replace(store, work.masks_rle)
    finally:
        store.unlink(missing_ok=True)
    rejects += more
    cohort = df[COHORT_COLUMNS + ["rle_row"] + label_columns(c.classes)]
    boxes = None
    if tables.boxes is not None:  # the radiologists' boxes of the cohort's images and classes
        boxes, box_rejects = cohort_boxes(tables.boxes, cohort, c.classes, tables.boxes_in_pixels)
        rejects += box_rejects
    rejects_df = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
    files = write_cohort_tables(work, cohort, boxes, rejects_df)
    # per class: training targets (under `first`, the first positive in the target order: not a
    # prevalence) and positives (every image where the finding is positive under the uncertain policy)
    counts = {s: {"images": int((cohort["split"] == s).sum()),
                  "patients": int(cohort.loc[cohort["split"] == s, "subject_id"].nunique()),
                  "targets": {cl: int(cohort.loc[cohort["split"] == s, f"target_{cl}"].sum()) for cl in c.classes},
                  "positives": {cl: int(cohort.loc[cohort["split"] == s, f"positive_{cl}"].sum())
                                for cl in c.classes}}
              for s in ("train", "val", "test")}
    # the record is the one source of the cohort's decisions for every later stage: the classes,
    # the label policy and the order that makes a multi-positive image one class (findings.first_positive)
    record = write_record(
        work.cohort_manifest, work.root, "cohort", "radacx cohort",
        files=[p.name for p in files],
        inputs_fingerprint=inputs_fp, rle_hash=rle_content_hash(bytes.fromhex(d) for d in df["rle_digest"]),
        rows=len(cohort), rejects=len(rejects_df), reject_reasons=reason_counts(rejects_df["reason"]),
        counts=counts, classes=list(c.classes),
        target_order=[c.classes[i] for i in target_order(c.classes, c.priority)],
        policy={"uncertain": c.uncertain, "multi_positive": c.multi_positive, "priority": list(c.priority),
                "split": c.split, "val_fraction": c.val_fraction, "min_mask_quality": c.min_mask_quality,
                "views": list(c.views), "seed": cfg.seed,
                **found.policy(cfg)},
        archive=cfg.archive.kind, archive_name=found.name,
        **({"archive_summary": summary} if (summary := found.summary(df)) else {}),
        synthetic_archive=phantom_home(cfg.archive.root) is not None)
    return record.data


def cohort_boxes(boxes: pd.DataFrame, cohort: pd.DataFrame, classes, in_pixels: bool) -> tuple[pd.DataFrame, list]:
    """The boxes that are truth for the cohort: of its images, of a class the image is positive for
    under the label policy (a finding one of three readers boxed is not what the readers agreed on),
    as fractions of the image's width and height. Boxes given in pixels (VinDr) are divided by the
    cohort's Rows x Columns (CheXmask's frame, checked against the image by the shard stage); one
    that does not lie inside that frame is a reject row, not silently clipped."""
    boxes = boxes[boxes["finding"].isin(classes)].merge(
        cohort[["dicom_id", "Rows", "Columns", *(f"positive_{k}" for k in classes)]], on="dicom_id", how="inner")
    column = boxes["finding"].map({k: i for i, k in enumerate(classes)}).to_numpy(int)
    boxes = boxes[boxes[[f"positive_{k}" for k in classes]].to_numpy()[np.arange(len(boxes)), column] == 1]
    rejects = []
    if in_pixels and len(boxes):
        w, h = boxes["Columns"].to_numpy(float), boxes["Rows"].to_numpy(float)
        outside = (boxes["x1"] > w) | (boxes["y1"] > h)
        rejects = [{"id": i, "stage": "cohort", "reason": f"{f} box by reader {r} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) "
                    f"is not inside the image's {int(hh)}x{int(ww)} pixels"}
                   for i, f, r, x0, y0, x1, y1, hh, ww in boxes.loc[outside, ["dicom_id", "finding", "reader", "x0", "y0",
                                                                           "x1", "y1", "Rows", "Columns"]].to_numpy()]
        boxes = boxes.assign(x0=boxes["x0"] / w, x1=boxes["x1"] / w, y0=boxes["y0"] / h, y1=boxes["y1"] / h)[~outside]
    return boxes[BOXES_COLUMNS].sort_values(["dicom_id", "finding", "x0", "y0"], kind="stable"), rejects


def _input_stamp(cfg: Config) -> dict:
    """Size and mtime of every input table: a changed archive invalidates the cohort."""
    stamp = {}
    for p in input_files(cfg):
        if p.exists():
            st = p.stat()
            stamp[str(p.name)] = [st.st_size, st.st_mtime_ns]
    return stamp
