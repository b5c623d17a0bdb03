"""The exact cache's entry ids and Redis keys (pure functions; no Redis)."""

from typing import Any

import pytest

from services.cache.scope import entry_id, redis_key
from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2

USER = common_pb2.ROLE_USER
SYSTEM = common_pb2.ROLE_SYSTEM
ASSISTANT = common_pb2.ROLE_ASSISTANT


def scope(model: str = "mock-small", tenant: str = "acme", **params) -> cache_pb2.CacheScope:
    return cache_pb2.CacheScope(
        tenant_id=tenant, model=model, params=common_pb2.GenerationParams(**params)
    )


def conversation(*turns: tuple[int, str]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=role, content=text) for role, text in turns]  # type: ignore[arg-type]


BASE_MESSAGES = [(SYSTEM, "be brief"), (USER, "hello"), (ASSISTANT, "hi"), (USER, "bye")]
BASE_PARAMS: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.9,
    "max_output_tokens": 64,
    "stop": ["\n"],
    "seed": 1,
}


def base_id() -> str:
    return entry_id(scope(**BASE_PARAMS), conversation(*BASE_MESSAGES))


def test_equal_inputs_give_the_same_id():
    first = base_id()
    # Built afresh, from equal but distinct objects.
    second = entry_id(scope(**dict(BASE_PARAMS)), conversation(*list(BASE_MESSAGES)))

    assert first == second
    assert len(first) == 64
    int(first, 16)


def test_tenant_is_not_part_of_the_entry_id():
    messages = conversation(*BASE_MESSAGES)

    assert entry_id(scope(tenant="a", **BASE_PARAMS), messages) == entry_id(
        scope(tenant="b", **BASE_PARAMS), messages
    )


def test_different_model_gives_a_different_id():
    assert entry_id(scope("mock-fast", **BASE_PARAMS), conversation(*BASE_MESSAGES)) != base_id()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.8),
        ("top_p", 1.0),
        ("max_output_tokens", 65),
        ("stop", ["\n", "END"]),
        ("stop", []),
        ("seed", 2),
    ],
)
def test_any_changed_parameter_gives_a_different_id(field, value):
    params = {**BASE_PARAMS, field: value}

    assert entry_id(scope(**params), conversation(*BASE_MESSAGES)) != base_id()


@pytest.mark.parametrize("field", ["temperature", "top_p", "max_output_tokens", "seed"])
def test_dropping_a_parameter_gives_a_different_id(field):
    params = {k: v for k, v in BASE_PARAMS.items() if k != field}

    assert entry_id(scope(**params), conversation(*BASE_MESSAGES)) != base_id()


@pytest.mark.parametrize(
    ("field", "zero"), [("temperature", 0.0), ("top_p", 0.0), ("max_output_tokens", 0), ("seed", 0)]
)
def test_unset_parameter_differs_from_zero(field, zero):
    messages = conversation(*BASE_MESSAGES)

    assert entry_id(scope(), messages) != entry_id(scope(**{field: zero}), messages)


def test_stop_sequence_order_matters():
    messages = conversation(*BASE_MESSAGES)

    assert entry_id(scope(stop=["a", "b"]), messages) != entry_id(scope(stop=["b", "a"]), messages)


def test_message_order_matters():
    swapped = [BASE_MESSAGES[0], BASE_MESSAGES[3], BASE_MESSAGES[2], BASE_MESSAGES[1]]

    assert entry_id(scope(**BASE_PARAMS), conversation(*swapped)) != base_id()


def test_role_matters():
    changed = [*BASE_MESSAGES[:3], (SYSTEM, "bye")]

    assert entry_id(scope(**BASE_PARAMS), conversation(*changed)) != base_id()


def test_content_matters():
    changed = [*BASE_MESSAGES[:3], (USER, "bye!")]

    assert entry_id(scope(**BASE_PARAMS), conversation(*changed)) != base_id()


def test_dropping_or_adding_a_message_matters():
    assert entry_id(scope(**BASE_PARAMS), conversation(*BASE_MESSAGES[:3])) != base_id()
    extra = [*BASE_MESSAGES, (ASSISTANT, "")]
    assert entry_id(scope(**BASE_PARAMS), conversation(*extra)) != base_id()


def test_message_boundaries_matter():
    joined = conversation((USER, "ab"), (USER, "c"))
    split = conversation((USER, "a"), (USER, "bc"))

    assert entry_id(scope(), joined) != entry_id(scope(), split)


def test_name_and_tool_call_id_matter():
    plain = [common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="42")]
    named = [common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="42", name="calc")]
    called = [common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="42", tool_call_id="c1")]

    ids = {entry_id(scope(), m) for m in (plain, named, called)}
    assert len(ids) == 3


def test_redis_key_embeds_the_tenant():
    digest = base_id()

    key_a = redis_key("acme", digest)
    key_b = redis_key("globex", digest)

    assert key_a != key_b
    assert "acme" in key_a
    assert "globex" in key_b
    assert key_a.endswith(digest)
    assert key_b.endswith(digest)


def test_equal_conversations_of_two_tenants_never_share_a_key():
    messages = conversation(*BASE_MESSAGES)
    keys = {
        redis_key(tenant, entry_id(scope(tenant=tenant, **BASE_PARAMS), messages))
        for tenant in ("acme", "globex", "acme-2", "a")
    }

    assert len(keys) == 4
