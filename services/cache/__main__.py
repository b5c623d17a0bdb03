"""`python -m services.cache`: runs the cache service until SIGTERM."""

from services.cache.app import build
from services.cache.settings import CacheSettings
from services.common.bootstrap import main

if __name__ == "__main__":
    main("cache", CacheSettings, build)
