"""Small I/O helpers shared by every stage: atomic writes, stable fingerprints, thread caps."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from threadpoolctl import threadpool_limits
from tqdm import tqdm


def stable_hash(obj, n: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class UnsafePath(OSError):
    """A write would go through a link planted in the workdir."""


_WRITE_ROOT: list[Path] = []  # the workdir of the stage running in this process (set by stage_lock)


def refuse_links_below_root(folder: Path) -> None:
    """Refuse a folder reached through a link below the running stage's workdir (a workdir others can
    write: ``predictions/`` replaced by a link to another place). The workdir itself may be a link."""
    if not _WRITE_ROOT:
        return
    root = _WRITE_ROOT[-1].absolute()
    try:
        rel = Path(os.path.normpath(folder.absolute())).relative_to(os.path.normpath(root))
    except ValueError:
        return  # not below the workdir (e.g. the phantom's output folder): not a stage output
    here = root
    for part in rel.parts:
        here = here / part
        if here.is_symlink():
            raise UnsafePath(errno.ELOOP, f"{here} is a link; refusing to write through it (remove the link: "
                                          f"stage outputs stay inside the workdir)", str(here))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def private_tmp(path: Path) -> Path:
    """A new, empty temporary file beside ``path`` with an unpredictable name, created exclusively
    (``mkstemp``: a link planted at a guessed name is never followed), mode as the umask says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_links_below_root(path.parent)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds
    (``os.replace`` replaces a link at ``path`` itself, never its target)."""
    path = Path(path)
    tmp = private_tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: str | Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell that starts so as a formula


def spreadsheet_safe(df: pd.DataFrame, columns) -> pd.DataFrame:
    """``df`` with every text cell of ``columns`` that a spreadsheet would run as a formula (OWASP's
    CSV injection rule: a leading ``= + - @``, tab or CR) prefixed by ``'``, for tables written from
    archive values that people open in Excel (rejects.csv). Other cells are unchanged."""
    out = df.copy()
    for col in columns:
        if col in out:
            out[col] = out[col].map(lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v)
    return out


def write_npz(path: str | Path, **arrays) -> None:
    """``np.savez`` with fixed zip timestamps, written atomically: the same arrays give the same bytes,
    so a rerun that computes the same thing does not change the records built on it."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def cap_threads(n: int = 1) -> None:
    """Cap BLAS/torch threads in a worker so that parallel workers do not thrash the cores."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    threadpool_limits(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def remove_stale_tmp(folder: Path) -> int:
    """Delete temporary files left by an interrupted run; returns how many."""
    n = 0
    if folder.exists():
        for p in folder.glob(".*.tmp"):
            p.unlink()
            n += 1
    return n


class StageBusy(RuntimeError):
    """Another process runs the same stage on the same workdir."""


@contextlib.contextmanager
def stage_lock(workdir: str | Path, stage: str):
    """Hold an exclusive lock for ``stage`` on ``workdir`` (fcntl, released when the process ends).

    A second run of the same stage on the same workdir is refused at once with the holder's pid,
    instead of the two deleting each other's temporary files.
    """
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".radacx-{stage}.lock"
    try:  # never through a planted link: O_NOFOLLOW refuses one at the lock's name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UnsafePath(errno.ELOOP, f"{path} is a link; refusing to open the stage lock through it "
                                      f"(remove it)", str(path)) from None
    if not os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
        os.close(fd)
        raise StageBusy(f"{path} changed while it was opened; run the stage again")
    _WRITE_ROOT.append(folder)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise StageBusy(f"another `radacx {stage}` (pid {holder}) is running on {folder}; wait for it "
                            f"to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        _WRITE_ROOT.pop()
        os.close(fd)  # closing releases the lock


PERMISSION_UMASKS = {"group": 0o027, "private": 0o077}


def apply_permissions(mode: str) -> None:
    """Make every file and folder written from now on readable by the owner (``private``), the owner
    and the group (``group``), or as the umask says (``umask``). Process-wide; workers inherit it."""
    if mode in PERMISSION_UMASKS:
        os.umask(PERMISSION_UMASKS[mode])
    elif mode != "umask":
        raise ValueError(f"permissions {mode!r}: expected umask, group or private")


@contextlib.contextmanager
def stage_run(workdir: str | Path, stage: str, permissions: str = "umask"):
    """What every stage does first: the configured file permissions, then its workdir lock."""
    apply_permissions(permissions)
    with stage_lock(workdir, stage):
        yield


def jpeg_bytes(pixels: np.ndarray, quality: int = 95) -> bytes:
    """A grey (H, W) uint8 image as JPEG bytes (the phantom's files are quality-95 JPEGs, as MIMIC's)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class _LogLines(io.TextIOBase):
    """Where a progress bar writes off a terminal: each refresh becomes one log line."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger = logger

    def write(self, text: str) -> int:
        if text.strip("\r\n "):
            self.logger.info("%s", text.strip("\r\n "))
        return len(text)


PROGRESS_EVERY = 30.0  # seconds between progress lines in a log (Slurm, nohup, a pipe)


def progress_bar(iterable=None, *, enabled: bool = True, every: float = PROGRESS_EVERY, **kwargs) -> tqdm:
    """A tqdm bar on a terminal; off a terminal (a scheduler's log file) the same progress as a log line
    at most every ``every`` seconds: done / total, percent, rate and ETA. ``enabled=False``: silent."""
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return _LoggedBar(iterable, file=_LogLines(logging.getLogger("radacx_cache.progress")), mininterval=every,
                      bar_format="{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), {rate_fmt}, elapsed {elapsed}, "
                                 "ETA {remaining}", every=every, **kwargs)


class _LoggedBar(tqdm):
    """A bar whose every refresh is a log line: at most one per ``every`` seconds, whatever calls
    refresh (``set_postfix`` does on each step), and the last one when it closes."""

    def __init__(self, *args, every: float = PROGRESS_EVERY, **kwargs):
        self._every, self._logged = every, -float("inf")
        super().__init__(*args, **kwargs)

    def refresh(self, nolock=False, lock_args=None):
        now = time.monotonic()
        if now - self._logged < self._every and not (self.total and self.n >= self.total):
            return
        self._logged = now
        super().refresh(nolock=nolock, lock_args=lock_args)

