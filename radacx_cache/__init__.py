"""radacx-cache: anatomy-aware chest X-ray shards, feature caches, probes and fine-tuning."""
from ._version import __version__
from .formats.shardset import ShardSet, open_shards

__all__ = ["__version__", "ShardSet", "open_shards"]
