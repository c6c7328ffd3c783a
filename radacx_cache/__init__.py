"""radacx-cache: anatomy-aware chest X-ray shards, feature caches, probes and fine-tuning."""
from ._version import __version__

__all__ = ["__version__", "ShardSet", "open_shards"]


def __getattr__(name):  # PEP 562: h5py and pandas are imported only when a shard set is opened
    if name in ("ShardSet", "open_shards"):
        from .formats import shard
        return getattr(shard, name)
    raise AttributeError(f"module 'radacx_cache' has no attribute {name!r}")
