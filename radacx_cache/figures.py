"""Figures (PNG): the report's accuracy / AUROC / confusion plots and original-vs-masked montages."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def montage(path: str | Path, png: str | Path, n: int = 8) -> None:
    """Original (top) vs masked (bottom) images of the first ``n`` rows, with their targets."""
    with h5py.File(path, "r") as f:
        n = min(n, f["original"].shape[0])
        original, masked = f["original"][:n], f["masked"][:n]
        targets = f["targets"][:n]
        names = json.loads(f.attrs["target_names"]) if isinstance(f.attrs["target_names"], str) \
            else list(f.attrs["target_names"])
    if n == 0:
        raise ValueError(f"{path}: no rows to show")
    fig, axes = plt.subplots(2, n, figsize=(2 * n, 4.4), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(original[i], cmap="gray", vmin=0, vmax=255)
        axes[1, i].imshow(masked[i])
        title = "\n".join(names[j] for j in np.flatnonzero(targets[i] > 0)) or "-"
        axes[0, i].set_title(title, fontsize=7)
        for ax in axes[:, i]:
            ax.axis("off")
    axes[0, 0].text(-10, 112, "original", rotation=90, va="center", ha="right", fontsize=8)
    axes[1, 0].text(-10, 112, "masked", rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle("Original (top) and overlay (bottom) images; titles: training targets. Overlay key: "
                 "red = right lung, green = left lung, blue = heart (the patient's sides)", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# one colour scheme in every figure: the test image variant is the colour, the arm the position
VARIANT_COLORS = {"original": "#4c72b0", "masked": "#dd8452"}


def arm_key(descriptions: dict) -> str:
    """What V1-V4 are, for a figure's caption line."""
    return "; ".join(f"{name} = {text}" for name, text in descriptions.items())


def accuracy_figure(path: Path, results: dict, refs: dict, published: dict | None, descriptions: dict) -> None:
    """Headline accuracy per arm on original vs masked test images, with CIs, chance and majority."""
    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for j, (v, color) in enumerate(VARIANT_COLORS.items()):
        ci = np.array([results[n]["ci"][v]["argmax"] for n in names])
        ax.bar(x + (j - 0.5) * 0.38, ci[:, 0], 0.38, color=color, label=f"{v} test images",
               yerr=[ci[:, 0] - ci[:, 1], ci[:, 2] - ci[:, 0]], capsize=3)
    ax.axhline(refs["argmax"]["chance"][0], color="grey", ls="--", lw=1, label="chance (uniform)")
    ax.axhline(refs["argmax"]["majority"][0], color="k", ls=":", lw=1, label="majority class (train)")
    if published:  # the paper's MIMIC-CXR numbers: only beside results on MIMIC-CXR
        ax.scatter(x - 0.19, [published[n][0] for n in names], marker="_", color="k", s=200, label="published (MIMIC)")
        ax.scatter(x + 0.19, [published[n][1] for n in names], marker="_", color="k", s=200)
    ax.set_xticks(x, names)
    ax.set_ylabel("accuracy (top-1 = first positive finding)", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Accuracy on original vs masked test images (95% patient bootstrap CI)", fontsize=9)
    fig.text(0.01, 0.01, arm_key(descriptions), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def auroc_figure(path: Path, results: dict, classes, descriptions: dict) -> None:
    """Per-class AUROC with patient-bootstrap CIs: one panel per arm, the test variant as the colour
    (as in the accuracy figure), classes along the axis."""
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 1.5, 4.4), sharey=True, squeeze=False)
    x = np.arange(len(classes))
    for ax, name in zip(axes[0], names):
        for j, (v, color) in enumerate(VARIANT_COLORS.items()):
            au = np.array(results[name][v]["auroc"], float)
            ci = np.array(results[name].get("auroc_ci", {}).get(v, [(np.nan, np.nan)] * len(classes)), float)
            err = np.nan_to_num(np.abs(np.vstack([au - ci[:, 0], ci[:, 1] - au])))
            ax.bar(x + (j - 0.5) * 0.4, np.nan_to_num(au), 0.4, color=color, yerr=err, capsize=2,
                   label=f"{v} test images")
        ax.set_xticks(x, classes, fontsize=7, rotation=40, ha="right")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
    axes[0, 0].set_ylabel("AUROC (one-vs-rest, multi-hot positives)", fontsize=8)
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Per-class AUROC by arm, 95% patient bootstrap CI (dashed: chance 0.5)", fontsize=9)
    fig.text(0.01, 0.01, arm_key(descriptions), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def confusion_figure(path: Path, results: dict, classes) -> None:
    """Counts per (target, prediction) with row shares as colour, full class names and a colour bar."""
    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names) + 1.4, 7.6), squeeze=False)
    labels = [c.replace(" ", "\n") for c in classes]
    image = None
    for i, name in enumerate(names):
        for j, v in enumerate(("original", "masked")):
            counts = np.array(results[name][v]["confusion"], float)
            share = counts / counts.sum(1, keepdims=True).clip(1)
            ax = axes[j, i]
            image = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
            for (r, c), n in np.ndenumerate(counts):
                ax.text(c, r, f"{int(n)}", ha="center", va="center", fontsize=8,
                        color="white" if share[r, c] > 0.6 else "black")
            ax.set_title(f"{name}, {v} test images", fontsize=8)
            ax.set_xticks(range(len(classes)), labels, fontsize=7, rotation=90)
            ax.set_yticks(range(len(classes)), labels if i == 0 else [""] * len(classes), fontsize=7)
    fig.supylabel("target: first positive finding (target order)", fontsize=8)
    fig.supxlabel("top-1 prediction; numbers: images, colour: share of the row", fontsize=8)
    fig.suptitle("Confusion matrices", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.colorbar(image, ax=axes, fraction=0.02, pad=0.01, label="share of the target's images")
    fig.savefig(path, dpi=120)
    plt.close(fig)


SYNTHETIC_NOTE = "SYNTHETIC PHANTOM ARCHIVE: a test of the pipeline, not results on real radiographs"


def stamp(png: str | Path, text: str = SYNTHETIC_NOTE) -> None:
    """Add a band with ``text`` above a saved figure, so that it says what it was made from wherever
    it is copied to."""
    from PIL import Image, ImageDraw, ImageFont
    im = Image.open(png, formats=("PNG",)).convert("RGB")
    band = max(22, im.width // 45)
    out = Image.new("RGB", (im.width, im.height + band), (178, 34, 34))
    out.paste(im, (0, band))
    font = ImageFont.load_default(size=int(band * 0.6))
    ImageDraw.Draw(out).text((8, band // 2), text, fill=(255, 255, 255), font=font, anchor="lm")
    out.save(png)


def report_figures(path_of, results: dict, refs: dict, classes, shards_dir: Path, *, published: bool,
                   published_values: dict, synthetic: bool = False, descriptions: dict | None = None) -> list[str]:
    """accuracy.png, auroc_per_class.png, confusion.png and figure1_montage.png at ``path_of(name)``
    (the workdir's result paths); returns their paths. ``synthetic``: each figure says so in a band on top."""
    descriptions = descriptions or {}
    accuracy_figure(path_of("accuracy.png"), results, refs, published_values if published else None, descriptions)
    auroc_figure(path_of("auroc_per_class.png"), results, classes, descriptions)
    confusion_figure(path_of("confusion.png"), results, classes)
    paths = [str(path_of(n)) for n in ("accuracy.png", "auroc_per_class.png", "confusion.png")]
    shard = sorted(shards_dir.glob("test-*.h5"))
    if shard:
        montage(shard[0], path_of("figure1_montage.png"), n=6)
        paths.append(str(path_of("figure1_montage.png")))
    for path in paths if synthetic else ():
        stamp(path)
    return paths


def saliency_panels(folder: Path, rows: list[dict], test, n: int, seed: int) -> list[str]:
    """Per arm, ``n`` test images (half correct, half wrong on original images, seeded): each image
    and, per method, its heat map with the anatomy contours, on original and masked images."""
    if n <= 0:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 11])
    paths = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        first = [r for r in mine if r["method"] == methods[0] and r["tested_on"] == "original"]
        right = [r["position"] for r in first if r["correct"]]
        wrong = [r["position"] for r in first if not r["correct"]]
        pick = list(rng.permutation(right)[:(n + 1) // 2]) + list(rng.permutation(wrong)[:n // 2])
        if not pick:
            continue
        maps = {(r["position"], r["method"], r["tested_on"]): r for r in mine}
        cols = 2 * (1 + len(methods))
        fig, axes = plt.subplots(len(pick), cols, figsize=(1.9 * cols, 2.0 * len(pick)), squeeze=False)
        for i, pos in enumerate(pick):
            item = test[int(pos)]
            for j, variant in enumerate(("original", "masked")):
                img = item[variant]
                ax = axes[i, j * (1 + len(methods))]
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
                r0 = maps[(pos, methods[0], variant)]
                verdict = "= target" if r0["correct"] else "≠ target"
                ax.set_title(f"{variant}: predicted {r0['predicted']}\n({verdict})", fontsize=5)
                for k, method in enumerate(methods):
                    ax = axes[i, j * (1 + len(methods)) + 1 + k]
                    grey = img if img.ndim == 2 else img.mean(2)
                    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
                    heat = np.asarray(maps[(pos, method, variant)]["_map"], float)
                    heat = np.clip(heat / max(float(np.nanmax(heat)), 1e-12), 0, 1)  # each map on its own maximum
                    scale = ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
                    for m, color in zip(item["masks"], ("r", "g", "b")):
                        ax.contour(m.astype(float), levels=[0.5], colors=color, linewidths=0.5)
                    ax.set_title(method.replace("integrated_gradients", "IG"), fontsize=6)
        for ax in axes.ravel():
            ax.axis("off")
        fig.suptitle(f"{arm}: saliency (red right lung, green left lung, blue heart contours)", fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.94, 1))
        fig.colorbar(scale, ax=axes, fraction=0.02, pad=0.01,
                     label="saliency, share of the map's own maximum (positive evidence for the target)")
        path = folder / f"{arm}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def variant_figure(path: Path, test, variants, n: int = 3, seed: int = 0) -> None:
    """The overlay ablation's variants side by side on the same ``n`` test radiographs (seeded)."""
    pick = np.random.default_rng([seed, 22]).permutation(len(test))[:n]
    fig, axes = plt.subplots(len(pick), len(variants), figsize=(1.9 * len(variants), 2.0 * len(pick)), squeeze=False)
    for i, pos in enumerate(pick):
        item = test.row(int(pos), tuple(variants))
        for j, variant in enumerate(variants):
            axes[i, j].imshow(item[variant], cmap="gray" if item[variant].ndim == 2 else None, vmin=0, vmax=255)
            axes[i, j].set_title(variant if i == 0 else "", fontsize=7)
            axes[i, j].axis("off")
    fig.suptitle("Overlay variants on the same test radiographs (224 x 224 px; settings in shards/variants.json)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
