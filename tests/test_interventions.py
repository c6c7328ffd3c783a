"""Interventions and saliency that carries the class (issue 27), on hand-built models of known reliance.

Every check here is shown failing on a model or map that lacks the property: a model that reads only
the heart must lose its prediction when the heart is deleted and not when as many pixels outside the
anatomy are; a model that ignores the image must drop by exactly 0; a true gradient map must pass the
deletion test and the same maps shuffled across images must not; a trained and a random head must
give different region scores under the contrastive target. No pipeline is built: images are drawn here.
"""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from radacx_cache.attribution import RandomHead, curve_rows, explain, occlusion_rows, rank_correlation
from radacx_cache.interventions import (curve_auc, curve_images, curve_summary, equal_area_region, fill_image, occlude,
                                        occlusion_regions, occlusion_summary, rank_pixels)
from radacx_cache.models import unit_pixels
from radacx_cache.saliency_metrics import image_metrics, regions

SIZE = 64
LM = SimpleNamespace(to_input=unit_pixels)  # the models below read pixels in [0, 1]
SC = SimpleNamespace(fill="blur", blur_sigma=4.0)


def anatomy(seed: int) -> np.ndarray:
    """(3, S, S) masks: right lung, left lung, heart, shifted a little per image."""
    rng = np.random.default_rng(seed)
    dy, dx = rng.integers(-3, 4, 2)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    right = ((y - 28 - dy) / 18) ** 2 + ((x - 18 - dx) / 9) ** 2 < 1
    left = ((y - 28 - dy) / 18) ** 2 + ((x - 46 - dx) / 9) ** 2 < 1
    heart = ((y - 40 - dy) / 8) ** 2 + ((x - 32 - dx) / 8) ** 2 < 1
    return np.stack([right & ~heart, left & ~heart, heart])


def textured(seed: int) -> np.ndarray:
    """A grey image of fine random texture (what a blur removes) around mid-grey."""
    return np.clip(np.random.default_rng([seed, 1]).normal(120, 30, (SIZE, SIZE)), 0, 255).astype(np.uint8)


class HeartTexture(torch.nn.Module):
    """Three classes; class 0's logit is the texture energy (mean |horizontal difference|) inside the
    image's own heart, eroded so that no pixel outside the heart enters: it uses the heart and
    nothing else."""

    def __init__(self, heart: np.ndarray):
        super().__init__()
        inner = heart.copy()
        for _ in range(2):
            inner[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        self.register_buffer("inner", torch.as_tensor(inner[:, :-1], dtype=torch.float32))

    def forward(self, x):
        grey = x.mean(1)
        energy = ((grey[:, :, 1:] - grey[:, :, :-1]).abs() * self.inner).sum((1, 2)) / self.inner.sum()
        z = 40 * (energy - 0.05)
        return torch.stack([z, torch.zeros_like(z), torch.zeros_like(z)], 1)


class IgnoresImage(torch.nn.Module):
    def forward(self, x):
        return torch.tensor([[1.0, 0.2, -0.5]]).expand(len(x), 3) + 0 * x.sum((1, 2, 3))[:, None]


def occlusion_frame(model_for, n: int = 24) -> pd.DataFrame:
    rows = []
    for i in range(n):
        masks = anatomy(i)
        model = model_for(masks)
        image = textured(i)
        intact = torch.softmax(model(LM.to_input(torch.from_numpy(image[None]))), 1)[0].detach().numpy()
        fill = fill_image(image, SC.fill, SC.blur_sigma)
        rows += occlusion_rows(model, LM, image, fill, masks, None, regions(masks, 1), None, 0, intact,
                               np.random.default_rng([i, 2]), {"arm": "A", "tested_on": "original",
                                                               "dicom_id": f"d{i}", "subject_id": i, "position": i})
    return pd.DataFrame(rows)


def summary_of(df, region, mode="delete"):
    found = [r for r in occlusion_summary(df, 400, 0) if r["region"] == region and r["mode"] == mode]
    assert len(found) == 1
    return found[0]


def test_occluding_the_region_a_model_reads_drops_it_and_an_equal_area_control_does_not():
    df = occlusion_frame(lambda masks: HeartTexture(masks[2]))
    heart = summary_of(df, "heart")
    assert heart["drop"][1] > 0.2, heart["drop"]  # the CI's lower end: deleting the heart costs the class
    outside = heart["controls"]["equal_area_outside"]
    assert abs(outside["drop"][0]) < 1e-6  # as many pixels outside the anatomy: nothing changes
    assert outside["effect"]["low"] > 0.2 and outside["effect"]["p_value"] < 0.01
    # kept alone, the heart carries the prediction: far less is lost than when a random region is kept
    kept = summary_of(df, "heart", "keep")
    assert kept["drop"][0] < 0.05 and kept["controls"]["equal_area_outside"]["effect"]["low"] > 0.2
    # and the lungs, which it does not read, do not matter beyond their area
    lungs = summary_of(df, "lungs")
    assert abs(lungs["drop"][0]) < 1e-6


def test_a_model_that_ignores_the_image_drops_by_zero_everywhere():
    df = occlusion_frame(lambda masks: IgnoresImage())
    assert len(df) > 0 and np.abs(df["p_intact"] - df["p"]).max() < 1e-6
    for rec in occlusion_summary(df, 200, 0):
        assert abs(rec["drop"][0]) < 1e-6
        for c in rec["controls"].values():
            assert c["effect"] is None or (abs(c["effect"]["diff"]) < 1e-6 and not c["effect"]["low"] > 0)


def test_equal_area_controls_have_the_area_and_stay_where_they_are_told():
    masks = anatomy(0)
    reg = regions(masks, 1)
    found = occlusion_regions(reg, None, np.random.default_rng(0))
    for name, probes in found.items():
        area = int(probes["region"].sum())
        assert int(probes["equal_area"].sum()) == area
        if probes["equal_area_outside"] is not None:
            assert int(probes["equal_area_outside"].sum()) == area
            assert not (probes["equal_area_outside"] & reg["anatomy"]).any()
    assert found["outside_anatomy"]["equal_area_outside"] is None
    # a region larger than what is allowed has no control (never a smaller one)
    assert equal_area_region(10, np.zeros((8, 8), bool), np.random.default_rng(0)) is None
    assert equal_area_region(64, np.ones((8, 8), bool), np.random.default_rng(0)).all()


def test_occlude_and_fill():
    img = textured(3)
    region = np.zeros_like(img, bool)
    region[10:20, 10:20] = True
    fill = fill_image(img, "blur", 4.0)
    deleted, kept = occlude(img, region, fill, "delete"), occlude(img, region, fill, "keep")
    assert (deleted[region] == fill[region]).all() and (deleted[~region] == img[~region]).all()
    assert (kept[~region] == fill[~region]).all() and (kept[region] == img[region]).all()
    assert abs(float(fill.mean()) - float(img.mean())) < 2  # a blur keeps the brightness, removes the texture
    assert fill.std() < img.std() / 3
    assert (fill_image(img, "mean") == np.rint(img.mean())).all()
    with pytest.raises(ValueError, match="fill"):
        fill_image(img, "black")


# ---------------------------------------------------------------- deletion / insertion curves
class BrightSpot(torch.nn.Module):
    """Two classes; class 0 grows with the amount of pixels brighter than 0.7: the one bright spot
    each image has, wherever it is."""

    def forward(self, x):
        z = 6 * torch.relu(x.mean(1) - 0.7).sum((1, 2)) / 20 - 2
        return torch.stack([z, -z], 1)


def spot_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 3])
    img = rng.normal(100, 12, (SIZE, SIZE))
    cy, cx = rng.integers(10, SIZE - 10, 2)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    img[(y - cy) ** 2 + (x - cx) ** 2 <= 16] = 250
    return np.clip(img, 0, 255).astype(np.uint8)


def gradient_map(model, image: np.ndarray, target: int) -> np.ndarray:
    """The model's true input gradient × input for ``target`` (what a faithful map ranks first)."""
    x = LM.to_input(torch.from_numpy(image[None])).requires_grad_(True)
    model(x)[0, target].backward()
    return (x.grad * x).sum(1)[0].detach().numpy().clip(0)


def curves_frame(maps: dict, images: dict, steps: int = 8) -> pd.DataFrame:
    model, rows = BrightSpot(), []
    for i, image in images.items():
        reg = {"anatomy": np.zeros(image.shape, bool)}
        reg["anatomy"][16:48, 8:56] = True
        rows += curve_rows(model, LM, image, fill_image(image, "blur", 4.0), maps[i], reg, 0, steps,
                           np.random.default_rng([i, 4]), {"arm": "A", "tested_on": "original", "dicom_id": f"d{i}",
                                                           "subject_id": i, "position": i})
    return pd.DataFrame(rows)


def deletion_gain(df: pd.DataFrame, control: str = "random_order") -> dict:
    rec = [r for r in curve_summary(df, 400, 0) if r["curve"] == "deletion"][0]
    return rec["gain"][control]


def test_the_true_gradient_map_passes_the_deletion_test_and_the_same_maps_shuffled_fail():
    images = {i: spot_image(i) for i in range(20)}
    maps = {i: gradient_map(BrightSpot(), img, 0) for i, img in images.items()}
    true = deletion_gain(curves_frame(maps, images))
    assert true["low"] > 0.1, true  # the evidence goes first: the class falls at once
    shuffled = deletion_gain(curves_frame({i: maps[(i + 1) % 20] for i in maps}, images))
    assert not shuffled["low"] > 0, shuffled  # another image's spot: no better than a random order
    # the insertion curve agrees: the true map puts the evidence back first
    rec = [r for r in curve_summary(curves_frame(maps, images), 400, 0) if r["curve"] == "insertion"][0]
    assert rec["gain"]["random_order"]["low"] > 0.1


def test_curve_images_change_the_ranked_pixels_in_equal_steps():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    fill = np.full_like(img, 200)
    order = rank_pixels(img.astype(float), np.random.default_rng(0))
    assert list(order[:3]) == [15, 14, 13]  # highest first
    dele = curve_images(img, fill, order, 4, "deletion")
    ins = curve_images(img, fill, order, 4, "insertion")
    assert (dele[0] == img).all() and (dele[-1] == fill).all() and (ins[0] == fill).all() and (ins[-1] == img).all()
    assert [(d == 200).sum() for d in dele] == [0, 4, 8, 12, 16]
    assert (dele[1].ravel()[[12, 13, 14, 15]] == 200).all()
    assert curve_auc([1, 1, 1]) == 1.0 and curve_auc([1, 0, 0]) == 0.25
    # ties (a flat map) are broken at random, never in raster order (which deletes the top rows first)
    flat = rank_pixels(np.zeros((8, 8)), np.random.default_rng(1))
    assert sorted(flat) == list(range(64)) and list(flat[:8]) != list(range(8))


# ---------------------------------------------------------------- saliency that carries the class
class TwoRegions(torch.nn.Module):
    """An encoder with two features (the mean grey inside the heart, inside the lungs) and a head:
    the trained head reads class 0 from the heart only (class 1 is its constant alternative), so
    "class 0 rather than the others" is the heart alone."""

    def __init__(self, masks: np.ndarray):
        super().__init__()
        self.register_buffer("heart", torch.as_tensor(masks[2], dtype=torch.float32))
        self.register_buffer("lungs", torch.as_tensor(masks[0] | masks[1], dtype=torch.float32))
        self.visual = torch.nn.Identity()
        self.head = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
            self.head.bias.zero_()

    def features(self, x):
        grey = x.mean(1)
        return torch.stack([(grey * self.heart).sum((1, 2)) / self.heart.sum(),
                            (grey * self.lungs).sum((1, 2)) / self.lungs.sum()], 1)

    def forward(self, x):
        return self.head(self.features(x))


def heart_scores(head: str, n: int = 16) -> np.ndarray:
    out = []
    for i in range(n):
        masks = anatomy(i)
        model = TwoRegions(masks)
        net = model if head == "trained" else RandomHead(model, seed=i)
        image = textured(i)
        x = LM.to_input(torch.from_numpy(image[None]))
        base = LM.to_input(torch.from_numpy(fill_image(image, "blur", 4.0)[None]))
        maps, complete = explain("integrated_gradients", net, x, [0], baseline=base, ig_steps=16)
        with torch.no_grad():
            logits, start = net(x)[0], net(base)[0]
        change = float((logits[0] - logits.mean()) - (start[0] - start.mean()))
        assert complete[0] == pytest.approx(change, rel=1e-3, abs=1e-5)  # completeness, contrastive target
        out.append(image_metrics(maps[0], regions(masks, 1), "Cardiomegaly")["organ"])
    return np.array(out)


def test_with_the_contrastive_target_a_trained_and_a_random_head_give_different_region_scores():
    from radacx_cache.metrics import paired_difference
    trained, random = heart_scores("trained"), heart_scores("random")
    assert trained.min() > 0.99  # class 0 reads the heart only: its map is in the heart
    d = paired_difference(random, trained, np.ones(len(trained), bool), np.arange(len(trained)), n_boot=400)
    assert d["low"] > 0.05, (d, random)


def test_the_random_head_is_not_the_trained_head():
    model = TwoRegions(anatomy(0))
    rand = RandomHead(model, seed=3)
    assert not torch.allclose(rand.head.weight, model.head.weight)
    assert float(rand.head.weight.std()) == pytest.approx(float(model.head.weight.std()), rel=0.8)  # same scale
    again = RandomHead(model, seed=3)
    assert torch.equal(rand.head.weight, again.head.weight)  # seeded


def test_rank_correlation():
    a = np.arange(100.0).reshape(10, 10)
    assert rank_correlation(a, a * 3 + 1) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(a, np.zeros_like(a)))


def test_heads_that_explain_a_constant_are_flagged_near_the_line():
    from radacx_cache.interventions import head_summary
    classes = ["A", "B", "C", "D", "E"]

    def frame(predicted, p):
        return pd.DataFrame({"arm": "V2", "tested_on": "original", "source": "model", "method": "ig",
                             "predicted": predicted, "p_predicted": p, "output_change": 1.0, "completeness": 1.0})
    # 19 of 20 (95%) one class: near-constant; 18 of 20 (90%): not above the line
    varied = 0.6 + 0.2 * np.tile([1, -1], 10)
    (h,) = head_summary(frame(["A"] * 19 + ["B"], varied), "ig", classes)
    assert h["collapsed"] and h["top_prediction"] == "A" and h["distinct"] == 2 and not h["flat_output"]
    (h,) = head_summary(frame(["C"] * 18 + ["B"] * 2, 0.6), "ig", classes)
    assert not h["collapsed"] and h["top_prediction"] == "C"
    # a top-1 probability that varies by SD 0.025 across the images is flat; SD 0.035 is not
    assert head_summary(frame(list("ABCDE") * 4, 0.4 + 0.025 * np.tile([1, -1], 10)), "ig", classes)[0]["flat_output"]
    assert not head_summary(frame(list("ABCDE") * 4, 0.4 + 0.035 * np.tile([1, -1], 10)), "ig", classes)[0]["flat_output"]


def test_cascading_randomisation_redraws_the_top_blocks_and_restores_them():
    from radacx_cache.attribution import randomised
    from radacx_cache.models import Classifier, load_model
    lm = load_model("tiny", seed=0)
    model = Classifier(lm.model.visual, 64, 5).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
    with randomised(model, 1, seed=3) as net:
        blocks = model.visual.trunk.blocks
        top = dict(blocks[-1].named_parameters())
        assert not torch.equal(top["attn.qkv.weight"], before["visual.trunk.blocks.1.attn.qkv.weight"])
        assert torch.equal(top["norm1.weight"], before["visual.trunk.blocks.1.norm1.weight"])  # 1-D kept
        assert torch.equal(blocks[0].attn.qkv.weight, before["visual.trunk.blocks.0.attn.qkv.weight"])
        assert not torch.equal(net.head.weight, model.head.weight)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the arm is unchanged
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_every_boxed_image_joins_the_sample_up_to_the_cap():
    from radacx_cache.stages.saliency import sample_images
    test = list(range(1000))
    plain = sample_images(test, 48, seed=0)
    boxed = np.arange(900, 1000)
    both = sample_images(test, 48, 0, boxed, cap=200)
    assert set(plain) <= set(both) and set(boxed) <= set(both) and len(both) == len(set(plain) | set(boxed))
    capped = sample_images(test, 48, 0, boxed, cap=30)
    assert len(set(capped) & set(boxed)) >= 30 and set(plain) <= set(capped)
    assert (sample_images(test, 48, 0, boxed, cap=30) == capped).all()  # seeded
    assert (sample_images(test, 48, 0, boxed, cap=0) == plain).all()


def test_the_ig_baseline_is_the_blur_whatever_fill_the_interventions_use():
    from radacx_cache.stages.saliency import _batch

    class Flat(torch.nn.Module):
        lm = LM

        def forward(self, x):
            return torch.zeros(len(x), 3)
    pixels = np.stack([textured(i) for i in range(3)])
    items = [{"original": p} for p in pixels]
    for fill in ("mean", "blur"):
        b = _batch(Flat(), SimpleNamespace(fill=fill, blur_sigma=4.0, baseline="blur"), np.arange(3), items,
                   [None] * 3, "original")
        blurred = np.stack([fill_image(p, "blur", 4.0) for p in pixels])
        assert torch.equal(b.base, LM.to_input(torch.from_numpy(blurred))), fill
        assert (b.fills == np.stack([fill_image(p, fill, 4.0) for p in pixels])).all()
    black = _batch(Flat(), SimpleNamespace(fill="blur", blur_sigma=4.0, baseline="black"), np.arange(3), items,
                   [None] * 3, "original")
    assert float(black.base.abs().max()) == 0.0


def test_arms_know_their_training_variant_and_their_original_counterpart():
    from radacx_cache.arms import original_counterpart, trained_on, variant_arm
    from radacx_cache.interventions import arm_pairs
    for method, variant in (("probe", "original"), ("probe", "masked"), ("probe", "thick"), ("finetune", "crop")):
        assert trained_on(variant_arm(method, variant)) == variant  # the inverse of variant_arm
    assert trained_on("Baseline") is None and original_counterpart("V1") is None
    assert [original_counterpart(a) for a in ("V2", "V2-thick", "V4", "V4-crop")] == ["V1", "V1", "V3", "V3"]
    assert arm_pairs(["V1", "V2", "V4", "V2-thick"]) == [("V2", "V1"), ("V2-thick", "V1")]  # V3 absent: no V4 pair
    with pytest.raises(KeyError):
        trained_on("V9")
