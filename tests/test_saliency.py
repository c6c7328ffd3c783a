"""Saliency (issues 9, 20): the metrics say what constructed models do, maps align with the shards'
masks under padding, and the check against the controls fails for maps drawn without a model."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from radacx_cache.attribution import saliency_maps
from radacx_cache.formats.shard import open_shards
from radacx_cache.phantom.truth import read_truth, region_at, truth_path
from radacx_cache.render import Geometry
from radacx_cache.saliency_metrics import image_metrics, regions


class HeartOnly(torch.nn.Module):
    """Two classes; the score depends only on the pixels inside a fixed heart mask (conv features
    masked before pooling, so a CAM on `features` can only see the heart)."""

    def __init__(self, heart: np.ndarray):
        super().__init__()
        self.register_buffer("heart", torch.as_tensor(heart, dtype=torch.float32)[None, None])
        self.features = torch.nn.Conv2d(3, 4, 1)  # 1x1: no receptive field beyond the pixel itself
        self.gate = torch.nn.Identity()
        self.head = torch.nn.Linear(4, 2)
        with torch.no_grad():  # fixed weights (no draw from the session's RNG): class 0 grows with brightness
            self.features.weight.fill_(1 / 3)
            self.features.bias.zero_()
            self.head.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
            self.head.bias.zero_()

    def forward(self, x):
        f = self.gate(torch.relu(self.features(x)) * self.heart)
        return self.head(f.mean((2, 3)))


class InkOnly(torch.nn.Module):
    """The score is the amount of pure red/green/blue overlay colour: the drawn lines alone."""

    def forward(self, x):
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        ink = torch.relu(r - g) + torch.relu(g - r) + torch.relu(b - r)
        return torch.stack([ink.mean((1, 2)), -ink.mean((1, 2))], 1)


@pytest.fixture(scope="module")
def item(pipeline):
    shards = open_shards(Path(pipeline["cfg"].workdir) / "shards").split("test")
    for i in range(len(shards)):  # a non-square original: padding on one side
        it = shards[i]
        if it["geometry"][3] > 0 or it["geometry"][4] > 0:
            return it
    pytest.fail("no padded test image in the session phantom")


def test_a_model_that_sees_only_the_heart_is_measured_so(item):
    reg = regions(item["masks"], 2)
    model = HeartOnly(reg["heart"]).eval()
    x = torch.from_numpy(np.repeat(item["original"][None, None], 3, 1).astype(np.float32) / 255)
    for method, layer in (("integrated_gradients", None), ("gradcam", model.gate)):
        maps = saliency_maps(method, model, x.clone().requires_grad_(False), [0], cam_layer=layer, ig_steps=8)
        assert maps.shape == (1, 224, 224)
        m = image_metrics(maps[0], reg, "Cardiomegaly")
        assert m["organ"] > 0.95 and m["organ_area"] < 0.2, (method, m)  # far above the area baseline
        assert m["pointing"] == 1.0


def test_a_model_that_sees_only_the_overlay_ink_is_measured_so(item):
    reg = regions(item["masks"], 2)
    x = torch.from_numpy(item["masked"].transpose(2, 0, 1)[None].astype(np.float32) / 255)
    maps = saliency_maps("integrated_gradients", InkOnly(), x, [0], ig_steps=8)
    m = image_metrics(maps[0], reg, "Edema")
    assert m["ink"] > 0.9 and m["ink_area"] < 0.1, m


def test_truth_regions_align_with_the_shard_masks_under_padding(pipeline, item):
    """The phantom's drawn heart (Cardiomegaly) and the CheXmask heart come from one polygon: mapped
    through the same geometry onto the 224 grid, they must coincide, padding and all."""
    cfg = pipeline["cfg"]
    path = truth_path(cfg.archive.root)
    assert path is not None
    test = open_shards(Path(cfg.workdir) / "shards").split("test")
    truth = read_truth(path, test.index["dicom_id"])
    checked = 0
    for i in range(len(test)):
        it = test[i]
        entry = truth.get(it["dicom_id"], {})
        if "Cardiomegaly" not in entry or it["mask_quality"] < 0.7:
            continue
        g = it["geometry"]
        geom = Geometry.from_array(g)
        drawn = region_at(entry["Cardiomegaly"], entry["shape"], geom, 224)
        heart = it["masks"][2].astype(bool)
        iou = (drawn & heart).sum() / (drawn | heart).sum()
        assert drawn.shape == (224, 224) and iou > 0.85, (it["dicom_id"], iou, g)
        checked += 1
    assert checked >= 5


@pytest.mark.slow
def test_phantom_truth_check_on_a_fine_tuned_arm(pipeline, tmp_path):
    from radacx_cache.config import load_config
    from radacx_cache.stages.finetune import train_variant
    from radacx_cache.stages.saliency import run_saliency
    cfg = pipeline["cfg"]
    for part in ("cohort", "shards"):
        (tmp_path / part).symlink_to(Path(cfg.workdir) / part)
    run = load_config(None, [f"workdir={tmp_path}", "seed=7", f"archive.root={cfg.archive.root}",
                             "finetune.batch_size=16", "finetune.block_rows=32", "finetune.shuffle_buffer=64",
                             "finetune.lr_encoder=0.002", "finetune.lr_head=0.002", "finetune.warmup_steps=5",
                             "finetune.epochs=20", "finetune.patience=20", "finetune.checkpoint_every=0",
                             "saliency.images=40", "saliency.ig_steps=8", "saliency.panels=2", "report.bootstrap=100"])
    train_variant(run, "original", progress=False)
    result = run_saliency(run, progress=False)
    df = pd.read_csv(tmp_path / "results" / "saliency.csv", dtype={"dicom_id": str})
    model = df[df["source"] == "model"]
    assert set(model["arm"]) == {"V3"} and len(model) == 40 * 2 * 2  # images x variants x methods
    controls = df[df["source"] != "model"]
    assert set(controls["source"]) == {"uniform_anatomy", "centred_gaussian", "random_head", "shuffled_maps",
                                       "input_intensity"}
    assert (controls["method"] == "integrated_gradients").all() and len(controls) == 5 * 40 * 2
    v3 = model[(model["tested_on"] == "original") & model["truth"].notna()]
    assert len(v3) >= 10
    # the uniform control recomputed from its definition: the drawn region's share of lungs + heart
    uniform = controls[controls["source"] == "uniform_anatomy"].set_index(["dicom_id", "tested_on"])
    row = v3[v3["method"] == "integrated_gradients"].iloc[0]
    got = uniform.loc[(row["dicom_id"], "original")]
    assert got["truth"] == pytest.approx(got["truth_area"] / got["anatomy_area"], rel=0.05)
    data = json.loads((tmp_path / "results" / "saliency.json").read_text())
    (check,) = [c for c in data["checks"] if c["tested_on"] == "original"]
    assert check["method"] == "integrated_gradients" and set(check["controls"]) == set(uniform["source"].unique()) | {
        "centred_gaussian", "random_head", "shuffled_maps", "input_intensity"}
    assert ("PASSED" if check["passed"] else "NOT PASSED") in result["table"]
    assert "Saliency check against controls" in result["table"]
    assert (tmp_path / "results" / "saliency" / "V3.png").exists()


def _synthetic_rows(kind: str, n: int = 40, seed: int = 0) -> list[dict]:
    """One arm's rows on ``n`` synthetic images (two per patient): anatomy a fixed block, the finding
    drawn as a random 12 x 12 patch inside it. ``kind``: the map the "model" draws."""
    from radacx_cache.saliency_metrics import centred_gaussian_map, image_metrics, regions
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        masks = np.zeros((3, 64, 64), np.uint8)
        masks[0, 8:56, 6:30], masks[1, 8:56, 34:58], masks[2, 30:50, 24:40] = 1, 1, 1
        reg = regions(masks, 1)
        truth = np.zeros((64, 64), bool)
        r, c = rng.integers(10, 40), rng.choice([8, 36])
        truth[r:r + 12, c:c + 12] = True
        smap = {"content_free": reg["anatomy"].astype(float), "oracle": truth.astype(float) + 0.01,
                "gaussian": centred_gaussian_map((64, 64))}[kind]
        base = {"arm": "V3", "method": "integrated_gradients", "tested_on": "original", "dicom_id": f"img{i}",
                "subject_id": i // 2, "position": i, "predicted": "Edema", "correct": True}
        rows.append({**base, "source": "model", **image_metrics(smap, reg, "Edema", truth),
                     "_map": smap, "_reg": reg, "_truth": truth, "_grey": rng.integers(0, 256, (64, 64))})
        random_head = rng.random((64, 64))  # a random head: evidence anywhere
        rows.append({**base, "source": "random_head", **image_metrics(random_head, reg, "Edema", truth)})
    return rows


@pytest.mark.parametrize("kind,passed", [("content_free", False), ("gaussian", False), ("oracle", True)])
def test_the_check_fails_for_maps_drawn_without_a_model(kind, passed):
    """The review's finding: a uniform map over lungs + heart 'passed' the old truth check. Against
    the controls, a content-free map and a fixed Gaussian fail, a map on the drawn finding passes."""
    from radacx_cache.saliency_metrics import control_checks, control_rows
    rows = _synthetic_rows(kind)
    model = [r for r in rows if r["source"] == "model"]
    df = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows + control_rows(model, 0)])
    assert set(df["source"]) == {"model", "uniform_anatomy", "centred_gaussian", "random_head", "shuffled_maps",
                                 "input_intensity"}
    (check,) = control_checks(df, "integrated_gradients", n_boot=300, seed=0)
    assert check["passed"] is passed, {c: v["diff"] for c, v in check["controls"].items()}
    if kind == "content_free":
        assert not check["controls"]["uniform_anatomy"]["beaten"]
        assert check["controls"]["uniform_anatomy"]["diff"]["diff"] == pytest.approx(0.0)


def test_shuffled_maps_are_never_scored_on_their_own_image():
    from radacx_cache.saliency_metrics import derangement
    for n in (2, 3, 10, 48):
        perm = derangement(n, seed=7)
        assert sorted(perm) == list(range(n)) and (perm != np.arange(n)).all()
