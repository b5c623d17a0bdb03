"""Measuring the semantic cache on labelled pairs, through a real CacheService over gRPC.

For each pair, `a` is stored and `b` looked up in a scope of their own (so pairs never meet),
with the similarity threshold at its floor: the similarity of a hit then tells at which
thresholds it would have been served, so one pass measures every threshold. A pair that the
guards refuse (or that finds nothing) is a miss at every threshold.

A pair with `same_answer: true` served is a good hit; a pair with `same_answer: false`
served is a wrong answer. In strict mode, pairs tagged `ambiguous` count as traps.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strata.cache.v1 import cache_pb2, cache_pb2_grpc
from strata.common.v1 import common_pb2

FLOOR = 1e-6
"""A threshold of 0 means "the server's default", so the floor is the smallest above it."""
ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one labelled pair went."""

    id: str
    category: str
    should_hit: bool
    similarity: float | None
    """None: never served (guard refusal or nothing found); 1.0 for an exact hit."""
    rejected_by: str

    def served_at(self, threshold: float) -> bool:
        return self.similarity is not None and self.similarity >= threshold


def load_pairs(path: Path, *, strict: bool = True) -> list[dict[str, Any]]:
    """Labelled pairs (question pairs or conversation pairs) from a JSON-lines file."""
    pairs = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        pair = json.loads(line)
        if strict and pair.get("ambiguous"):
            pair["same_answer"] = False
        pair.setdefault("category", pair.get("subtype", "conversation"))
        pairs.append(pair)
    return pairs


def _messages(value: str | list[dict[str, str]]) -> list[common_pb2.ChatMessage]:
    if isinstance(value, str):
        return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=value)]
    return [common_pb2.ChatMessage(role=ROLES[m["role"]], content=m["content"]) for m in value]


def run_pairs(
    stub: cache_pb2_grpc.CacheServiceStub, pairs: Iterable[dict[str, Any]], model: str = "eval"
) -> list[Outcome]:
    """Stores each pair's `a` and looks up its `b`; returns the outcomes."""
    run = uuid.uuid4().hex[:8]
    outcomes = []
    for pair in pairs:
        scope = cache_pb2.CacheScope(
            tenant_id=f"eval-{run}-{pair['id']}".lower()[:60],
            model=model,
            params=common_pb2.GenerationParams(temperature=0),
            semantic=cache_pb2.SemanticPolicy(min_similarity=FLOOR),
        )
        stub.Store(
            cache_pb2.StoreRequest(
                scope=scope,
                messages=_messages(pair["a"]),
                answer=cache_pb2.CachedAnswer(
                    text=f"answer to {pair['id']}",
                    finish_reason=common_pb2.FINISH_REASON_STOP,
                    usage=common_pb2.Usage(input_tokens=1, output_tokens=1),
                ),
            ),
            timeout=30,
        )
        found = stub.Lookup(
            cache_pb2.LookupRequest(scope=scope, messages=_messages(pair["b"])), timeout=30
        )
        similarity: float | None = None
        if found.match == common_pb2.CACHE_MATCH_EXACT:
            similarity = 1.0
        elif found.match == common_pb2.CACHE_MATCH_SEMANTIC:
            similarity = found.similarity
        outcomes.append(
            Outcome(
                id=pair["id"],
                category=pair["category"],
                should_hit=bool(pair["same_answer"]),
                similarity=similarity,
                rejected_by=found.rejected_by,
            )
        )
    return outcomes


@dataclass(frozen=True, slots=True)
class Rates:
    """Hit and wrong-answer rates at one threshold."""

    threshold: float
    hit_rate: float
    wrong_rate: float
    hits: int
    should_hit: int
    wrong: int
    traps: int


def rates(outcomes: Sequence[Outcome], threshold: float) -> Rates:
    """Share of should-hit pairs served, and of traps served, at a threshold."""
    good = [o for o in outcomes if o.should_hit]
    traps = [o for o in outcomes if not o.should_hit]
    hits = sum(o.served_at(threshold) for o in good)
    wrong = sum(o.served_at(threshold) for o in traps)
    return Rates(
        threshold=threshold,
        hit_rate=hits / len(good) if good else 0.0,
        wrong_rate=wrong / len(traps) if traps else 0.0,
        hits=hits,
        should_hit=len(good),
        wrong=wrong,
        traps=len(traps),
    )


def candidate_thresholds(outcomes: Sequence[Outcome]) -> list[float]:
    """Every threshold at which some outcome changes (the served similarities), and 1.0."""
    values = {o.similarity for o in outcomes if o.similarity is not None}
    return sorted(values | {1.0})


def best_threshold(outcomes: Sequence[Outcome], max_wrong_rate: float) -> Rates:
    """The lowest threshold (most hits) whose wrong-answer rate is at most `max_wrong_rate`."""
    for threshold in candidate_thresholds(outcomes):
        measured = rates(outcomes, threshold)
        if measured.wrong_rate <= max_wrong_rate:
            return measured
    return rates(outcomes, 1.0 + 1e-9)


def by_category(outcomes: Sequence[Outcome]) -> dict[str, list[Outcome]]:
    """Outcomes grouped by category."""
    groups: defaultdict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        groups[outcome.category].append(outcome)
    return dict(groups)


def guard_refusals(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """How often each guard refused the pair's candidate."""
    counts: defaultdict[str, int] = defaultdict(int)
    for outcome in outcomes:
        if outcome.rejected_by:
            counts[outcome.rejected_by] += 1
    return dict(sorted(counts.items()))


def report(name: str, outcomes: Sequence[Outcome], threshold: float) -> str:
    """A plain-text report: overall and per category, at `threshold` and at 2% / 5% wrong."""
    lines = [f"== {name}: {len(outcomes)} pairs"]
    for label, rate in (
        (f"at the threshold {threshold:.3f}", rates(outcomes, threshold)),
        ("best at <= 2% wrong", best_threshold(outcomes, 0.02)),
        ("best at <= 5% wrong", best_threshold(outcomes, 0.05)),
    ):
        lines.append(
            f"  {label:<24} threshold {rate.threshold:.3f}: hit rate {rate.hit_rate:6.1%}"
            f" ({rate.hits}/{rate.should_hit}), wrong-answer rate {rate.wrong_rate:6.1%}"
            f" ({rate.wrong}/{rate.traps})"
        )
    lines.append(f"  per category at {threshold:.3f}:")
    for category, group in sorted(by_category(outcomes).items()):
        rate = rates(group, threshold)
        kind = "hit rate" if group[0].should_hit else "wrong-answer rate"
        value = rate.hit_rate if group[0].should_hit else rate.wrong_rate
        lines.append(f"    {category:<28} {kind:<18} {value:6.1%}  ({len(group)} pairs)")
    if refusals := guard_refusals(outcomes):
        lines.append("  refused by guard: " + ", ".join(f"{g} {n}" for g, n in refusals.items()))
    return "\n".join(lines)
