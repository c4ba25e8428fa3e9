"""The local stack behind `blockpilot up` / `down` / `status`.

`up` starts Redis (when none answers on the URL and `redis-server` is installed; otherwise the
services use their in-memory store, with a warning), then the policy, drafter and verifier services
and the HTTP gateway in front of the verifier on loopback, each as `python -m services.<name>` with its settings in BLOCKPILOT_<SERVICE>_* env
variables; waits until every one is SERVING; prints the addresses. State (pids, addresses, logs)
lives in the run folder: $BLOCKPILOT_RUN_DIR, else $BLOCKPILOT_CACHE/run (default
~/.cache/blockpilot/run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError

SERVICES = ("policy", "drafter", "verifier", "gateway")  # start order; stopped in reverse
HTTP_SERVICES = ("gateway",)  # health at GET /health on their HTTP port, not gRPC health checking


@dataclass(frozen=True)
class StackOptions:
    target: str = "default"
    drafter: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    verifier_port: int = 50051
    drafter_port: int = 50052
    policy_port: int = 50053
    gateway_port: int = 8000  # HTTP: the OpenAI API, /health and /metrics
    verifier_metrics_port: int = 9101
    drafter_metrics_port: int = 9102
    policy_metrics_port: int = 9103
    gateway_metrics_port: int = 9104
    threads: int = 1
    timeout_s: float = 600.0
    backend: str = ""  # the verifier's backend; '' = its config's (env BLOCKPILOT_VERIFIER_BACKEND, else onnxruntime)
    precision: str = ""  # the verifier's onnxruntime precision; '' = its config's (env BLOCKPILOT_VERIFIER_PRECISION)
    # The verifier's and the drafter's dtype and device ('' = each one's config: env
    # BLOCKPILOT_VERIFIER_DTYPE, BLOCKPILOT_DRAFTER_DEVICE, ...): one placement for both, as the
    # drafter drafts with the target's embedding and lm_head at the verifier's precision.
    dtype: str = ""
    device: str = ""
    secure: bool = False  # TLS, mTLS between services, tokens, a Redis password (see secure_material)

    def __post_init__(self) -> None:
        from blockpilot.models.placement import device_problem, dtype_problem

        for name, problem in (("dtype", dtype_problem), ("device", device_problem)):
            value = getattr(self, name)
            wrong = problem(value) if value else None
            if wrong:
                raise InvalidArgumentError(f"up --{name} {wrong}, got {value!r}")


SECURE_FILES = {  # what `up --secure` makes under <run dir>/secure/ (mode 0600)
    "ca": "ca.pem", "server_cert": "server.pem", "server_key": "server-key.pem",
    "client_cert": "client.pem", "client_key": "client-key.pem",
    "token": "token", "admin_token": "admin-token", "redis_password": "redis-password",
}


def secure_material(folder: Path) -> dict[str, Path]:
    """The secured stack's material in `folder` (made once, then reused so that configured
    clients keep working): a private CA; a server certificate for localhost / 127.0.0.1; a client
    certificate the services present to each other (mTLS); a data token and an admin token; a
    Redis password. Each file readable by its owner only."""
    import secrets

    from blockpilot.serving.certs import issue, make_ca, write_private

    paths = {key: folder / name for key, name in SECURE_FILES.items()}
    if all(path.is_file() for path in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    ca_files, ca = make_ca("BlockPilot local stack CA")
    server = issue(ca, "blockpilot", ["localhost", "127.0.0.1"])
    client = issue(ca, "blockpilot-services", client=True)
    for key, data in (("ca", ca_files.cert_pem), ("server_cert", server.cert_pem), ("server_key", server.key_pem),
                      ("client_cert", client.cert_pem), ("client_key", client.key_pem)):
        write_private(paths[key], data)
    for key in ("token", "admin_token", "redis_password"):
        write_private(paths[key], (secrets.token_urlsafe(32) + "\n").encode())
    return paths


def stack_security(state: dict | None, *, token: bool = False):
    """How this process reaches the stack's services (a ClientSecurity; plain for a plain stack):
    the services' own client certificate, and with token=True the data token."""
    from blockpilot.serving.security import ClientSecurity

    if not state or not state.get("secure"):
        return ClientSecurity()
    paths = {key: Path(state["run_dir"]) / "secure" / name for key, name in SECURE_FILES.items()}
    return ClientSecurity(str(paths["ca"]), str(paths["client_cert"]), str(paths["client_key"]),
                          str(paths["token"]) if token else "")


def run_dir() -> Path:
    from blockpilot.models.store import cache_root

    override = os.environ.get("BLOCKPILOT_RUN_DIR", "").strip()
    # Absolute: redis-server changes into --dir before it reads --aclfile, so a relative run dir breaks `up --secure`.
    path = (Path(override).expanduser() if override else cache_root() / "run").absolute()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_file() -> Path:
    return run_dir() / "stack.json"


def read_state() -> dict | None:
    path = _state_file()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie child counts as gone
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        ok = client.ping()
        client.close()
        return bool(ok)
    except Exception:  # noqa: BLE001 - any failure means "not answering"
        return False


def health_status(address: str, service: str = "", timeout_s: float = 1.0, security=None) -> str:
    """SERVING / NOT_SERVING / UNKNOWN / DOWN (no answer). security: a ClientSecurity for a TLS
    server (health checking needs no token)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from blockpilot.serving.security import ClientSecurity

    with (security or ClientSecurity()).channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return "DOWN"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def default_policy_line(address: str, timeout_s: float = 5.0, security=None) -> str:
    """What answers requests that name no policy (DescribePolicy ""), in one line."""
    import grpc

    from blockpilot.serving.security import ClientSecurity
    from blockpilot.v1 import policy_pb2, policy_pb2_grpc

    security = security or ClientSecurity()
    with security.channel(address) as channel:
        try:
            spec = policy_pb2_grpc.PolicyStub(channel).DescribePolicy(policy_pb2.DescribePolicyRequest(), timeout=timeout_s,
                                                                      metadata=security.metadata())
        except grpc.RpcError as err:
            return f"default policy unknown (DescribePolicy failed: {err.code().name} {err.details()})"
    versions = ", ".join(spec.policy_versions)
    if spec.fallback_reason == "default_policy_not_loaded":
        return (f"default policy {spec.policy} is not in the repository: the fixed default block size answers "
                f"({versions}; responses say default_policy_not_loaded)")
    routed = f" (experiment {spec.experiment})" if spec.experiment else ""
    features = ", ".join(f"{f.kind}[{f.dim}]" for f in spec.features) or "no features"
    return f"default policy {spec.policy}{routed}: {versions} ({features})"


def wait_serving(address: str, service: str, deadline: float, pid: int | None = None, security=None) -> None:
    while time.monotonic() < deadline:
        if health_status(address, service, security=security) == "SERVING":
            return
        if pid is not None and not pid_alive(pid):
            raise UnavailableError(f"{service or address} exited before it was SERVING")
        time.sleep(0.3)
    raise UnavailableError(f"{service or address} was not SERVING within the timeout")


REDIS_USER = "blockpilot"
# The key patterns the services use (verifier: sessions; policy: statistics, the outcome stream, the
# experiments) and the commands they run, as one ACL rule; `up --secure` gives its Redis this user.
REDIS_ACL_RULE = "~bp:* -@all +@read +@write +@keyspace +@stream +@scripting +@connection +@transaction -@dangerous"


def with_redis_user(url: str, user: str, password: str) -> str:
    parsed = urlparse(url)
    return parsed._replace(netloc=f"{user}:{password}@{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}").geturl()


def _start_redis(url: str, folder: Path, password: str | None = None) -> int:
    """Start redis-server for `url`; with a password, its default user is off and REDIS_USER may
    touch only the services' keys (REDIS_ACL_RULE)."""
    parsed = urlparse(url)
    port = parsed.port or 6379
    host = parsed.hostname or "127.0.0.1"
    command = ["redis-server", "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(folder)]
    if password is not None:
        from blockpilot.serving.certs import write_private

        acl = write_private(folder / "redis-users.acl", f"user default off\nuser {REDIS_USER} on >{password} {REDIS_ACL_RULE}\n".encode())
        command += ["--aclfile", str(acl)]
        url = with_redis_user(url, REDIS_USER, password)
    process = subprocess.Popen(command, stdout=open(folder / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redis_answers(url):
            return process.pid
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise UnavailableError(f"redis-server did not start on {host}:{port} (see {folder / 'redis.log'})")


def _service_env(name: str, opts: StackOptions, redis_url: str, secure: dict[str, Path] | None = None) -> dict[str, str]:
    port = getattr(opts, f"{name}_port")
    values = {"host": opts.host, "port": port, "metrics_port": getattr(opts, f"{name}_metrics_port")}
    if name == "gateway":  # HTTPS with the stack's server certificate; the verifier is called over TLS
        values["verifier_address"] = f"{opts.host}:{opts.verifier_port}"
        if secure is not None:
            values.update(tls_cert=secure["server_cert"], tls_key=secure["server_key"], client_tls_ca=secure["ca"],
                          client_tls_cert=secure["client_cert"], client_tls_key=secure["client_key"])
    elif secure is not None:
        values.update(tls_cert=secure["server_cert"], tls_key=secure["server_key"], token_file=secure["token"],
                      admin_token_file=secure["admin_token"])
        if name != "verifier":  # internal services take only the services' client certificate
            values["tls_client_ca"] = secure["ca"]
        else:
            values.update(client_tls_ca=secure["ca"], client_tls_cert=secure["client_cert"], client_tls_key=secure["client_key"],
                          client_token_file=secure["token"])
    if name in ("verifier", "drafter"):
        values.update({key: getattr(opts, key) for key in ("dtype", "device") if getattr(opts, key)})
    if name == "verifier":
        values.update(target=opts.target, redis_url=redis_url, threads=opts.threads,
                      drafter_address=f"{opts.host}:{opts.drafter_port}", policy_address=f"{opts.host}:{opts.policy_port}")
        if opts.backend:
            values["backend"] = opts.backend
        if opts.precision:
            values["precision"] = opts.precision
        from blockpilot.backends.loader import served_drafter_layers  # torch: only when a verifier starts

        layers = served_drafter_layers(opts.target, opts.drafter)
        if layers is not None:
            values["onnx_layers"] = ",".join(map(str, layers))
    elif name == "drafter":
        values.update(target=opts.target, drafter=opts.drafter, threads=opts.threads)
    else:
        values.update(redis_url=redis_url)
    env = dict(os.environ)
    env.update({f"BLOCKPILOT_{name.upper()}_{k.upper()}": str(v) for k, v in values.items()})
    return env


def _spawn(name: str, opts: StackOptions, redis_url: str, secure: dict[str, Path] | None, folder: Path) -> dict:
    """Start one service process (not waiting for it); returns its state entry."""
    log_path = folder / f"{name}.log"
    process = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=_service_env(name, opts, redis_url, secure),
                               stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                               cwd=str(Path(__file__).resolve().parents[2]))
    (folder / f"{name}.pid").write_text(str(process.pid))
    return {"pid": process.pid, "address": f"{opts.host}:{getattr(opts, f'{name}_port')}", "log": str(log_path),
            "metrics": f"http://{opts.host}:{getattr(opts, f'{name}_metrics_port')}/metrics"}


def http_health(address: str, security=None, timeout_s: float = 2.0) -> str:
    """SERVING (GET /health answers 200) / NOT_SERVING (another status) / DOWN (no answer) of an
    HTTP service; over HTTPS when `security` (a ClientSecurity) has a CA."""
    import ssl
    import urllib.error
    import urllib.request

    tls = security is not None and security.tls
    context = ssl.create_default_context(cafile=security.tls_ca) if tls else None
    try:
        with urllib.request.urlopen(f"{'https' if tls else 'http'}://{address}/health", timeout=timeout_s, context=context):
            return "SERVING"
    except urllib.error.HTTPError:
        return "NOT_SERVING"
    except OSError:
        return "DOWN"


def service_health(name: str, address: str, security=None) -> str:
    """SERVING / NOT_SERVING / UNKNOWN / DOWN of one of the stack's services."""
    if name in HTTP_SERVICES:
        return http_health(address, security)
    return health_status(address, f"blockpilot.v1.{name.capitalize()}", security=security)


def _wait_service(name: str, entry: dict, deadline: float, security) -> None:
    try:
        if name in HTTP_SERVICES:
            while service_health(name, entry["address"], security) != "SERVING":
                if not pid_alive(entry["pid"]):
                    raise UnavailableError(f"{name} exited before it was SERVING")
                if time.monotonic() > deadline:
                    raise UnavailableError(f"{name} was not SERVING within the timeout")
                time.sleep(0.3)
        else:
            wait_serving(entry["address"], f"blockpilot.v1.{name.capitalize()}", deadline, entry["pid"], security)
    except UnavailableError as err:
        tail = Path(entry["log"]).read_text(errors="replace").strip().splitlines()[-5:]
        raise UnavailableError(f"{err}; last lines of {entry['log']}: " + " | ".join(tail)) from None


def check_verifier_placement(opts: StackOptions) -> None:
    """The verifier's dtype, device and backend as it will start (the flags over its environment),
    checked before anything starts: a device for a graph backend is one line here, not a service
    log after the wait."""
    from blockpilot.config import VerifierServiceConfig, load_config
    from blockpilot.models.placement import Placement, check_backend_placement

    flags = {f"BLOCKPILOT_VERIFIER_{name.upper()}": getattr(opts, name) for name in ("backend", "dtype", "device")
             if getattr(opts, name)}
    config = load_config(VerifierServiceConfig, [], env={**os.environ, **flags})
    check_backend_placement(Placement(config.dtype, config.device), config.backend)


def up(opts: StackOptions, log=print) -> dict:
    """Start the stack; returns its state. Raises FailedPreconditionError if it already runs."""
    check_verifier_placement(opts)
    state = read_state()
    if state and any(pid_alive(s["pid"]) for s in state.get("services", {}).values()):
        raise FailedPreconditionError(f"the stack is already running (run dir {run_dir()}); `blockpilot down` first")
    folder = run_dir()
    for name in SERVICES:
        port = getattr(opts, f"{name}_port")
        with socket.socket() as sock:
            if sock.connect_ex((opts.host, port)) == 0:
                raise FailedPreconditionError(f"port {opts.host}:{port} for the {name} is already in use")
    state = {"run_dir": str(folder), "services": {}, "redis": {"url": opts.redis_url, "pid": None}, "secure": opts.secure}
    secure = secure_material(folder / "secure") if opts.secure else None
    security = stack_security(state)
    redis_url = opts.redis_url
    if not redis_answers(redis_url):
        if shutil.which("redis-server"):
            password = secure["redis_password"].read_text().strip() if secure else None
            state["redis"]["pid"] = _start_redis(redis_url, folder, password)
            if password is not None:  # the services' URL carries the user and password; what is printed does not
                redis_url = with_redis_user(redis_url, REDIS_USER, password)
                state["redis"]["user"] = REDIS_USER
            log(f"redis      {opts.redis_url} (started, pid {state['redis']['pid']}{', ACL user ' + REDIS_USER if secure else ''})")
        else:
            log(f"warning: no Redis answers on {redis_url} and redis-server is not installed: "
                "the services use in-memory stores (sessions live in the verifier process only)")
            redis_url = "memory"
            state["redis"]["url"] = "memory"
    else:
        log(f"redis      {redis_url} (already running)")
        if secure is not None:
            log("warning: --secure uses the Redis already running as it is configured; put its user and password in "
                "--redis-url (redis://USER:PASSWORD@HOST:PORT/0, or rediss:// for TLS)")
    _state_file().write_text(json.dumps(state, indent=2))
    deadline = time.monotonic() + opts.timeout_s
    try:
        for name in SERVICES:
            state["services"][name] = _spawn(name, opts, redis_url, secure, folder)
            _state_file().write_text(json.dumps(state, indent=2))
        for name in SERVICES:
            entry = state["services"][name]
            _wait_service(name, entry, deadline, security)
            log(f"{name:<10} {entry['address']} SERVING (pid {entry['pid']}, metrics {entry['metrics']})")
            if name == "policy":
                log(f"{'':<10} {default_policy_line(entry['address'], security=stack_security(state, token=True))}")
    except BaseException:
        down(log=lambda *_: None)
        raise
    if secure is not None:
        log(f"secure     TLS + tokens: clients take --tls-ca {secure['ca']} --token-file {secure['token']} "
            f"(admin token: {secure['admin_token']})")
    return state


def down(grace_s: float = 15.0, log=print) -> int:
    """Stop what `up` started (services in reverse order, then Redis if it started it)."""
    state = read_state()
    if state is None:
        log("nothing to stop (no stack state in the run dir)")
        return 0
    entries = [(name, state["services"][name]["pid"]) for name in reversed(SERVICES) if name in state.get("services", {})]
    if state.get("redis", {}).get("pid"):
        entries.append(("redis", state["redis"]["pid"]))
    for name, pid in entries:
        if not pid_alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            log(f"{name:<10} killed (pid {pid}) after {grace_s:.0f} s")
        else:
            log(f"{name:<10} stopped (pid {pid})")
    folder = run_dir()
    for name in SERVICES:
        (folder / f"{name}.pid").unlink(missing_ok=True)
    _state_file().unlink(missing_ok=True)
    return 0


def status(log=print) -> int:
    """Print each service's health; 0 when all are SERVING."""
    state = read_state()
    if state is None:
        log("the stack is not running (no stack state in the run dir)")
        return 1
    ok = True
    for name in SERVICES:
        entry = state["services"].get(name)
        if entry is None:
            ok = False
            log(f"{name:<10} not started")
            continue
        health = service_health(name, entry["address"], stack_security(state))
        alive = pid_alive(entry["pid"])
        ok &= health == "SERVING"
        log(f"{name:<10} {entry['address']} {health} (pid {entry['pid']} {'alive' if alive else 'gone'})")
        if name == "verifier" and health == "SERVING":
            for line in server_info_lines(entry["address"], stack_security(state, token=True)):
                log(f"{'':<10} {line}")
    url = stack_redis_url(state)
    redis_ok = url == "memory" or redis_answers(url)
    log(f"{'redis':<10} {state.get('redis', {}).get('url')} {'answers' if redis_ok else 'DOWN'}")
    return 0 if ok else 1


def server_info_lines(address: str, security) -> list[str]:
    """The verifier's GetServerInfo as `status` prints it (or the error that answered)."""
    from blockpilot.client import BlockPilotClient
    from blockpilot.errors import BlockPilotError

    with BlockPilotClient(address, security=security) as client:
        try:
            i = client.server_info(timeout=5.0)
        except BlockPilotError as err:
            return [f"server info: {err}"]
    drafter = (f"drafter {i.drafter} (block size {i.drafter_block_size}, max {i.drafter_max_block_size})" if i.drafter_block_size
               else f"drafter {i.drafter or '(not answering)'}")
    limits = i.limits
    return [f"target {i.target} on {i.backend} ({i.precision}), {drafter}, default policy {i.default_policy or '(not answering)'}, "
            f"blockpilot {i.version}",
            f"limits: context {limits.context_length} tokens, prompt {limits.max_prompt_tokens}, max new tokens "
            f"{limits.max_new_tokens} (default {limits.default_max_new_tokens}), {limits.max_streams} streams, "
            f"block size <= {limits.max_block_size}",
            f"prompt lookup corpus: {i.lookup_corpus} ({i.lookup_corpus_trigrams} trigrams, {i.lookup_corpus_bigrams} bigrams)"
            if i.lookup_corpus else "prompt lookup corpus: none"]


def stack_redis_url(state: dict) -> str:
    """The Redis URL the stack's services use ('memory' when they have none): for a Redis that
    `up --secure` started, with its user and the password from <run dir>/secure/."""
    redis = state.get("redis", {})
    url = redis["url"]
    if redis.get("user") and url != "memory":
        password = (Path(state["run_dir"]) / "secure" / SECURE_FILES["redis_password"]).read_text().strip()
        url = with_redis_user(url, redis["user"], password)
    return url


def stop_service(name: str, *, kill: bool = False, grace_s: float = 15.0) -> int:
    """Stop one part of the running stack (a service or 'redis'): SIGTERM (its drain; SIGKILL
    after grace_s) or, with kill=True, SIGKILL at once (a crash). Returns the pid stopped. The
    state keeps its entry so that start_service can start it again."""
    state = read_state()
    if state is None:
        raise FailedPreconditionError(f"the stack is not running (no stack state in {run_dir()})")
    pid = state["redis"]["pid"] if name == "redis" else state["services"][name]["pid"]
    if not pid or not pid_alive(pid):
        raise FailedPreconditionError(f"{name} is not running")
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise UnavailableError(f"{name} (pid {pid}) did not exit after SIGKILL")
            time.sleep(0.05)
    return pid


def start_service(name: str, opts: StackOptions, timeout_s: float | None = None) -> int:
    """Start one stopped part of the running stack again (a service or 'redis') with the settings
    `up` gave it (opts: the ones given to `up`); waits until it is SERVING (Redis: answers).
    Returns its new pid."""
    state = read_state()
    if state is None:
        raise FailedPreconditionError(f"the stack is not running (no stack state in {run_dir()})")
    folder = Path(state["run_dir"])
    secure = secure_material(folder / "secure") if state.get("secure") else None
    if name == "redis":
        if not state["redis"]["pid"]:
            raise FailedPreconditionError("the stack's Redis was not started by `up`, so it cannot restart it")
        password = secure["redis_password"].read_text().strip() if secure and state["redis"].get("user") else None
        pid = state["redis"]["pid"] = _start_redis(state["redis"]["url"], folder, password)
    else:
        entry = state["services"][name] = _spawn(name, opts, stack_redis_url(state), secure, folder)
        pid = entry["pid"]
    _state_file().write_text(json.dumps(state, indent=2))  # before the wait: `down` stops it even if the wait fails
    if name != "redis":
        _wait_service(name, entry, time.monotonic() + (opts.timeout_s if timeout_s is None else timeout_s), stack_security(state))
    return pid
