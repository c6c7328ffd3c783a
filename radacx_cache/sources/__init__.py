"""Readers of the real archives: MIMIC-CXR-JPG tables and tree, CheXmask tables and RLE."""
from .chexmask import (MASK_NAMES, RLEError, decode_rle, encode_rle, parse_landmarks, parse_rle,
                       polygon_mask, read_chexmask, sample_rle)
from .mimic import jpg_relpath, read_labels, read_metadata, read_split, table_path

__all__ = ["MASK_NAMES", "RLEError", "decode_rle", "encode_rle", "parse_landmarks", "parse_rle",
           "polygon_mask", "read_chexmask", "sample_rle", "jpg_relpath", "read_labels",
           "read_metadata", "read_split", "table_path"]
