"""The shard format, writer beside reader (as mosaicml/streaming's ``format/mds/``; docs/shard-format.md).

- ``schema``: the one table of datasets, dtypes, tail shapes and storage, and the root attributes;
- ``writer``: ``write_shard``, one file from rendered rows (the shard stage plans and commits);
- ``reader``: ``ShardSet``, ``open_shards``, ``open_verified`` and the checks a reader makes.
"""
from .reader import (DerivedView, ShardError, ShardSet, check_row_shapes, open_shards, open_verified, read_variants,
                     row_blocks, validate_shard)
from .schema import (DATASETS, INDEX_NAME, MANIFEST_NAME, ROW_DATASETS, SCHEMA, SCHEMA_VERSION, SPLITS, VARIANTS_NAME,
                     Dataset, root_attributes, tail_shape)
from .writer import write_shard

__all__ = ["DATASETS", "INDEX_NAME", "MANIFEST_NAME", "ROW_DATASETS", "SCHEMA", "SCHEMA_VERSION", "SPLITS",
           "VARIANTS_NAME", "Dataset", "DerivedView", "ShardError", "ShardSet", "check_row_shapes", "open_shards",
           "open_verified", "read_variants", "root_attributes", "row_blocks", "tail_shape", "validate_shard",
           "write_shard"]
