"""The model catalog: validation, pricing and loading from YAML."""

import re
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.catalog import Catalog, ModelConfig, load_catalog
from services.common.errors import RequestInvalid
from services.common.settings import ConfigError
from services.executor.completion import Executor
from strata.common.v1 import common_pb2

REPO_MODELS = Path(__file__).resolve().parents[2] / "config" / "models.yaml"


def model(input_price: str = "0.15", output_price: str = "0.60") -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "provider": "mock",
            "upstream_model": "echo",
            "input_usd_per_million_tokens": input_price,
            "output_usd_per_million_tokens": output_price,
        }
    )


def usage(input_tokens: int, output_tokens: int) -> common_pb2.Usage:
    return common_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens)


def test_single_token_rounds_up_to_one_micro_per_part():
    cost = model("0.15", "0.60").cost(usage(1, 1))

    assert cost.input_usd_micros == 1
    assert cost.output_usd_micros == 1
    # Each part rounds up on its own: 0.15 + 0.60 micros would round to 1 as a whole.
    assert cost.total_usd_micros == 2


def test_a_million_tokens_cost_exactly_the_price():
    cost = model("0.15", "0.60").cost(usage(1_000_000, 1_000_000))

    assert cost.input_usd_micros == 150_000
    assert cost.output_usd_micros == 600_000
    assert cost.total_usd_micros == 750_000


def test_exact_micro_amounts_are_not_rounded_up():
    # 20 tokens at $0.15/M is exactly 3 micros; 10 tokens is 1.5 and rounds to 2.
    assert model("0.15", "0").cost(usage(20, 0)).input_usd_micros == 3
    assert model("0.15", "0").cost(usage(10, 0)).input_usd_micros == 2


def test_total_is_input_plus_output():
    for tokens in [(0, 0), (7, 0), (0, 7), (123_457, 98_765), (3_000_001, 1)]:
        cost = model("2.5", "10").cost(usage(*tokens))
        assert cost.total_usd_micros == cost.input_usd_micros + cost.output_usd_micros
        # Rounded up, never by a whole micro or more.
        assert 0 <= cost.input_usd_micros * 1_000_000 - tokens[0] * 2_500_000 < 1_000_000
        assert 0 <= cost.output_usd_micros * 1_000_000 - tokens[1] * 10_000_000 < 1_000_000


def test_free_model_costs_nothing():
    cost = model("0", "0").cost(usage(5_000_000, 5_000_000))

    assert (cost.input_usd_micros, cost.output_usd_micros, cost.total_usd_micros) == (0, 0, 0)


def test_price_with_six_decimals_is_accepted():
    config = model("0.000001", "1.234567")

    assert config.input_usd_per_million_tokens == Decimal("0.000001")
    assert config.input_micros_per_million == 1
    assert config.output_micros_per_million == 1_234_567


@pytest.mark.parametrize("price", ["0.0000001", "1.2345678"])
def test_price_with_more_than_six_decimals_is_refused(price):
    with pytest.raises(ValidationError, match="at most 6 decimals"):
        model(input_price=price)
    with pytest.raises(ValidationError, match="at most 6 decimals"):
        model(output_price=price)


def test_negative_price_is_refused():
    with pytest.raises(ValidationError):
        model(input_price="-0.15")


def catalog_data(**models: dict) -> dict:
    return {"providers": {"mock": {"kind": "mock"}}, "models": models}


def test_model_naming_an_unknown_provider_is_refused():
    data = catalog_data(good={"provider": "mock", "upstream_model": "x"})
    data["models"]["bad"] = {"provider": "nowhere", "upstream_model": "x"}

    with pytest.raises(ValidationError, match="nowhere"):
        Catalog.model_validate(data)


def test_model_names_are_filled_from_the_mapping_keys():
    catalog = Catalog.model_validate(
        catalog_data(
            alpha={"provider": "mock", "upstream_model": "x"},
            beta={"provider": "mock", "upstream_model": "y", "name": "ignored"},
        )
    )

    assert {alias: m.name for alias, m in catalog.models.items()} == {
        "alpha": "alpha",
        "beta": "beta",
    }
    found = catalog.get("beta")
    assert found is not None
    assert found.upstream_model == "y"
    assert catalog.get("gamma") is None


def test_unknown_field_is_refused():
    with pytest.raises(ValidationError):
        Catalog.model_validate(
            catalog_data(alpha={"provider": "mock", "upstream_model": "x", "max_tokens": 5})
        )


def test_load_catalog_missing_file_names_it(tmp_path):
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_catalog(path)


def test_load_catalog_invalid_yaml_names_it(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("providers: [mock\nmodels: {\n")

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_catalog(path)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "- just\n- a list\n",
        "providers: {mock: {kind: mock}}\nmodels: {m: {provider: other, upstream_model: x}}\n",
        "providers: {mock: {kind: telepathy}}\nmodels: {}\n",
    ],
)
def test_load_catalog_invalid_content_names_it(tmp_path, text):
    path = tmp_path / "wrong.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_catalog(path)


def test_load_catalog_non_utf8_file_names_it(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# café\nproviders: {}\nmodels: {}\n".encode("latin-1"))

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_catalog(path)


def test_load_catalog_reads_a_valid_file(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        "providers:\n"
        "  local: {kind: openai_compatible, base_url: 'http://127.0.0.1:1/v1'}\n"
        "models:\n"
        "  small: {provider: local, upstream_model: s, input_usd_per_million_tokens: '1.5'}\n"
    )

    catalog = load_catalog(path)

    small = catalog.get("small")
    assert small is not None
    assert small.name == "small"
    assert small.input_micros_per_million == 1_500_000
    assert catalog.providers["local"].kind == "openai_compatible"


def test_repository_models_file_loads_and_every_provider_exists():
    catalog = load_catalog(REPO_MODELS)

    assert catalog.models
    for alias, config in catalog.models.items():
        assert config.name == alias
        assert config.provider in catalog.providers


# Executor.list_models pages through the catalog's aliases.


def paging_executor(count: int) -> Executor:
    models = {f"m{i:02d}": {"provider": "mock", "upstream_model": "x"} for i in range(count)}
    catalog = Catalog.model_validate({"providers": {"mock": {"kind": "mock"}}, "models": models})
    return Executor(catalog, {})


def test_list_models_pages_cover_every_model_once_in_alias_order():
    executor = paging_executor(7)
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page, token = executor.list_models(3, token)
        sizes.append(len(page))
        seen.extend(m.name for m in page)
        if not token:
            break

    assert sizes == [3, 3, 1]
    assert seen == sorted(f"m{i:02d}" for i in range(7))


def test_list_models_last_page_has_no_token_when_it_is_exactly_full():
    executor = paging_executor(6)

    first, token = executor.list_models(3, "")
    second, last_token = executor.list_models(3, token)

    assert [m.name for m in first] == ["m00", "m01", "m02"]
    assert [m.name for m in second] == ["m03", "m04", "m05"]
    assert last_token == ""


def test_list_models_zero_page_size_means_the_default():
    executor = paging_executor(5)

    page, token = executor.list_models(0, "")

    assert len(page) == 5
    assert token == ""


def test_list_models_page_size_is_capped():
    executor = paging_executor(3)

    page, token = executor.list_models(10**9, "")

    assert len(page) == 3
    assert token == ""


@pytest.mark.parametrize("token", ["not-a-token", "YQ", "_w==", "\u00e9t\u00e9"])
def test_list_models_garbage_token_is_refused(token):
    with pytest.raises(RequestInvalid) as caught:
        paging_executor(3).list_models(2, token)

    assert [v.field for v in caught.value.violations] == ["page_token"]


def test_list_models_token_without_base64_characters_is_refused():
    with pytest.raises(RequestInvalid):
        paging_executor(3).list_models(2, "%%%%")


def test_list_models_negative_page_size_is_refused():
    with pytest.raises(RequestInvalid) as caught:
        paging_executor(3).list_models(-1, "")

    assert [v.field for v in caught.value.violations] == ["page_size"]
