"""Readers of the real archives (one module per archive, each defining its ``Archive``), CheXmask's
tables and RLE, and the DICOM display pipeline. Every module of this folder is imported here, so
an archive module is registered in ``ARCHIVES`` by being in the folder (``sources/archive.py``)."""
import importlib
import pkgutil

from .archive import ARCHIVES, Archive, ArchiveTables, archive
from .chexmask import (MASK_NAMES, RLEError, decode_rle, encode_rle, parse_landmarks, parse_rle, polygon_mask,
                       read_chexmask, sample_rle)
from .mimic import jpg_relpath, read_labels, read_metadata, read_split, table_path

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ARCHIVES", "Archive", "ArchiveTables", "archive", "MASK_NAMES", "RLEError", "decode_rle", "encode_rle",
           "parse_landmarks", "parse_rle", "polygon_mask", "read_chexmask", "sample_rle", "jpg_relpath",
           "read_labels", "read_metadata", "read_split", "table_path"]
