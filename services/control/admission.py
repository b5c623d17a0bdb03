"""Admission and settlement: limits, budgets, breakers, guardrails; each decision atomic.

Redis layout. A tenant's keys share the hash tag `{t:<tenant>}` (one Cluster slot), a
model's share `{m:<model>}`; each script touches one slot only.

    strata:{t:T}:policy                 limits and budgets (tenant, team:<id>, key:<id>)
    strata:{t:T}:pending                zset request id -> reservation expiry (us)
    strata:{t:T}:reservations           hash request id -> key|team|tokens|cost|model
    strata:{t:T}:reserved               hash holder -> money reserved by running requests
    strata:{t:T}:expired                hash request id -> cost charged when it expired
    strata:{t:T}:settled:<request>      hash: admissions, which are settled or replayed, counted
    strata:{t:T}:rl:<key|tenant>:<id>:<req|tok>     GCRA state
    strata:{t:T}:usage:<holder>:<total|d<day>|m<yyyymm>>   spent, tokens, requests, ...
    strata:{t:T}:guardrails             stream of guardrail findings, by request
    strata:{m:M}:breaker, :policy, :rl:<req|tok>      circuit breaker and model limits

Admission is one round trip: a pipeline of one breaker check per candidate model and the
tenant's admit script. Budgets are checked against spend + reservations + this request's
worst case (prompt + max output tokens at the priciest candidate's prices), so concurrent
requests on any number of replicas can never overspend. Reservations that are never settled
expire into a charge of their worst case (the sweeper), never into free money; a late
settlement corrects the charge to the real cost. An admission whose caller was cut before it
saw it is settled at once as cancelled (`admit_call`). A request id settled and then admitted
again (a retry after a failure) is a new admission, charged on its own; the request counts
once. Periods (UTC day and month) follow Redis server time: the scripts refuse keys named
after another period and the caller renames them.

When Redis does not answer (down, paused, cut off: each call is bounded by the Redis
timeout, and after a few failures in a row Redis is skipped for a moment, see
`RedisOutage`), admission degrades instead of failing:

- keys are authenticated from the records this process last read (at most `outage_grace_s`
  old); an unknown key is refused REDIS_UNAVAILABLE;
- budgets fail closed: a request of a key, team or tenant with any budget, or whose policy
  this process has not read recently, is refused UNAVAILABLE/BUDGET_UNVERIFIABLE (no spend
  that cannot be counted);
- the other requests pass a per-process limiter (`LocalLimiter`: the same requests and tokens
  per minute and burst, from the policy last read, which each admission refreshes in its
  pipeline every POLICY_REFRESH_S; so N replicas may together admit up to N times a limit),
  counted in `strata.ratelimit.local_fallbacks`; breakers, model limits and the tenant's
  concurrency cap are not consulted (every candidate is planned, none as a probe), nothing
  is reserved and the admission number is 0;
- a settlement that Redis cannot take is kept in memory (at most MAX_DEFERRED) and written
  by the sweeper once Redis answers (attempts' breaker records dropped): Settle answers
  `applied=false` instead of failing; a process that stops first loses them, and reserved
  requests then expire into their worst case. Admission number 0 settles the reservation
  the request id holds (an admit that timed out but ran), else counts the usage on its own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as redis
from opentelemetry import trace
from opentelemetry.metrics import Counter
from opentelemetry.trace import Span
from redis.exceptions import ResponseError

from services.common import semconv, telemetry
from services.common.catalog import Catalog, ModelConfig
from services.common.errors import (
    BudgetExceeded,
    BudgetUnverifiable,
    ConcurrencyLimited,
    CostCeilingExceeded,
    DependencyUnavailable,
    FieldViolation,
    GuardrailBlocked,
    ModelNotFound,
    ModelsUnavailable,
    RateLimited,
    RequestExceedsLimit,
    RequestInvalid,
    StrataError,
)
from services.common.guardrails import Action, Guardrails, Verdict
from services.common.redis_state import RedisOutage, queue_script, redis_errors, run_pipeline
from services.common.tasks import Background
from services.common.validation import MAX_TOKENS, check_name, check_request_id
from services.control.keys import (
    TENANTS_SET,
    KeyRecord,
    KeyStore,
    digest_of,
    tenant_tag,
    valid_id,
)
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2

log = logging.getLogger(__name__)

BATCH_SHARE = 0.8
"""Batch requests may use this share of any limit or budget; the rest is kept for people."""
GUARDRAIL_STREAM_LENGTH = 10_000
POLICY_REFRESH_S = 5.0
"""How often an admission also reads its tenant's policy (same pipeline), for degraded mode."""
MAX_DEFERRED = 10_000
"""Settlements kept in memory while Redis does not answer; past it Settle fails."""
DEFERRED_BATCH = 200
"""Kept settlements written in one Redis round trip once Redis answers again."""
METRIC_LOCAL_FALLBACKS = "strata.ratelimit.local_fallbacks"
MAX_CANDIDATES = 32
"""Models one admission may plan over."""
MAX_ATTEMPTS = 64
"""Attempts one settlement may report (retries and fallbacks of one request)."""
MAX_COUNT = 2**53 - 1
"""The largest token count or cost a settlement may report: Lua numbers are doubles."""
MAX_SETTLE_BATCH = 1000
"""Settlements one SettleBatch may carry."""
MAX_TRACEPARENT = 256
"""Longest trace context a batch entry may carry (a W3C traceparent is 55 characters)."""
_OUTCOMES = {
    control_pb2.OUTCOME_SUCCESS: "success",
    control_pb2.OUTCOME_FAILURE: "failure",
    control_pb2.OUTCOME_CANCELLED: "cancelled",
}
BREAKER_FAILURES = frozenset(
    {
        "PROVIDER_UNAVAILABLE",
        "UPSTREAM_TIMEOUT",
        "UPSTREAM_RATE_LIMITED",
        "STREAM_INTERRUPTED",
        "BAD_UPSTREAM_RESPONSE",
        "PROVIDER_AUTH_FAILED",
        "EXECUTOR_UNAVAILABLE",
    }
)
"""Attempt failures that count against a model's breaker (the model's fault, not the
request's: a rejected or cancelled request says nothing about the model's health)."""
_ACTIONS = {
    Action.BLOCK: control_pb2.GUARDRAIL_ACTION_BLOCK,
    Action.REDACT: control_pb2.GUARDRAIL_ACTION_REDACT,
    Action.FLAG: control_pb2.GUARDRAIL_ACTION_FLAG,
}


def _script(*names: str) -> str:
    folder = resources.files("services.control").joinpath("lua")
    return "\n".join(folder.joinpath(name).read_text() for name in names)


def periods(now: float | None = None) -> tuple[int, int]:
    """The current UTC day number and year*100+month (the scripts check them)."""
    moment = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    return int(moment.timestamp() // 86400), moment.year * 100 + moment.month


class TenantKeys:
    """Redis key names of one tenant."""

    def __init__(self, tenant_id: str) -> None:
        self.base = base = tenant_tag(tenant_id)
        self.policy = f"{base}:policy"
        self.pending = f"{base}:pending"
        self.reservations = f"{base}:reservations"
        self.reserved = f"{base}:reserved"
        self.expired = f"{base}:expired"
        self.guardrails = f"{base}:guardrails"

    def settled(self, request_id: str) -> str:
        return f"{self.base}:settled:{request_id}"

    def rate(self, scope: str, scope_id: str, kind: str) -> str:
        return f"{self.base}:rl:{scope}:{scope_id}:{kind}"

    def usage(self, holder: str, period: str) -> str:
        return f"{self.base}:usage:{holder}:{period}"

    def usage_keys(self, team_id: str, key_id: str, day: int, month: int) -> list[str]:
        """The 9 usage hashes of a request: tenant, team, key x total, day, month."""
        names = []
        for holder in ("tenant", f"team:{team_id}", f"key:{key_id}"):
            names += [self.usage(holder, p) for p in ("total", f"d{day}", f"m{month}")]
        return names


def model_keys(model: str) -> list[str]:
    """Breaker, policy and limit state of a model."""
    base = f"strata:{{m:{model}}}"
    return [f"{base}:breaker", f"{base}:policy", f"{base}:rl:req", f"{base}:rl:tok"]


def worst_cost(model: ModelConfig, input_tokens: int, output_tokens: int) -> int:
    """The most a call can cost, in micro-USD."""
    usage = common_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return int(model.cost(usage).total_usd_micros)


@dataclass(slots=True)
class Admission:
    """A request that may run."""

    key: KeyRecord
    plan: list[tuple[str, bool]]
    """(model, is the breaker's probe), in order."""
    reserved_tokens: int
    reserved_cost: int
    profile: str
    number: int
    """Which admission of the request id this is (a retry after settlement is the next)."""
    replayed: bool = False
    """The request id held this admission already (an admit repeated): another call has it."""
    findings: list[control_pb2.GuardrailFinding] = field(default_factory=list)
    redacted: list[common_pb2.ChatMessage] | None = None


@dataclass(slots=True)
class _Settling:
    """One settlement on its way to the settle script: what it charges, and to whom."""

    request_id: str
    tenant_id: str
    key_id: str
    team_id: str
    outcome: str
    model: str
    input_tokens: int
    output_tokens: int
    cost: int
    cache_hit: bool
    admission: int
    before: Callable[[Any], None] | None = None
    """Queues commands that go in the same round trip, ahead of it (breaker records,
    findings), on the first attempt only."""
    cut: bool = False
    """The admission's caller never saw it; another call given it since settles it instead."""
    day: int = 0
    month: int = 0


def finding_protos(verdict: Verdict, text_to_message: Sequence[int] | None) -> list[Any]:
    """Guardrail findings as protos (never with the matched text)."""
    return [
        control_pb2.GuardrailFinding(
            rule=f.rule,
            action=_ACTIONS[f.action],
            message_index=(
                text_to_message[f.text_index]
                if text_to_message is not None and f.text_index >= 0
                else -1
            ),
        )
        for f in verdict.findings
    ]


class LocalLimiter:
    """The admit script's per-minute limits (GCRA, burst, batch share) in process memory,
    for while Redis does not answer. Each process counts alone; tokens are never given back
    (settlement does that in Redis only), so it errs on the strict side."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._tat: dict[str, float] = {}
        self._max_entries = max_entries

    def admit(self, key: KeyRecord, policy: dict[str, str], tokens: int, batch: bool) -> None:
        """Takes one request and its tokens, or raises RATE_LIMITED / REQUEST_EXCEEDS_LIMIT."""
        now = time.monotonic()
        share = BATCH_SHARE if batch else 1.0
        burst_s = _number(policy.get("tenant:burst_s")) or 60.0
        base = f"{key.tenant_id}:"
        checks = (
            (f"{base}key:{key.key_id}:req", f"key:{key.key_id}:rpm", 1, "key", "requests"),
            (f"{base}key:{key.key_id}:tok", f"key:{key.key_id}:tpm", tokens, "key", "tokens"),
            (f"{base}tenant:req", "tenant:rpm", 1, "tenant", "requests"),
            (f"{base}tenant:tok", "tenant:tpm", tokens, "tenant", "tokens"),
        )
        taken: list[tuple[str, float]] = []
        for name, field_name, quantity, scope, what in checks:
            per_minute = int(_number(policy.get(field_name)))
            if per_minute <= 0:
                continue
            limit = f"{what}_per_minute"
            if quantity > per_minute:
                raise RequestExceedsLimit(scope, limit, per_minute)
            interval = 60.0 / per_minute
            tat = max(self._tat.get(name, now), now)
            new_tat = tat + interval * quantity
            allowed = new_tat - max(burst_s * share, interval * quantity)
            if allowed > now:
                raise RateLimited(
                    f"{limit} limit of the {scope} reached",
                    retry_after_s=allowed - now,
                    metadata={"scope": scope, "limit": limit, "limit_value": str(per_minute)},
                )
            taken.append((name, new_tat))
        if len(self._tat) > self._max_entries:
            self._tat = {n: t for n, t in self._tat.items() if t > now}
        self._tat.update(taken)


def budgets_that_apply(policy: dict[str, str], key: KeyRecord) -> list[str]:
    """The budgets (holder:period) of a policy that bind a key's requests."""
    holders = ["tenant", f"key:{key.key_id}"] + ([f"team:{key.team_id}"] if key.team_id else [])
    return [
        f"{holder}:{period}"
        for holder in holders
        for period in ("day", "month", "total")
        if _number(policy.get(f"{holder}:budget:{period}")) > 0
    ]


def _number(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


class AdmissionControl:
    """Admits requests and settles what they used."""

    def __init__(
        self,
        keys: KeyStore,
        client: redis.Redis,
        catalog: Catalog,
        guardrails: Guardrails,
        reservation_ttl_s: int,
        settlement_ttl_s: int,
        outage_grace_s: float = 900.0,
    ) -> None:
        self._keys = keys
        self._redis = client
        self._catalog = catalog
        self._guardrails = guardrails
        self._reservation_ttl_s = reservation_ttl_s
        self._settlement_ttl_s = settlement_ttl_s
        self._admit = client.register_script(_script("common.lua", "admit.lua"))
        self._settle = client.register_script(_script("common.lua", "settle.lua"))
        self._expire = client.register_script(_script("common.lua", "expire.lua"))
        self._breaker = client.register_script(_script("breaker.lua"))
        self._release_script = client.register_script(_script("common.lua", "release.lua"))
        self._scripts = (self._admit, self._settle, self._breaker)
        """The scripts queued in pipelines (loaded again together when Redis lost them)."""
        # Degraded mode (see the module docstring): what was last read from Redis.
        self._outage = RedisOutage("control")
        self._outage_grace_s = outage_grace_s
        self._policies: dict[str, tuple[dict[str, str], float]] = {}
        self._local = LocalLimiter()
        self._deferred: deque[control_pb2.SettleRequest] = deque()
        self._fallbacks: tuple[object, Counter] | None = None
        self._background = Background()

    async def drain(self) -> None:
        """Waits for the settlements of admissions cut by their clients (see `admit_call`)."""
        await self._background.drain()

    # --- admission -------------------------------------------------------------------

    async def admit_call(self, request: control_pb2.AdmitRequest) -> Admission:
        """`admit` for a call its client may cut (a deadline, a cancel) while Redis decides.

        A cut admission runs to its end anyway and is then settled at once as cancelled,
        probes released: its client never learns of it, and left alone its reservation would
        hold the tenant's concurrency and budget, then expire into a worst-case charge."""
        admitting = asyncio.ensure_future(self.admit(request))
        try:
            return await asyncio.shield(admitting)
        except asyncio.CancelledError:
            self._background.run(self._settle_unseen(request.request_id, admitting))
            raise

    async def _settle_unseen(self, request_id: str, admitting: asyncio.Future[Admission]) -> None:
        try:
            admission = await admitting
        except StrataError:
            return  # refused: nothing is held
        if admission.number == 0:
            return  # admitted by this process while Redis did not answer: nothing is held
        probes = [self._catalog.models[name] for name, probe in admission.plan if probe]
        key = admission.key
        try:
            if admission.replayed:
                # The admission of another call of the request id, which settles it; the
                # breaker probes this call took are its own.
                await self._release_probes(probes)
                return
            cut = _Settling(
                request_id,
                key.tenant_id,
                key.key_id,
                key.team_id,
                _OUTCOMES[control_pb2.OUTCOME_CANCELLED],
                model="",
                input_tokens=0,
                output_tokens=0,
                cost=0,
                cache_hit=False,
                admission=admission.number,
                before=(lambda pipe: self._queue_probe_releases(pipe, probes)) if probes else None,
                cut=True,
            )
            await self._apply_settlements([cut])
        except StrataError as err:
            # Not kept for later as other settlements are: by then another call of the
            # request id may hold the admission.
            log.warning(
                "admission of %s cut by its client not settled (%s): it will expire",
                request_id,
                err.reason,
            )

    async def authenticate(self, api_key: str, api_key_sha256: str = "") -> KeyRecord:
        """The key's record (by the key, or its hash); API_KEY_INVALID when unknown or revoked.

        While Redis does not answer: the record this process last read, if recent enough."""
        digest = api_key_sha256 if api_key_sha256 and not api_key else digest_of(api_key)
        if self._outage.active and self._keys.known(digest):
            return self._keys.last_known(digest, self._outage_grace_s)
        try:
            return await self._keys.authenticate_hash(digest)
        except DependencyUnavailable:
            self._outage.failed()
            return self._keys.last_known(digest, self._outage_grace_s)

    async def admit(self, request: control_pb2.AdmitRequest) -> Admission:
        """Authenticates, checks guardrails, plans, enforces limits and budgets, reserves."""
        key = await self.authenticate(request.api_key, request.api_key_sha256)
        _check_admit(request)
        candidates = self._candidates(request)
        profile = request.guardrail_profile or key.profile
        findings, redacted = await self._input_guardrails(request, key, profile)

        tokens = request.estimated_input_tokens + request.max_output_tokens
        priced = [
            (m, worst_cost(m, request.estimated_input_tokens, request.max_output_tokens))
            for m in candidates
        ]
        if request.HasField("max_cost_usd_micros"):
            affordable = [(m, c) for m, c in priced if c <= request.max_cost_usd_micros]
            if not affordable:
                raise CostCeilingExceeded(request.max_cost_usd_micros, min(c for _, c in priced))
            priced = affordable
        cost = max(c for _, c in priced)
        batch = request.priority == common_pb2.PRIORITY_BATCH

        if self._outage.active:
            return self._admit_locally(key, priced, tokens, batch, profile, findings, redacted)
        try:
            checks, admitted = await self._run_admission(request, key, priced, tokens, cost, batch)
        except DependencyUnavailable:
            self._outage.failed()
            return self._admit_locally(key, priced, tokens, batch, profile, findings, redacted)
        self._outage.answered()
        made = telemetry.instruments("control")
        for (model, _), check in zip(priced, checks, strict=True):
            # 0 closed, 1 open, 2 half open (this request probes); a model skipped for its
            # rate limit says nothing of its breaker.
            if int(check[0]) == 0 and _text(check[1]) != "breaker_open":
                continue
            state = {1: 0, 2: 2}.get(int(check[0]), 1)
            made.gauge(semconv.METRIC_BREAKER_STATE, state, **{semconv.MODEL: model.name})
        if admitted[0] == 0:
            probes = [m for (m, _), c in zip(priced, checks, strict=True) if c[0] == 2]
            await self._release_probes(probes)
            raise _refusal(admitted)
        plan = [
            (model.name, check[0] == 2)
            for (model, _), check in zip(priced, checks, strict=True)
            if check[0] in (1, 2)
        ]
        if not plan:
            await self._release(request.request_id, key)
            raise ModelsUnavailable(
                [(m.name, _text(c[1]), int(c[2])) for (m, _), c in zip(priced, checks, strict=True)]
            )
        if findings:
            await self._record_findings(key.tenant_id, request.request_id, "input", findings)
        return Admission(
            key=key,
            plan=plan,
            reserved_tokens=int(admitted[1]),
            reserved_cost=int(admitted[2]),
            profile=profile,
            number=int(admitted[4]),
            replayed=bool(admitted[3]),
            findings=findings,
            redacted=redacted,
        )

    def _admit_locally(
        self,
        key: KeyRecord,
        priced: list[tuple[ModelConfig, int]],
        tokens: int,
        batch: bool,
        profile: str,
        findings: list[control_pb2.GuardrailFinding],
        redacted: list[common_pb2.ChatMessage] | None,
    ) -> Admission:
        """Admission while Redis does not answer: budgets fail closed, limits per process."""
        known = self._policies.get(key.tenant_id)
        if known is None or time.monotonic() - known[1] > self._outage_grace_s:
            self._count_fallback("budget_unverifiable")
            raise BudgetUnverifiable("unknown")
        if budgets := budgets_that_apply(known[0], key):
            self._count_fallback("budget_unverifiable")
            raise BudgetUnverifiable(",".join(budgets))
        try:
            self._local.admit(key, known[0], tokens, batch)
        except StrataError:
            self._count_fallback("rate_limited")
            raise
        self._count_fallback("admitted")
        return Admission(
            key=key,
            plan=[(model.name, False) for model, _ in priced],
            reserved_tokens=0,
            reserved_cost=0,
            profile=profile,
            number=0,
            findings=findings,
            redacted=redacted,
        )

    def _count_fallback(self, outcome: str) -> None:
        made = telemetry.of("control")
        if self._fallbacks is None or self._fallbacks[0] is not made:
            counter = made.meter_provider.get_meter("strata.control").create_counter(
                METRIC_LOCAL_FALLBACKS,
                unit="{request}",
                description="Admissions decided without Redis (per-process limits; budgets "
                "refused)",
            )
            self._fallbacks = (made, counter)
        self._fallbacks[1].add(1, {semconv.OUTCOME: outcome})

    def _candidates(self, request: control_pb2.AdmitRequest) -> list[ModelConfig]:
        names = list(request.candidates) or [request.model]
        for name in names:
            if self._catalog.get(name) is None:
                raise ModelNotFound(name)
        if request.candidates:
            return [self._catalog.models[n] for n in dict.fromkeys(names)]
        return self._catalog.candidates(request.model)

    async def _input_guardrails(
        self, request: control_pb2.AdmitRequest, key: KeyRecord, profile: str
    ) -> tuple[list[control_pb2.GuardrailFinding], list[common_pb2.ChatMessage] | None]:
        try:
            self._guardrails.profile(profile)
        except KeyError:
            raise RequestInvalid.field(
                "guardrail_profile", f"unknown profile {profile!r}"
            ) from None
        texts = [m.content for m in request.messages]
        verdict = await self._guardrails.acheck_input(
            texts, profile, request.estimated_input_tokens
        )
        findings = finding_protos(verdict, list(range(len(texts))))
        if verdict.blocked:
            await self._record_findings(key.tenant_id, request.request_id, "input", findings)
            blocking = verdict.blocking
            assert blocking is not None
            raise GuardrailBlocked(blocking.rule, "input")
        redacted = None
        if verdict.redacted is not None:
            redacted = []
            for message, text in zip(request.messages, verdict.redacted, strict=True):
                copy = common_pb2.ChatMessage()
                copy.CopyFrom(message)
                copy.content = text
                redacted.append(copy)
        return findings, redacted

    async def _run_admission(
        self,
        request: control_pb2.AdmitRequest,
        key: KeyRecord,
        priced: list[tuple[ModelConfig, int]],
        tokens: int,
        cost: int,
        batch: bool,
    ) -> tuple[list[Any], list[Any]]:
        names = TenantKeys(key.tenant_id)
        day, month = periods()
        known = self._policies.get(key.tenant_id)
        # The policy rides along (no extra round trip) now and then, for degraded mode.
        read_policy = known is None or time.monotonic() - known[1] > POLICY_REFRESH_S
        for _ in range(3):

            def build(pipe: Any, day: int = day, month: int = month) -> None:
                for model, _ in priced:
                    queue_script(
                        pipe,
                        self._breaker,
                        model_keys(model.name),
                        ["check", int(batch), BATCH_SHARE, tokens, 0, *_breaker_args(model)],
                    )
                if read_policy:
                    pipe.hgetall(names.policy)
                queue_script(
                    pipe,
                    self._admit,
                    [
                        names.policy,
                        names.pending,
                        names.reservations,
                        names.reserved,
                        names.rate("key", key.key_id, "req"),
                        names.rate("key", key.key_id, "tok"),
                        names.rate("tenant", "", "req"),
                        names.rate("tenant", "", "tok"),
                        *names.usage_keys(key.team_id, key.key_id, day, month),
                        names.settled(request.request_id),
                    ],
                    [
                        request.request_id,
                        key.key_id,
                        key.team_id,
                        day,
                        month,
                        tokens,
                        cost,
                        self._reservation_ttl_s,
                        int(batch),
                        BATCH_SHARE,
                        priced[0][0].name,
                    ],
                )

            results = await run_pipeline(self._redis, build, self._scripts)
            if read_policy:
                policy = {_text(k): _text(v) for k, v in results[len(priced)].items()}
                if len(self._policies) > 100_000:
                    self._policies.clear()
                self._policies[key.tenant_id] = (policy, time.monotonic())
            admitted = results[-1]
            if admitted[0] != -1:
                return results[: len(priced)], admitted
            day, month = int(admitted[1]), int(admitted[2])
        raise StrataError("the UTC period kept changing during admission")

    async def _release(self, request_id: str, key: KeyRecord) -> None:
        """Undoes a reservation that no model can use; the request may be retried as is."""
        names = TenantKeys(key.tenant_id)
        with redis_errors():
            await self._release_script(
                keys=[
                    names.pending,
                    names.reservations,
                    names.reserved,
                    names.rate("key", key.key_id, "tok"),
                    names.rate("tenant", "", "tok"),
                    names.rate("key", key.key_id, "req"),
                    names.rate("tenant", "", "req"),
                    names.policy,
                ],
                args=[request_id],
            )

    async def _release_probes(self, models: Sequence[ModelConfig]) -> None:
        """Lets another request probe the half-open breakers this refused request held."""
        if models:
            await run_pipeline(
                self._redis, lambda pipe: self._queue_probe_releases(pipe, models), self._scripts
            )

    def _queue_probe_releases(self, pipe: Any, models: Sequence[ModelConfig]) -> None:
        for model in models:
            queue_script(
                pipe,
                self._breaker,
                model_keys(model.name),
                ["release", 0, 1, 0, 0, *_breaker_args(model)],
            )

    # --- settlement ------------------------------------------------------------------

    async def settle(self, request: control_pb2.SettleRequest) -> bool:
        """Records what a request used, once; True when this call recorded it.

        While Redis does not answer the settlement is kept and written later (False)."""
        _check_settle(request)
        return await self._settle_checked(request)

    async def settle_batch(self, entries: Sequence[control_pb2.SettleBatchEntry]) -> list[bool]:
        """Settles each entry as `settle` would, all in one Redis round trip, each under a
        span of its own request's trace (linked to the batch's); the batch is checked whole
        first."""
        if not 1 <= len(entries) <= MAX_SETTLE_BATCH:
            raise RequestInvalid.field("entries", f"1 to {MAX_SETTLE_BATCH} entries")
        violations: list[FieldViolation] = []
        for i, entry in enumerate(entries):
            violations += _settle_violations(entry.settlement, f"entries[{i}].settlement.")
            if len(entry.traceparent) > MAX_TRACEPARENT:
                field, limit = f"entries[{i}].traceparent", f"at most {MAX_TRACEPARENT} characters"
                violations.append(FieldViolation(field, limit))
        if violations:
            raise RequestInvalid(violations)
        batch = trace.get_current_span().get_span_context()
        links = [trace.Link(batch)] if batch.is_valid else None
        spans = [_entry_span(entry, links) for entry in entries]
        try:
            return await self._settle_all([entry.settlement for entry in entries])
        except BaseException as err:
            for span in spans:
                telemetry.record_error(span, err)
            raise
        finally:
            for span in spans:
                span.end()

    async def _settle_checked(self, request: control_pb2.SettleRequest) -> bool:
        return (await self._settle_all([request]))[0]

    async def _settle_all(self, requests: Sequence[control_pb2.SettleRequest]) -> list[bool]:
        """Settles checked requests in one round trip; while Redis does not answer they are
        kept and written later (False)."""
        if self._outage.active:
            return [self._defer(request) for request in requests]
        try:
            applied = await self._apply_settlements([self._settling(r) for r in requests])
        except DependencyUnavailable:
            self._outage.failed()
            return [self._defer(request) for request in requests]
        self._outage.answered()
        return applied

    def _defer(self, request: control_pb2.SettleRequest) -> bool:
        if len(self._deferred) >= MAX_DEFERRED:
            raise DependencyUnavailable("redis")
        kept = control_pb2.SettleRequest()
        kept.CopyFrom(request)
        # Breaker records would be stale by the time Redis answers.
        del kept.attempts[:]
        self._deferred.append(kept)
        log.warning(
            "settlement of %s kept until Redis answers (%d waiting)",
            request.request_id,
            len(self._deferred),
        )
        return False

    async def write_deferred(self) -> int:
        """Writes the settlements kept while Redis did not answer, DEFERRED_BATCH to a Redis
        round trip; returns how many."""
        written = 0
        while self._deferred:
            batch = list(itertools.islice(self._deferred, DEFERRED_BATCH))
            try:
                await self._write_kept(batch)
            except DependencyUnavailable:
                self._outage.failed()
                break
            for _ in batch:
                self._deferred.popleft()
            written += len(batch)
        if written:
            self._outage.answered()
            log.warning("wrote %d settlements kept while Redis did not answer", written)
        return written

    async def _write_kept(self, batch: list[control_pb2.SettleRequest]) -> None:
        """A batch Redis refuses (a script's error, say a key of the wrong type, fails it
        whole) goes again one by one, so that only the settlement at fault is dropped.
        Redis ran the batch's other commands: their settlements are not applied twice (once
        per request id), but their output findings, if any, are recorded twice, under the
        same request id. (A Redis that cannot serve for now, out of memory say, is an
        outage: every settlement is kept for later.)"""
        try:
            await self._apply_settlements([self._settling(r) for r in batch])
        except DependencyUnavailable:
            raise
        except (StrataError, ResponseError) as err:
            if len(batch) > 1:
                for request in batch:
                    await self._write_kept([request])
                return
            reason = err.reason if isinstance(err, StrataError) else str(err)[:200]
            log.error("kept settlement of %s dropped (%s)", batch[0].request_id, reason)

    def _settling(self, request: control_pb2.SettleRequest) -> _Settling:
        def records(pipe: Any) -> None:
            for attempt in request.attempts:
                model = self._catalog.get(attempt.model)
                failed = not attempt.success and attempt.error_reason in BREAKER_FAILURES
                if model is None or not (attempt.success or failed):
                    continue
                used = attempt.usage.input_tokens + attempt.usage.output_tokens
                queue_script(
                    pipe,
                    self._breaker,
                    model_keys(model.name),
                    ["record", 0, 1, used, int(attempt.success), *_breaker_args(model)],
                )
            if request.guardrail_findings:
                _add_findings(
                    pipe,
                    request.tenant_id,
                    request.request_id,
                    "output",
                    request.guardrail_findings,
                )

        return _Settling(
            request.request_id,
            request.tenant_id,
            request.key_id,
            request.team_id,
            _OUTCOMES[request.outcome],
            request.model,
            request.usage.input_tokens,
            request.usage.output_tokens,
            request.cost.total_usd_micros,
            request.cache_status == common_pb2.CACHE_STATUS_HIT,
            request.admission,
            records if request.attempts or request.guardrail_findings else None,
        )

    async def _apply_settlements(self, settlings: Sequence[_Settling]) -> list[bool]:
        """Applies the settlement script for each, all in one round trip (a settlement the
        script sends back for other holders or another period goes again, in the next);
        True for each this call recorded."""
        day, month = periods()
        for settling in settlings:
            settling.day, settling.month = day, month
        applied = [False] * len(settlings)
        todo = list(range(len(settlings)))
        for _ in range(3):
            replies_at: list[int] = []

            def build(pipe: Any, todo: list[int] = todo, at: list[int] = replies_at) -> None:
                at.clear()  # built again when Redis lost the scripts
                for i in todo:
                    self._queue_settlement(pipe, settlings[i])
                    at.append(len(pipe) - 1)

            replies = await run_pipeline(self._redis, build, self._scripts)
            again: list[int] = []
            for i, at in zip(todo, replies_at, strict=True):
                settling, result = settlings[i], replies[at]
                settling.before = None  # breaker records and findings went the first time
                if result[0] == -2:
                    # The reservation belongs to another key or team than the call said:
                    # charge the holders the money was reserved for.
                    settling.key_id, settling.team_id = _text(result[1]), _text(result[2])
                    again.append(i)
                elif result[0] == -1:
                    settling.day, settling.month = int(result[1]), int(result[2])
                    again.append(i)
                else:
                    applied[i] = bool(result[0])
            if not again:
                return applied
            todo = again
        raise StrataError("the settlement kept changing under the call")

    def _queue_settlement(self, pipe: Any, s: _Settling) -> None:
        if s.before is not None:
            s.before(pipe)
        names = TenantKeys(s.tenant_id)
        queue_script(
            pipe,
            self._settle,
            [
                names.settled(s.request_id),
                names.pending,
                names.reservations,
                names.reserved,
                names.expired,
                names.policy,
                names.rate("key", s.key_id, "tok"),
                names.rate("tenant", "", "tok"),
                *names.usage_keys(s.team_id, s.key_id, s.day, s.month),
            ],
            [
                s.request_id,
                s.key_id,
                s.team_id,
                s.day,
                s.month,
                s.input_tokens,
                s.output_tokens,
                s.cost,
                s.outcome,
                int(s.cache_hit),
                s.model,
                self._settlement_ttl_s,
                s.admission,
                int(s.cut),
            ],
        )

    # --- expiry ----------------------------------------------------------------------

    async def sweep(self, limit: int = 200) -> int:
        """Charges every reservation past its expiry (of every tenant); returns how many."""
        charged = 0
        now_us = int(time.time() * 1_000_000)
        with redis_errors():
            tenants = [t.decode() async for t in self._redis.sscan_iter(TENANTS_SET)]
        for tenant_id in tenants:
            names = TenantKeys(tenant_id)
            with redis_errors():
                due: Any = await self._redis.zrangebyscore(names.pending, 0, now_us, 0, limit)
            for raw_id in due:
                request_id = raw_id.decode()
                with redis_errors():
                    record: Any = await self._redis.hget(names.reservations, request_id)
                key_id, team_id = (record.decode().split("|")[:2]) if record else ("", "")
                day, month = periods()
                with redis_errors():
                    result = await self._expire(
                        keys=[
                            names.pending,
                            names.reservations,
                            names.reserved,
                            names.expired,
                            *names.usage_keys(team_id, key_id, day, month),
                            names.settled(request_id),
                        ],
                        args=[request_id, day, month],
                    )
                charged += int(result[0] == 1)
        return charged

    async def run_sweeper(self, interval_s: float) -> None:
        """Sweeps forever (every replica may: the expiry script is atomic and idempotent)."""
        while True:
            try:
                await self.write_deferred()
                if charged := await self.sweep():
                    log.warning("charged %d expired reservations", charged)
            except StrataError as err:
                log.warning("reservation sweep failed (%s)", err.reason)
            except ResponseError as err:  # (a script's error must not end the sweeps)
                log.error("reservation sweep failed (%s)", str(err)[:200])
            await asyncio.sleep(interval_s)

    # --- output guardrails -----------------------------------------------------------

    async def check_output(
        self, request: control_pb2.CheckOutputRequest
    ) -> tuple[Verdict, list[control_pb2.GuardrailFinding]]:
        """The output guardrails' verdict on a text, recorded with the request."""
        violations = [v for v in [check_request_id(request.request_id)] if v]
        if not valid_id(request.tenant_id):
            violations.append(FieldViolation("tenant_id", "is required ([a-z0-9][a-z0-9_-]*)"))
        if violations:
            raise RequestInvalid(violations)
        try:
            verdict = await self._guardrails.acheck_output(
                request.text, request.guardrail_profile or None
            )
        except KeyError:
            raise RequestInvalid.field("guardrail_profile", "unknown profile") from None
        findings = finding_protos(verdict, None)
        if findings:
            await self._record_findings(request.tenant_id, request.request_id, "output", findings)
        return verdict, findings

    async def _record_findings(
        self,
        tenant_id: str,
        request_id: str,
        phase: str,
        findings: Sequence[control_pb2.GuardrailFinding],
    ) -> None:
        # Findings are a record, not a decision: losing them to an outage is logged, and the
        # request is not failed for it.
        if self._outage.active:
            log.warning("guardrail findings of %s not recorded (Redis unavailable)", request_id)
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                _add_findings(pipe, tenant_id, request_id, phase, findings)
                with redis_errors():
                    await pipe.execute()
        except DependencyUnavailable:
            self._outage.failed()
            log.warning("guardrail findings of %s not recorded (Redis unavailable)", request_id)

    async def ping(self) -> None:
        """Raises unless Redis answers."""
        await self._redis.ping()


def _add_findings(
    pipe: Any,
    tenant_id: str,
    request_id: str,
    phase: str,
    findings: Sequence[control_pb2.GuardrailFinding],
) -> None:
    stream = TenantKeys(tenant_id).guardrails
    for finding in findings:
        pipe.xadd(
            stream,
            {
                "request_id": request_id,
                "phase": phase,
                "rule": finding.rule,
                "action": control_pb2.GuardrailAction.Name(finding.action),
                "message_index": finding.message_index,
            },
            maxlen=GUARDRAIL_STREAM_LENGTH,
            approximate=True,
        )
    pipe.expire(stream, 30 * 86400)


def _entry_span(entry: control_pb2.SettleBatchEntry, links: list[trace.Link] | None) -> Span:
    """A batch entry's span, under its own request's trace (under the batch's without it)."""
    parent = (
        telemetry.extract_metadata((("traceparent", entry.traceparent),))
        if entry.traceparent
        else None
    )
    return telemetry.tracer("control").start_span(
        semconv.SPAN_SETTLE_ENTRY,
        context=parent,
        links=links,
        attributes={semconv.REQUEST_ID: entry.settlement.request_id},
    )


def _breaker_args(model: ModelConfig) -> list[float]:
    b = model.breaker
    return [
        b.consecutive_failures,
        b.failure_ratio,
        b.window_s,
        b.min_requests,
        b.cooldown_s,
        b.max_cooldown_s,
        b.probe_timeout_s,
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _refusal(result: Sequence[Any]) -> StrataError:
    reason, detail = _text(result[1]), _text(result[2])
    retry_us, limit, remaining = int(result[3]), int(result[4]), int(result[5])
    scope, _, name = detail.partition(":")
    if reason == "REQUEST_EXCEEDS_LIMIT":
        return RequestExceedsLimit(scope, name, limit)
    if reason == "RATE_LIMITED":
        return RateLimited(
            f"{name} limit of the {scope} reached",
            retry_after_s=retry_us / 1e6,
            metadata={"scope": scope, "limit": name, "limit_value": str(limit)},
        )
    if reason == "CONCURRENCY_LIMITED":
        return ConcurrencyLimited(limit)
    holder, _, period = detail.rpartition(":")
    return BudgetExceeded(holder, period, limit, remaining)


def _check_admit(request: control_pb2.AdmitRequest) -> None:
    violations = [v for v in [check_request_id(request.request_id)] if v]
    if violation := check_name(request.model, "model"):
        violations.append(violation)
    for name in ("estimated_input_tokens", "max_output_tokens"):
        if not 1 <= getattr(request, name) <= MAX_TOKENS:
            violations.append(FieldViolation(name, f"must be 1 to {MAX_TOKENS}"))
    if len(request.candidates) > MAX_CANDIDATES:
        violations.append(FieldViolation("candidates", f"at most {MAX_CANDIDATES}"))
    else:
        for i, candidate in enumerate(request.candidates):
            if violation := check_name(candidate, f"candidates[{i}]"):
                violations.append(violation)
    if violation := check_name(request.guardrail_profile, "guardrail_profile", required=False):
        violations.append(violation)
    if request.priority not in common_pb2.Priority.values():
        violations.append(FieldViolation("priority", "must be a known priority"))
    if request.HasField("max_cost_usd_micros") and request.max_cost_usd_micros <= 0:
        violations.append(FieldViolation("max_cost_usd_micros", "must be greater than 0"))
    if violations:
        raise RequestInvalid(violations)


def _check_settle(request: control_pb2.SettleRequest) -> None:
    if violations := _settle_violations(request):
        raise RequestInvalid(violations)


def _settle_violations(
    request: control_pb2.SettleRequest, prefix: str = ""
) -> list[FieldViolation]:
    """What is wrong with a settlement; `prefix` names it inside a batch."""
    violations = [v for v in [check_request_id(request.request_id)] if v]
    for name in ("tenant_id", "key_id"):
        if not valid_id(getattr(request, name)):
            violations.append(FieldViolation(name, "is required ([a-z0-9][a-z0-9_-]*)"))
    if request.team_id and not valid_id(request.team_id):
        violations.append(FieldViolation("team_id", "must match [a-z0-9][a-z0-9_-]*"))
    if request.outcome not in _OUTCOMES:
        violations.append(FieldViolation("outcome", "must be a known outcome"))
    if request.model and (violation := check_name(request.model, "model")):
        violations.append(violation)
    usage, cost = request.usage, request.cost
    amounts = [usage.input_tokens, usage.output_tokens, cost.input_usd_micros]
    amounts += [cost.output_usd_micros, cost.total_usd_micros]
    if not _countable(*amounts):
        violations.append(FieldViolation("usage", f"tokens and cost must be 0 to {MAX_COUNT}"))
    if request.cache_status not in common_pb2.CacheStatus.values():
        violations.append(FieldViolation("cache_status", "must be a known cache status"))
    if request.admission < 0:
        violations.append(FieldViolation("admission", "must not be negative"))
    if len(request.attempts) > MAX_ATTEMPTS:
        violations.append(FieldViolation("attempts", f"at most {MAX_ATTEMPTS}"))
    for i, attempt in enumerate(request.attempts[:MAX_ATTEMPTS]):
        if violation := check_name(attempt.model, f"attempts[{i}].model"):
            violations.append(violation)
        if not _countable(attempt.usage.input_tokens, attempt.usage.output_tokens):
            violations.append(FieldViolation(f"attempts[{i}].usage", f"must be 0 to {MAX_COUNT}"))
    for i, finding in enumerate(request.guardrail_findings):
        if finding.action not in control_pb2.GuardrailAction.values() or not finding.rule:
            violations.append(
                FieldViolation(f"guardrail_findings[{i}]", "needs a rule and a known action")
            )
    return [FieldViolation(prefix + v.field, v.description) for v in violations]


def _countable(*values: int) -> bool:
    """Whether every value is a count Redis's Lua numbers (doubles) hold exactly."""
    return all(0 <= value <= MAX_COUNT for value in values)
