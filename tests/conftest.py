"""Shared fixtures: one small phantom archive and one pipeline run per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout (CI too)


def shared_path(*parts) -> Path:
    """A file of the reference data beside the checkout. Missing: a skip on a laptop, a failure in CI
    (CI has it; a silent skip there would hide the real-data checks)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"reference data {path} not available"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: the real-data tests must run)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    from radacx_cache.phantom.generator import generate
    out = tmp_path_factory.mktemp("phantom")
    summary = generate(out, n_patients=400, long_side=256, seed=7, faults=True, progress=False)
    return summary


def make_config(phantom, workdir, *extra):
    from radacx_cache.config import load_config
    return load_config(None, [f"workdir={workdir}", f"archive.root={phantom['root']}",
                              f"archive.chexmask_csv={phantom['chexmask_csv']}", "seed=7",
                              "shards.rows_per_shard=64", "shards.n_jobs=2", "embed.batch_size=32",
                              "embed.block_rows=96", "report.bootstrap=200", *extra])


@pytest.fixture(scope="session")
def pipeline(phantom, tmp_path_factory):
    """cohort + shards (loky, 2 workers) on the session phantom."""
    from radacx_cache.stages.cohort import build_cohort
    from radacx_cache.stages.shards import build_shards
    cfg = make_config(phantom, tmp_path_factory.mktemp("work"))
    cohort = build_cohort(cfg, progress=False)
    shards = build_shards(cfg, progress=False)
    return {"cfg": cfg, "cohort": cohort, "shards": shards}


@pytest.fixture(scope="session")
def features(pipeline):
    from radacx_cache.stages.embed import embed_all
    return embed_all(pipeline["cfg"], progress=False)


PIPELINE_FIXTURES = {"phantom", "pipeline", "features", "archive", "trained", "reported", "item"}


def pytest_collection_modifyitems(config, items):
    """Tests that build a phantom pipeline are marked ``pipeline``: ``make test-quick`` leaves them out."""
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pipeline)
