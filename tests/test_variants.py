"""Overlay variants (issue 22): drawn at read time from the stored original and masks, the paper's
`masked` exactly as stored, one cache per variant and settings, nothing re-rendered when one is
added, and an ablation table that recomputes from the prediction files."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

VARIANTS = ["render.variants.thick.line_width=6", "render.variants.filled.style=fill",
            "render.variants.heart_only.structures=[heart]", "render.variants.grey_ink.ink=255"]


def paper(render_config: dict):
    from radacx_cache.config import RenderConfig
    return RenderConfig(**{k: v for k, v in render_config.items() if k != "variants"}).paper_overlay()


# ---------------------------------------------------------------- pure functions
def test_the_paper_overlay_drawn_at_read_time_is_the_rendered_masked(tmp_path):
    """On a real radiograph: what render_image stores as `masked` is exactly draw_variant of its own
    original and masks under the paper's settings, for every style the paper's config can take."""
    from test_render import wikimedia

    from radacx_cache.config import RenderConfig
    from radacx_cache.render import draw_variant, render_image
    from radacx_cache.sources.chexmask import encode_rle
    data, masks = wikimedia()
    rles = {k: encode_rle(v) for k, v in masks.items()}
    for overlay, width in (("boundary", 2), ("boundary", 5), ("fill", 2), ("crop", 2)):
        cfg = RenderConfig(overlay=overlay, line_width=width, colors={"heart": [255, 255, 0]})
        out = render_image(data, rles, masks["heart"].shape, cfg)
        assert np.array_equal(draw_variant(out["original"], out["masks"], cfg.paper_overlay()), out["masked"])


def test_a_variant_that_draws_nothing_is_the_original():
    from radacx_cache.config import RenderConfig
    from radacx_cache.render import draw_variant
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    masks = rng.random((2, 3, 32, 32)) > 0.5
    base = RenderConfig().paper_overlay()
    for spec in (replace(base, style="none"), replace(base, structures=[])):
        assert np.array_equal(draw_variant(original, masks, spec), np.repeat(original[..., None], 3, axis=3))
    # and a control: a variant that draws does change the image
    assert not np.array_equal(draw_variant(original, masks, base), np.repeat(original[..., None], 3, axis=3))


def test_structures_ink_and_style_change_what_is_drawn():
    from radacx_cache.config import RenderConfig
    from radacx_cache.render import draw_variant
    original = np.full((40, 40), 100, np.uint8)
    masks = np.zeros((3, 40, 40), bool)
    masks[0, 5:20, 5:15] = masks[1, 5:20, 25:35] = masks[2, 22:35, 12:28] = True
    base = RenderConfig().paper_overlay()
    heart_only = draw_variant(original, masks, replace(base, structures=["heart"]))
    assert (heart_only[..., 2] == 255).any() and not (heart_only[..., 0] == 255).any()  # blue heart, no red lung
    ink = draw_variant(original, masks, replace(base, ink=255))
    drawn = (ink != 100).any(2)
    assert drawn.any() and (ink[drawn] == 255).all()  # every drawn pixel white
    thick = draw_variant(original, masks, replace(base, line_width=6))
    assert (thick != 100).any(2).sum() > 2 * (draw_variant(original, masks, base) != 100).any(2).sum()
    # the shards store masks as uint8 0/1: every style must read them as the same boolean masks
    for style in ("boundary", "fill", "crop"):
        spec = replace(base, style=style)
        assert np.array_equal(draw_variant(original, masks.astype(np.uint8), spec), draw_variant(original, masks, spec))


@pytest.mark.parametrize("setting,message", [
    ("render.variants.Thick.line_width=3", "must be lower-case"),
    ("render.variants.masked.line_width=3", "not original or masked"),
    ("render.variants.x.width=3", "unknown setting 'width'"),
    ("render.variants.x.style=glow", "style': 'glow'"),
    ("render.variants.x.ink=300", "not a grey level"),
    ("render.variants.x.line_width=0", "not an integer in [1, 64]"),
    ("render.variants.x.structures=[liver]", "structures'"),
    ("finetune.variants=[nosuch]", "is not one of render.variants"),
])
def test_bad_variant_settings_are_one_line_naming_the_key(setting, message):
    from radacx_cache.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [setting])


# ---------------------------------------------------------------- on a pipeline
@pytest.fixture(scope="module")
def ablated(pipeline, features, tmp_path_factory):
    """The session's cohort and shards copied, four variants added, then every stage on them."""
    from radacx_cache.config import load_config
    from radacx_cache.stages.embed import embed_all
    from radacx_cache.stages.finetune import run_finetune
    from radacx_cache.stages.probe import run_probes
    from radacx_cache.stages.report import build_report
    from radacx_cache.stages.shards import build_shards
    from radacx_cache.stages.zeroshot import run_zeroshot
    src = pipeline["cfg"]
    work = tmp_path_factory.mktemp("ablation")
    for part in ("cohort", "shards"):
        shutil.copytree(Path(src.workdir) / part, work / part)
    before = {p.name: p.stat().st_mtime_ns for p in (work / "shards").glob("*.h5")}
    cfg = load_config(None, [f"workdir={work}", f"archive.root={src.archive.root}",
                             f"archive.chexmask_csv={src.archive.chexmask_csv}", "seed=7", "shards.rows_per_shard=64",
                             "shards.n_jobs=2", "embed.batch_size=32", "embed.block_rows=96", "report.bootstrap=50",
                             "finetune.epochs=1", "finetune.max_steps=2", "finetune.variants=[thick]", *VARIANTS])
    build_shards(cfg, progress=False)
    embed_all(cfg, progress=False)
    run_zeroshot(cfg)
    run_probes(cfg)
    run_finetune(cfg)
    build_report(cfg)
    return {"cfg": cfg, "work": work, "before": before}


def test_adding_variants_re_renders_no_shard(ablated):
    work = ablated["work"]
    after = {p.name: p.stat().st_mtime_ns for p in (work / "shards").glob("*.h5")}
    assert after == ablated["before"] and after
    from radacx_cache.formats.shard import open_verified
    from radacx_cache.workdir import Workdir
    shards = open_verified(Workdir(work))
    assert shards.variants[:2] == ("original", "masked")
    assert set(shards.variants[2:]) == {"thick", "filled", "heart_only", "grey_ink"}


def test_masked_in_the_shards_is_the_paper_variant_drawn_from_them(ablated):
    from radacx_cache.formats.shard import ShardSet
    from radacx_cache.render import draw_variant
    shards = ShardSet(ablated["work"] / "shards")
    spec = paper(shards.render_config)
    for shard in sorted({*shards.index["shard"]}):
        f = shards.file(shard)
        assert np.array_equal(draw_variant(f["original"][:], f["masks"][:], spec), f["masked"][:]), shard


def test_readers_serve_a_derived_variant_as_drawn(ablated):
    import torch

    from radacx_cache.formats.shard import ShardSet
    from radacx_cache.formats.stream import ShardMapDataset, ShardStream
    from radacx_cache.render import draw_variant
    shards = ShardSet(ablated["work"] / "shards").split("train")
    spec = shards.derived["thick"]
    item = ShardMapDataset(shards, "thick")[3]
    row = shards.row(3, ("original", "masks", "thick"))
    assert np.array_equal(item["pixels"].numpy(), draw_variant(row["original"], row["masks"], spec))
    assert np.array_equal(row["thick"], item["pixels"].numpy())
    batch = next(iter(ShardStream(shards, "thick", batch_size=4, seed=0, shuffle_buffer=1)))
    for pixels, pos in zip(batch["pixels"], batch["index"]):
        r = shards.row(int(pos), ("original", "masks"))
        assert torch.equal(pixels, torch.from_numpy(draw_variant(r["original"], r["masks"], spec)))
    with pytest.raises(ValueError, match="image variant 'thin'"):
        ShardMapDataset(shards, "thin")


def test_each_variant_has_its_own_cache_and_fingerprint(ablated):
    from radacx_cache.formats.features import FeatureCache, FeatureCacheError
    features = ablated["work"] / "features" / "tiny"
    fps = {v: FeatureCache(features / f"{v}.h5").fingerprints for v in ("thick", "filled", "grey_ink")}
    assert len({fp["variant_spec"] for fp in fps.values()}) == 3
    with pytest.raises(FeatureCacheError, match="variant"):  # the thick cache asked for as filled
        FeatureCache(features / "thick.h5", fps["filled"])


def test_a_redefined_variant_is_embedded_again_and_the_others_are_kept(ablated, tmp_path):
    """thick redefined (line width 6 -> 8): its cache is rebuilt, every other cache is untouched."""
    from radacx_cache.config import load_config
    from radacx_cache.formats.features import FeatureCache
    from radacx_cache.stages.embed import embed_all
    from radacx_cache.stages.shards import build_shards
    work = tmp_path / "run"
    for part in ("cohort", "shards", "features"):
        shutil.copytree(ablated["work"] / part, work / part)
    src = ablated["cfg"]
    args = [f"workdir={work}", f"archive.root={src.archive.root}", f"archive.chexmask_csv={src.archive.chexmask_csv}",
            "seed=7", "shards.rows_per_shard=64", "embed.batch_size=32", "embed.block_rows=96"]
    features = work / "features" / "tiny"
    stamps = {p.name: p.stat().st_mtime_ns for p in features.glob("*.h5")}
    cfg = load_config(None, [*args, *[v.replace("line_width=6", "line_width=8") for v in VARIANTS]])
    build_shards(cfg, progress=False)
    embed_all(cfg, progress=False)
    changed = {p.name for p in features.glob("*.h5") if p.stat().st_mtime_ns != stamps.get(p.name)}
    assert changed == {"thick.h5"}
    assert FeatureCache(features / "thick.h5").fingerprints["variant_spec"] != \
        FeatureCache(ablated["work"] / "features" / "tiny" / "thick.h5").fingerprints["variant_spec"]


def test_the_ablation_table_recomputes_from_the_prediction_files(ablated):
    """Every accuracy and difference of ablation.json, recomputed with pandas from the arms'
    prediction CSVs and the shards' index (first positive in the target order)."""
    import json

    from radacx_cache.arms import ABLATION_COLUMNS
    from radacx_cache.formats.shard import ShardSet
    work = ablated["work"]
    data = json.loads((work / "results" / "ablation.json").read_text())
    shards = ShardSet(work / "shards")
    test = shards.index[shards.index["split"] == "test"].set_index("dicom_id")
    classes, order = shards.target_names, shards.manifest["target_order"]
    pos = test[[f"positive_{c}" for c in classes]].to_numpy() > 0
    first = np.array([next((classes.index(c) for c in order if p[classes.index(c)]), -1) for p in pos])

    def correct(arm, variant):
        pred = pd.read_csv(work / "predictions" / arm / f"{variant}.csv", dtype={"dicom_id": str}).set_index("dicom_id")
        proba = pred.loc[test.index, [f"prob_{c}" for c in classes]].to_numpy()
        return (proba.argmax(1) == first)[first >= 0]

    column_arm = dict(ABLATION_COLUMNS)
    arms_seen = set()
    for row in data["rows"]:
        mine = correct(row["arm"], row["variant"])
        assert row["accuracy"][0] == pytest.approx(mine.mean())
        for ref in ("original", "masked"):
            if row[f"minus_{ref}"] is not None:
                base = correct(column_arm[row["column"]](ref), ref)
                assert row[f"minus_{ref}"]["diff"] == pytest.approx(mine.mean() - base.mean())
        arms_seen.add(row["arm"])
    assert {"Baseline", "V1", "V2", "V2-thick", "V3", "V4-thick"} <= arms_seen
    md = (work / "results" / "table1.md").read_text()
    assert "Overlay ablation" in md and "grey_ink" in md and (work / "results" / "ablation_variants.png").exists()


def test_saliency_explains_the_derived_variants_it_is_asked_for(ablated, tmp_path):
    import json

    from radacx_cache.config import load_config
    from radacx_cache.stages.saliency import run_saliency
    work = tmp_path / "run"
    for part in ("cohort", "shards", "features", "probes", "finetune", "predictions"):
        if (ablated["work"] / part).exists():
            shutil.copytree(ablated["work"] / part, work / part)
    src = ablated["cfg"]
    cfg = load_config(None, [f"workdir={work}", f"archive.root={src.archive.root}",
                             f"archive.chexmask_csv={src.archive.chexmask_csv}", "seed=7", "report.bootstrap=50",
                             "saliency.images=4", "saliency.methods=[gradcam]", "saliency.check_method=gradcam",
                             "saliency.panels=0", "saliency.variants=[thick]", *VARIANTS])
    out = run_saliency(cfg, progress=False)
    data = json.loads((work / "results" / "saliency.json").read_text())
    rec = next(r for r in data["summary"] if r["arm"] == "V1" and r["metric"] == "anatomy")
    assert rec["variants"] == ["original", "masked", "thick"] and rec["thick_minus_original"] is not None
    assert "Saliency per overlay variant" in out["table"] and "| thick |" in out["table"]
    df = pd.read_csv(work / "results" / "saliency.csv")
    assert set(df["tested_on"]) == {"original", "masked", "thick"}
    # the maps differ between variants: the images did
    assert not np.allclose(df[df["tested_on"] == "thick"]["anatomy"].to_numpy(),
                           df[df["tested_on"] == "original"]["anatomy"].to_numpy())


@pytest.mark.parametrize("change,message", [
    ({"../../escape": None}, "must be lower-case"),
    ({"thick": {"line_width": 10 ** 9}}, "not an integer in \\[1, 64\\]"),
    ({"thick": {"style": "glow"}}, "style': 'glow'"),
    ({"thick": {"extra": 1}}, "expected exactly the settings"),
])
def test_a_variants_record_from_elsewhere_is_checked_on_reading(ablated, tmp_path, change, message):
    """variants.json is input like any other: resealed with a hostile entry, it is refused with a reason."""
    import json

    from radacx_cache.formats.records import seal
    from radacx_cache.formats.shard import ShardError, ShardSet
    shutil.copytree(ablated["work"] / "shards", tmp_path / "shards")
    path = tmp_path / "shards" / "variants.json"
    data = json.loads(path.read_text())
    data.pop("fingerprint")
    for name, settings in change.items():
        data["variants"][name] = None if settings is None else {**data["variants"]["thick"], **settings}
    if None in data["variants"].values():
        data["variants"] = {k: (v if v is not None else data["variants"]["thick"]) for k, v in data["variants"].items()}
    path.write_text(json.dumps(seal(data)))
    with pytest.raises(ShardError, match=message):
        ShardSet(tmp_path / "shards").derived


def test_a_finished_v3_predicts_a_new_variant_without_training_again(ablated, tmp_path):
    """Adding a variant to a finished run: the shards and every other cache stay, the new variant is
    embedded, and the finished V3 predicts it from its best checkpoint (no training step)."""
    from radacx_cache.config import load_config
    from radacx_cache.stages.embed import embed_all
    from radacx_cache.stages.finetune import run_finetune
    from radacx_cache.stages.shards import build_shards
    work = tmp_path / "run"
    for part in ("cohort", "shards", "features", "finetune", "predictions"):
        shutil.copytree(ablated["work"] / part, work / part)
    src = ablated["cfg"]
    cfg = load_config(None, [f"workdir={work}", f"archive.root={src.archive.root}",
                             f"archive.chexmask_csv={src.archive.chexmask_csv}", "seed=7", "shards.rows_per_shard=64",
                             "embed.batch_size=32", "embed.block_rows=96", "finetune.epochs=1", "finetune.max_steps=2",
                             *VARIANTS, "render.variants.thin.line_width=1"])
    stamps = {p: p.stat().st_mtime_ns for p in [*work.glob("shards/*.h5"), *work.glob("features/tiny/*.h5"),
                                                 work / "finetune" / "original" / "best.pt"]}
    build_shards(cfg, progress=False)
    embed_all(cfg, progress=False)
    summary = run_finetune(cfg, variants=["original"])["V3"]
    assert {p for p, t in stamps.items() if p.stat().st_mtime_ns != t} == set()  # nothing redone
    assert (work / "features" / "tiny" / "thin.h5").exists()
    assert "thin" in summary["tested_on"] and "test_thin" in summary
    record = json.loads((work / "predictions" / "V3" / "manifest.json").read_text())
    assert "thin.csv" in record["files"] and "thin" in record["tested_on"]


def test_results_load_reads_the_ablation_as_the_markdown_prints_it(ablated):
    from radacx_cache import results
    df = results.load(ablated["work"])
    md = (ablated["work"] / "results" / "table1.md").read_text()
    rows = df[(df.section == "ablation") & (df.quantity == "accuracy")]
    assert len(rows) >= 10 and set(rows["tested_on"]) >= {"original", "masked", "thick", "filled"}
    for r in rows.itertuples():
        assert f"| {r.tested_on} | {r.value:.4f} [{r.low:.3f}, {r.high:.3f}] |" in md, r
    diffs = df[(df.section == "ablation") & (df.quantity == "accuracy - original")]
    assert len(diffs) and not (diffs["p"] == 0).any() and diffs["p_below"].dtype == bool
