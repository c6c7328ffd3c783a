"""radacx-cache: anatomy-aware chest X-ray shards, feature caches, probes and fine-tuning."""
__version__ = "0.1.0"

from .shards import ShardSet, open_shards  # noqa: E402

__all__ = ["__version__", "ShardSet", "open_shards"]
