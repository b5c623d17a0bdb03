"""Idempotency keys and single flight, shared by every orchestrator replica through Redis.

- A client's `request_id` is an idempotency key for 24 h: the first call claims it and runs;
  once it has completed, a repeat replays the stored answer without calling a model; a
  repeat that arrives while the first still runs waits for it; the same key with another
  body is FAILED_PRECONDITION/IDEMPOTENCY_KEY_REUSED. A call that fails releases its key,
  so the client's retry runs again. A running claim is a lease the owner renews: when its
  replica dies, a waiting repeat takes the request over within LEASE_S.
- Single flight: identical cacheable requests running at once (same exact-cache key) share
  one model call: the first takes a lock (a lease it renews), the others wait for it to end
  and then find the answer in the cache. When the first fails or its replica dies, the next
  one in takes over.

One slow Redis answer is not an outage: a call waiting on another lets up to
WAITING_FAILURES Redis calls in a row fail (each bounded by the Redis timeout) before it
gives up, and a claim whose reply was lost (the command ran, its answer timed out) is found
to be this call's own. Idempotency then fails closed (UNAVAILABLE/REDIS_UNAVAILABLE: the
request cannot be run once only); single flight only saves model calls, so a call that cannot
reach Redis for it just makes its own model call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from google.protobuf import json_format
from redis.commands.core import AsyncScript

from services.common.calls import Deadline
from services.common.errors import DependencyUnavailable, IdempotencyKeyReused, StrataError
from services.common.redis_state import redis_errors
from services.common.tasks import cancel_and_wait
from strata.orchestrator.v1 import orchestrator_pb2

log = logging.getLogger(__name__)

KEY_TTL_S = 24 * 3600
LEASE_S = 10.0
"""A running claim not renewed for this long is free again (its owner died)."""
POLL_S = (0.01, 0.25)
WAITING_FAILURES = 3
"""Redis calls in a row a claim or a wait may lose (timed out, cut) before it gives up."""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


async def renew(script: AsyncScript, key: str, token: bytes, lease_ms: int) -> None:
    """Extends a lease held as `token` every quarter of it, until cancelled or lost."""
    while True:
        await asyncio.sleep(lease_ms / 4000)
        try:
            with redis_errors():
                if not await script(keys=[key], args=[token, lease_ms]):
                    return  # lost (taken over after a stall): the holder's work still counts
        except StrataError as err:
            log.warning("could not renew a lease (%s)", err.reason)


async def release(script: AsyncScript, key: str, token: bytes, what: str) -> None:
    """Deletes a lease held as `token` (not another's); one that cannot be deleted now
    expires (logged as `what`)."""
    try:
        with redis_errors():
            await script(keys=[key], args=[token])
    except StrataError as err:
        log.warning("could not end %s (%s); it expires", what, err.reason)


def body_hash(request: Any) -> str:
    """A stable hash of a generate request's content, without its request id."""
    fields = json_format.MessageToDict(request, preserving_proto_field_name=True)
    fields.pop("request_id", None)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    """Claims, completes and replays requests by (tenant, request id)."""

    def __init__(self, client: redis.Redis, lease_s: float = LEASE_S) -> None:
        self._redis = client
        self._lease_ms = int(lease_s * 1000)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    @staticmethod
    def _key(tenant_id: str, request_id: str) -> str:
        return f"strata:idem:{{t:{tenant_id}}}:{request_id}"

    async def claim(
        self, tenant_id: str, request_id: str, digest: str, deadline: Deadline
    ) -> orchestrator_pb2.GenerateResponse | bytes:
        """The first call's answer (waited for while it runs), or this call's lease when it
        owns the request: then `keep` it while running, and `complete` or `release` it."""
        key = self._key(tenant_id, request_id)
        lease = b"running:" + digest.encode() + b":" + uuid.uuid4().hex.encode()
        delay = POLL_S[0]
        failures = 0
        while True:
            try:
                with redis_errors():
                    claimed = await self._redis.set(key, lease, nx=True, px=self._lease_ms)
                    if claimed:
                        return lease
                    stored: Any = await self._redis.get(key)
            except DependencyUnavailable:
                failures += 1
                if failures >= WAITING_FAILURES:
                    raise
                await asyncio.sleep(min(delay, deadline.remaining()))
                continue
            failures = 0
            if stored is None:
                continue  # released or expired between the two calls: try to claim again
            if stored == lease:
                return lease  # this call's claim, whose reply an earlier try lost
            state, _, rest = stored.partition(b":")
            held_digest, _, body = rest.partition(b":")
            if held_digest.decode() != digest:
                raise IdempotencyKeyReused(
                    f"request id {request_id!r} was used for a different request",
                    metadata={"request_id": request_id},
                )
            if state == b"done":
                return orchestrator_pb2.GenerateResponse.FromString(body)
            await asyncio.sleep(min(delay, deadline.remaining()))
            delay = min(delay * 2, POLL_S[1])

    async def keep(self, tenant_id: str, request_id: str, lease: bytes) -> None:
        """Renews the lease until cancelled (run it beside the request)."""
        await renew(self._renew, self._key(tenant_id, request_id), lease, self._lease_ms)

    async def complete(
        self,
        tenant_id: str,
        request_id: str,
        digest: str,
        response: orchestrator_pb2.GenerateResponse,
    ) -> None:
        """Keeps the answer for repeats (tried twice: writing it again is harmless)."""
        value = b"done:" + digest.encode() + b":" + response.SerializeToString()
        for attempt in range(2):
            try:
                with redis_errors():
                    await self._redis.set(self._key(tenant_id, request_id), value, ex=KEY_TTL_S)
                return
            except DependencyUnavailable:
                if attempt:
                    raise

    async def release(self, tenant_id: str, request_id: str, lease: bytes) -> None:
        """Gives the key back after a failure, so the client's retry runs again."""
        await release(self._release, self._key(tenant_id, request_id), lease, "an idempotency key")


@dataclass(frozen=True, slots=True)
class FlightClaim:
    """A single-flight claim sent ahead of the call that may use it (beside its
    admission). Hand it to `SingleFlight.leader`, or give it back with
    `SingleFlight.withdraw`."""

    key: str
    """The lock's Redis key (its tenant and exact key)."""
    token: bytes
    leads: asyncio.Future[bool]
    """Whether the claim took the lock (True too when Redis did not answer)."""


class SingleFlight:
    """One model call for identical concurrent requests, across replicas."""

    def __init__(self, client: redis.Redis, lease_s: float = LEASE_S) -> None:
        self._redis = client
        self._lease_ms = int(lease_s * 1000)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._withdrawing: set[asyncio.Future[None]] = set()

    def claim(self, tenant_id: str, exact_key: str) -> FlightClaim:
        """Sends the claim for (tenant, exact key) now, without waiting for its answer."""
        key = f"strata:flight:{{t:{tenant_id}}}:{exact_key}"
        token = uuid.uuid4().hex.encode()
        leads = asyncio.ensure_future(self._take(key, token))
        return FlightClaim(key, token, leads)

    async def _take(self, key: str, token: bytes) -> bool:
        try:
            with redis_errors():
                return bool(await self._redis.set(key, token, nx=True, px=self._lease_ms))
        except DependencyUnavailable as err:
            # The command may have run: lead as though it had (the lease is renewed and
            # released only while it is this call's).
            log.warning("single flight without Redis (%s): this call makes its own", err.reason)
            return True

    def withdraw(self, claim: FlightClaim | None) -> asyncio.Future[None] | None:
        """Gives back, in the background, a claim that will not be used (its request was
        refused or cut, or asks for another key): identical requests waiting on it go on
        at once instead of when its lease lapses. None: nothing to give back."""
        if claim is None:
            return None
        task = asyncio.ensure_future(self._withdraw(claim))
        self._withdrawing.add(task)
        task.add_done_callback(self._withdrawing.discard)
        return task

    async def _withdraw(self, claim: FlightClaim) -> None:
        sent = claim.leads
        await asyncio.wait({sent})
        # Cut while it was sent, or failed, it may have run; the release deletes the key
        # only while it holds this claim's token.
        if sent.cancelled() or sent.exception() is not None or sent.result():
            await self._give_back(claim)

    async def _give_back(self, claim: FlightClaim) -> None:
        await release(self._release, claim.key, claim.token, "a single flight")

    @asynccontextmanager
    async def leader(
        self,
        tenant_id: str,
        exact_key: str,
        deadline: Deadline,
        claim: FlightClaim | None = None,
    ) -> AsyncIterator[bool]:
        """Yields True when this call leads (makes the model call), False when another call
        led and has now finished (look in the cache again). Waits at most the deadline.
        Without Redis, every call leads. `claim`, sent earlier for the same tenant and exact
        key, saves sending one now."""
        if claim is None:
            claim = self.claim(tenant_id, exact_key)
        try:
            leads = await claim.leads
        except BaseException:
            self.withdraw(claim)
            raise
        key = claim.key
        if leads:
            # A lease, renewed while the leader runs: when its replica dies, waiters go on
            # within the lease instead of waiting out the leader's deadline.
            keeper = asyncio.create_task(renew(self._renew, key, claim.token, self._lease_ms))
            try:
                yield True
            finally:
                await cancel_and_wait(keeper)
                await self._give_back(claim)
            return
        delay = POLL_S[0]
        failures = 0
        while True:
            try:
                with redis_errors():
                    held = await self._redis.exists(key)
            except DependencyUnavailable:
                failures += 1
                if failures >= WAITING_FAILURES:
                    break  # the cache may have the answer by now; else this call runs
            else:
                if not held:
                    break
                failures = 0
            await asyncio.sleep(min(delay, deadline.remaining()))
            delay = min(delay * 2, POLL_S[1])
        yield False
