"""API keys and tenants: key generation, authentication and the tenants file."""

import hashlib
import re

import grpc
import pytest
import yaml

from services.common.errors import ApiKeyInvalid
from services.common.settings import ConfigError
from services.control.keys import KEY_PREFIX, KeyRing, TenantsFile, hash_key, new_key
from services.orchestrator.servicer import bearer_key


def tenants(spec: dict) -> TenantsFile:
    return TenantsFile.model_validate({"tenants": spec})


def key_entry(key_id: str, key: str, **extra) -> dict:
    return {"id": key_id, "sha256": hash_key(key), **extra}


def test_new_key_has_prefix_and_matching_hash():
    key, digest = new_key()

    assert key.startswith(KEY_PREFIX)
    assert len(key) == len(KEY_PREFIX) + 43
    assert digest == hash_key(key)
    assert digest == hashlib.sha256(key.encode()).hexdigest()


def test_new_keys_are_unique():
    keys = {new_key()[0] for _ in range(200)}

    assert len(keys) == 200


def test_authenticate_returns_the_key_record():
    prod, _ = new_key()
    dev, _ = new_key()
    other, _ = new_key()
    ring = KeyRing(
        tenants(
            {
                "acme": {
                    "keys": [
                        key_entry("acme-prod", prod, requests_per_minute=600),
                        key_entry("acme-dev", dev, tokens_per_minute=5000),
                    ]
                },
                "globex": {"keys": [key_entry("main", other)]},
            }
        )
    )

    record = ring.authenticate(prod)
    assert (record.tenant_id, record.key_id) == ("acme", "acme-prod")
    assert (record.requests_per_minute, record.tokens_per_minute) == (600, 0)

    record = ring.authenticate(dev)
    assert (record.tenant_id, record.key_id) == ("acme", "acme-dev")
    assert (record.requests_per_minute, record.tokens_per_minute) == (0, 5000)

    assert ring.authenticate(other).tenant_id == "globex"


def test_unknown_key_is_refused():
    known, _ = new_key()
    unknown, _ = new_key()
    ring = KeyRing(tenants({"acme": {"keys": [key_entry("k", known)]}}))

    with pytest.raises(ApiKeyInvalid):
        ring.authenticate(unknown)


def test_malformed_key_is_refused_even_if_its_hash_is_known():
    bare = "no-prefix-at-all"
    ring = KeyRing(tenants({"acme": {"keys": [key_entry("k", bare)]}}))

    with pytest.raises(ApiKeyInvalid, match="malformed"):
        ring.authenticate(bare)
    with pytest.raises(ApiKeyInvalid):
        ring.authenticate("")


def test_disabled_key_is_refused_but_found_by_ids():
    key, _ = new_key()
    ring = KeyRing(
        tenants({"acme": {"keys": [key_entry("old", key, disabled=True, tokens_per_minute=7)]}})
    )

    with pytest.raises(ApiKeyInvalid):
        ring.authenticate(key)
    record = ring.get("acme", "old")
    assert record is not None
    assert (record.tenant_id, record.key_id, record.tokens_per_minute) == ("acme", "old", 7)
    assert ring.get("acme", "missing") is None
    assert ring.get("other", "old") is None


def test_same_key_id_in_two_tenants_is_allowed():
    a, _ = new_key()
    b, _ = new_key()
    ring = KeyRing(
        tenants(
            {"acme": {"keys": [key_entry("main", a)]}, "globex": {"keys": [key_entry("main", b)]}}
        )
    )

    assert ring.authenticate(a).tenant_id == "acme"
    assert ring.authenticate(b).tenant_id == "globex"


def test_duplicate_key_id_in_a_tenant_is_refused():
    a, _ = new_key()
    b, _ = new_key()

    with pytest.raises(ValueError, match="two keys"):
        KeyRing(tenants({"acme": {"keys": [key_entry("main", a), key_entry("main", b)]}}))


def test_repeated_hash_is_refused_even_across_tenants():
    key, _ = new_key()

    with pytest.raises(ValueError, match="repeats"):
        KeyRing(
            tenants(
                {"acme": {"keys": [key_entry("a", key)]}, "globex": {"keys": [key_entry("b", key)]}}
            )
        )


def test_repeated_hash_is_refused_whatever_the_order_of_disabled_keys():
    key, _ = new_key()
    enabled = key_entry("enabled", key)
    disabled = key_entry("disabled", key, disabled=True)

    with pytest.raises(ValueError, match="repeats"):
        KeyRing(tenants({"acme": {"keys": [enabled, disabled]}}))
    with pytest.raises(ValueError, match="repeats"):
        KeyRing(tenants({"acme": {"keys": [disabled, enabled]}}))


@pytest.mark.parametrize("tenant_id", ["Acme", "{acme}", "-acme", "", "a" * 64, "ac me"])
def test_invalid_tenant_id_is_refused(tenant_id):
    with pytest.raises(ValueError, match="tenant id"):
        KeyRing(tenants({tenant_id: {"keys": []}}))


def test_longest_valid_tenant_id_is_accepted():
    key, _ = new_key()
    tenant_id = "a" * 63
    ring = KeyRing(tenants({tenant_id: {"keys": [key_entry("k", key)]}}))

    assert ring.authenticate(key).tenant_id == tenant_id


def test_from_file_reads_a_valid_file(tmp_path):
    key, digest = new_key()
    path = tmp_path / "tenants.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "acme": {"keys": [{"id": "k1", "sha256": digest, "requests_per_minute": 3}]}
                }
            }
        )
    )

    record = KeyRing.from_file(path).authenticate(key)

    assert (record.tenant_id, record.key_id, record.requests_per_minute) == ("acme", "k1", 3)


@pytest.mark.parametrize(
    "text",
    [
        "tenants: {acme: [\n",
        "tenants:\n  acme:\n    keys:\n      - {id: k, sha256: not-hex}\n",
        "tenants:\n  Acme:\n    keys: []\n",
        "tenants: {}\nextra: 1\n",
        "",
    ],
)
def test_from_file_with_bad_content_names_the_file(tmp_path, text):
    path = tmp_path / "bad-tenants.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        KeyRing.from_file(path)


def test_from_file_missing_names_the_file(tmp_path):
    path = tmp_path / "nowhere.yaml"

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        KeyRing.from_file(path)


# bearer_key: the key a client presents in `authorization` metadata.


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
