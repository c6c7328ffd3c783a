"""The archive the cohort reads, through the registry of ``sources`` (docs/archives.md).

Every archive is an ``Archive`` class in its own module of ``sources/`` (``sources/archive.py``
says what one declares); this module reads the configured one and its CheXmask rows. Nothing here
names an archive: an unknown ``archive.kind`` is refused by the config, and ``archive`` raises a
``KeyError`` listing the known kinds.
"""
from __future__ import annotations

from pathlib import Path

from .config import Config
from .sources.archive import ARCHIVES, Archive, ArchiveTables, archive
from .sources.chexmask import read_chexmask

__all__ = ["ARCHIVES", "Archive", "ArchiveTables", "archive", "chexmask_id_column", "id_problem", "input_files",
           "read_archive_tables", "relpath"]


def id_problem(kind: str, row) -> str | None:
    """Why a metadata row's identifiers are not this archive's, or None (then paths may be built)."""
    return archive(kind).id_problem(row)


def relpath(tables: ArchiveTables, row) -> str:
    """The image file of a validated row, relative to ``archive.root``."""
    return archive(tables.kind).relpath(tables, row)


def read_archive_tables(cfg: Config, with_chexmask: bool = True) -> ArchiveTables:
    """Read the archive's tables (and, for small archives and tests, the whole CheXmask table)."""
    root = Path(cfg.archive.root)
    if not root.is_dir():
        raise FileNotFoundError(f"archive.root {root} is not a folder (unmounted, or a wrong path?); "
                                f"nothing was rejected or written")
    tables = archive(cfg.archive.kind).read(cfg)
    if with_chexmask:
        frontal_ids = tables.metadata.loc[tables.metadata["ViewPosition"].isin(cfg.cohort.views), "dicom_id"]
        tables.chexmask = read_chexmask(cfg.archive.chexmask_csv, id_column=chexmask_id_column(cfg), ids=frontal_ids)
    return tables


def chexmask_id_column(cfg: Config) -> str:
    """The image-id column of this archive's CheXmask file (``Image Index`` for NIH, ...)."""
    return archive(cfg.archive.kind).chexmask_id_column


def input_files(cfg: Config) -> list[Path]:
    """Every table the cohort reads: a change to any of them (size, mtime) invalidates it."""
    try:
        files = archive(cfg.archive.kind).input_files(Path(cfg.archive.root))
    except FileNotFoundError:  # the readers say what is missing, and where, when they run
        files = []
    return files + [Path(cfg.archive.chexmask_csv)]
