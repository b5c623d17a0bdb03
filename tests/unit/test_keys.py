"""API keys and the tenants file, without Redis: key generation, ids, the file's checks."""

import hashlib
import re
from decimal import Decimal

import grpc
import pytest
import yaml

from services.common.errors import ApiKeyInvalid
from services.common.settings import ConfigError
from services.control.keys import (
    KEY_PREFIX,
    BudgetsConfig,
    LimitsConfig,
    TenantsFile,
    hash_key,
    micros,
    new_key,
    record_key,
    tenant_tag,
    valid_id,
)
from services.orchestrator.servicer import bearer_key


def tenants(spec: dict) -> TenantsFile:
    return TenantsFile.model_validate({"tenants": spec})


def key_entry(key_id: str, key: str, **extra) -> dict:
    return {"id": key_id, "sha256": hash_key(key), **extra}


def write(tmp_path, content: object, name: str = "tenants.yaml"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


# --- keys and ids -----------------------------------------------------------------------


def test_new_key_has_prefix_256_random_bits_and_matching_hash():
    key, digest = new_key()

    assert key.startswith(KEY_PREFIX)
    assert len(key) == len(KEY_PREFIX) + 43
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key[len(KEY_PREFIX) :])
    assert digest == hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


def test_new_keys_are_unique():
    made = [new_key() for _ in range(200)]

    assert len({key for key, _ in made}) == 200
    assert len({digest for _, digest in made}) == 200


def test_hash_key_is_the_hex_sha256_of_any_text():
    assert hash_key("") == hashlib.sha256(b"").hexdigest()
    assert hash_key("sk-strata-é") == hashlib.sha256("sk-strata-é".encode()).hexdigest()
    assert hash_key("a") != hash_key("A")


@pytest.mark.parametrize("value", ["a", "acme", "acme-prod", "a_b", "0", "9-x", "a" * 63])
def test_valid_ids(value):
    assert valid_id(value)


@pytest.mark.parametrize(
    "value",
    ["", "Acme", "-acme", "_acme", "{acme}", "ac me", "acme:x", "a" * 64, "acme\n", "é", "a.b"],
)
def test_invalid_ids(value):
    assert not valid_id(value)


def test_redis_names_keep_a_tenant_in_one_hash_slot():
    assert tenant_tag("acme") == "strata:{t:acme}"
    assert record_key("ab" * 32) == "strata:key:" + "ab" * 32


@pytest.mark.parametrize(
    ("usd", "expected"),
    [(None, 0), (Decimal("1"), 1_000_000), (Decimal("0.000001"), 1), (Decimal("12.5"), 12_500_000)],
)
def test_micros(usd, expected):
    assert micros(usd) == expected


# --- budgets and limits -----------------------------------------------------------------


def test_budget_fields_name_the_holder_and_period_in_micros():
    budgets = BudgetsConfig(day_usd=Decimal("0.000001"), total_usd=Decimal("12.5"))

    assert budgets.fields("key:k1") == {"key:k1:budget:day": 1, "key:k1:budget:total": 12_500_000}
    assert BudgetsConfig(month_usd=Decimal("3")).fields("team:search") == {
        "team:search:budget:month": 3_000_000
    }
    assert BudgetsConfig().fields("tenant") == {}


@pytest.mark.parametrize("value", ["0.000001", "5", "1000000", "0.123456", 2, "1e-6"])
def test_budgets_with_at_most_6_decimals_are_accepted(value):
    assert BudgetsConfig(month_usd=value).month_usd == Decimal(str(value))


@pytest.mark.parametrize(
    "value", ["0.0000001", "1.0000005", "0", 0, "-1", "-0.000001", "NaN", "Infinity"]
)
@pytest.mark.parametrize("period", ["day_usd", "month_usd", "total_usd"])
def test_budgets_with_more_than_6_decimals_or_not_positive_are_refused(period, value):
    with pytest.raises(ValueError, match=period):
        BudgetsConfig(**{period: value})


@pytest.mark.parametrize("burst_s", [0.5, 1, 60])
def test_burst_within_one_minute_is_accepted(burst_s):
    assert LimitsConfig(burst_s=burst_s).burst_s == burst_s


@pytest.mark.parametrize("burst_s", [0, -1, 60.001, 3600, "nan"])
def test_burst_outside_zero_to_sixty_seconds_is_refused(burst_s):
    with pytest.raises(ValueError, match="burst_s"):
        LimitsConfig(burst_s=burst_s)


def test_limits_default_to_none_and_a_whole_minute_of_burst():
    limits = LimitsConfig()

    assert (limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent) == (
        0,
        0,
        0,
    )
    assert limits.burst_s == 60


@pytest.mark.parametrize("field", ["requests_per_minute", "tokens_per_minute", "max_concurrent"])
def test_negative_limits_are_refused(field):
    with pytest.raises(ValueError, match=field):
        LimitsConfig(**{field: -1})


# --- the tenants file ---------------------------------------------------------------------


def test_load_reads_a_whole_file(tmp_path):
    prod, dev = new_key(), new_key()
    path = write(
        tmp_path,
        {
            "tenants": {
                "acme": {
                    "name": "Acme",
                    "limits": {
                        "requests_per_minute": 600,
                        "tokens_per_minute": 20000,
                        "max_concurrent": 8,
                        "burst_s": 5,
                    },
                    "budgets": {"day_usd": "50", "month_usd": "1000"},
                    "guardrail_profile": "strict",
                    "teams": {"search": {"budgets": {"month_usd": "200"}}},
                    "keys": [
                        {
                            "id": "acme-prod",
                            "sha256": prod[1],
                            "team": "search",
                            "requests_per_minute": 60,
                            "tokens_per_minute": 5000,
                            "budgets": {"day_usd": "5"},
                        },
                        {"id": "acme-dev", "sha256": dev[1], "disabled": True},
                    ],
                },
                "globex": {},
            }
        },
    )

    loaded = TenantsFile.load(path)

    acme = loaded.tenants["acme"]
    assert acme.name == "Acme"
    assert (acme.limits.requests_per_minute, acme.limits.max_concurrent) == (600, 8)
    assert acme.limits.burst_s == 5
    assert acme.budgets.fields("tenant") == {
        "tenant:budget:day": 50_000_000,
        "tenant:budget:month": 1_000_000_000,
    }
    assert acme.guardrail_profile == "strict"
    assert acme.teams["search"].budgets.fields("team:search") == {
        "team:search:budget:month": 200_000_000
    }
    prod_key, dev_key = acme.keys
    assert (prod_key.id, prod_key.sha256, prod_key.team) == ("acme-prod", prod[1], "search")
    assert (prod_key.requests_per_minute, prod_key.tokens_per_minute) == (60, 5000)
    assert prod_key.budgets.fields("key:acme-prod") == {"key:acme-prod:budget:day": 5_000_000}
    assert not prod_key.disabled
    assert dev_key.disabled and dev_key.team == "" and dev_key.requests_per_minute == 0
    globex = loaded.tenants["globex"]
    assert globex.keys == [] and globex.teams == {} and globex.limits.burst_s == 60


def test_same_key_id_in_two_tenants_is_allowed():
    a, b = new_key()[0], new_key()[0]

    tenants(
        {"acme": {"keys": [key_entry("main", a)]}, "globex": {"keys": [key_entry("main", b)]}}
    ).check()


def test_longest_valid_ids_are_accepted():
    key = new_key()[0]
    spec = {"a" * 63: {"teams": {"t" * 63: {}}, "keys": [key_entry("k" * 63, key, team="t" * 63)]}}

    tenants(spec).check()


def test_duplicate_key_id_in_a_tenant_is_refused():
    a, b = new_key()[0], new_key()[0]

    with pytest.raises(ValueError, match="two keys with id 'main'"):
        tenants({"acme": {"keys": [key_entry("main", a), key_entry("main", b)]}}).check()


def test_repeated_hash_is_refused_across_tenants():
    key = new_key()[0]

    with pytest.raises(ValueError, match="globex/b repeats"):
        tenants(
            {"acme": {"keys": [key_entry("a", key)]}, "globex": {"keys": [key_entry("b", key)]}}
        ).check()


@pytest.mark.parametrize("order", ["enabled-first", "disabled-first"])
def test_repeated_hash_is_refused_even_for_a_disabled_key(order):
    key = new_key()[0]
    entries = [key_entry("enabled", key), key_entry("disabled", key, disabled=True)]
    if order == "disabled-first":
        entries.reverse()

    with pytest.raises(ValueError, match="repeats another key's hash"):
        tenants({"acme": {"keys": entries}}).check()


def test_key_of_an_undeclared_team_is_refused():
    key = new_key()[0]
    spec = {"acme": {"teams": {"search": {}}, "keys": [key_entry("k", key, team="ads")]}}

    with pytest.raises(ValueError, match="undeclared team ads"):
        tenants(spec).check()


@pytest.mark.parametrize("tenant_id", ["Acme", "{acme}", "-acme", "", "a" * 64, "ac me"])
def test_invalid_tenant_id_is_refused(tenant_id):
    with pytest.raises(ValueError, match="tenant id"):
        tenants({tenant_id: {"keys": []}}).check()


@pytest.mark.parametrize("team_id", ["Search", "{s}", "", "a" * 64, "s:x"])
def test_invalid_team_id_is_refused(team_id):
    with pytest.raises(ValueError, match="team id"):
        tenants({"acme": {"teams": {team_id: {}}}}).check()


@pytest.mark.parametrize(
    "entry",
    [
        {"id": "Bad", "sha256": "a" * 64},
        {"id": "k", "sha256": "A" * 64},
        {"id": "k", "sha256": "a" * 63},
        {"id": "k", "sha256": "not-hex"},
        {"id": "k", "sha256": "a" * 64, "team": "Bad Team"},
        {"id": "k", "sha256": "a" * 64, "requests_per_minute": -1},
        {"id": "k", "sha256": "a" * 64, "tokens_per_minute": -5},
        {"id": "k", "sha256": "a" * 64, "budgets": {"day_usd": "0.0000001"}},
        {"id": "k", "sha256": "a" * 64, "surprise": 1},
    ],
)
def test_malformed_key_entries_are_refused(entry):
    with pytest.raises(ValueError, match="keys"):
        tenants({"acme": {"keys": [entry]}})


@pytest.mark.parametrize(
    "text",
    [
        "tenants: {acme: [\n",
        "tenants:\n  acme:\n    keys:\n      - {id: k, sha256: not-hex}\n",
        "tenants:\n  Acme:\n    keys: []\n",
        "tenants: {}\nextra: 1\n",
        "tenants:\n  acme:\n    budgets: {day_usd: '0.0000001'}\n",
        "tenants:\n  acme:\n    budgets: {month_usd: 0}\n",
        "tenants:\n  acme:\n    limits: {burst_s: 0}\n",
        "tenants:\n  acme:\n    limits: {burst_s: 61}\n",
        "tenants:\n  acme:\n    teams: {search: {budgets: {total_usd: '-2'}}}\n",
        "tenants:\n  acme:\n    keys:\n      - {id: k, sha256: " + "a" * 64 + ", team: ads}\n",
        "tenants:\n  acme:\n    keys:\n"
        + "      - {id: k, sha256: "
        + "a" * 64
        + "}\n"
        + "      - {id: k, sha256: "
        + "b" * 64
        + "}\n",
        "",
        "just a string\n",
    ],
)
def test_load_with_bad_content_names_the_file(tmp_path, text):
    path = tmp_path / "bad-tenants.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        TenantsFile.load(path)


def test_load_of_a_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"tenants: {caf\xe9: {}}\n")

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        TenantsFile.load(path)


def test_load_says_what_is_wrong(tmp_path):
    key = new_key()[0]
    path = write(tmp_path, {"tenants": {"acme": {"keys": [key_entry("k", key, team="ads")]}}})

    with pytest.raises(ConfigError, match="undeclared team ads"):
        TenantsFile.load(path)


def test_load_of_a_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nowhere.yaml"

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        TenantsFile.load(path)


# --- bearer_key: the key a client presents in `authorization` metadata -----------------


class FakeContext:
    def __init__(self, *metadata: tuple[str, str | bytes]) -> None:
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata


@pytest.mark.parametrize(
    ("value", "expected"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER sk-strata-x", "sk-strata-x")],
)
def test_bearer_key_is_extracted(value, expected):
    context = FakeContext(("x-request-id", "r1"), ("authorization", value))

    assert bearer_key(context) == expected


def test_bearer_key_skips_other_authorization_schemes():
    context = FakeContext(("authorization", "Basic x"), ("authorization", "Bearer later"))

    assert bearer_key(context) == "later"


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("x-request-id", "r1"),),
        (("authorization", "Basic x"),),
        (("authorization", "Bearer"),),
        (("authorization", "Bearer    "),),
        (("authorization", "Bearerabc"),),
        (("authorization-bin", b"Bearer abc"),),
        (("x-authorization", "Bearer abc"),),
    ],
)
def test_missing_or_other_scheme_is_unauthenticated(metadata):
    with pytest.raises(ApiKeyInvalid) as caught:
        bearer_key(FakeContext(*metadata))

    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "API_KEY_INVALID"
