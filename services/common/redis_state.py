"""The Redis client every stateful service uses: bounded calls, one pool per process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.errors import DependencyUnavailable


def connect(url: str, timeout_s: float, max_connections: int = 64) -> redis.Redis:
    """A pooled client whose every command gives up after `timeout_s`."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        max_connections=max_connections,
        health_check_interval=30,
        decode_responses=False,
    )


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turns Redis being unreachable or slow into UNAVAILABLE/REDIS_UNAVAILABLE."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as err:
        raise DependencyUnavailable("redis") from err
