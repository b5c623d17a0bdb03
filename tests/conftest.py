"""Fixtures shared by every test layer: a real Redis, tenants with keys, models, an upstream.

Redis: $STRATA_TEST_REDIS_URL when set; else database 15 of the Redis on 127.0.0.1:6379
when it answers; else a private `redis-server` started for the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml

from services.control.keys import new_key
from strata_cli.devstack import PrivateRedis, free_port, redis_answers
from tests.fakes.openai_upstream import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
TEST_DB = 15


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the session's tests."""
    explicit = os.environ.get("STRATA_TEST_REDIS_URL")
    local = f"redis://127.0.0.1:6379/{TEST_DB}"
    if explicit:
        yield explicit
    elif redis_answers(local):
        yield local
    else:
        server = PrivateRedis(tmp_path_factory.mktemp("redis")).start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test Redis, emptied before the test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@dataclass(frozen=True)
class ApiKeys:
    """Clear API keys of the test tenants, by key id."""

    acme: str
    """acme/acme-main: generous limits."""
    acme_second: str
    """acme/acme-second: another key of the same tenant."""
    tight: str
    """acme/acme-tight: 3 requests per minute."""
    tokens: str
    """acme/acme-tokens: 1000 tokens per minute."""
    disabled: str
    """acme/acme-off: disabled."""
    globex: str
    """globex/globex-main: another tenant."""
    watched: str
    """watched/watched-main: a tenant whose guardrails watch only the answers."""


@pytest.fixture(scope="session")
def keys_and_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[ApiKeys, Path]:
    made = {
        name: new_key()
        for name in ("acme", "acme_second", "tight", "tokens", "disabled", "globex", "watched")
    }

    def entry(key_id: str, name: str, **limits: object) -> dict[str, object]:
        return {"id": key_id, "sha256": made[name][1], **limits}

    tenants = {
        "tenants": {
            "acme": {
                "name": "Acme",
                "keys": [
                    entry("acme-main", "acme", requests_per_minute=10_000, tokens_per_minute=0),
                    entry("acme-second", "acme_second", requests_per_minute=10_000),
                    entry("acme-tight", "tight", requests_per_minute=3),
                    entry("acme-tokens", "tokens", tokens_per_minute=1000),
                    entry("acme-off", "disabled", disabled=True),
                ],
            },
            "globex": {"tier": "free", "keys": [entry("globex-main", "globex")]},
            "watched": {
                "guardrail_profile": "watch-output",
                "keys": [entry("watched-main", "watched")],
            },
        }
    }
    path = tmp_path_factory.mktemp("config") / "tenants.yaml"
    path.write_text(yaml.safe_dump(tenants))
    return ApiKeys(**{name: key for name, (key, _) in made.items()}), path


@pytest.fixture(scope="session")
def test_keys(keys_and_file: tuple[ApiKeys, Path]) -> ApiKeys:
    return keys_and_file[0]


@pytest.fixture(scope="session")
def tenants_file(keys_and_file: tuple[ApiKeys, Path]) -> Path:
    return keys_and_file[1]


@pytest.fixture(scope="session")
def guardrails_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config/guardrails.yaml plus `watch-output`: no input rules; answers must hold no
    secret (block) and no personal data (redact)."""
    config = yaml.safe_load((ROOT / "config" / "guardrails.yaml").read_text())
    config["profiles"]["watch-output"] = {
        "rules": {},
        "output_rules": {"secret": "block", "pii": "redact"},
    }
    path = tmp_path_factory.mktemp("config") / "guardrails.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeOpenAI]:
    """The fake OpenAI-compatible server, for the whole session."""
    server = FakeOpenAI().start()
    try:
        yield server
    finally:
        server.stop()


UPSTREAM_BEHAVIOURS = (
    "ok",
    "slow",
    "500",
    "500-once",
    "429",
    "429-once",
    "quota",
    "hang",
    "slow-first",
    "slow-first-once",
    "cut",
    "malformed",
    "no-usage",
)
"""`up-<behaviour>` aliases reach `fake-<behaviour>` on the fake upstream."""
FAST_RETRY = {"max_attempts": 3, "base_delay_s": 0.02, "max_delay_s": 0.1}


@pytest.fixture(scope="session")
def models_file(tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI) -> Path:
    """config/models.yaml plus `up-*` aliases served by the fake upstream (`up-slow-start`:
    2 s to its first chunk, within its timeout; `up-unreachable`: on a closed port),
    `mock-down` (fails, falls back to mock-fast) and two echo models whose prices cross
    (`mock-dear-prompt`, `mock-dear-answer`)."""
    catalog = yaml.safe_load((ROOT / "config" / "models.yaml").read_text())
    catalog["providers"]["fake"] = {
        "kind": "openai_compatible",
        "base_url": upstream.base_url,
        "headers": {"x-strata-test": "1"},
        "retry_budget": {"ratio": 0.1, "window_s": 10, "min_retries": 1000},
    }
    for behaviour in UPSTREAM_BEHAVIOURS:
        catalog["models"]["up-" + behaviour] = {
            "provider": "fake",
            "upstream_model": "fake-" + behaviour,
            "input_usd_per_million_tokens": "2.5",
            "output_usd_per_million_tokens": "10",
            "max_output_tokens": 2048,
            "context_window": 32_000,
            "retry": FAST_RETRY,
            "timeouts": {"first_token_s": 1.0, "stall_s": 5.0},
        }
    catalog["models"]["up-slow-first"]["timeouts"] = {"first_token_s": 0.3}
    catalog["models"]["up-hedged"] = {
        **catalog["models"]["up-slow-first-once"],
        "timeouts": {"first_token_s": 10.0},
        "hedge_after_s": 0.2,
    }
    catalog["models"]["up-slow-start"] = {
        **catalog["models"]["up-slow-first"],
        "timeouts": {"first_token_s": 5.0},
    }
    # Nothing listens on the port of `up-unreachable` (it was free when the file was made).
    catalog["providers"]["closed"] = {
        "kind": "openai_compatible",
        "base_url": f"http://127.0.0.1:{free_port()}/v1",
    }
    catalog["models"]["up-unreachable"] = {
        **catalog["models"]["up-ok"],
        "provider": "closed",
        "retry": {"max_attempts": 1},
    }
    catalog["models"]["mock-down"] = {
        "provider": "mock",
        "upstream_model": "error",
        "fallbacks": ["mock-fast"],
        "retry": {"max_attempts": 1},
    }
    # Prices that cross: the first is cheaper for short prompts, the second for long ones.
    for alias, price_in, price_out in (
        ("mock-dear-prompt", "10", "0.1"),
        ("mock-dear-answer", "0.1", "10"),
    ):
        catalog["models"][alias] = {
            "provider": "mock",
            "upstream_model": "echo",
            "input_usd_per_million_tokens": price_in,
            "output_usd_per_million_tokens": price_out,
            "max_output_tokens": 1024,
            "context_window": 32_000,
        }
    path = tmp_path_factory.mktemp("config") / "models.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path
