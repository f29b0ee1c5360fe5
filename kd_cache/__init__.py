"""Producing and reading teacher caches.

Public reader API: ``open_cache(path_or_url)`` returns a cache with ``len()``, ``.manifest``,
iteration and random access, yielding one dict of numpy arrays per sample.
"""

from kd_cache.shards import FORMAT_VERSION, CacheWriter, KDCache, open_cache

__all__ = ["FORMAT_VERSION", "CacheWriter", "KDCache", "open_cache"]
