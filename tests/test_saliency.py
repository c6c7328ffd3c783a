"""Saliency (issue 9): the metrics say what constructed models do, maps align with the shards'
masks under padding, and on the phantom a fine-tuned arm looks where the findings were drawn."""
import numpy as np
import pandas as pd
import pytest
import torch

from radacx_cache.render import Geometry
from radacx_cache.stages.saliency import image_metrics, regions, saliency_maps
from radacx_cache.formats.shardset import open_shards
from radacx_cache.phantom.truth import read_truth, region_at, truth_path


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
    shards = open_shards(pipeline["cfg"].work / "shards").split("test")
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
    test = open_shards(cfg.work / "shards").split("test")
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
        (tmp_path / part).symlink_to(cfg.work / part)
    run = load_config(None, [f"workdir={tmp_path}", "seed=7", f"archive.root={cfg.archive.root}",
                             "finetune.batch_size=16", "finetune.block_rows=32", "finetune.shuffle_buffer=64",
                             "finetune.lr_encoder=0.002", "finetune.lr_head=0.002", "finetune.warmup_steps=5",
                             "finetune.epochs=20", "finetune.patience=20", "finetune.checkpoint_every=0",
                             "saliency.images=40", "saliency.ig_steps=8", "saliency.panels=2", "report.bootstrap=100"])
    train_variant(run, "original", progress=False)
    result = run_saliency(run, progress=False)
    df = pd.read_csv(tmp_path / "results" / "saliency.csv")
    assert set(df["arm"]) == {"V3"} and len(df) == 40 * 2 * 2  # images x variants x methods
    v3 = df[(df["tested_on"] == "original") & df["truth"].notna()]
    assert len(v3) >= 10
    best = max(v3[v3["method"] == m]["truth"].mean() / v3[v3["method"] == m]["truth_area"].mean()
               for m in ("gradcam", "integrated_gradients"))
    assert best > 1.3, v3.groupby("method")[["truth", "truth_area"]].mean()  # clearly above a uniform map
    assert (tmp_path / "results" / "saliency" / "V3.png").exists() and "Saliency" in result["table"]


def test_anatomy_mass_counts_both_lungs_and_the_heart():
    """Fixed numbers on hand-made regions: a map inside the right lung, inside the heart, or half
    inside the left lung and half outside every structure."""
    masks = np.zeros((3, 40, 40), np.uint8)
    masks[0, 5:35, 2:14] = 1
    masks[1, 5:35, 26:38] = 1
    masks[2, 20:30, 15:25] = 1
    reg = regions(masks, 1)
    right, heart = np.zeros((40, 40)), np.zeros((40, 40))
    right[10, 5] = 1.0
    heart[25, 20] = 1.0
    half = np.zeros((40, 40))
    half[10, 30], half[0, 0] = 1.0, 1.0
    assert image_metrics(right, reg, "Edema")["anatomy"] == pytest.approx(1.0)
    assert image_metrics(heart, reg, "Edema")["anatomy"] == pytest.approx(1.0)
    assert image_metrics(half, reg, "Edema")["anatomy"] == pytest.approx(0.5)
    assert image_metrics(heart, reg, "Cardiomegaly")["organ"] == pytest.approx(1.0)
    assert image_metrics(right, reg, "Cardiomegaly")["organ"] == pytest.approx(0.0)
    assert image_metrics(right, reg, "Edema")["anatomy_area"] == pytest.approx((360 + 360 + 100) / 1600)
