"""The deployment files (deploy/k8s, docker-compose.yml, .env.example) against their schemas
and against the code: every variable they set is a setting of the service that receives it,
every address names a service and its port, every mounted file exists.

Offline: the Kubernetes schemas ship inside kubernetes-validate, the compose-spec schema in
check-jsonschema's vendored catalog. Rendering the kustomizations needs kubectl (skipped
where there is none)."""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from services.common.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# The oldest Kubernetes the manifests support (gRPC probes are GA since 1.27) and the newest
# whose schemas this kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")

# Workload -> the Python package whose settings it reads (jobs runs the orchestrator).
PROGRAMS = {
    "orchestrator": "orchestrator",
    "jobs": "orchestrator",
    "control": "control",
    "cache": "cache",
    "executor": "executor",
    "gateway": "gateway",
}

Doc = dict[str, Any]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifest_docs() -> list[tuple[str, Doc]]:
    return [
        (f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in _manifest_files()
        for doc in _docs(path)
    ]


MANIFESTS = _manifest_docs()
KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))


def _base_objects(kind: str) -> dict[str, Doc]:
    return {
        doc["metadata"]["name"]: doc
        for path in _manifest_files()
        if path.parent == BASE
        for doc in _docs(path)
        if doc["kind"] == kind
    }


def _kustomization(directory: Path) -> Doc:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _generated_files(directory: Path) -> dict[str, list[Path]]:
    """configMapGenerator name -> the files it reads (`files` and `envs`)."""
    out: dict[str, list[Path]] = {}
    for gen in _kustomization(directory).get("configMapGenerator", []):
        entries = [*gen.get("files", []), *gen.get("envs", [])]
        # `key=path` names the key; the path is what must exist.
        out[gen["name"]] = [(directory / e.split("=", 1)[-1]).resolve() for e in entries]
    return out


def _configmap_keys() -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for gen in _kustomization(BASE).get("configMapGenerator", []):
        keys[gen["name"]] = {
            e.split("=", 1)[0] if "=" in e else Path(e).name for e in gen.get("files", [])
        }
    return keys


def _env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def _container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    container: Doc = containers[0]
    return container


def _workload_env(name: str) -> dict[str, str]:
    """Every variable a base workload's container gets: its ConfigMap's, then its own `env`."""
    container = _container(_base_objects("Deployment")[name])
    env: dict[str, str] = {}
    generated = _generated_files(BASE)
    for source in container.get("envFrom", []):
        for path in generated[source["configMapRef"]["name"]]:
            env.update(_env_file(path))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<secret>")
    return env


def _settings_class(program: str) -> type[ServiceSettings]:
    try:
        module = importlib.import_module(f"services.{program}.settings")
    except ModuleNotFoundError:
        pytest.skip(f"services.{program}.settings does not exist yet")
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, ServiceSettings)
        and obj is not ServiceSettings
        and obj.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"one settings class expected in {module.__name__}"
    return classes[0]


def _env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads: prefix + field, or its aliases."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(f"{prefix}{field_name}".upper())
    return {name.upper() for name in names}


def _required_env(program: str) -> set[str]:
    """Settings without a default, each as the set of variables that can give it."""
    cls = _settings_class(program)
    prefix = str(cls.model_config.get("env_prefix", ""))
    required: set[str] = set()
    for field_name, field in cls.model_fields.items():
        if field.is_required():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                required.add("|".join(str(choice) for choice in alias.choices))
            else:
                required.add(f"{prefix}{field_name}".upper())
    return required


def _missing_required(program: str, env: dict[str, str]) -> list[str]:
    return sorted(r for r in _required_env(program) if not set(r.split("|")) & set(env))


def _provider_key_names() -> set[str]:
    """Variables the executor's providers read keys from (api_key_env; with defaults)."""
    catalog = yaml.safe_load((ROOT / "config" / "models.yaml").read_text())
    named = {
        str(provider["api_key_env"])
        for provider in (catalog.get("providers") or {}).values()
        if provider.get("api_key_env")
    }
    return named | {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}


def _allowed_env(program: str) -> set[str]:
    names = _env_names(_settings_class(program))
    return names | _provider_key_names() if program == "executor" else names


# Kubernetes objects ----------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), MANIFESTS, ids=[where for where, _ in MANIFESTS])
def test_manifest_is_valid_kubernetes(where: str, doc: Doc, version: str) -> None:
    _validate(doc, version, where)


def _validate(doc: Doc, version: str, where: str) -> None:
    """Strict: an unknown or misplaced field fails, not only a wrong type."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{where} (Kubernetes {version}): {err.message} at {list(err.path)}")


_KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "labels",
    "images",
    "configMapGenerator",
    "secretGenerator",
    "patches",
    "namespace",
}


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_refers_to_existing_files(path: Path) -> None:
    data = _kustomization(path.parent)
    assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert data["kind"] == "Kustomization"
    assert set(data) <= _KUSTOMIZATION_KEYS, set(data) - _KUSTOMIZATION_KEYS
    for resource in data.get("resources", []):
        target = path.parent / resource
        assert target.is_file() or (target / "kustomization.yaml").is_file(), resource
    for name, files in _generated_files(path.parent).items():
        for file in files:
            assert file.is_file(), f"{name}: {file} does not exist"


def test_every_config_file_the_services_read_is_generated() -> None:
    generated = _generated_files(BASE)
    config = ROOT / "config"
    for name in ("models", "routes", "pipelines", "guardrails"):
        assert generated[f"strata-{name}"] == [config / f"{name}.yaml"]
    templates = sorted(generated["strata-templates"])
    assert templates == sorted((config / "templates").glob("*.yaml")), "a template is missing"


def test_base_has_a_deployment_autoscaler_and_budget_per_workload() -> None:
    deployments = _base_objects("Deployment")
    assert set(deployments) == set(PROGRAMS)
    autoscalers = _base_objects("HorizontalPodAutoscaler")
    budgets = _base_objects("PodDisruptionBudget")
    for name, deployment in deployments.items():
        assert "replicas" not in deployment["spec"], f"{name}: the autoscaler owns replicas"
        assert autoscalers[name]["spec"]["scaleTargetRef"]["name"] == name
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert budgets[name]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        container = _container(deployment)
        assert container["command"] == ["python", "-m", f"services.{PROGRAMS[name]}"]
        assert "cpu" in container["resources"]["requests"], f"{name}: the HPA needs a request"
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_workload_env_names_are_settings_of_its_service(name: str) -> None:
    program = PROGRAMS[name]
    env = _workload_env(name)
    unknown = set(env) - _allowed_env(program)
    assert not unknown, f"{name}: not settings of services.{program}: {sorted(unknown)}"
    assert not _missing_required(program, env), f"{name}: required settings not set"


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_workload_ports_and_probes_match_its_settings(name: str) -> None:
    deployment = _base_objects("Deployment")[name]
    container = _container(deployment)
    env = _workload_env(name)
    prefix = f"STRATA_{PROGRAMS[name].upper()}_"
    port = int(env[f"{prefix}PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    served = "http" if name == "gateway" else "grpc"
    assert ports[served] == port
    assert ports["metrics"] == int(env[f"{prefix}METRICS_PORT"])
    if served == "grpc":
        # Probes ask the plaintext health-only port, which answers with mutual TLS on.
        assert ports["health"] == int(env[f"{prefix}HEALTH_PORT"])
    for probe in ("startupProbe", "readinessProbe"):
        spec = container[probe]
        if served == "grpc":
            assert spec["grpc"]["port"] == ports["health"], f"{name}.{probe}"
        else:
            assert spec["httpGet"]["path"] == "/healthz"
            assert spec["httpGet"]["port"] in (port, served)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in _base_objects("Service").values():
        if service["spec"]["selector"].items() <= pod_labels.items():
            for service_port in service["spec"]["ports"]:
                assert service_port["port"] == port
                assert service_port["targetPort"] in (port, served)


def test_addresses_name_headless_services_and_their_ports() -> None:
    services = _base_objects("Service")
    for name in PROGRAMS:
        for var, value in _workload_env(name).items():
            if not var.endswith("_ADDRESS"):
                continue
            match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", value)
            assert match, f"{name}: {var}={value} is not dns:///service:port"
            service = services[match[1]]
            assert service["spec"].get("clusterIP") == "None", f"{match[1]} is not headless"
            assert int(match[2]) in {p["port"] for p in service["spec"]["ports"]}


def test_mounted_files_are_in_the_mounted_config_maps() -> None:
    keys = _configmap_keys()
    for name, deployment in _base_objects("Deployment").items():
        container = _container(deployment)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        for var, value in _workload_env(name).items():
            if not var.endswith(("_FILE", "_DIR")):
                continue
            path = Path(value)
            if var.endswith("_DIR"):
                volume = mounts[str(path)]
                assert volume["configMap"]["name"] in keys, f"{name}: {var}"
                continue
            volume = mounts[str(path.parent)]
            sources = [s["configMap"]["name"] for s in volume["projected"]["sources"]]
            assert any(path.name in keys[cm] for cm in sources), f"{name}: {var}={value}"


def test_secret_keys_are_documented_and_given_in_dev() -> None:
    example = next(doc for _, doc in MANIFESTS if doc["kind"] == "Secret")
    documented = set(example["stringData"])
    dev = _kustomization(K8S / "overlays" / "dev")["secretGenerator"][0]
    given = {literal.split("=", 1)[0] for literal in dev["literals"]}
    for deployment in _base_objects("Deployment").values():
        for var in _container(deployment).get("env", []):
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == example["metadata"]["name"] == dev["name"]
            assert ref["key"] in documented
            assert ref.get("optional") or ref["key"] in given, ref["key"]


def _kustomize(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.mark.parametrize("overlay", ["base", "overlays/dev"])
def test_kustomize_build_is_valid_kubernetes(overlay: str) -> None:
    docs = _kustomize(K8S / overlay)
    for doc in docs:
        where = f"{overlay}:{doc['kind']}/{doc['metadata']['name']}"
        _validate(doc, K8S_VERSIONS[0], where)
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for volume in doc["spec"]["template"]["spec"]["volumes"]:
            sources = volume.get("projected", {}).get("sources", [volume])
            for source in sources:
                if "configMap" in source:
                    assert source["configMap"]["name"] in config_maps


# docker compose ---------------------------------------------------------------------------


@functools.cache
def _compose() -> Doc:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


_DEFAULTED = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Replaces ${VAR:-default} by its default (and ${VAR:?msg} by a stand-in)."""
    return _DEFAULTED.sub(lambda m: m[2] if m[0].startswith(f"${{{m[1]}:-") else "x", value)


def test_compose_is_valid_compose_spec() -> None:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not errors, errors


def test_compose_services_refer_to_what_exists() -> None:
    services = _compose()["services"]
    volumes = set(_compose().get("volumes") or {})
    published: list[str] = []
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        assert set(service.get("depends_on") or []) <= set(services), name
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0]
            assert source.startswith(".") or source in volumes, f"{name}: volume {source}"
        for port in service.get("ports") or []:
            published.append(_interpolate(str(port)).rsplit(":", 1)[0])
    assert len(published) == len(set(published)), published


def _strata_services() -> dict[str, tuple[str, dict[str, str]]]:
    """Compose service -> (the program it runs, its environment)."""
    out = {}
    for name, service in _compose()["services"].items():
        command = service.get("command") or []
        if command[:2] == ["python", "-m"] and command[2].startswith("services."):
            env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
            out[name] = (command[2].removeprefix("services."), env)
    return out


def test_compose_runs_every_workload() -> None:
    assert set(_strata_services()) == set(PROGRAMS)
    assert {program for program, _ in _strata_services().values()} == set(PROGRAMS.values())


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_compose_env_names_are_settings_of_its_service(name: str) -> None:
    program, env = _strata_services()[name]
    assert all(var.startswith(f"STRATA_{program.upper()}_") or var.isupper() for var in env)
    unknown = set(env) - _allowed_env(program)
    assert not unknown, f"{name}: not settings of services.{program}: {sorted(unknown)}"
    assert not _missing_required(program, env), f"{name}: required settings not set"


def test_compose_addresses_name_services_and_their_ports() -> None:
    strata = _strata_services()
    for name, (_, env) in strata.items():
        for var, value in env.items():
            if not var.endswith("_ADDRESS"):
                continue
            host, port = value.rsplit(":", 1)
            target_program, target_env = strata[host]
            assert target_env[f"STRATA_{target_program.upper()}_PORT"] == port, (name, var)


def test_compose_variables_are_in_env_example() -> None:
    used = set(_DEFAULTED.findall(COMPOSE.read_text()))
    example = _env_file(ENV_EXAMPLE)
    assert {var for var, _ in used} <= set(example)
    assert set(example) <= {var for var, _ in used}, "unused variables in .env.example"
    secrets = ("STRATA_ADMIN_TOKEN", "STRATA_CACHE_ADMIN_TOKEN", "OPENAI_API_KEY")
    assert all(example[var] == "" for var in secrets), "no secret values in .env.example"
