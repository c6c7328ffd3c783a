"""Stage records: the content-addressed manifests that chain every output to the archive.

A record is a JSON file a stage writes last (its commit point). It lists every file a later stage
reads, with its size and sha256, the fingerprints of the upstream records it was built from, and the
decisions later stages take from it (the cohort's classes and target rule, the shards' render
settings, the model of a prediction file). Its ``fingerprint`` is the hash of all of that (less the
volatile keys below), so a record edited by hand no longer matches its own fingerprint::

    {"record_version": 1, "stage": "probe", "command": "radacx probe",
     "files": {"V1.npz": {"bytes": 4321, "sha256": "..."}},
     "upstream": {"features/tiny-1a2b/manifest.json": "<fingerprint>"},
     ...decisions..., "fingerprint": "<hash of the above>"}

``files`` are named relative to the record's folder (a shard folder stays relocatable); upstream
records relative to the workdir. ``Verifier.record`` checks a record and, recursively, the chain
above it: the fingerprint, every listed file (re-hashed unless its inode, ctime, size and mtime are
those of an earlier check: ``touch -r`` cannot forge a ctime), and that each upstream record still
has the fingerprint recorded. A break raises ``RecordError``: one line naming both fingerprints and
the command that fixes it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .._io import file_sha256, read_json, stable_hash, write_json
from ..workdir import VERIFIED_CACHE
from .record_kinds import record_facts

RECORD_VERSION = 1
# not part of a record's identity: the package version that wrote it, the archive files' mtimes
# (the cohort's cache key: touched but unchanged tables give the same cohort)
VOLATILE = ("fingerprint", "created_with", "inputs_fingerprint")
VERIFIED = VERIFIED_CACHE
# the command that writes the records of each top-level workdir folder (for a missing one's message)
WRITERS = {"cohort": "radacx cohort", "shards": "radacx shards", "features": "radacx embed",
           "zeroshot": "radacx zeroshot", "probes": "radacx probe", "finetune": "radacx finetune",
           "predictions": "radacx zeroshot / probe / finetune", "results": "radacx saliency / report"}


class RecordError(RuntimeError):
    """A stage record is missing, edited, or no longer matches the files or records it lists."""


def record_fingerprint(data: dict) -> str:
    """The hash of a record's content: everything but the volatile keys."""
    return stable_hash({k: v for k, v in data.items() if k not in VOLATILE}, n=24)


def safe_relpath(name: str, what: str) -> PurePosixPath:
    """A name from a record or a table: relative, no ``..``, no empty part (never leaves its folder)."""
    rel = PurePosixPath(str(name))
    if not str(name) or rel.is_absolute() or any(p in ("", "..") for p in rel.parts) or "\\" in str(name):
        raise RecordError(f"{what}: {name!r} is not a plain relative path inside its folder")
    return rel


@dataclass(frozen=True)
class Record:
    path: Path
    data: dict

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]

    def file(self, name: str) -> Path:
        if name not in self.data.get("files", {}):
            raise RecordError(f"{self.path}: lists no file {name!r}")
        return self.path.parent / name

    @property
    def facts(self):
        """The record's typed decisions (``record_kinds``: CohortFacts, ShardFacts, ArmFacts), checked
        when it was read."""
        return record_facts(self.data["stage"], self.data)

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)


def seal(data: dict) -> dict:
    """``data`` with its record version and fingerprint."""
    data = {**data, "record_version": RECORD_VERSION}
    data["fingerprint"] = record_fingerprint(data)
    return data


def write_record(path: Path, root: Path, stage: str, command: str, files=(), upstream=(), known=None,
                 **facts) -> Record:
    """Hash ``files`` (names relative to ``path``'s folder), chain the ``upstream`` records (each
    verified by the caller), and write the record last: the stage's commit point. ``known``: sha256
    the caller has just computed or verified ({name: sha256}), and files whose (inode, ctime, size,
    mtime) the folder's verified-once cache knows, are not hashed again (the shards of a 100k-image set)."""
    folder = path.parent
    cached, known = _load_verified(folder), dict(known or {})
    entries = {}
    for name in files:
        target = folder / safe_relpath(name, str(path))
        key = _stat_key(target)
        seen = cached.get(name)
        sha = known.get(name) or (seen[4] if isinstance(seen, list) and len(seen) == 5 and seen[:4] == key else None)
        entries[name] = {"bytes": key[2], "sha256": sha or file_sha256(target)}
    ups = {rel_to(root, rec.path): rec.fingerprint for rec in upstream}
    data = seal({"stage": stage, "command": command, "files": entries, "upstream": ups, **facts})
    write_json(path, data)
    _remember(folder, {name: entries[name]["sha256"] for name in entries})
    return Record(path, data)


def rel_to(root: Path, path: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def link_below(root: Path, path: Path) -> Path | None:
    """The first symbolic link among the folders from ``root`` (exclusive) down to ``path``'s folder, or None."""
    try:
        rel = Path(os.path.normpath(path.absolute())).relative_to(os.path.normpath(root.absolute()))
    except ValueError:
        return None
    here = root
    for part in rel.parts[:-1]:
        here = here / part
        if here.is_symlink():
            return here
    return None


def _stat_key(path: Path) -> list:
    st = path.stat()
    return [st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns]


def _load_verified(folder: Path) -> dict:
    try:
        data = read_json(folder / VERIFIED)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(folder: Path, hashes: dict) -> None:
    """Record that these files had these hashes at their current (inode, ctime, size, mtime)."""
    known = _load_verified(folder)
    for name, sha in hashes.items():
        try:
            known[name] = [*_stat_key(folder / name), sha]
        except OSError:
            known.pop(name, None)
    try:
        write_json(folder / VERIFIED, known)
    except OSError:  # a read-only folder: hashed again next time, nothing else lost
        pass


def check_files(folder: Path, expected: dict, what: str, command: str, rehash: bool = False,
                remember: bool = True) -> None:
    """Every file of ``expected`` ({name: {bytes, sha256}}) present and unchanged, hashed at most
    once per (inode, ctime, size, mtime) unless ``rehash``; ``remember=False``: write no
    ``.verified.json`` (a folder reached through a link)."""
    known, fresh = ({} if rehash else _load_verified(folder)), {}
    for name, entry in expected.items():
        path = folder / safe_relpath(name, what)
        if not path.is_file():
            raise RecordError(f"{path}: listed in {what} but missing; rerun `{command}`")
        key = _stat_key(path)
        if known.get(name) == [*key, entry["sha256"]]:
            continue
        if key[2] != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise RecordError(f"{path} changed after `{command}` wrote it (its sha256 is not the one in {what}); "
                              f"rerun `{command}`")
        fresh[name] = entry["sha256"]
    if fresh and remember:
        _remember(folder, fresh)


def read_record(path: Path, stage: str | None = None, command: str | None = None) -> Record:
    """A record whose fingerprint matches its content (files and upstream not checked)."""
    hint = command or (f"radacx {stage}" if stage else "the stage that writes it")
    if not path.is_file():
        raise RecordError(f"{path}: no finished record (run `{hint}` first)")
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: not a readable record ({exc}); rerun `{hint}`") from None
    if not isinstance(data, dict) or data.get("record_version") != RECORD_VERSION:
        found = data.get("record_version") if isinstance(data, dict) else None
        raise RecordError(f"{path}: record_version {found!r}, this radacx-cache reads {RECORD_VERSION} (written "
                          f"by an older version: rerun `{hint}`, or `make clean` and rerun every stage)")
    if stage is not None and data.get("stage") != stage:
        raise RecordError(f"{path}: a {data.get('stage')!r} record where a {stage!r} one was expected")
    if record_fingerprint(data) != data.get("fingerprint"):
        raise RecordError(f"{path} was edited after it was written (fingerprint {data.get('fingerprint')} "
                          f"!= its content's {record_fingerprint(data)}); rerun `{data.get('command', hint)}`")
    try:
        record_facts(str(data.get("stage")), data)
    except ValueError as exc:  # sealed, but not what a stage of this tool writes
        raise RecordError(f"{path}: {exc}; rerun `{data.get('command', hint)}`") from None
    return Record(path, data)


class Verifier:
    """Verifies records and the chain above them, each once per run (``radacx verify``, every stage)."""

    def __init__(self, root: str | Path, rehash: bool = False, refuse_links: bool = False):
        self.root = Path(root)
        self.rehash = rehash
        # `radacx verify`: a record reached through a link below the workdir is BROKEN, not followed; the
        # stages read through such links (a workdir may share finished stages) but never write through them
        self.refuse_links = refuse_links
        self.done: dict[str, Record] = {}
        self._open: list[str] = []  # the chain being walked: a record met again on it is a cycle

    def record(self, path: Path, stage: str | None = None, command: str | None = None) -> Record:
        rel = rel_to(self.root, Path(path))
        if rel in self.done:
            return self.done[rel]
        if rel in self._open:  # records from elsewhere can name each other as upstream: never recurse forever
            raise RecordError(f"{path}: upstream records form a cycle ({' -> '.join([*self._open, rel])}); "
                              f"no stage writes that, rerun the stages named in them")
        self._open.append(rel)
        try:
            return self._record(path, rel, stage, command)
        finally:
            self._open.pop()

    def _record(self, path: Path, rel: str, stage: str | None, command: str | None) -> Record:
        link = link_below(self.root, Path(path))
        if link is not None and self.refuse_links:
            raise RecordError(f"{path}: reached through the link {link} (-> {os.path.realpath(link)}); verify reads "
                              f"and writes only inside the workdir (copy the folder in, or verify where it lives)")
        rec = read_record(Path(path), stage, command or WRITERS.get(rel.split("/")[0]))
        cmd = rec.get("command", command or "")
        check_files(rec.path.parent, rec.get("files", {}), str(rec.path), cmd, self.rehash, remember=link is None)
        for up_rel, up_fp in rec.get("upstream", {}).items():
            up = self.record(self.root / safe_relpath(up_rel, str(rec.path)))
            if up.fingerprint != up_fp:
                raise RecordError(f"{rec.path} was built from {up.path} {up_fp}, which is now {up.fingerprint}; "
                                  f"rerun `{cmd}`")
        self.done[rel] = rec
        return rec

    def require_upstream(self, rec: Record, up: Record) -> None:
        """``rec`` must have been built from ``up`` as it is now."""
        key = rel_to(self.root, up.path)
        found = rec.get("upstream", {}).get(key)
        if found != up.fingerprint:
            raise RecordError(f"{rec.path} was built from {key} {found}, which is now {up.fingerprint}; "
                              f"rerun `{rec.get('command')}`")
