import pytest

from radacx_cache.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["seed=3", "shards.n_jobs=4", "render.draft=false", "cohort.views=PA,AP"])
    assert (cfg.seed, cfg.shards.n_jobs, cfg.render.draft, cfg.cohort.views) == (3, 4, False, ["PA", "AP"])
    path = tmp_path / "c.yaml"
    path.write_text("config_version: 1\nrender:\n  overlay: fill\n")
    assert load_config(path).render.overlay == "fill"


@pytest.mark.parametrize("override,message", [
    ("render.colour=1", "unknown config key 'render.colour'"),
    ("render.overlay=glow", "'render.overlay'"),
    ("shards.n_jobs=two", "'shards.n_jobs': expected an integer"),
    ("cohort.classes=Edema,Flu", "'cohort.classes'"),
    ("config_version=4", "config_version 4"),
    ("archive.kind=candid", "'archive.kind': 'candid' is not one of mimic, chexpert, generic, nih, padchest, vindr"),
    ("archive.mimic_root=/x", "unknown config key 'archive.mimic_root'"),  # a v3 file spells it archive.root
    ("shards.rows_per_shard=0", "'shards.rows_per_shard': 0 is outside its range"),
    ("render.line_width=-2", "'render.line_width'"),
    ("seed", "expected key=value"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_version_1_configs_are_migrated_to_the_model_and_runtime_sections(tmp_path):
    path = tmp_path / "v1.yaml"
    path.write_text("config_version: 1\nembed:\n  model: biomedclip\n  device: cpu\n  precision: bf16\n"
                    "  batch_size: 7\n")
    cfg = load_config(path)
    assert (cfg.model.spec, cfg.runtime.device, cfg.runtime.precision, cfg.embed.batch_size) == (
        "biomedclip", "cpu", "bf16", 7)


def test_version_2_configs_are_migrated_to_archive_root(tmp_path):
    """v2 named the archive folder archive.mimic_root (MIMIC was the only kind): read as archive.root,
    kind mimic; a label table only MIMIC has is refused for another kind."""
    path = tmp_path / "v2.yaml"
    path.write_text("config_version: 2\narchive:\n  mimic_root: /data/mimic\n  labeler: negbio\n")
    cfg = load_config(path)
    assert (cfg.archive.kind, cfg.archive.root, cfg.archive.labeler) == ("mimic", "/data/mimic", "negbio")
    with pytest.raises(ConfigError, match="archive.labeler"):
        load_config(path, ["archive.kind=nih"])


@pytest.mark.parametrize("override,message", [
    ("shards.max_reject_share=nan", "'shards.max_reject_share': 'nan' is not a finite number"),
    ("cohort.val_fraction=nan", "'cohort.val_fraction': 'nan' is not a finite number"),
    ("cohort.val_fraction=-1", "'cohort.val_fraction': -1.0 is not in (0.0, 1.0)"),
    ("cohort.val_fraction=0", "'cohort.val_fraction': 0.0 is not in (0.0, 1.0)"),
    ("cohort.min_mask_quality=nan", "'cohort.min_mask_quality'"),
    ("probe.tol=nan", "'probe.tol'"),
    ("probe.tol=inf", "'probe.tol'"),
    ("finetune.grad_clip=nan", "'finetune.grad_clip'"),
    ("finetune.lr_head=-1", "'finetune.lr_head': -1.0 is outside its range"),
    ("shards.n_jobs=100000", "'shards.n_jobs': 100000 is outside its range [1, 1024]"),
    ("render.line_width=1000000000", "'render.line_width': 1000000000 is outside its range [1, 64]"),
    ("seed=-1", "'seed': -1 is outside its range [0, 4294967295]"),
    ("probe.c_min_log10=8", "'probe.c_min_log10' 8.0 > 'probe.c_max_log10' 6.0"),
    ("render.fill_alpha=nan", "'render.fill_alpha'"),
])
def test_every_config_number_is_finite_and_bounded(override, message):
    """Each value below was once accepted (nan, negative, 10^5 processes, a 10^9-pixel line)."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, [override])


def test_yaml_aliases_are_refused(tmp_path):
    """An alias bomb: nine levels of nine aliases expand to 9^9 strings; refused at the first alias."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nzeroshot:\n  prompts:\n    Edema: *a9\n")
    with pytest.raises(ConfigError, match="alias \\*a0 at line 2: YAML aliases are refused"):
        load_config(path)
    with pytest.raises(ConfigError, match="aliases are refused"):
        load_config(None, ["zeroshot.template=[&x a, *x]"])
