"""One opened context per stage: the workdir, the run's verifier and the verified shard set.

Every stage after ``shards`` starts the same way: the configured permissions, the stage's workdir
lock, one ``Verifier`` for the whole run (each record verified once) and the shard set read through
its verified chain. ``open_stage`` does that once; the stage then reads every path from ``work`` and
every record through ``verifier``, and never rebuilds either.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .._io import stage_run
from ..workdir import Workdir
from .records import Record, Verifier
from .shard import ShardSet, open_verified


@dataclass
class StageContext:
    """What a running stage holds: where it writes, how it verifies, what it read."""
    work: Workdir
    verifier: Verifier
    shards: ShardSet | None = None  # None for a stage that runs before the shards exist

    @classmethod
    def of(cls, workdir: str | Path, shards: bool = True) -> "StageContext":
        """The context of ``workdir`` without the stage lock (a library call inside a locked stage,
        or a reader such as ``results.load``)."""
        work = Workdir(workdir)
        verifier = Verifier(work.root)
        return cls(work, verifier, open_verified(work, verifier) if shards else None)

    def record(self, path: Path, stage: str) -> Record:
        """A record of this workdir, verified with its chain (once per context)."""
        return self.verifier.record(path, stage)


@contextlib.contextmanager
def open_stage(workdir: str | Path, stage: str, permissions: str = "umask", shards: bool = True
               ) -> Iterator[StageContext]:
    """Apply the permissions, take the stage's workdir lock, verify the shard set: the stage's context."""
    with stage_run(workdir, stage, permissions):
        yield StageContext.of(workdir, shards)
