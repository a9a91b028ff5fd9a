from decodekit.cache.manager import CacheFullError, CacheManager, CacheStats, KVHandle

__all__ = ["CacheFullError", "CacheManager", "CacheStats", "KVHandle"]
