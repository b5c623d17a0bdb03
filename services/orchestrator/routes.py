"""Routes: named recipes that choose the models for a request, and its defaults.

A request names a route instead of a model; the route's policy orders its candidate models
(the first is tried first, the rest are fallbacks) and the route sets the request's
deadline, cost ceiling, cache use, guardrail profile and retrieval defaults. The routes
live in a YAML file that is reloaded when it changes, without a restart:

    routes:
      support:
        policy: weighted
        candidates: [mock-small, mock-fast]
        weights: {mock-small: 3, mock-fast: 1}
        latency_budget_s: 20
        max_cost_usd: "0.01"

Policies:

    fallback   the candidates in the configured order
    weighted   one candidate drawn by weight first, the others after it in configured order
    cheapest   by the price of the expected tokens (the prompt, and the model's whole
               max_output_tokens), cheapest first; ties keep the configured order
    fastest    by the model's observed median latency in this process, fastest first;
               models not yet observed come first (so each gets measured), in configured order
    rules      the first rule whose conditions all hold gives the leading candidates; the
               route's candidates follow as fallbacks (all of them when no rule matches)

A new file that does not validate never replaces the routes in use: the error is logged and
the previous routes keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar, assert_never

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from services.common.catalog import Catalog
from services.common.errors import RouteNotFound
from services.common.settings import ConfigError

log = logging.getLogger(__name__)

Policy = Literal["fallback", "weighted", "cheapest", "fastest", "rules"]
ROUTE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleCondition(_Strict):
    """When a rule applies: every condition given must hold (at least one is given)."""

    prompt_tokens_over: int | None = Field(default=None, ge=0)
    """The estimated prompt has more tokens than this."""
    prompt_tokens_under: int | None = Field(default=None, gt=0)
    """The estimated prompt has fewer tokens than this."""
    tags: dict[str, str] = Field(default_factory=dict)
    """The request carries each of these tags with exactly this value."""
    tiers: list[str] = Field(default_factory=list)
    """The caller's tenant has one of these tiers (the tenants file's `tier`)."""

    @model_validator(mode="after")
    def _not_empty(self) -> RuleCondition:
        if (
            self.prompt_tokens_over is None
            and self.prompt_tokens_under is None
            and not self.tags
            and not self.tiers
        ):
            raise ValueError("a rule needs at least one condition")
        return self

    def matches(self, prompt_tokens: int, tags: Mapping[str, str], tier: str = "") -> bool:
        """Whether a request with this prompt size, tags and tenant tier meets every
        condition."""
        if self.tiers and tier not in self.tiers:
            return False
        if self.prompt_tokens_over is not None and prompt_tokens <= self.prompt_tokens_over:
            return False
        if self.prompt_tokens_under is not None and prompt_tokens >= self.prompt_tokens_under:
            return False
        return all(tags.get(key) == value for key, value in self.tags.items())


class RouteRule(_Strict):
    """One rule of a `rules` route."""

    when: RuleCondition
    """The conditions, all of which must hold."""
    candidates: list[str] = Field(min_length=1)
    """Models tried first when the rule matches, in order; any model of the catalog."""

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates: list[str]) -> list[str]:
        return _distinct_names(candidates)


class RouteCacheConfig(_Strict):
    """How requests of the route may reuse stored answers."""

    semantic: bool = False
    """Reuse answers to questions that mean the same (not only identical requests)."""
    min_similarity: float | None = Field(default=None, gt=0, le=1)
    """Least similarity for reuse by meaning; unset: the cache service's threshold."""
    max_temperature: float = Field(default=0.7, ge=0)
    """Above this sampling temperature reuse by meaning is off (the caller asked for
    variety), unless `allow_high_temperature`."""
    allow_high_temperature: bool = False
    """Reuse by meaning whatever the temperature."""
    ttl_s: float | None = Field(default=None, gt=0)
    """How long a stored answer lives; unset: the cache service's default."""

    def semantic_allowed(self, temperature: float | None) -> bool:
        """Whether reuse by meaning is on for a request sampled at `temperature`."""
        if not self.semantic:
            return False
        if self.allow_high_temperature or temperature is None:
            return True
        return temperature <= self.max_temperature


class RouteRetrievalConfig(_Strict):
    """Retrieval defaults for requests of the route that set none of their own."""

    collection: str = Field(min_length=1)
    """The tenant's knowledge collection."""
    top_k: int = Field(default=4, ge=1, le=50)
    """Chunks to retrieve."""
    min_score: float | None = Field(default=None, ge=0, le=1)
    """Least similarity of a chunk; unset: none."""
    on_failure: Literal["fail", "answer_without_context"] = "fail"
    """When the knowledge index fails or is too slow: `fail` (UNAVAILABLE,
    RETRIEVAL_UNAVAILABLE) or `answer_without_context` (the model answers without documents
    and the final chunk says `retrieval_degraded`). Applies to the route's requests that do
    not set their own."""


class RouteConfig(_Strict):
    """One route: which models a request may use, in what order, and its defaults."""

    name: str = ""
    """The route's name; filled from the key of the `routes` mapping."""
    policy: Policy = "fallback"
    """How the candidates are ordered for a request (see the module docstring)."""
    candidates: list[str] = Field(min_length=1)
    """Chat models of the catalog, in the configured order; every one is a fallback."""
    weights: dict[str, float] | None = None
    """For `weighted` only, and required there: a positive weight for each candidate."""
    rules: list[RouteRule] | None = None
    """For `rules` only, and required there: tried in order, the first match wins."""
    latency_budget_s: float | None = Field(default=None, gt=0)
    """The request's deadline: the smaller of this and the client's."""
    max_cost_usd: Decimal | None = Field(default=None, gt=0)
    """Per-request cost ceiling in USD (at most 6 decimals): the smaller of this and the
    client's. Models whose worst case costs more are not tried."""
    cache: RouteCacheConfig | None = None
    """Cache use of the route's requests; unset: as the request says."""
    guardrail_profile: str | None = Field(default=None, min_length=1)
    """Guardrail profile for the route's requests; unset: the tenant's."""
    retrieval: RouteRetrievalConfig | None = None
    """Retrieval for requests that ask for none; unset: no retrieval."""

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates: list[str]) -> list[str]:
        return _distinct_names(candidates)

    @field_validator("max_cost_usd")
    @classmethod
    def _whole_micros(cls, cost: Decimal | None) -> Decimal | None:
        if cost is not None and (not cost.is_finite() or (cost * 1_000_000) % 1 != 0):
            raise ValueError("must have at most 6 decimals")
        return cost

    @model_validator(mode="after")
    def _policy_fields(self) -> RouteConfig:
        if self.policy == "weighted":
            if not self.weights:
                raise ValueError("policy weighted needs `weights`")
            unknown = sorted(set(self.weights) - set(self.candidates))
            if unknown:
                raise ValueError(f"weights name models that are not candidates: {unknown}")
            missing = [c for c in self.candidates if c not in self.weights]
            if missing:
                raise ValueError(f"weights miss candidates: {missing}")
            bad = sorted(m for m, w in self.weights.items() if not (w > 0 and math.isfinite(w)))
            if bad:
                raise ValueError(f"weights must be positive numbers: {bad}")
        elif self.weights is not None:
            raise ValueError(f"`weights` apply to policy weighted only, not {self.policy}")
        if self.policy == "rules":
            if not self.rules:
                raise ValueError("policy rules needs `rules`")
        elif self.rules is not None:
            raise ValueError(f"`rules` apply to policy rules only, not {self.policy}")
        return self

    @model_validator(mode="after")
    def _models_exist(self, info: ValidationInfo) -> RouteConfig:
        catalog = info.context.get("catalog") if isinstance(info.context, dict) else None
        if not isinstance(catalog, Catalog):
            return self
        named = [*self.candidates, *(c for rule in self.rules or () for c in rule.candidates)]
        for alias in dict.fromkeys(named):
            model = catalog.get(alias)
            if model is None:
                raise ValueError(f"candidate {alias!r} is not in the models catalog")
            if model.kind != "chat":
                raise ValueError(f"candidate {alias!r} is an {model.kind} model, not a chat one")
        return self

    @property
    def max_cost_usd_micros(self) -> int | None:
        """The cost ceiling in millionths of a USD, or None."""
        return None if self.max_cost_usd is None else int(self.max_cost_usd * 1_000_000)


def _distinct_names(names: list[str]) -> list[str]:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"models listed more than once: {repeated}")
    return names


class RoutesFile(_Strict):
    """The whole routes file."""

    routes: dict[str, RouteConfig]
    """The routes by name."""

    @model_validator(mode="before")
    @classmethod
    def _name_routes(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("routes"), dict):
            data = dict(data)
            data["routes"] = {
                name: {**spec, "name": name} if isinstance(spec, dict) else spec
                for name, spec in data["routes"].items()
            }
        return data

    @field_validator("routes")
    @classmethod
    def _valid_names(cls, routes: dict[str, RouteConfig]) -> dict[str, RouteConfig]:
        bad = [name for name in routes if not re.fullmatch(ROUTE_NAME_PATTERN, str(name))]
        if bad:
            raise ValueError(f"route names must match {ROUTE_NAME_PATTERN}: {bad}")
        return routes


def load_routes(path: Path, catalog: Catalog) -> dict[str, RouteConfig]:
    """Reads and validates a routes file against the catalog; ConfigError names the file,
    the route and the field of each problem."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read routes file {path}: {err}") from err
    try:
        parsed = RoutesFile.model_validate(raw, context={"catalog": catalog})
    except ValidationError as err:
        problems = "\n".join(
            f"  {'.'.join(str(part) for part in problem['loc']) or '(file)'}: {problem['msg']}"
            for problem in err.errors()
        )
        raise ConfigError(f"invalid routes file {path}:\n{problems}") from err
    return dict(parsed.routes)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """What a route decided for one request."""

    route: str
    """The route's name."""
    candidates: list[str]
    """Models to try, in order: the first is preferred, the others are fallbacks."""
    deadline_s: float | None
    """The route's latency budget; the request's deadline is the smaller of it and the
    client's (see `deadline_within`)."""
    max_cost_usd_micros: int | None
    """The route's cost ceiling; the request's is the smaller of it and the client's (see
    `cost_ceiling`)."""
    config: RouteConfig
    """The route as configured when the decision was made (cache, guardrails, retrieval)."""

    def deadline_within(self, client_s: float | None) -> float | None:
        """Seconds the request may run: the smaller of the route's budget and `client_s`."""
        return _smaller(self.deadline_s, client_s)

    def cost_ceiling(self, client_usd_micros: int | None) -> int | None:
        """The request's cost ceiling: the smaller of the route's and the client's."""
        return _smaller(self.max_cost_usd_micros, client_usd_micros)


_N = TypeVar("_N", int, float)


def _smaller(a: _N | None, b: _N | None) -> _N | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


class LatencyTracker:
    """Recent latencies of each model in this process, for the `fastest` policy.

    A ring of the last `window` observations per model, so a model that slows down (or
    recovers) shows it within a few hundred requests.
    """

    def __init__(self, window: int = 200) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._window = window
        self._seconds: dict[str, deque[float]] = {}

    def observe(self, model: str, seconds: float) -> None:
        """Records how long one call to `model` took."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"a latency must be a finite number >= 0, not {seconds}")
        ring = self._seconds.get(model)
        if ring is None:
            ring = self._seconds[model] = deque(maxlen=self._window)
        ring.append(seconds)

    def p50(self, model: str) -> float | None:
        """The median of the model's recent latencies, or None before any observation."""
        ring = self._seconds.get(model)
        return statistics.median(ring) if ring else None


class Router:
    """The routes of one process, reloaded when their file changes."""

    def __init__(
        self,
        path: Path | None,
        catalog: Catalog,
        latencies: LatencyTracker,
        rng: random.Random | None = None,
    ) -> None:
        """Loads the routes from `path` (None: no routes); raises ConfigError naming the
        file when it is missing or invalid."""
        self._path = path
        self._catalog = catalog
        self._latencies = latencies
        self._rng = rng if rng is not None else random.Random()
        self._routes: Mapping[str, RouteConfig] = {}
        self._stamp: tuple[int, int] | None = None
        if path is not None:
            stamp = _stamp(path)
            self._routes = load_routes(path, catalog)
            self._stamp = stamp
            log.info("loaded %d routes from %s", len(self._routes), path)

    def names(self) -> list[str]:
        """The configured routes' names, sorted."""
        return sorted(self._routes)

    def configs(self) -> list[RouteConfig]:
        """The configured routes, sorted by name."""
        return [self._routes[name] for name in sorted(self._routes)]

    def uses_tier(self, route: str) -> bool:
        """Whether deciding `route` needs the caller's tenant tier."""
        config = self._routes.get(route)
        return config is not None and any(rule.when.tiers for rule in config.rules or ())

    def decide(
        self, route: str, prompt_tokens: int, tags: Mapping[str, str], tier: str = ""
    ) -> RouteDecision:
        """Orders the route's candidates for a request; raises RouteNotFound."""
        config = self._routes.get(route)
        if config is None:
            raise RouteNotFound(route)
        return RouteDecision(
            route=route,
            candidates=self._order(config, prompt_tokens, tags, tier),
            deadline_s=config.latency_budget_s,
            max_cost_usd_micros=config.max_cost_usd_micros,
            config=config,
        )

    def reorder(
        self,
        decision: RouteDecision,
        prompt_tokens: int,
        tags: Mapping[str, str],
        tier: str = "",
    ) -> RouteDecision:
        """`decision` with its candidates ordered again, by the same version of the route, for
        a prompt of `prompt_tokens` (the conversation a template or retrieval built)."""
        candidates = self._order(decision.config, prompt_tokens, tags, tier)
        return replace(decision, candidates=candidates)

    def _order(
        self, config: RouteConfig, prompt_tokens: int, tags: Mapping[str, str], tier: str
    ) -> list[str]:
        candidates = config.candidates
        match config.policy:
            case "fallback":
                return list(candidates)
            case "weighted":
                assert config.weights is not None  # guaranteed by validation
                weights = [config.weights[c] for c in candidates]
                first = self._rng.choices(candidates, weights=weights)[0]
                return _chain([first], candidates)
            case "cheapest":
                return sorted(
                    candidates, key=lambda alias: self._expected_cost(alias, prompt_tokens)
                )
            case "fastest":
                return _fastest_first(candidates, self._latencies)
            case "rules":
                for rule in config.rules or ():
                    if rule.when.matches(prompt_tokens, tags, tier):
                        return _chain(rule.candidates, candidates)
                return list(candidates)
            case _:
                assert_never(config.policy)

    def _expected_cost(self, alias: str, prompt_tokens: int) -> int:
        """Micro-USD per million tokens times tokens: only compared, so never divided."""
        model = self._catalog.models[alias]
        return (
            model.input_micros_per_million * max(prompt_tokens, 0)
            + model.output_micros_per_million * model.max_output_tokens
        )

    def reload_if_changed(self) -> bool:
        """Reloads the file if its modification time or size changed.

        Returns True when new routes took over. A file that cannot be read or does not
        validate leaves the routes in use as they are; its error is logged once per change.
        """
        if self._path is None:
            return False
        try:
            stamp = _stamp(self._path)
        except ConfigError as err:
            if self._stamp is not None:
                log.error("keeping the current routes: %s", err)
                self._stamp = None
            return False
        if stamp == self._stamp:
            return False
        # Remembered before reading: a write that lands while the file is read changes the
        # stamp again, so the next check picks it up.
        self._stamp = stamp
        try:
            routes = load_routes(self._path, self._catalog)
        except ConfigError as err:
            log.error("keeping the current routes: %s", err)
            return False
        self._routes = routes
        log.info("reloaded %d routes from %s", len(routes), self._path)
        return True

    async def watch(self, interval_s: float = 2.0) -> None:
        """Checks the file every `interval_s` seconds, forever (returns at once without one)."""
        if self._path is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.reload_if_changed()
            except Exception:
                log.exception("checking the routes file %s failed", self._path)


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError as err:
        raise ConfigError(f"cannot read routes file {path}: {err}") from err
    return stat.st_mtime_ns, stat.st_size


def _chain(first: Iterable[str], then: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*first, *then]))


def _fastest_first(candidates: list[str], latencies: LatencyTracker) -> list[str]:
    unobserved = [c for c in candidates if latencies.p50(c) is None]
    observed = [(p50, c) for c in candidates if (p50 := latencies.p50(c)) is not None]
    # Stable: equal medians keep the configured order.
    observed.sort(key=lambda pair: pair[0])
    return [*unobserved, *(c for _, c in observed)]
