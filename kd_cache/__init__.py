"""Producing and reading teacher caches.

Public reader API: ``open_cache(path_or_url)`` returns a cache with ``len()``, ``.manifest``,
iteration and random access, yielding one dict of numpy arrays per sample.
"""

from kd_cache.reader import KDCache, open_cache
from kd_cache.schema import FORMAT_VERSION
from kd_cache.writer import CacheWriter

__all__ = ["FORMAT_VERSION", "CacheWriter", "KDCache", "open_cache"]
