"""Property-based fuzzing of the readers (issue 28): whatever the input, a reader returns a result, a
reject row, or raises its one-line domain error (ValueError and its subclasses: DicomError, RLEError,
ConfigError; RecordError, ShardError); any other exception, or a run past the deadline, fails.

The example budget is small in ``make test`` (profile ``ci``) and large in ``make fuzz`` (profile
``fuzz``, ``HYPOTHESIS_PROFILE=fuzz``). A failing example hypothesis finds is added below as an
``@example`` so that it is replayed on every run."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

settings.register_profile("ci", max_examples=40, deadline=2000, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=2000, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)


class Hang(Exception):
    """An example that ran past its time limit: a failure, with the example shown."""


@contextlib.contextmanager
def time_limit(seconds: int = 10):
    """Fail an example that runs past ``seconds`` (hypothesis's deadline only measures finished ones)."""
    def hang(*_):
        raise Hang(f"no result after {seconds} s")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def domain_error(exc: BaseException) -> bool:
    """The project's own one-line errors: ValueError and its subclasses (ConfigError, DicomError,
    RLEError, RenderError, ...) and the record / shard errors."""
    from radacx_cache.formats.records import RecordError
    from radacx_cache.formats.shard import ShardError
    return isinstance(exc, (ValueError, RecordError, ShardError)) and "\n" not in str(exc).strip()


# ---------------------------------------------------------------- label cells
@given(TEXT)
@example("['a', __import__('os').system('x')]")
@example("[" * 5000)
def test_padchest_labels_cells(cell):
    from radacx_cache.sources.padchest import parse_labels
    terms, problem = parse_labels(cell)
    assert isinstance(terms, list) and (problem is None or isinstance(problem, str))
    assert problem is None or terms == []


@given(st.lists(TEXT, min_size=1, max_size=20))
def test_nih_finding_labels_cells(cells):
    from radacx_cache.sources.nih import finding_matrix
    labels, problems = finding_matrix(pd.Series(cells))
    assert len(problems) == len(cells)
    for col in labels.values():
        assert set(np.unique(col[np.isfinite(col)])) <= {0.0, 1.0}


# ---------------------------------------------------------------- CheXmask RLE
@given(TEXT, st.integers(1, 64), st.integers(1, 64))
@example("1 2 3", 8, 8)
@example("0 -1", 4, 4)
@example("99999999999999999999999 1", 8, 8)
def test_rle_strings(text, height, width):
    from radacx_cache.sources.chexmask import decode_rle
    try:
        mask = decode_rle(text, (height, width))
    except Exception as exc:
        assert domain_error(exc), repr(exc)
    else:
        assert mask.shape == (height, width) and mask.dtype == bool


# ---------------------------------------------------------------- config YAML
@given(text=TEXT)
@example(text="seed: 1\nseed: 2\n")
@example(text="a: &x [1]\nb: *x\n")
@example(text="render: {variants: {thick: {line_width: .inf}}}")
@example(text="!!python/object/apply:os.system ['x']")
def test_config_yaml(text, tmp_path_factory):
    from radacx_cache.config import ConfigError, load_config
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert domain_error(exc), repr(exc)


@given(data=st.dictionaries(st.sampled_from(["seed", "workdir", "render", "saliency", "archive", "cohort", "x"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(TEXT, inner, max_size=3),
                                    max_leaves=8), max_size=4))
@example(data={"render": {"\n": None}})  # found by the fuzz profile: a key with a newline broke the one-line error
def test_config_values(data, tmp_path_factory):
    from radacx_cache.config import ConfigError, load_config
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(json.dumps(data, default=str), encoding="utf-8")  # JSON is YAML
    try:
        load_config(path)
    except ConfigError as exc:
        assert domain_error(exc), repr(exc)


# ---------------------------------------------------------------- DICOM bytes
def _valid_dicom() -> bytes:
    from radacx_cache.phantom.layouts.vindr import dicom_bytes
    stored = (np.arange(40 * 32).reshape(40, 32) % 4000).astype(np.uint16)
    return dicom_bytes(stored, "MONOCHROME2", 1.0, 0.0, (2000.0, 4000.0))


VALID_DICOM = _valid_dicom()


@given(st.integers(0, len(VALID_DICOM)), st.lists(st.tuples(st.integers(0, len(VALID_DICOM) - 1),
                                                            st.integers(0, 255)), max_size=8))
@example(len(VALID_DICOM), [])
@example(200, [])
@example(632, [(483, 76)])  # found by the fuzz profile: SamplesPerPixel's length off (pydicom's BytesLengthException)
@example(632, [(482, 69)])  # found by the fuzz profile: an unknown VR 'ES' (pydicom's NotImplementedError)
def test_dicom_mutations(cut, flips):
    """Truncations and byte flips of a valid file (element lengths, VRs, the transfer syntax, the
    pixel data): decoded, or a DicomError."""
    from radacx_cache.render import RenderError, decode_grey
    data = bytearray(VALID_DICOM[:cut])
    for at, value in flips:
        if at < len(data):
            data[at] = value
    try:
        with time_limit():
            pixels, _, size = decode_grey(bytes(data), formats=("DICOM",))
    except RenderError as exc:
        assert domain_error(exc), repr(exc)
    else:
        assert pixels.dtype == np.uint8 and pixels.shape == size


# ---------------------------------------------------------------- records (JSON handed over)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)


@given(data=st.dictionaries(st.sampled_from(["stage", "files", "upstream", "fingerprint", "record_version",
                                             "command", "classes"]), JSON, max_size=6))
def test_records(data, tmp_path_factory):
    from radacx_cache.formats.records import RecordError, read_record
    path = tmp_path_factory.mktemp("rec") / "manifest.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    try:
        with time_limit():
            read_record(path, "cohort")
    except RecordError as exc:
        assert domain_error(exc), repr(exc)


@given(data=st.dictionaries(st.sampled_from(["classes", "target_order", "policy", "rows", "rejects", "archive",
                                             "files", "upstream", "tested_on", "model_spec", "training", "shards"]),
                            JSON, max_size=8),
       stage=st.sampled_from(["cohort", "shards", "predictions"]))
def test_sealed_records_of_any_content(data, stage, tmp_path_factory):
    """Records sealed elsewhere (a valid fingerprint over anything): their decisions are read into
    typed facts or refused with one line, never a traceback."""
    from radacx_cache.formats.records import RecordError, read_record, seal
    path = tmp_path_factory.mktemp("sealed") / "manifest.json"
    path.write_text(json.dumps(seal({"stage": stage, "command": "radacx x", **data})), encoding="utf-8")
    try:
        with time_limit():
            read_record(path, stage).facts
    except RecordError as exc:
        assert domain_error(exc), repr(exc)


# pandas writes a lone CR unquoted (and reads it back as a line end): not a cell a CSV writer can carry
@given(rows=st.lists(st.lists(TEXT.filter(lambda t: "\x00" not in t and "\r" not in t), min_size=6, max_size=6),
                     max_size=6))
def test_generic_manifest_rows(rows, tmp_path_factory):
    from radacx_cache.sources.generic import id_problem, read_manifest
    root = tmp_path_factory.mktemp("generic")
    pd.DataFrame(rows, columns=["image", "patient", "study", "view", "split", "Edema"]).to_csv(
        root / "manifest.csv", index=False)
    try:
        with time_limit():
            df = read_manifest(root)
    except ValueError as exc:
        assert domain_error(exc), repr(exc)
    else:
        assert len(df) == len(rows) and set(df["split"]) <= {"train", "validate", "test"}
        for row in df.to_dict("records"):
            problem = id_problem(row["dicom_id"], row["subject_id"], row["study_id"])
            assert problem is None or "\n" not in problem


# ---------------------------------------------------------------- table readers
@given(rows=st.lists(st.lists(TEXT.filter(lambda t: "\x00" not in t), min_size=7, max_size=7), max_size=6))
def test_vindr_annotation_rows(rows, tmp_path_factory):
    from radacx_cache.sources.vindr import read_annotations
    path = tmp_path_factory.mktemp("vindr") / "annotations_train.csv"
    pd.DataFrame(rows, columns=["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]).to_csv(
        path, index=False)
    try:
        with time_limit():
            entries, boxes, rejects = read_annotations(path, "train", 2)
    except ValueError as exc:
        assert domain_error(exc), repr(exc)
    else:
        assert boxes["reader"].between(0, 10 ** 9 - 1).all() and all(isinstance(r["reason"], str) for r in rejects)


def test_the_budget_is_the_ci_profile_unless_asked():
    assert settings().max_examples in (40, 2000)
    assert io is not None and pytest is not None
