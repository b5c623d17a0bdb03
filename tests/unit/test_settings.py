"""Loading service settings from the environment."""

from pathlib import Path

import pytest

from services.cache.settings import CacheSettings
from services.common.settings import load_settings
from services.control.settings import ControlSettings
from services.orchestrator.settings import OrchestratorSettings

ORCHESTRATOR_REQUIRED = {
    "STRATA_ORCHESTRATOR_CONTROL_ADDRESS": "127.0.0.1:50052",
    "STRATA_ORCHESTRATOR_CACHE_ADDRESS": "127.0.0.1:50053",
    "STRATA_ORCHESTRATOR_EXECUTOR_ADDRESS": "127.0.0.1:50054",
    "STRATA_ORCHESTRATOR_MODELS_FILE": "config/models.yaml",
    "STRATA_ORCHESTRATOR_REDIS_URL": "redis://127.0.0.1:6379/0",
}
CONTROL_VARIABLES = [
    "REDIS_URL",
    "STRATA_CONTROL_REDIS_URL",
    "STRATA_CONTROL_TENANTS_FILE",
    "STRATA_CONTROL_PORT",
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in [*ORCHESTRATOR_REQUIRED, *CONTROL_VARIABLES, "STRATA_CACHE_REDIS_URL"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def exit_message(cls) -> str:
    with pytest.raises(SystemExit) as caught:
        load_settings(cls)
    assert isinstance(caught.value.code, str)
    return caught.value.code


def test_missing_required_variable_is_named(clean_env):
    for name, value in ORCHESTRATOR_REQUIRED.items():
        if name != "STRATA_ORCHESTRATOR_CONTROL_ADDRESS":
            clean_env.setenv(name, value)

    message = exit_message(OrchestratorSettings)

    assert "OrchestratorSettings" in message
    assert "STRATA_ORCHESTRATOR_CONTROL_ADDRESS" in message
    assert "STRATA_ORCHESTRATOR_CACHE_ADDRESS" not in message


def test_every_missing_variable_is_named(clean_env):
    message = exit_message(OrchestratorSettings)

    for name in ORCHESTRATOR_REQUIRED:
        assert name in message


def test_invalid_value_is_named(clean_env):
    for name, value in ORCHESTRATOR_REQUIRED.items():
        clean_env.setenv(name, value)
    clean_env.setenv("STRATA_ORCHESTRATOR_PORT", "not-a-port")

    message = exit_message(OrchestratorSettings)

    assert "STRATA_ORCHESTRATOR_PORT" in message
    assert "CONTROL_ADDRESS" not in message


def test_complete_environment_loads(clean_env):
    for name, value in ORCHESTRATOR_REQUIRED.items():
        clean_env.setenv(name, value)
    clean_env.setenv("STRATA_ORCHESTRATOR_PORT", "6000")

    settings = load_settings(OrchestratorSettings)

    assert settings.control_address == "127.0.0.1:50052"
    assert settings.models_file == Path("config/models.yaml")
    assert settings.port == 6000


def test_control_missing_redis_url_names_the_prefixed_variable(clean_env):
    clean_env.setenv("STRATA_CONTROL_TENANTS_FILE", "tenants.yaml")

    message = exit_message(ControlSettings)

    assert "STRATA_CONTROL_REDIS_URL" in message
    assert "TENANTS_FILE" not in message


def test_control_accepts_the_redis_url_alias(clean_env):
    clean_env.setenv("REDIS_URL", "redis://alias:6379/0")
    clean_env.setenv("STRATA_CONTROL_TENANTS_FILE", "tenants.yaml")
    clean_env.setenv("STRATA_CONTROL_MODELS_FILE", "models.yaml")

    settings = load_settings(ControlSettings)

    assert settings.redis_url == "redis://alias:6379/0"
    assert settings.tenants_file == Path("tenants.yaml")
    assert settings.port == 50052


def test_control_prefixed_redis_url_wins_over_alias(clean_env):
    clean_env.setenv("REDIS_URL", "redis://alias:6379/0")
    clean_env.setenv("STRATA_CONTROL_REDIS_URL", "redis://own:6379/1")
    clean_env.setenv("STRATA_CONTROL_MODELS_FILE", "models.yaml")

    assert load_settings(ControlSettings).redis_url == "redis://own:6379/1"


def test_another_service_prefix_is_not_read(clean_env):
    clean_env.setenv("STRATA_CONTROL_REDIS_URL", "redis://control:6379/0")

    message = exit_message(CacheSettings)

    assert "STRATA_CACHE_REDIS_URL" in message
