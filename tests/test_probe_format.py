"""The probe format (formats/probes.py): written and read in one module, every array checked on read."""
import numpy as np
import pytest

from radacx_cache._io import write_npz
from radacx_cache.formats.probes import ProbeFormatError, read_probe, write_probe


def fitted():
    from radacx_cache.estimators.linear_probe import LinearProbe
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)).astype(np.float32)
    return LinearProbe(C=1.0).fit(X, rng.integers(0, 3, 60))


def test_a_written_probe_reads_back_and_predicts_the_same(tmp_path):
    from types import SimpleNamespace

    import torch

    from radacx_cache.formats.probes import ProbeHead
    probe = fitted()
    write_probe(tmp_path / "V1.npz", probe, "features", "abc")
    w = read_probe(tmp_path / "V1.npz")
    assert w["coef"].shape == (3, 8) and str(w["feature"]) == "features" and str(w["shards_fingerprint"]) == "abc"
    X = np.random.default_rng(1).normal(size=(10, 8)).astype(np.float32)
    lm = SimpleNamespace(model=SimpleNamespace(visual=torch.nn.Identity()),
                         encode_image_parts=lambda x: (x, None))
    with torch.no_grad():
        got = ProbeHead(lm, w)(torch.from_numpy(X)).softmax(1).numpy()
    np.testing.assert_allclose(got, probe.predict_proba(X), atol=1e-5)
    before = (tmp_path / "V1.npz").read_bytes()
    write_probe(tmp_path / "V1.npz", probe, "features", "abc")
    assert (tmp_path / "V1.npz").read_bytes() == before  # byte-stable


@pytest.mark.parametrize("change,message", [
    (lambda w: w.pop("scale"), "missing array"),
    (lambda w: w.update(coef=np.zeros((3,), np.float32)), "coef has shape"),
    (lambda w: w.update(intercept=np.zeros(4, np.float32)), "intercept has shape"),
    (lambda w: w.update(mean=np.full(8, np.nan, np.float32)), "mean is not finite"),
    (lambda w: w.update(coef=np.zeros((3, 8), np.int64)), "coef is not finite floating point"),
    (lambda w: w.update(preprocess=np.array("pickle")), "preprocess 'pickle'"),
    (lambda w: w.update(feature=np.array("x" * 100)), "feature"),
])
def test_a_probe_file_from_elsewhere_is_refused_with_the_array_named(tmp_path, change, message):
    probe = fitted()
    w = {"coef": probe.coef_, "intercept": probe.intercept_, "mean": probe.mean_.numpy(),
         "scale": probe.scale_.numpy(), "feature": np.array("features"), "preprocess": np.array("standardize")}
    change(w)
    write_npz(tmp_path / "bad.npz", **w)
    with pytest.raises(ProbeFormatError, match=message):
        read_probe(tmp_path / "bad.npz")


@pytest.mark.parametrize("y,message", [
    (np.array([[1, 0, -1]] * 30 + [[0, 1, 0]] * 30), ">= 0"),  # a raw label matrix: -1 for uncertain
    (np.array([[1.0, np.nan, 0]] * 30 + [[0, 1, 0]] * 30), "NaN"),  # scikit-learn's own check
    (np.array([[0, 0, 0]] * 30 + [[0, 1, 0]] * 30), "no positive class"),
])
def test_a_2d_y_that_is_not_class_weights_is_refused(y, message):
    from radacx_cache.estimators.linear_probe import LinearProbe
    X = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        LinearProbe().fit(X, y)
    multi_hot = np.abs(y.astype(float))
    multi_hot[~np.isfinite(multi_hot)] = 0
    multi_hot[multi_hot.sum(1) == 0, 0] = 1
    assert LinearProbe().fit(X, multi_hot).predict_proba(X).shape == (60, 3)  # class weights are fitted
