from decodekit.cache.base import KVStorage
from decodekit.cache.manager import CacheFullError, CacheManager, CacheStats, KVHandle

__all__ = ["CacheFullError", "CacheManager", "CacheStats", "KVHandle", "KVStorage"]
