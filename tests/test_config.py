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
    ("archive.kind=padchest", "'archive.kind'"),
    ("archive.mimic_root=/x", "unknown config key 'archive.mimic_root'"),  # a v3 file spells it archive.root
    ("shards.rows_per_shard=0", "'shards.rows_per_shard': 0 is below its minimum 1"),
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
