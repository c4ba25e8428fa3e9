"""Service configuration: one frozen dataclass per service and one loader for all of them.

Precedence, highest first: command-line flags (`--port 50061`) > environment variables
(`BLOCKPILOT_<SERVICE>_<FIELD>`, e.g. BLOCKPILOT_VERIFIER_PORT) > a config file (`--config FILE`,
TOML or JSON; either flat `field = value` pairs or a table named after the service) > defaults.
Every value is checked whatever its source; a bad one raises InvalidArgumentError that quotes the
value and says where it came from. `python -m services.<name> --help` lists every field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from blockpilot.errors import InvalidArgumentError
from blockpilot.models.placement import DEFAULT_DEVICE, DEFAULT_DTYPE, device_problem, dtype_problem
from blockpilot.policy.metadata import POLICY_NAME, SHIPPED_POLICY_NAME

Check = Callable[[Any], str | None]  # returns what is wrong, or None


def _port(allow_zero: bool = False) -> Check:
    low = 0 if allow_zero else 1
    return lambda v: None if low <= v <= 65535 else f"must be a port number in {low}..65535"


def _at_least(low: float) -> Check:
    return lambda v: None if v >= low and (not isinstance(v, float) or math.isfinite(v)) else f"must be a finite number >= {low}"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {list(choices)}"


def _redis_url(v: str) -> str | None:
    if v in ("", "memory") or v.startswith(("redis://", "rediss://", "unix://")):
        return None
    return "must be a redis:// URL, or 'memory' for the in-process store"


def _address(v: str) -> str | None:
    if v == "" or (":" in v and v.rsplit(":", 1)[1].isdigit()):
        return None
    return "must be HOST:PORT (or empty)"


def _json_object(v: str) -> str | None:
    if not v.strip():
        return None
    try:
        value = json.loads(v)
    except json.JSONDecodeError:
        return "must be a JSON object, e.g. '{\"enable_thinking\": false}'"
    return None if isinstance(value, dict) else "must be a JSON object, e.g. '{\"enable_thinking\": false}'"


def _file_or_empty(v: str) -> str | None:
    return None if v == "" or Path(v).expanduser().is_file() else "is not a readable file"


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _otlp_endpoint(v: str) -> str | None:
    return None if v == "" or v.startswith(("http://", "https://")) else \
        "must be an http:// (plaintext) or https:// (TLS) URL of an OTLP/gRPC collector, e.g. http://jaeger:4317, or empty"


def _policy_name(v: str) -> str | None:
    return None if POLICY_NAME.fullmatch(v) else f"must be a policy name ({POLICY_NAME.pattern})"


def opt(default: Any, help: str, check: Check | None = None) -> Any:
    """A documented config field."""
    return field(default=default, metadata={"help": help, "check": check})


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Tracing (blockpilot.serving.tracing), the same two fields in every service.
OTLP_HELP = ("OTLP/gRPC collector spans are exported to, e.g. http://jaeger:4317 ('' = no export; OTEL_EXPORTER_OTLP_* "
             "variables set its headers, TLS files, timeout)")
TRACE_FILE_HELP = "append finished spans to this file, one JSON object per line (debugging, tests; '' = none)"

# gRPC connection age (drafter, policy): clients hold one connection each, so a replica added by a
# scale-up gets work only from connections opened after it; ending connections by age re-balances.
MAX_CONNECTION_AGE_HELP = ("close each client connection after about this long (GOAWAY, +-10 % jitter; the client "
                           "reconnects, through a load-balanced address possibly to a newer replica; 0 = never)")
MAX_CONNECTION_AGE_GRACE_HELP = ("after that, time the connection's calls in flight get to finish before it is cut "
                                 "(a cut Draft stream continues at block size 1)")


class ServiceConfig:
    """Base of the service configs: `SERVICE` names the env prefix; fields are checked on creation."""

    SERVICE = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_field(self.SERVICE, f, getattr(self, f.name), "argument")


@dataclass(frozen=True)
class VerifierServiceConfig(ServiceConfig):
    """Verifier service (client-facing; owns the target and its KV caches)."""

    SERVICE = "verifier"
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 in containers)", _nonempty)
    port: int = opt(50051, "gRPC port", _port())
    metrics_port: int = opt(9101, "Prometheus /metrics HTTP port (0 = no metrics server)", _port(True))
    target: str = opt("default", "target model: 'default', a Hugging Face directory, a .gguf file or a Hugging Face "
                                 "repository id (ORG/NAME: from the Hugging Face cache, downloaded into it unless "
                                 "HF_HUB_OFFLINE=1)", _nonempty)
    drafter_address: str = opt("127.0.0.1:50052", "drafter service HOST:PORT ('' = no drafter, block size 1)", _address)
    policy_address: str = opt("127.0.0.1:50053", "policy service HOST:PORT ('' = in-process fixed policy)", _address)
    redis_url: str = opt("redis://127.0.0.1:6379/0", "session store: redis:// URL or 'memory' (in-process, one replica only)", _redis_url)
    default_block_size: int = opt(0, "block size when the policy is unreachable (0 = the drafter's trained size)", _at_least(0))
    prompt_lookup: bool = opt(True, "verify prompt-lookup drafts (a copy of what followed an earlier occurrence of the "
                                    "last tokens) instead of a drafter pass when a request leaves prompt_lookup unset")
    lookup_corpus: str = opt("auto", "corpus n-grams prompt lookup proposes from where the request's own text has no "
                                     "match of 2+ tokens: 'auto' (the shipped table of the default target's own "
                                     "responses, used only for the weights it was counted over), 'none', or a table "
                                     "folder (`blockpilot drafter corpus`)", _nonempty)
    chat_template_kwargs: str = opt("", "JSON object of chat-template arguments for `messages` prompts, over those the "
                                        "drafter's config.json names (its Describe reply) and under a request's own "
                                        "(e.g. '{\"enable_thinking\": false}' for a Qwen3 target whose drafter was trained "
                                        "on non-thinking replies; '' = none)", _json_object)
    default_max_new_tokens: int = opt(128, "max_new_tokens when a request leaves it unset", _at_least(1))
    max_new_tokens_cap: int = opt(4096, "largest max_new_tokens a request may ask for", _at_least(1))
    max_streams: int = opt(16, "concurrent Generate streams (all decoded in one batch); more are refused RESOURCE_EXHAUSTED", _at_least(1))
    max_prompt_tokens: int = opt(0, "longest prompt a request may send, in tokens (0 = the target's context)", _at_least(0))
    prefill_chunk_tokens: int = opt(512, "prompt tokens prefilled per scheduler iteration: a long prompt delays the other "
                                         "streams' steps by one chunk at a time", _at_least(1))
    load_aware_drafts: bool = opt(True, "an AUTO request drafts only while its drafts pay for their cost in the pass it runs in "
                                        "(the speed gate: the backend's verify-cost curve scaled by measured passes, its own "
                                        "acceptance; FIXED / OFF sizes and seeded sampling by the p/q rule are left as given)")
    ragged_batches: str = opt("auto", "'on': one target pass per iteration over every session (torch, onnxruntime); 'off': one "
                              "pass per session, sessions' passes on different cores at once; 'auto': on for torch, off for "
                              "onnxruntime (measured: see README, Which backend to serve; rerun `blockpilot bench` to choose)",
                              _one_of("auto", "on", "off"))
    batch_row_tokens: int = opt(1024, "tokens per stream the batch's KV pool holds at first (it grows for longer "
                                      "requests, up to the context)", _at_least(16))
    max_sessions: int = opt(64, "sessions whose target KV cache is kept for follow-up turns (LRU)", _at_least(0))
    session_ttl_s: float = opt(1800.0, "idle time after which a session expires (local cache and Redis keys)", _at_least(1))
    session_lease_s: float = opt(30.0, "a running turn holds its session this long past its last renewal (renewed every third "
                                 "of it): a crashed verifier's sessions can be continued elsewhere within it", _at_least(1))
    drafter_timeout_s: float = opt(10.0, "longest wait for one draft step or for opening a draft stream", _at_least(0.01))
    drafter_connect_timeout_s: float = opt(1.0, "longest wait for a connection to the drafter replica a session's record "
                                                "names (its kept draft cache); past it the turn drafts through "
                                                "drafter_address and the cache is rebuilt", _at_least(0.01))
    drafter_replica_channels: int = opt(16, "connections kept open to individual drafter replicas for session routing "
                                            "(least recently used closed first; one still carrying a stream closes "
                                            "when it ends)", _at_least(1))
    policy_timeout_s: float = opt(2.0, "longest wait for a policy decision", _at_least(0.01))
    redis_timeout_s: float = opt(0.5, "socket timeout of Redis calls (the store fails open after it)", _at_least(0.01))
    grace_s: float = opt(10.0, "on SIGTERM: time in-flight streams get to finish", _at_least(0))
    threads: int = opt(1, "torch CPU threads of the decode loop", _at_least(1))
    # The names of blockpilot.backends.BACKENDS (spelled out: this module does not import the backends).
    backend: str = opt("onnxruntime", "verifier backend: 'onnxruntime' (default; the engine's exported graph, exported once "
                                      "into $BLOCKPILOT_CACHE/onnx; CPU, or CUDA with the gpu extra), 'torch' (the engine "
                                      "itself, no export) or 'tensorrt' (needs the gpu extra and an NVIDIA GPU)", _one_of("torch", "onnxruntime", "tensorrt"))
    precision: str = opt("auto", "numeric precision of the onnxruntime backend on the CPU: 'int4' (a GGUF's own 4-bit "
                                 "codes; output then equals the int4 backend's own plain decoding), 'fp32', or 'auto' "
                                 "(int4 for a target converted from a GGUF of Q4_1/Q8_0 codes, e.g. the default model; else fp32)",
                         _one_of("auto", "fp32", "int4"))
    onnx_path: str = opt("", "ONNX export folder (`blockpilot export onnx`) for the onnxruntime/tensorrt backends "
                             "('' = export on demand into $BLOCKPILOT_CACHE/onnx)")
    onnx_layers: str = opt("", "target layers an on-demand export returns: the drafter's target_layer_ids, e.g. '1,9,17' "
                               "('' = the shipped drafter's for the default target, else DFlash's one-layer default)",
                           lambda v: None if all(p.isdigit() for p in v.replace(",", " ").split())
                           else "must be layer ids separated by commas, e.g. '1,9,17'")
    dtype: str = opt(DEFAULT_DTYPE, "precision of the target's weights and KV caches, 'float32', 'bfloat16' or 'float16' "
                                    "(output equals the same dtype's own block-size-1 output); the graph backends run an "
                                    "export of this dtype (ONNX Runtime's CPU provider: float32 or float16)", dtype_problem)
    device: str = opt(DEFAULT_DEVICE, "backend torch: where the target's weights and KV caches live, 'cpu', 'cuda' or "
                                      "'cuda:N' (a GPU torch does not see is refused at start; the graph backends take "
                                      "'cpu' only and pick their own device)", device_problem)
    replica_id: str = opt("", "this replica's id in Redis ('' = HOSTNAME:port)")
    log_level: str = opt("INFO", "logging level", _one_of(*LOG_LEVELS))
    otlp_endpoint: str = opt("", OTLP_HELP, _otlp_endpoint)
    trace_file: str = opt("", TRACE_FILE_HELP)
    tls_cert: str = opt("", "PEM certificate chain: serve TLS (with tls_key; re-read when it changes)", _file_or_empty)
    tls_key: str = opt("", "PEM private key of tls_cert", _file_or_empty)
    tls_client_ca: str = opt("", "PEM CA: require client certificates it signed (mTLS)", _file_or_empty)
    token_file: str = opt("", "data-plane bearer tokens, one per line (calls need 'authorization: Bearer <token>'; '' = none)", _file_or_empty)
    admin_token_file: str = opt("", "admin bearer tokens (admin RPCs, e.g. policy Reload; they may call the data plane too)", _file_or_empty)
    client_tls_ca: str = opt("", "PEM CA this service trusts when it calls the drafter and policy services (TLS on)", _file_or_empty)
    client_tls_cert: str = opt("", "PEM client certificate it presents to them (mTLS, with client_tls_key)", _file_or_empty)
    client_tls_key: str = opt("", "PEM key of client_tls_cert", _file_or_empty)
    client_token_file: str = opt("", "bearer token file it sends to them (the first token)", _file_or_empty)


@dataclass(frozen=True)
class DrafterServiceConfig(ServiceConfig):
    """Drafter service (DFlash drafter bound to the target's embedding and lm_head)."""

    SERVICE = "drafter"
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 in containers)", _nonempty)
    port: int = opt(50052, "gRPC port", _port())
    metrics_port: int = opt(9102, "Prometheus /metrics HTTP port (0 = no metrics server)", _port(True))
    target: str = opt("default", "target model the drafter is bound to (same value as the verifier's); only its "
                                 "embedding and lm_head are loaded", _nonempty)
    drafter: str = opt("", "'' = the engine's default (the shipped drafter of the default target, else none), "
                           "'random', 'none', a DFlash checkpoint directory or a Hugging Face repository id (ORG/NAME)")
    random_block_size: int = opt(8, "block size of the 'random' drafter", _at_least(2))
    max_sessions: int = opt(64, "concurrent draft sessions; more are refused RESOURCE_EXHAUSTED", _at_least(1))
    max_batch_sessions: int = opt(64, "most sessions whose draft steps run as one drafter pass (steps that arrive "
                                      "while a pass runs go together in the next; 1 = one pass per step)", _at_least(1))
    max_kept_sessions: int = opt(64, "draft caches kept after a session's stream ends, for its next turn "
                                     "(LRU; 0 = free every cache when its stream ends)", _at_least(0))
    kept_session_ttl_s: float = opt(600.0, "idle time after which a kept draft cache is freed", _at_least(0.1))
    grace_s: float = opt(10.0, "on SIGTERM: time in-flight streams get to finish", _at_least(0))
    threads: int = opt(1, "torch CPU threads", _at_least(1))
    dtype: str = opt(DEFAULT_DTYPE, "precision of the drafter, its draft caches and the target's embedding and lm_head: "
                                    "'float32' (on the CPU the drafter then runs in the machine's cheaper draft precision, "
                                    "int8 or bf16), 'bfloat16' or 'float16' (the drafter runs as loaded)", dtype_problem)
    device: str = opt(DEFAULT_DEVICE, "where the drafter and its caches live: 'cpu', 'cuda' or 'cuda:N' (a GPU torch "
                                      "does not see is refused at start)", device_problem)
    step_delay_s: float = opt(0.0, "artificial delay per drafter pass (fault-injection tests only)", _at_least(0))
    replica_id: str = opt("", "this replica's id ('' = HOSTNAME:port)")
    advertise_address: str = opt("", "HOST:PORT at which other services reach this replica directly, not through a "
                                     "load-balanced address: verifiers record it with a session's kept draft cache and "
                                     "open the session's next Draft stream there ('' = not routable)", _address)
    max_connection_age_s: float = opt(300.0, MAX_CONNECTION_AGE_HELP, _at_least(0))
    # A Draft stream lives as long as its generation: the grace matches the gateway's request_timeout_s.
    max_connection_age_grace_s: float = opt(300.0, MAX_CONNECTION_AGE_GRACE_HELP, _at_least(0))
    log_level: str = opt("INFO", "logging level", _one_of(*LOG_LEVELS))
    otlp_endpoint: str = opt("", OTLP_HELP, _otlp_endpoint)
    trace_file: str = opt("", TRACE_FILE_HELP)
    tls_cert: str = opt("", "PEM certificate chain: serve TLS (with tls_key; re-read when it changes)", _file_or_empty)
    tls_key: str = opt("", "PEM private key of tls_cert", _file_or_empty)
    tls_client_ca: str = opt("", "PEM CA: require client certificates it signed (mTLS)", _file_or_empty)
    token_file: str = opt("", "data-plane bearer tokens, one per line (calls need 'authorization: Bearer <token>'; '' = none)", _file_or_empty)
    admin_token_file: str = opt("", "admin bearer tokens (admin RPCs, e.g. policy Reload; they may call the data plane too)", _file_or_empty)


@dataclass(frozen=True)
class PolicyServiceConfig(ServiceConfig):
    """Policy service (stateless block-size decisions; outcome statistics in Redis)."""

    SERVICE = "policy"
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 in containers)", _nonempty)
    port: int = opt(50053, "gRPC port", _port())
    metrics_port: int = opt(9103, "Prometheus /metrics HTTP port (0 = no metrics server)", _port(True))
    redis_url: str = opt("redis://127.0.0.1:6379/0", "where arm statistics and the outcome stream go: redis:// URL or 'memory'", _redis_url)
    default_block_size: int = opt(0, "block size of the default policy (0 = the drafter's trained size sent by the verifier)", _at_least(0))
    policy_version: str = opt("fixed-v1", "version reported with decisions of the fixed-size policies ('default', 'fixed-<n>')", _nonempty)
    repository: str = opt("", "policy repository folder (<name>/<version>/model.onnx + metadata.json; '' = the policies/ "
                              "folder of this checkout)")
    default_policy: str = opt(SHIPPED_POLICY_NAME, "policy (or experiment) that answers requests naming none; when it "
                                                   "is not loaded, the fixed default size answers and says so", _policy_name)
    poll_interval_s: float = opt(5.0, "how often the repository is rescanned for new versions (0 = only on a Reload call)",
                                 _at_least(0))
    onnx_providers: str = opt("auto", "ONNX Runtime providers: 'auto' (CUDA when onnxruntime-gpu and a GPU are present, "
                                      "else CPU), 'cpu' or 'cuda'", _one_of("auto", "cpu", "cuda"))
    spec_ttl_s: float = opt(5.0, "seconds verifiers may cache which features a policy needs (DescribePolicy)", _at_least(0))
    outcome_stream_maxlen: int = opt(100000, "outcomes kept in the Redis stream bp:outcomes (approximate)", _at_least(1))
    stats_ttl_s: float = opt(7 * 86400.0, "TTL of the statistics keys (refreshed on every write)", _at_least(1))
    decision_ttl_s: float = opt(3600.0, "how long an issued decision can be reported (once; Reports of other ids are refused)",
                                _at_least(1))
    redis_timeout_s: float = opt(0.5, "socket timeout of Redis calls (statistics fail open)", _at_least(0.01))
    grace_s: float = opt(5.0, "on SIGTERM: time in-flight calls get to finish", _at_least(0))
    decide_delay_s: float = opt(0.0, "artificial delay per Decide (fault-injection tests only)", _at_least(0))
    max_connection_age_s: float = opt(300.0, MAX_CONNECTION_AGE_HELP, _at_least(0))
    max_connection_age_grace_s: float = opt(30.0, MAX_CONNECTION_AGE_GRACE_HELP, _at_least(0))
    log_level: str = opt("INFO", "logging level", _one_of(*LOG_LEVELS))
    otlp_endpoint: str = opt("", OTLP_HELP, _otlp_endpoint)
    trace_file: str = opt("", TRACE_FILE_HELP)
    tls_cert: str = opt("", "PEM certificate chain: serve TLS (with tls_key; re-read when it changes)", _file_or_empty)
    tls_key: str = opt("", "PEM private key of tls_cert", _file_or_empty)
    tls_client_ca: str = opt("", "PEM CA: require client certificates it signed (mTLS)", _file_or_empty)
    token_file: str = opt("", "data-plane bearer tokens, one per line (calls need 'authorization: Bearer <token>'; '' = none)", _file_or_empty)
    admin_token_file: str = opt("", "admin bearer tokens (admin RPCs, e.g. policy Reload; they may call the data plane too)", _file_or_empty)


@dataclass(frozen=True)
class GatewayServiceConfig(ServiceConfig):
    """HTTP gateway (the OpenAI API: /v1/chat/completions, /v1/completions, /v1/models) in front of the verifier."""

    SERVICE = "gateway"
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 in containers)", _nonempty)
    port: int = opt(8000, "HTTP port (serves /metrics and /health too)", _port())
    metrics_port: int = opt(0, "Prometheus /metrics on a port of its own too, as the other services have (0 = only on the "
                               "HTTP port)", _port(True))
    verifier_address: str = opt("127.0.0.1:50051", "verifier service HOST:PORT", lambda v: _nonempty(v) or _address(v))
    model_name: str = opt("blockpilot", "model id listed by /v1/models; requests must name it in `model`", _nonempty)
    request_timeout_s: float = opt(300.0, "deadline of one generation, passed to the verifier (and on to every hop)",
                                   _at_least(0.01))
    grace_s: float = opt(10.0, "on SIGTERM: time in-flight requests get to finish", _at_least(0))
    log_level: str = opt("INFO", "logging level", _one_of(*LOG_LEVELS))
    otlp_endpoint: str = opt("", OTLP_HELP, _otlp_endpoint)
    trace_file: str = opt("", TRACE_FILE_HELP)
    tls_cert: str = opt("", "PEM certificate chain: serve HTTPS (with tls_key)", _file_or_empty)
    tls_key: str = opt("", "PEM private key of tls_cert", _file_or_empty)
    client_tls_ca: str = opt("", "PEM CA this gateway trusts when it calls the verifier (TLS on)", _file_or_empty)
    client_tls_cert: str = opt("", "PEM client certificate it presents to the verifier (mTLS, with client_tls_key)",
                               _file_or_empty)
    client_tls_key: str = opt("", "PEM key of client_tls_cert", _file_or_empty)


C = TypeVar("C", bound=ServiceConfig)


def env_name(service: str, name: str) -> str:
    return f"BLOCKPILOT_{service.upper()}_{name.upper()}"


def _convert(f: dataclasses.Field, raw: Any, service: str, source: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw.strip())
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if not isinstance(raw, str):
            raise ValueError
        return raw
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"{service} config: {f.name} expects {kind.__name__}, got {raw!r} (from {source})"
        ) from None


def _check_field(service: str, f: dataclasses.Field, value: Any, source: str) -> None:
    check = f.metadata.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise InvalidArgumentError(f"{service} config: {f.name} {problem}, got {value!r} (from {source})")


def read_config_file(path: str | Path, service: str) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidArgumentError(f"config file '{path}' does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise InvalidArgumentError(f"config file '{path}' is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {err}") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"config file '{path}' must hold a table/object of settings")
    if isinstance(data.get(service), dict):
        data = data[service]
    return data


def build_arg_parser(cls: type[C], prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip(), argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file with settings (flags and env override it)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, metavar=f.name.upper(),
                            help=f"{f.metadata.get('help', '')} [env {env_name(cls.SERVICE, f.name)}; default {f.default!r}]")
    return parser


def load_config(cls: type[C], argv: Sequence[str] | None = (), env: Mapping[str, str] | None = None,
                config_file: str | Path | None = None) -> C:
    """Build a `cls` from flags (`argv`), environment and config file, in that precedence.

    argv: command-line arguments (None = sys.argv[1:]); flags may also carry --config FILE.
    env: environment (None = os.environ).
    """
    service = cls.SERVICE
    parser = build_arg_parser(cls, f"python -m services.{service}")
    flags = vars(parser.parse_args(argv))
    env = os.environ if env is None else env
    config_file = flags.pop("config", None) or config_file or env.get(env_name(service, "config")) or None
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        data = read_config_file(config_file, service)
        unknown = sorted(set(data) - set(by_name))
        if unknown:
            raise InvalidArgumentError(f"config file '{config_file}': unknown {service} setting(s) {unknown}; known: {sorted(by_name)}")
        for name, raw in data.items():
            values[name] = (raw, f"config file {config_file}")
    for name in by_name:
        key = env_name(service, name)
        if key in env:
            values[name] = (env[key], f"env {key}")
    for name, raw in flags.items():
        values[name] = (raw, f"flag --{name.replace('_', '-')}")
    kwargs = {}
    for name, (raw, source) in values.items():
        f = by_name[name]
        value = _convert(f, raw, service, source)
        _check_field(service, f, value, source)
        kwargs[name] = value
    return cls(**kwargs)


def describe(cls: type[ServiceConfig]) -> list[dict[str, Any]]:
    """Field documentation (name, env variable, default, help) for docs and --help."""
    return [{"name": f.name, "env": env_name(cls.SERVICE, f.name), "default": f.default, "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(cls)]
