"""Synthetic phantom archive in the exact layout of a real archive + its CheXmask file (the embedded default).

Everything a reader sees is in the real format (``phantom/layouts/``). For MIMIC-CXR-JPG (the
default): the four ``mimic-cxr-2.0.0-*.csv.gz`` tables with their real columns, the
``files/pNN/pSUBJECT/sSTUDY/DICOM.jpg`` tree of quality-95 grey JPEGs, and a CheXmask
``OriginalResolution/MIMIC-CXR-JPG.csv`` with 1-based row-major RLE, 120 landmarks (right lung 44,
left lung 50, heart 26, in NumPy-repr text as ``back_mimic.py`` wrote them) and Dice RCA columns;
NIH ChestX-ray14 and CheXpert in theirs. Masks are filled polygons of their own landmarks, as CheXmask's are.

The five findings are drawn *inside the anatomy* so that a classifier can learn them and masks
matter: Cardiomegaly widens the heart (cardiothoracic ratio > 0.5), Pleural Effusion fills the
lung base under a meniscus and blunts the costophrenic angle, Consolidation is a dense patch in a
lobe, Edema a bilateral perihilar haze, Atelectasis a raised hemidiaphragm (volume loss) with a
plate-like band. Uncertain (-1) findings are drawn at half strength.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from .._io import atomic_path, progress_bar, write_json
from ..findings import FINDINGS, FINDINGS_ALL
from ..sources.chexmask import encode_rle, polygon_mask
from .faults import plant_faults
from .layouts import CHEXMASK_SUBDIR, LAYOUTS
from .truth import phantom_file, truth_file

log = logging.getLogger(__name__)

GENERATOR_VERSION = 5  # bump when the phantom's content changes (2: truth/findings.csv.gz; 3: layouts; 4: NIH boxes; 5: VinDr)

@dataclass
class Anatomy:
    right_lung: np.ndarray  # (44, 2) x, y
    left_lung: np.ndarray  # (50, 2)
    heart: np.ndarray  # (26, 2)
    cx: float
    thorax_half: float
    top: float
    base_right: float
    base_left: float


def _resample_closed(points: np.ndarray, n: int, smooth: int = 3) -> np.ndarray:
    """Densify a closed polygon, smooth it and take ``n`` points evenly spaced by arc length."""
    pts = np.vstack([points, points[:1]])
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    t = np.concatenate([[0], np.cumsum(seg)])
    dense_t = np.linspace(0, t[-1], 400, endpoint=False)
    dense = np.stack([np.interp(dense_t, t, pts[:, 0]), np.interp(dense_t, t, pts[:, 1])], 1)
    kernel = np.ones(2 * smooth * 4 + 1) / (2 * smooth * 4 + 1)
    padded = np.vstack([dense[-len(kernel):], dense, dense[:len(kernel)]])
    sm = np.stack([np.convolve(padded[:, i], kernel, "same") for i in (0, 1)], 1)
    dense = sm[len(kernel):-len(kernel)]
    seg = np.linalg.norm(np.diff(np.vstack([dense, dense[:1]]), axis=0), axis=1)
    t = np.concatenate([[0], np.cumsum(seg)])
    want = np.linspace(0, t[-1], n, endpoint=False)
    closed = np.vstack([dense, dense[:1]])
    return np.stack([np.interp(want, t, closed[:, 0]), np.interp(want, t, closed[:, 1])], 1)


def make_anatomy(height: int, width: int, rng: np.random.Generator, *, ctr: float,
                 atelectasis_side: int | None = None) -> Anatomy:
    """Landmark contours of right lung, left lung and heart (patient's sides; right = image left)."""
    cx = width * (0.5 + rng.normal(0, 0.015))
    half = width * rng.uniform(0.33, 0.39)
    top = height * rng.uniform(0.09, 0.14)
    base = height * rng.uniform(0.70, 0.78)
    mediastinum = width * rng.uniform(0.045, 0.06)
    bases = [base + height * rng.normal(0, 0.01), base - height * 0.02 + height * rng.normal(0, 0.01)]
    if atelectasis_side is not None:  # volume loss: raised hemidiaphragm on that side
        bases[atelectasis_side] -= height * rng.uniform(0.07, 0.10)
    heart_w = ctr * 2 * half
    heart_cx = cx + 0.18 * heart_w
    heart_cy = base - height * 0.14
    heart_h = height * rng.uniform(0.11, 0.14)
    lungs = []
    for side, sign in ((0, -1), (1, 1)):
        lat = cx + sign * half
        med = cx + sign * mediastinum
        lung_base = bases[side]
        span = lung_base - top
        w = abs(lat - med)
        def x(frac):  # fraction of the way from the medial border to the lateral one
            return med + sign * frac * w
        # the left lung's lower medial border hugs the heart's left border (slight overlap)
        medial_low = max(med, heart_cx + 0.4 * heart_w) if side == 1 else x(0.05)
        key = np.array([
            (x(0.45), top), (x(0.75), top + 0.08 * span), (x(0.93), top + 0.35 * span),
            (x(1.0), top + 0.75 * span), (x(0.97), lung_base), (x(0.6), lung_base - 0.05 * span),
            (medial_low, lung_base - 0.02 * span),
            (medial_low if side == 1 else med, top + 0.6 * span), (med, top + 0.35 * span),
            (x(0.15), top + 0.08 * span)])
        lungs.append(_resample_closed(key, 44 if side == 0 else 50))
    theta = np.linspace(0, 2 * np.pi, 26, endpoint=False)
    heart = np.stack([heart_cx + heart_w / 2 * np.cos(theta) * (1 + 0.08 * np.sin(theta)),
                      heart_cy + heart_h * np.sin(theta)], 1)
    heart[:, 1] = np.minimum(heart[:, 1], base + height * 0.01)
    clip = lambda p: np.stack([np.clip(p[:, 0], 0, width - 1), np.clip(p[:, 1], 0, height - 1)], 1)
    return Anatomy(clip(lungs[0]).round().astype(int), clip(lungs[1]).round().astype(int),
                   clip(heart).round().astype(int), cx, half, top, bases[0], bases[1])


def _blur(arr: np.ndarray, radius: float) -> np.ndarray:
    im = Image.fromarray(np.clip(arr * 255, 0, 255).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255


def draw_frontal(height: int, width: int, anatomy: Anatomy, findings: dict[str, float],
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Render a frontal radiograph; ``findings`` maps a finding to its strength (0, 0.5 or 1).

    Returns the pixels, the anatomy masks and, per drawn finding, the region it was drawn in (the
    phantom's known truth).
    """
    shape = (height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    masks = {name: polygon_mask(getattr(anatomy, name), shape) for name in ("right_lung", "left_lung", "heart")}
    img = np.full(shape, 0.04, np.float32)
    body = ((xx - anatomy.cx) / (anatomy.thorax_half * 1.25)) ** 2 < 1
    img[body] = 0.50
    img += 0.08 * (yy / height)
    lungs = masks["right_lung"] | masks["left_lung"]
    # ribs: bright arcs over the lungs
    spacing = (max(anatomy.base_right, anatomy.base_left) - anatomy.top) / 9
    rib_phase = (yy - anatomy.top - 0.0009 * (xx - anatomy.cx) ** 2 * 500 / width) % spacing
    ribs = (rib_phase < spacing * 0.28).astype(np.float32)
    img[lungs] = 0.17 + 0.07 * ribs[lungs]
    spine = np.abs(xx - anatomy.cx) < width * 0.035
    img[spine & ~lungs] += 0.18
    img[masks["heart"]] = np.maximum(img[masks["heart"]], 0.62)
    diaphragm = (yy > anatomy.base_right) & (xx < anatomy.cx) | (yy > anatomy.base_left) & (xx >= anatomy.cx)
    img[diaphragm & body & ~lungs] = np.maximum(img[diaphragm & body & ~lungs], 0.56)
    span = max(anatomy.base_right, anatomy.base_left) - anatomy.top
    drawn: dict[str, np.ndarray] = {}

    def mark(finding, region):
        drawn[finding] = drawn.get(finding, np.zeros(shape, bool)) | region

    if findings.get("Cardiomegaly", 0):
        mark("Cardiomegaly", masks["heart"])  # the enlarged heart is the finding
    for side, name in enumerate(("right_lung", "left_lung")):
        m = masks[name]
        xs = np.flatnonzero(m.any(0))
        if xs.size == 0:
            continue
        x0, x1 = xs.min(), xs.max()
        base = anatomy.base_right if side == 0 else anatomy.base_left
        lateral = x0 if side == 0 else x1
        s = findings.get("Pleural Effusion", 0) * (1.0 if side == findings.get("_effusion_side", side) or
                                                     findings.get("_effusion_bilateral") else 0.0)
        if s:
            depth = span * rng.uniform(0.18, 0.28)
            level = base - depth + depth * 0.6 * (1 - np.abs(xx - lateral) / max(x1 - x0, 1))
            fluid = m & (yy > level - 0.4 * depth * (np.abs(xx - lateral) / max(x1 - x0, 1)) ** 2)
            img[fluid] = img[fluid] * (1 - 0.8 * s) + 0.62 * 0.8 * s
            mark("Pleural Effusion", fluid)
        s = findings.get("Consolidation", 0) * (side == findings.get("_consolidation_side", 0))
        if s:
            cy = anatomy.top + span * rng.uniform(0.35, 0.7)
            ccx = x0 + (x1 - x0) * rng.uniform(0.3, 0.7)
            r = (x1 - x0) * rng.uniform(0.18, 0.28)
            patch = np.exp(-(((xx - ccx) ** 2 + ((yy - cy) * 1.3) ** 2) / (2 * r * r)) ** 2)
            img += 0.5 * s * patch * m
            mark("Consolidation", m & (patch > 0.25))
        s = findings.get("Edema", 0)
        if s:
            hx = anatomy.cx + (-1 if side == 0 else 1) * (x1 - x0) * 0.35
            hy = anatomy.top + span * 0.5
            r = (x1 - x0) * 0.45
            haze = np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * r * r))
            img += 0.32 * s * haze * m
            mark("Edema", m & (haze > 0.35))
        s = findings.get("Atelectasis", 0) * (side == findings.get("_atelectasis_side", 0))
        if s:
            by = base - span * rng.uniform(0.12, 0.22)
            band = (np.abs(yy - by - 0.08 * (xx - (x0 + x1) / 2)) < span * 0.018) & m
            band &= np.abs(xx - (x0 + x1) / 2) < (x1 - x0) * 0.35
            img[band] += 0.45 * s
            mark("Atelectasis", band)
    img = _blur(np.clip(img, 0, 1), radius=max(1.0, width / 400))
    img += rng.normal(0, 0.025, shape).astype(np.float32)
    return np.clip(img * 255, 0, 255).astype(np.uint8), masks, drawn


def draw_lateral(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.full((height, width), 0.05, np.float32)
    body = ((xx - width * 0.5) / (width * 0.33)) ** 2 + ((yy - height * 0.5) / (height * 0.55)) ** 2 < 1
    img[body] = 0.5
    lung = ((xx - width * 0.5) / (width * 0.22)) ** 2 + ((yy - height * 0.42) / (height * 0.3)) ** 2 < 1
    img[lung] = 0.22
    img[np.abs(xx - width * 0.75) < width * 0.04] += 0.2
    img = _blur(np.clip(img, 0, 1), max(1.0, width / 400)) + rng.normal(0, 0.025, img.shape)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def sample_study_findings(rng: np.random.Generator) -> dict[str, float]:
    """Study-level labels with realistic co-occurrence; values 1, 0, -1 or NaN."""
    labels = {name: np.nan for name in FINDINGS_ALL}
    kind = rng.random()
    if kind < 0.15:
        labels["No Finding"] = 1.0
        for name in FINDINGS:
            if rng.random() < 0.5:
                labels[name] = 0.0
        return labels
    pos = dict.fromkeys(FINDINGS, False)
    # about a quarter of abnormal studies carry none of the five (devices, fractures, ...)
    while kind >= 0.35 and not any(pos.values()):
        pos["Cardiomegaly"] = rng.random() < 0.32
        pos["Edema"] = rng.random() < (0.35 if pos["Cardiomegaly"] else 0.1)
        pos["Pleural Effusion"] = rng.random() < (0.45 if pos["Cardiomegaly"] or pos["Edema"] else 0.22)
        pos["Atelectasis"] = rng.random() < (0.4 if pos["Pleural Effusion"] else 0.2)
        pos["Consolidation"] = rng.random() < 0.14
    for name in FINDINGS:
        if pos[name]:
            labels[name] = -1.0 if rng.random() < 0.1 else 1.0
        elif rng.random() < 0.4:
            labels[name] = 0.0
    if pos["Consolidation"] or pos["Atelectasis"] or pos["Edema"]:
        labels["Lung Opacity"] = 1.0 if rng.random() < 0.6 else np.nan
    if rng.random() < 0.2:
        labels["Support Devices"] = 1.0
    if rng.random() < 0.03:
        labels["Fracture"] = 1.0
    return labels


def generate(out: str | Path, *, n_patients: int = 300, long_side: int = 448, seed: int = 0,
             faults: bool = False, progress: bool = True, layout: str = "mimic") -> dict:
    """Write the phantom archive under ``out`` in ``layout`` (mimic | nih | chexpert | vindr: that archive's
    real file and table layout, phantom/layouts/); returns a summary (paths, counts, planted faults)."""
    out = Path(out)
    lay = LAYOUTS[layout]
    params = {"patients": int(n_patients), "seed": seed, "long_side": long_side, "faults": bool(faults),
              "generator_version": GENERATOR_VERSION, "layout": layout}
    marker = out / phantom_file(layout)
    if marker.exists():
        previous = json.loads(marker.read_text())
        if all(previous.get(k) == v for k, v in params.items()):
            log.info("phantom: %s is up to date", out)
            return previous
    rng = np.random.default_rng(seed)
    root = out / lay.subdir
    chexmask_dir = out / CHEXMASK_SUBDIR
    meta_rows, label_rows, split_rows, mask_rows, truth_rows = [], [], [], [], []
    subject_ids = lay.subjects(rng, n_patients)
    study_pool = iter(rng.choice(np.arange(50_000_000, 60_000_000), n_patients * 5, replace=False))
    images = []  # (row dict, labels) kept only long enough to write
    for subject in progress_bar(subject_ids, desc="phantom patients", enabled=progress):
        split = lay.split(rng)
        date = 2100_00_00 + int(rng.integers(1, 80)) * 1_00_00 + 101
        for study_number in range(1 if lay.one_image_per_patient else int(rng.integers(1, 5))):
            study = lay.study_id(study_pool, study_number)
            labels = sample_study_findings(rng)
            label_rows.append({"subject_id": int(subject), "study_id": study, **labels})
            date += int(rng.integers(1, 400))
            n_images = 1 if lay.frontal_only else int(rng.choice([1, 2, 3], p=[0.35, 0.5, 0.15]))
            views = ["PA" if rng.random() < 0.45 else "AP"]
            views += ["LATERAL" if rng.random() < 0.8 else views[0] for _ in range(n_images - 1)]
            for view_number, view in enumerate(views):
                dicom_id = lay.image_id(rng, int(subject), study, study_number, view_number, view, split)
                aspect = 1.0 if lay.square else rng.uniform(0.8, 1.22)
                height = long_side if lay.square else int(long_side * rng.uniform(0.92, 1.0))
                width = height if lay.square else int(min(height * aspect, long_side * 1.05))
                row = {"dicom_id": dicom_id, "subject_id": int(subject), "study_id": study,
                       "PerformedProcedureStepDescription": "CHEST (PA AND LAT)" if view != "AP"
                       else "CHEST (PORTABLE AP)", "ViewPosition": view, "Rows": height,
                       "Columns": width, "StudyDate": date,
                       "StudyTime": float(rng.integers(0, 235959)) + 0.5,
                       "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                       "ViewCodeSequence_CodeMeaning": {"PA": "postero-anterior", "AP": "antero-posterior",
                                                        "LATERAL": "lateral"}[view],
                       "PatientOrientationCodeSequence_CodeMeaning": "Erect"}
                row["relpath"] = lay.relpath(row, split)
                meta_rows.append(row)
                split_rows.append({"dicom_id": dicom_id, "study_id": study, "subject_id": int(subject),
                                   "split": split})
                images.append((row, labels))
    log.info("phantom (%s): %d patients, %d studies, %d images", layout, n_patients, len(label_rows), len(images))
    for row, labels in progress_bar(images, desc="phantom images", enabled=progress):
        img_rng = np.random.default_rng([seed, int(row["study_id"]), lay.image_seed(row)])
        path = root / row["relpath"]
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width = row["Rows"], row["Columns"]
        if row["ViewPosition"] == "LATERAL":
            path.write_bytes(lay.encode(draw_lateral(height, width, img_rng), img_rng))
            continue
        strength = {k: (1.0 if labels[k] == 1 else 0.5 if labels[k] == -1 else 0.0) for k in FINDINGS}
        strength["_effusion_side"] = int(img_rng.integers(0, 2))
        strength["_effusion_bilateral"] = img_rng.random() < 0.4
        strength["_consolidation_side"] = int(img_rng.integers(0, 2))
        strength["_atelectasis_side"] = int(img_rng.integers(0, 2))
        ctr = img_rng.uniform(0.54, 0.64) if strength["Cardiomegaly"] == 1 else \
            img_rng.uniform(0.49, 0.53) if strength["Cardiomegaly"] == 0.5 else img_rng.uniform(0.36, 0.46)
        anatomy = make_anatomy(height, width, img_rng, ctr=ctr,
                               atelectasis_side=strength["_atelectasis_side"] if strength["Atelectasis"] else None)
        pixels, _, drawn = draw_frontal(height, width, anatomy, strength, img_rng)
        path.write_bytes(lay.encode(pixels, img_rng))
        truth_rows += [{"dicom_id": row["dicom_id"], "finding": k, "Height": height, "Width": width,
                        "RLE": encode_rle(v)} for k, v in drawn.items() if v.any()]
        if img_rng.random() < 0.03:  # CheXmask covers almost every frontal image, not all
            continue
        quality = float(np.clip(img_rng.normal(0.83, 0.05), 0.3, 0.93))
        if img_rng.random() < 0.04:
            quality = float(img_rng.uniform(0.45, 0.69))
        mask_anatomy = anatomy
        if quality < 0.7:  # a poor segmentation: the contours are visibly off
            jitter = lambda p: np.clip(p + img_rng.normal(0, width * 0.03, p.shape), 0,
                                       [width - 1, height - 1]).round().astype(int)
            mask_anatomy = Anatomy(jitter(anatomy.right_lung), jitter(anatomy.left_lung),
                                   jitter(anatomy.heart), anatomy.cx, anatomy.thorax_half, anatomy.top,
                                   anatomy.base_right, anatomy.base_left)
        points = np.vstack([mask_anatomy.right_lung, mask_anatomy.left_lung, mask_anatomy.heart])
        mask_rows.append({
            "dicom_id": row["dicom_id"], "Dice RCA (Mean)": quality,
            "Dice RCA (Max)": min(0.97, quality + float(img_rng.uniform(0.02, 0.06))),
            "Landmarks": lay.landmark_text(points),
            "Left Lung": encode_rle(polygon_mask(mask_anatomy.left_lung, (height, width))),
            "Right Lung": encode_rle(polygon_mask(mask_anatomy.right_lung, (height, width))),
            "Heart": encode_rle(polygon_mask(mask_anatomy.heart, (height, width))),
            "Height": height, "Width": width})
    meta = pd.DataFrame(meta_rows)
    labels_df = pd.DataFrame(label_rows)[["subject_id", "study_id", *FINDINGS_ALL]]
    split_df = pd.DataFrame(split_rows)
    masks_df = pd.DataFrame(mask_rows)
    planted = []
    if faults:
        planted, meta, labels_df, masks_df = plant_faults(root, meta, labels_df, masks_df, rng, lay)
    root.mkdir(parents=True, exist_ok=True)
    lay.write_tables(root, meta, labels_df, split_df, rng, truth_rows)
    lay.write_boxes(root, truth_rows)
    chexmask_csv = lay.write_chexmask(chexmask_dir, masks_df)
    with atomic_path(out / truth_file(layout)) as tmp:  # outside the real-format tree: the phantom's own truth
        pd.DataFrame(truth_rows, columns=["dicom_id", "finding", "Height", "Width", "RLE"]).to_csv(
            tmp, index=False, compression="gzip")
    summary = {"root": str(root), "chexmask_csv": str(chexmask_csv), "kind": layout,
               **params, "studies": len(labels_df), "images": len(meta), "mask_rows": len(masks_df),
               "faults": bool(faults), "planted": planted}
    write_json(marker, summary)  # written last: the phantom is complete
    return summary
