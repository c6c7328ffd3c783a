"""Hostile values in what is read and written (issue 28, in part): spreadsheet formulas in archive
values, tables saved with Excel's byte-order mark and CRLF, a config key given twice, an oversized
reader number. Each is what a real archive or a hand-edited file can carry."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from radacx_cache._io import spreadsheet_safe
from radacx_cache.config import ConfigError, load_config


def test_cells_a_spreadsheet_would_run_are_escaped_and_nothing_else():
    df = pd.DataFrame({"id": ["=HYPERLINK(\"http://x\",\"y\")", "@SUM(1+1)", "+1", "-2", "\tcmd", "\rcmd",
                              "00000001_000.png", "a=b", None],
                       "reason": ["=1+1"] * 9, "n": [-1] * 9})
    out = spreadsheet_safe(df, ("id", "reason"))
    assert out["id"].tolist()[:6] == ["'" + v for v in df["id"][:6]]
    assert out["id"].tolist()[6:8] == ["00000001_000.png", "a=b"] and pd.isna(out["id"].iloc[8])
    assert (out["reason"] == "'=1+1").all() and (out["n"] == -1).all()  # numbers are not touched
    assert df["id"].iloc[0].startswith("=")  # the input is not modified


def test_rejects_files_escape_archive_values(pipeline):
    """The session pipeline's rejects files hold no cell a spreadsheet would run."""
    work = Path(pipeline["cfg"].workdir)
    for path in (work / "cohort" / "rejects.csv", work / "shards" / "rejects.csv"):
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        for col in ("id", "reason"):
            assert not df[col].str.match(r"[=+\-@\t\r]").any(), (path, col)


def test_a_table_saved_with_a_byte_order_mark_and_crlf_is_read(tmp_path):
    from radacx_cache.sources.nih import read_data_entry
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    rows = ["00000001_000.png,Cardiomegaly|Effusion,0,1,58,M,PA,2682,2749,0.143,0.143",
            "00000002_000.png,No Finding,0,2,81,M,AP,2500,2048,0.168,0.168"]
    (tmp_path / "Data_Entry_2017_v2020.csv").write_bytes(("\ufeff" + "\r\n".join([header, *rows]) + "\r\n").encode())
    df = read_data_entry(tmp_path)
    assert df["dicom_id"].tolist() == ["00000001_000.png", "00000002_000.png"]
    assert df["ViewPosition"].tolist() == ["PA", "AP"]  # no stray CR
    assert (df["Cardiomegaly"].tolist(), df["Pleural Effusion"].tolist()) == ([1.0, 0.0], [1.0, 0.0])


def test_a_config_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\nrender:\n  variants:\n    thick: {line_width: 4}\n    thick: {line_width: 9}\n")
    with pytest.raises(ConfigError, match="'thick' at line 5 is already defined at line 4"):
        load_config(path)
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match="'seed' at line 2"):
        load_config(path)
    path.write_text("render:\n  variants:\n    thick: {line_width: 4}\n    thin: {line_width: 1}\n")
    assert set(load_config(path).render.variants) == {"thick", "thin"}  # distinct keys still fine


def test_an_oversized_reader_number_is_a_reject_row_not_a_crash(tmp_path):
    from radacx_cache.sources.vindr import read_tables
    a = "0" * 31 + "a"
    (tmp_path / "annotations").mkdir()
    pd.DataFrame([(a, "R1", "Cardiomegaly", 10, 20, 30, 40), (a, "R" + "9" * 24, "Cardiomegaly", 11, 21, 31, 41),
                  (a, "R3", "No finding", "", "", "", "")],
                 columns=["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]).to_csv(
        tmp_path / "annotations" / "annotations_train.csv", index=False)
    entries, split, boxes, rejects = read_tables(tmp_path, 2)
    assert len(entries) == 1 and entries["Cardiomegaly"].iloc[0] == 1  # the readers' marks still count
    assert boxes["reader"].tolist() == [1] and np.issubdtype(boxes["reader"].dtype, np.integer)
    assert len(rejects) == 1 and "rad_id 'R999" in rejects[0]["reason"] and "not a reader id" in rejects[0]["reason"]


def test_any_exception_from_one_image_is_its_reject_row_and_the_run_finishes(pipeline, tmp_path, monkeypatch):
    """A decoder that fails in a way nobody foresaw (an IndexError from a malformed LUT, a KeyError):
    that image is a reject row with the exception's type and message; every other image is sharded."""
    import shutil

    from radacx_cache.config import load_config
    from radacx_cache.stages import shards as shard_stage
    cfg0 = pipeline["cfg"]
    shutil.copytree(Path(cfg0.workdir) / "cohort", tmp_path / "cohort")
    cfg = load_config(None, [f"workdir={tmp_path}", f"archive.root={cfg0.archive.root}",
                             f"archive.chexmask_csv={cfg0.archive.chexmask_csv}", "seed=7", "shards.rows_per_shard=64",
                             "shards.backend=sequential", "shards.max_reject_share=0.5"])
    cohort = pd.read_csv(tmp_path / "cohort" / "cohort.csv", dtype={"dicom_id": str})
    victims = {cohort["dicom_id"].iloc[3]: IndexError("LUT descriptor promises 4096 entries, data holds 12"),
               cohort["dicom_id"].iloc[40]: KeyError("Rows")}
    by_path = dict(zip(cohort["path"], cohort["dicom_id"]))
    real_bytes = shard_stage._image_bytes

    def failing_bytes(root, path, strict):
        if by_path.get(path) in victims:
            raise victims[by_path[path]]
        return real_bytes(root, path, strict)
    monkeypatch.setattr(shard_stage, "_image_bytes", failing_bytes)
    shard_stage.build_shards(cfg, progress=False)
    rejects = pd.read_csv(tmp_path / "shards" / "rejects.csv", dtype=str)
    for dicom_id, exc in victims.items():
        row = rejects[rejects["id"] == dicom_id]
        assert len(row) == 1 and row["reason"].iloc[0].startswith(type(exc).__name__), row
    index = pd.read_csv(tmp_path / "shards" / "index.csv", dtype={"dicom_id": str})
    assert not set(victims) & set(index["dicom_id"]) and len(index) >= len(cohort) - len(rejects)


# ---------------------------------------------------------------- DICOM headers that crashed the shards stage
def _dicom(edit=None, syntax=None) -> bytes:
    """A valid 12-bit radiograph (the phantom's writer), optionally edited with pydicom and re-saved."""
    import io

    import pydicom

    from radacx_cache.phantom.layouts.vindr import dicom_bytes
    stored = (np.arange(64 * 48).reshape(64, 48) % 4000).astype(np.uint16)
    data = dicom_bytes(stored, "MONOCHROME2", 1.0, 0.0, (2000.0, 4000.0))
    if edit is None and syntax is None:
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    if edit is not None:
        edit(ds)
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _empty(keyword):
    def edit(ds):
        ds[keyword].value = None
    return edit


def _short_lut(ds):
    from pydicom.dataset import Dataset
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]  # promises 4096 entries
    item.add_new(0x00283006, "OW", np.zeros(12, "<u2").tobytes())  # LUTData: holds 12
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]


@pytest.mark.parametrize("edit,message", [
    (_empty("Rows"), "Rows is empty"),
    (_empty("SamplesPerPixel"), "SamplesPerPixel is empty"),
    (_empty("BitsAllocated"), "BitsAllocated is empty"),
    (_short_lut, "Modality LUT Sequence cannot be applied"),
])
def test_a_malformed_dicom_header_is_a_dicom_error_naming_the_element(edit, message):
    from radacx_cache.sources.dicom import DicomError, decode_dicom
    assert decode_dicom(_dicom())[1] == (64, 48)
    with pytest.raises(DicomError, match=re.escape(message)):
        decode_dicom(_dicom(edit))


def test_a_deflated_dicom_is_refused_before_it_is_inflated():
    """A deflate bomb: 60 MB of zeros behind a Deflated Explicit VR file meta, about 60 KB on disk."""
    import tracemalloc
    import zlib

    from radacx_cache.sources.dicom import DEFLATED, DicomError, read_header, transfer_syntax
    deflated = _dicom(syntax=DEFLATED)
    assert transfer_syntax(deflated) == DEFLATED
    cut = deflated.find(b"\x08\x00\x16\x00")  # the first dataset element after the meta group (0008,0016)
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = deflated[:cut] + body.compress(b"\x00" * 60_000_000) + body.flush()
    assert len(bomb) < 200_000
    tracemalloc.start()
    with pytest.raises(DicomError, match="Deflated Explicit VR Little Endian is refused"):
        read_header(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5_000_000, peak


def test_progress_off_a_terminal_is_logged_with_done_total_rate_and_eta(caplog):
    """Under a scheduler (no terminal) a long stage still says how far it is (issue 29)."""
    import logging

    from radacx_cache._io import progress_bar
    with caplog.at_level(logging.INFO, logger="radacx_cache.progress"):
        for _ in progress_bar(range(5), desc="shards", unit="img", every=0):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "radacx_cache.progress"]
    assert lines and lines[-1].startswith("shards: 5/5 (100%)") and "img/s" in lines[-1] and "ETA" in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="radacx_cache.progress"):
        for _ in progress_bar(range(5), desc="quiet", enabled=False):
            pass
    assert not caplog.records


def test_inspect_on_a_workdir_summarises_its_stages(pipeline):
    from radacx_cache.stages.inspect import inspect_path
    text = inspect_path(Path(pipeline["cfg"].workdir))
    assert "a radacx workdir" in text and "radacx verify" in text
    cohort = pd.read_csv(Path(pipeline["cfg"].workdir) / "cohort" / "cohort.csv")
    assert f"cohort      cohort                   {len(cohort)} images" in text
    assert "shards      shards" in text


def test_progress_lines_are_rate_limited_whatever_refreshes_the_bar(caplog):
    """A training loop calls set_postfix on every step (a refresh): the log still gets one line per
    interval and the last one, not one per step."""
    import logging

    from radacx_cache._io import progress_bar
    with caplog.at_level(logging.INFO, logger="radacx_cache.progress"):
        bar = progress_bar(total=500, desc="V3 epoch 1/20", unit="batch", every=3600)
        for _ in range(500):
            bar.update(1)
            bar.set_postfix(loss="0.5")
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "radacx_cache.progress"]
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("V3 epoch 1/20: 500/500 (100%)"), lines


def test_records_that_name_each_other_as_upstream_are_a_cycle_not_a_recursion_error(tmp_path):
    """Two re-sealed records from elsewhere, each the other's upstream: one RecordError naming the
    cycle (it was 'maximum recursion depth exceeded')."""
    import json as _json

    from radacx_cache.formats.records import RecordError, Verifier, seal
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for me, other in (("a", "b"), ("b", "a")):
        data = seal({"stage": "demo", "command": "radacx demo", "files": {}, "record_version": 1,
                     "upstream": {f"{other}/manifest.json": "0" * 16}})
        (tmp_path / me / "manifest.json").write_text(_json.dumps(data))
    with pytest.raises(RecordError, match="upstream records form a cycle"):
        Verifier(tmp_path).record(tmp_path / "a" / "manifest.json")


def test_verify_calls_a_record_behind_a_link_broken_and_writes_nothing_through_it(tmp_path):
    """A workdir whose cohort/ is a link to a folder elsewhere: verify says BROKEN for it and leaves no
    .verified.json there (it used to write one through the link and call the record intact)."""
    from radacx_cache.formats.records import VERIFIED, write_record
    from radacx_cache.stages.verify import verify_workdir
    elsewhere, work = tmp_path / "elsewhere", tmp_path / "work"
    (elsewhere / "cohort").mkdir(parents=True)
    (elsewhere / "cohort" / "cohort.csv").write_text("dicom_id\nx\n")
    write_record(elsewhere / "cohort" / "manifest.json", elsewhere, "demo", "radacx demo", files=["cohort.csv"])
    (elsewhere / "cohort" / VERIFIED).unlink(missing_ok=True)
    assert verify_workdir(elsewhere)[1]  # intact where it lives
    (elsewhere / "cohort" / VERIFIED).unlink(missing_ok=True)
    work.mkdir()
    (work / "cohort").symlink_to(elsewhere / "cohort")
    lines, ok = verify_workdir(work)
    assert not ok and any(line.startswith("BROKEN  cohort/manifest.json") and "reached through the link" in line
                          for line in lines), lines
    assert not (elsewhere / "cohort" / VERIFIED).exists()


def test_a_jpeg2000_file_that_fails_to_decode_is_one_line_and_pydicom_logs_nothing(caplog):
    """pydicom logs an ERROR with a traceback for each decoder that fails, before raising: for a file
    that becomes a reject row that is noise in a 18,000-file run. The reject is one line; pydicom's
    records are dropped while decoding and its loggers are back afterwards."""
    import logging

    from pydicom.encaps import encapsulate

    from radacx_cache.sources.dicom import DicomError, decode_dicom

    def broken_codestream(ds):
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # SOC, SIZ marker, then nothing
        ds["PixelData"].VR = "OB"
    data = _dicom(broken_codestream, syntax="1.2.840.10008.1.2.4.90")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DicomError) as err:
        decode_dicom(data)
    assert "\n" not in str(err.value) and "JPEG 2000" in str(err.value)
    assert [r for r in caplog.records if r.name.startswith("pydicom")] == []
    assert not logging.getLogger("pydicom.pixels.decoders.base").disabled


# ---------------------------------------------------------------- HDF5 handed over: walked by object, with a cap
@pytest.mark.parametrize("depth", [3, 40])
def test_groups_that_hard_link_the_next_level_twice_are_walked_once_per_object(tmp_path, depth):
    """2^depth paths, depth + 1 groups: the safety walk visits each object once, so a 40-level file
    (2^40 paths, the hostile case that hung `inspect`) is checked as fast as a 3-level one; a group
    linked below itself (a cycle) ends too, and a planted external link at the bottom is still found."""
    import time

    import h5py

    from radacx_cache.formats.hdf5 import UnsafeHDF5, open_checked, unsafe_objects
    path = tmp_path / "doubled.h5"
    with h5py.File(path, "w") as f:
        groups = [f.create_group("g0")]
        for k in range(1, depth + 1):
            g = f.create_group(f"level{k}")
            groups[-1]["left"] = g
            groups[-1]["right"] = g
            groups.append(g)
        groups[-1]["loop"] = groups[0]  # a cycle back to the top
    start = time.perf_counter()
    with h5py.File(path, "r") as f:
        assert unsafe_objects(f) == []
    assert time.perf_counter() - start < 5
    with h5py.File(path, "a") as f:
        f[f"level{depth}"]["out"] = h5py.ExternalLink("/etc/passwd", "/")
    with pytest.raises(UnsafeHDF5, match="external link"):
        open_checked(path)


def test_a_file_with_more_links_than_the_cap_is_refused(tmp_path):
    import h5py

    from radacx_cache.formats.hdf5 import unsafe_objects
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("g")
        for i in range(11):
            g[f"x{i}"] = g  # 11 hard links to one group
    with h5py.File(path, "r") as f:
        assert unsafe_objects(f, max_links=12) == []  # 12 links in all: at the cap, allowed
        assert "more than 11 links" in unsafe_objects(f, max_links=11)[0]


@pytest.mark.parametrize("box, ok", [
    ([9, 4, 0, 0, 10, 10], True),  # the last row, the last class: in range
    ([9, 5, 0, 0, 10, 10], False),  # class 5 of 5 (0-4)
    ([0, 7, 0, 0, 10, 10], False),  # class 7 of 5
    ([0, -1, 0, 0, 10, 10], False),  # would silently pick the last class
    ([10, 0, 0, 0, 10, 10], False),  # row 10 of a 10-row file
    ([0, 0, 0, float("nan"), 10, 10], False),
    ([0, 1.5, 0, 0, 10, 10], False),
])
def test_a_shards_boxes_name_a_row_and_a_class_in_range(tmp_path, box, ok):
    from radacx_cache.formats.shard import ShardError
    from radacx_cache.formats.shard.reader import checked_boxes
    table = np.array([[0, 0, 1, 1, 5, 5], box], np.float32)
    if ok:
        assert checked_boxes(tmp_path / "s.h5", table, rows=10, classes=5) is table
    else:
        with pytest.raises(ShardError, match="boxes row 1"):
            checked_boxes(tmp_path / "s.h5", table, rows=10, classes=5)


def test_a_shard_whose_boxes_declare_hundreds_of_gib_is_refused_before_a_read_and_inspect_says_why(pipeline,
                                                                                                    tmp_path):
    """A 1 MB shard declaring a 366 GiB ``boxes`` table (issue 28): the reader refuses it from its
    declared shape, naming the dataset, and ``radacx inspect --png`` exits 2 with one line (it said
    "needs a shard file" and exited 0)."""
    import shutil as _shutil

    import h5py

    from radacx_cache.cli import main
    from radacx_cache.formats.shard import ShardError, validate_shard
    src = Path(pipeline["cfg"].workdir) / "shards" / pipeline["shards"]["shards"][0]["name"]
    bomb = tmp_path / "bomb.h5"
    _shutil.copy(src, bomb)
    with h5py.File(bomb, "r+") as f:
        f.create_dataset("boxes", shape=(16_400_000_000, 6), dtype="float32", chunks=(1024, 6))  # never written
    assert bomb.stat().st_size < 50 << 20
    with pytest.raises(ShardError, match="boxes"):
        validate_shard(bomb)
    assert main(["inspect", str(bomb), "--png", str(tmp_path / "m.png")]) == 2
    assert not (tmp_path / "m.png").exists()
