"""Routes: policies, rules, limits, validation and reloading of the routes file."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from pydantic import ValidationError

from services.common.catalog import Catalog, load_catalog
from services.common.settings import ConfigError
from services.orchestrator.routes import (
    LatencyTracker,
    RouteConfig,
    RouteNotFound,
    Router,
    load_routes,
)

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config"


def _model(input_price: str, output_price: str, max_output: int, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "mock",
        "upstream_model": "echo",
        "input_usd_per_million_tokens": input_price,
        "output_usd_per_million_tokens": output_price,
        "max_output_tokens": max_output,
        **extra,
    }


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.model_validate(
        {
            "providers": {"mock": {"kind": "mock"}},
            "models": {
                # cheap to read, dear to write: cheapest for long prompts
                "reader": _model("0.10", "10", 1000),
                # the reverse: cheapest for short prompts
                "writer": _model("5", "0.50", 1000),
                "big": _model("3", "15", 8000),
                "embedder": _model("0.02", "0", 1, kind="embedding"),
            },
        }
    )


def write_routes(path: Path, routes: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"routes": routes}))
    return path


def router_for(
    tmp_path: Path,
    catalog: Catalog,
    routes: dict[str, Any],
    *,
    latencies: LatencyTracker | None = None,
    seed: int = 7,
) -> Router:
    path = write_routes(tmp_path / "routes.yaml", routes)
    return Router(path, catalog, latencies or LatencyTracker(), random.Random(seed))


def bump_mtime(path: Path) -> None:
    """Moves the file's mtime a second on: a rewrite within one clock tick keeps it."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


# Policies


def test_fallback_keeps_the_configured_order(tmp_path, catalog):
    router = router_for(tmp_path, catalog, {"r": {"candidates": ["big", "reader", "writer"]}})

    decision = router.decide("r", 100, {})

    assert decision.route == "r"
    assert decision.candidates == ["big", "reader", "writer"]
    assert decision.config.policy == "fallback"


def test_weighted_draws_the_first_candidate_by_weight(tmp_path, catalog):
    router = router_for(
        tmp_path,
        catalog,
        {
            "r": {
                "policy": "weighted",
                "candidates": ["reader", "writer", "big"],
                "weights": {"reader": 6, "writer": 3, "big": 1},
            }
        },
        seed=1234,
    )

    decisions = [router.decide("r", 10, {}).candidates for _ in range(1000)]
    firsts = Counter(candidates[0] for candidates in decisions)

    # Expected 600/300/100; three standard deviations are about 47, 43 and 28.
    assert abs(firsts["reader"] - 600) <= 50
    assert abs(firsts["writer"] - 300) <= 45
    assert abs(firsts["big"] - 100) <= 30
    # The others follow the drawn one in configured order, each once.
    assert {tuple(c) for c in decisions} == {
        ("reader", "writer", "big"),
        ("writer", "reader", "big"),
        ("big", "reader", "writer"),
    }


def test_weighted_is_reproducible_with_a_seed(tmp_path, catalog):
    routes = {
        "r": {
            "policy": "weighted",
            "candidates": ["reader", "writer"],
            "weights": {"reader": 1, "writer": 1},
        }
    }
    first = router_for(tmp_path, catalog, routes, seed=42)
    second = router_for(tmp_path, catalog, routes, seed=42)

    assert [first.decide("r", 1, {}).candidates for _ in range(50)] == [
        second.decide("r", 1, {}).candidates for _ in range(50)
    ]


def test_cheapest_prices_the_prompt_and_the_whole_output_limit(tmp_path, catalog):
    router = router_for(
        tmp_path, catalog, {"r": {"policy": "cheapest", "candidates": ["big", "reader", "writer"]}}
    )

    # 10 prompt tokens: reader 0.000001 + 0.01 USD, writer 0.00005 + 0.0005, big 0.00003 + 0.12.
    assert router.decide("r", 10, {}).candidates == ["writer", "reader", "big"]
    # 100_000 prompt tokens: reader 0.01 + 0.01 USD, writer 0.5 + 0.0005, big 0.3 + 0.12.
    assert router.decide("r", 100_000, {}).candidates == ["reader", "big", "writer"]


def test_cheapest_keeps_the_configured_order_on_ties(tmp_path):
    same = _model("1", "1", 100)
    catalog = Catalog.model_validate(
        {"providers": {"mock": {"kind": "mock"}}, "models": {"b": same, "a": same, "c": same}}
    )
    router = router_for(
        tmp_path, catalog, {"r": {"policy": "cheapest", "candidates": ["b", "c", "a"]}}
    )

    assert router.decide("r", 500, {}).candidates == ["b", "c", "a"]


def test_fastest_puts_unmeasured_models_first_then_by_median(tmp_path, catalog):
    latencies = LatencyTracker()
    router = router_for(
        tmp_path,
        catalog,
        {"r": {"policy": "fastest", "candidates": ["big", "reader", "writer"]}},
        latencies=latencies,
    )
    assert router.decide("r", 1, {}).candidates == ["big", "reader", "writer"]

    for seconds in (0.9, 1.0, 1.1):
        latencies.observe("big", seconds)
    for seconds in (0.2, 0.3, 5.0):  # one outlier; the median ignores it
        latencies.observe("writer", seconds)
    assert router.decide("r", 1, {}).candidates == ["reader", "writer", "big"]

    latencies.observe("reader", 2.0)
    assert router.decide("r", 1, {}).candidates == ["writer", "big", "reader"]


RULES_ROUTE: dict[str, Any] = {
    "policy": "rules",
    "candidates": ["reader", "writer"],
    "rules": [
        {"when": {"prompt_tokens_over": 2000}, "candidates": ["big"]},
        {"when": {"tags": {"tier": "free", "region": "eu"}}, "candidates": ["writer"]},
        {
            "when": {"prompt_tokens_under": 10, "tags": {"tier": "free"}},
            "candidates": ["big", "writer"],
        },
    ],
}


@pytest.mark.parametrize(
    ("prompt_tokens", "tags", "expected"),
    [
        # no rule: the route's candidates
        (500, {}, ["reader", "writer"]),
        # over is strict
        (2000, {}, ["reader", "writer"]),
        (2001, {}, ["big", "reader", "writer"]),
        # the first matching rule wins, even when a later one matches too
        (5000, {"tier": "free", "region": "eu"}, ["big", "reader", "writer"]),
        # every tag must match; a rule's candidate is not repeated among the fallbacks
        (500, {"tier": "free", "region": "eu"}, ["writer", "reader"]),
        (500, {"tier": "free", "region": "us"}, ["reader", "writer"]),
        (500, {"tier": "free"}, ["reader", "writer"]),
        # all conditions of a rule must hold: under is strict and needs the tag too
        (9, {"tier": "free"}, ["big", "writer", "reader"]),
        (10, {"tier": "free"}, ["reader", "writer"]),
        (9, {"tier": "paid"}, ["reader", "writer"]),
    ],
)
def test_rules_match_on_prompt_size_and_tags(tmp_path, catalog, prompt_tokens, tags, expected):
    router = router_for(tmp_path, catalog, {"r": RULES_ROUTE})

    assert router.decide("r", prompt_tokens, tags).candidates == expected


def test_rules_match_on_the_tenant_tier(tmp_path, catalog):
    route = {
        "policy": "rules",
        "candidates": ["reader", "writer"],
        "rules": [
            {"when": {"tiers": ["free", "trial"]}, "candidates": ["writer"]},
            {"when": {"tiers": ["pro"], "tags": {"kind": "long"}}, "candidates": ["big"]},
        ],
    }
    router = router_for(tmp_path, catalog, {"r": route, "plain": {"candidates": ["reader"]}})

    assert router.uses_tier("r")
    assert not router.uses_tier("plain")
    assert not router.uses_tier("missing")
    assert router.decide("r", 10, {}, "trial").candidates == ["writer", "reader"]
    assert router.decide("r", 10, {}, "").candidates == ["reader", "writer"]
    assert router.decide("r", 10, {}, "pro").candidates == ["reader", "writer"]
    assert router.decide("r", 10, {"kind": "long"}, "pro").candidates == [
        "big",
        "reader",
        "writer",
    ]


# Deadlines, ceilings and the other defaults


def test_the_route_sets_the_deadline_and_the_cost_ceiling(tmp_path, catalog):
    router = router_for(
        tmp_path,
        catalog,
        {
            "r": {"candidates": ["reader"], "latency_budget_s": 20, "max_cost_usd": "0.012345"},
            "open": {"candidates": ["reader"]},
        },
    )

    decision = router.decide("r", 1, {})
    assert decision.deadline_s == 20.0
    assert decision.max_cost_usd_micros == 12_345
    assert decision.config.max_cost_usd == Decimal("0.012345")
    # The smaller of the route's and the client's wins; an unset one gives way.
    assert decision.deadline_within(5.0) == 5.0
    assert decision.deadline_within(60.0) == 20.0
    assert decision.deadline_within(None) == 20.0
    assert decision.cost_ceiling(1_000) == 1_000
    assert decision.cost_ceiling(50_000) == 12_345
    assert decision.cost_ceiling(None) == 12_345

    unlimited = router.decide("open", 1, {})
    assert unlimited.deadline_s is None
    assert unlimited.max_cost_usd_micros is None
    assert unlimited.deadline_within(7.5) == 7.5
    assert unlimited.deadline_within(None) is None
    assert unlimited.cost_ceiling(99) == 99


def test_an_unquoted_yaml_cost_is_read_exactly(tmp_path, catalog):
    path = tmp_path / "routes.yaml"
    path.write_text("routes:\n  r: {candidates: [reader], max_cost_usd: 0.01}\n")

    assert load_routes(path, catalog)["r"].max_cost_usd_micros == 10_000


def test_cache_semantic_reuse_stops_above_the_temperature(tmp_path, catalog):
    cache = {"semantic": True, "min_similarity": 0.9, "max_temperature": 0.7, "ttl_s": 3600}
    router = router_for(
        tmp_path,
        catalog,
        {
            "r": {"candidates": ["reader"], "cache": cache},
            "hot": {"candidates": ["reader"], "cache": {**cache, "allow_high_temperature": True}},
            "exact": {"candidates": ["reader"], "cache": {"semantic": False}},
        },
    )

    config = router.decide("r", 1, {}).config.cache
    assert config is not None
    assert config.ttl_s == 3600
    assert config.semantic_allowed(None)
    assert config.semantic_allowed(0.7)
    assert not config.semantic_allowed(0.71)
    hot = router.decide("hot", 1, {}).config.cache
    assert hot is not None and hot.semantic_allowed(1.5)
    exact = router.decide("exact", 1, {}).config.cache
    assert exact is not None and not exact.semantic_allowed(0.0)


def test_unknown_route_is_not_found(tmp_path, catalog):
    router = router_for(tmp_path, catalog, {"r": {"candidates": ["reader"]}})

    with pytest.raises(RouteNotFound) as caught:
        router.decide("nope", 1, {})

    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "ROUTE_NOT_FOUND"
    assert caught.value.metadata == {"route": "nope"}
    assert "nope" in caught.value.message


def test_no_routes_file_means_no_routes(catalog):
    router = Router(None, catalog, LatencyTracker())

    assert router.names() == []
    assert router.reload_if_changed() is False
    with pytest.raises(RouteNotFound):
        router.decide("support", 1, {})


def test_names_are_sorted(tmp_path, catalog):
    router = router_for(
        tmp_path, catalog, {"zeta": {"candidates": ["reader"]}, "alpha": {"candidates": ["big"]}}
    )

    assert router.names() == ["alpha", "zeta"]
    assert router.decide("alpha", 1, {}).config.name == "alpha"


# Validation


@pytest.mark.parametrize(
    ("route", "complaint"),
    [
        ({"candidates": ["reader", "ghost"]}, "candidate 'ghost' is not in the models catalog"),
        ({"candidates": ["embedder"]}, "'embedder' is an embedding model"),
        ({"candidates": []}, "at least 1 item"),
        ({"candidates": ["reader", "reader"]}, "more than once"),
        ({"policy": "weighted", "candidates": ["reader", "writer"]}, "weighted needs `weights`"),
        (
            {"policy": "weighted", "candidates": ["reader", "writer"], "weights": {"reader": 1}},
            "weights miss candidates: ['writer']",
        ),
        (
            {
                "policy": "weighted",
                "candidates": ["reader", "writer"],
                "weights": {"reader": 1, "writer": 0},
            },
            "weights must be positive",
        ),
        (
            {
                "policy": "weighted",
                "candidates": ["reader"],
                "weights": {"reader": 1, "big": 2},
            },
            "not candidates: ['big']",
        ),
        ({"candidates": ["reader"], "weights": {"reader": 1}}, "apply to policy weighted only"),
        ({"policy": "rules", "candidates": ["reader"]}, "rules needs `rules`"),
        (
            {
                "policy": "rules",
                "candidates": ["reader"],
                "rules": [{"when": {}, "candidates": ["big"]}],
            },
            "at least one condition",
        ),
        (
            {
                "policy": "rules",
                "candidates": ["reader"],
                "rules": [{"when": {"tags": {"tier": "free"}}, "candidates": ["ghost"]}],
            },
            "candidate 'ghost' is not in the models catalog",
        ),
        ({"policy": "newest", "candidates": ["reader"]}, "policy"),
        ({"candidates": ["reader"], "max_cost_usd": "0.0000001"}, "at most 6 decimals"),
        ({"candidates": ["reader"], "max_cost_usd": "-1"}, "greater than 0"),
        ({"candidates": ["reader"], "latency_budget_s": 0}, "greater than 0"),
        ({"candidates": ["reader"], "cache": {"min_similarity": 1.5}}, "min_similarity"),
        ({"candidates": ["reader"], "retrieval": {"top_k": 4}}, "collection"),
        ({"candidates": ["reader"], "fallbacks": ["big"]}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_routes_are_refused_naming_the_file_and_the_route(
    tmp_path, catalog, route, complaint
):
    path = write_routes(
        tmp_path / "routes.yaml", {"good": {"candidates": ["big"]}, "support": route}
    )

    with pytest.raises(ConfigError) as caught:
        Router(path, catalog, LatencyTracker())

    message = str(caught.value)
    assert str(path) in message
    assert "routes.support" in message
    assert complaint in message
    assert "routes.good" not in message


def test_unreadable_or_malformed_files_are_config_errors(tmp_path, catalog):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"cannot read routes file {missing}"):
        Router(missing, catalog, LatencyTracker())

    broken = tmp_path / "broken.yaml"
    broken.write_text("routes: {r: [unclosed\n")
    with pytest.raises(ConfigError, match=f"cannot read routes file {broken}"):
        Router(broken, catalog, LatencyTracker())

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=f"invalid routes file {empty}"):
        Router(empty, catalog, LatencyTracker())

    badly_named = write_routes(tmp_path / "names.yaml", {"has space": {"candidates": ["big"]}})
    with pytest.raises(ConfigError, match="route names must match"):
        Router(badly_named, catalog, LatencyTracker())


def test_route_config_without_a_catalog_checks_only_its_own_fields():
    config = RouteConfig.model_validate({"candidates": ["anything"], "max_cost_usd": "0.5"})

    assert config.max_cost_usd_micros == 500_000
    with pytest.raises(ValidationError):
        RouteConfig.model_validate({"candidates": ["a"], "policy": "weighted"})


def test_route_config_is_frozen():
    config = RouteConfig.model_validate({"candidates": ["a"]})

    with pytest.raises(ValidationError):
        config.candidates = ["b"]


def test_the_repository_routes_file_is_valid():
    catalog = load_catalog(REPO_CONFIG / "models.yaml")
    router = Router(REPO_CONFIG / "routes.yaml", catalog, LatencyTracker(), random.Random(0))

    assert "support" in router.names()
    support = router.decide("support", 100, {})
    assert sorted(support.candidates) == ["mock-fast", "mock-small"]
    assert support.deadline_s == 20
    assert support.max_cost_usd_micros == 10_000
    for name in router.names():
        assert router.decide(name, 3000, {"tier": "free"}).candidates


# Reloading


def test_reload_swaps_in_a_changed_file(tmp_path, catalog):
    router = router_for(tmp_path, catalog, {"r": {"candidates": ["reader", "writer"]}})
    path = tmp_path / "routes.yaml"
    before = router.decide("r", 1, {})

    assert router.reload_if_changed() is False  # unchanged

    write_routes(path, {"r": {"candidates": ["big", "reader"]}, "new": {"candidates": ["writer"]}})
    bump_mtime(path)
    assert router.reload_if_changed() is True

    assert router.names() == ["new", "r"]
    assert router.decide("r", 1, {}).candidates == ["big", "reader"]
    # A decision already made keeps the route as it was.
    assert before.candidates == ["reader", "writer"]
    assert router.reload_if_changed() is False


def test_reload_notices_a_same_size_rewrite_by_its_mtime(tmp_path, catalog):
    router = router_for(tmp_path, catalog, {"r": {"candidates": ["reader", "writer"]}})
    path = tmp_path / "routes.yaml"
    size = path.stat().st_size

    write_routes(path, {"r": {"candidates": ["writer", "reader"]}})
    assert path.stat().st_size == size
    bump_mtime(path)

    assert router.reload_if_changed() is True
    assert router.decide("r", 1, {}).candidates == ["writer", "reader"]


def test_an_invalid_new_file_keeps_the_old_routes(tmp_path, catalog, caplog):
    router = router_for(tmp_path, catalog, {"r": {"candidates": ["reader", "writer"]}})
    path = tmp_path / "routes.yaml"

    write_routes(path, {"r": {"candidates": ["ghost"]}})
    bump_mtime(path)
    with caplog.at_level(logging.ERROR, logger="services.orchestrator.routes"):
        assert router.reload_if_changed() is False
    assert router.decide("r", 1, {}).candidates == ["reader", "writer"]
    assert str(path) in caplog.text
    assert "routes.r" in caplog.text
    assert "ghost" in caplog.text

    # The same bad file is not reported again on every check...
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="services.orchestrator.routes"):
        assert router.reload_if_changed() is False
    assert caplog.text == ""

    # ...and once fixed, it loads.
    write_routes(path, {"r": {"candidates": ["big"]}})
    bump_mtime(path)
    assert router.reload_if_changed() is True
    assert router.decide("r", 1, {}).candidates == ["big"]


def test_a_deleted_file_keeps_the_old_routes(tmp_path, catalog, caplog):
    router = router_for(tmp_path, catalog, {"r": {"candidates": ["reader"]}})
    path = tmp_path / "routes.yaml"

    path.unlink()
    with caplog.at_level(logging.ERROR, logger="services.orchestrator.routes"):
        assert router.reload_if_changed() is False
    assert "cannot read routes file" in caplog.text
    assert router.decide("r", 1, {}).candidates == ["reader"]

    write_routes(path, {"r": {"candidates": ["writer"]}})
    assert router.reload_if_changed() is True
    assert router.decide("r", 1, {}).candidates == ["writer"]


async def test_watch_reloads_in_the_background(tmp_path, catalog):
    router = router_for(tmp_path, catalog, {"r": {"candidates": ["reader"]}})
    path = tmp_path / "routes.yaml"
    watcher = asyncio.create_task(router.watch(interval_s=0.01))
    try:
        write_routes(path, {"r": {"candidates": ["writer"]}})
        bump_mtime(path)
        async with asyncio.timeout(5):
            while router.decide("r", 1, {}).candidates != ["writer"]:
                await asyncio.sleep(0.01)
        assert not watcher.done()
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


async def test_watch_without_a_file_returns(catalog):
    router = Router(None, catalog, LatencyTracker())

    async with asyncio.timeout(1):
        await router.watch(interval_s=0.01)


# Latency tracker


def test_latency_tracker_median_over_a_bounded_window():
    tracker = LatencyTracker(window=3)
    assert tracker.p50("m") is None

    tracker.observe("m", 3.0)
    assert tracker.p50("m") == 3.0
    tracker.observe("m", 1.0)
    assert tracker.p50("m") == 2.0  # an even count averages the middle two
    tracker.observe("m", 2.0)
    assert tracker.p50("m") == 2.0

    for seconds in (10.0, 11.0, 12.0):  # pushes out 3.0, 1.0 and 2.0
        tracker.observe("m", seconds)
    assert tracker.p50("m") == 11.0
    assert tracker.p50("other") is None


def test_latency_tracker_keeps_the_last_200_by_default():
    tracker = LatencyTracker()
    for _ in range(1000):
        tracker.observe("m", 100.0)
    for _ in range(200):
        tracker.observe("m", 0.5)

    assert tracker.p50("m") == 0.5


@pytest.mark.parametrize("seconds", [-0.1, float("nan"), float("inf")])
def test_latency_tracker_refuses_impossible_latencies(seconds):
    with pytest.raises(ValueError, match="latency"):
        LatencyTracker().observe("m", seconds)
