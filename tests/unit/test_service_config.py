"""Service config: precedence flags > env > file > defaults; bad values quoted with their source."""

from __future__ import annotations

import json
import math

import pytest

from blockpilot.config import (DrafterServiceConfig, PolicyServiceConfig, VerifierServiceConfig, describe, env_name,
                               load_config)
from blockpilot.backends import DEFAULT_VERIFIER_BACKEND
from blockpilot.errors import InvalidArgumentError


def test_defaults_match_the_shared_contract():
    v, d, p = (load_config(c, [], env={}) for c in (VerifierServiceConfig, DrafterServiceConfig, PolicyServiceConfig))
    assert (v.port, v.metrics_port, d.port, d.metrics_port, p.port, p.metrics_port) == (50051, 9101, 50052, 9102, 50053, 9103)
    assert v.drafter_address == "127.0.0.1:50052" and v.policy_address == "127.0.0.1:50053"
    assert env_name("verifier", "redis_url") == "BLOCKPILOT_VERIFIER_REDIS_URL"
    assert all(field["help"] for cls in (VerifierServiceConfig, DrafterServiceConfig, PolicyServiceConfig) for field in describe(cls))
    # config.py spells the backend names out (it does not import the backends): keep them in step.
    assert v.backend == DEFAULT_VERIFIER_BACKEND == "onnxruntime"


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    config_file = tmp_path / "verifier.toml"
    config_file.write_text('port = 1111\nmetrics_port = 2222\ntarget = "/models/a"\nthreads = 3\n')
    env = {"BLOCKPILOT_VERIFIER_PORT": "3333", "BLOCKPILOT_VERIFIER_TARGET": "/models/b"}
    cfg = load_config(VerifierServiceConfig, ["--config", str(config_file), "--port", "4444"], env=env)
    assert cfg.port == 4444  # flag
    assert cfg.target == "/models/b"  # env over file
    assert cfg.metrics_port == 2222 and cfg.threads == 3  # file over defaults
    assert cfg.redis_url == "redis://127.0.0.1:6379/0"  # default
    with pytest.raises(Exception):
        object.__setattr__  # noqa: B018 - the dataclass is frozen:
        cfg.port = 1  # type: ignore[misc]


def test_json_file_with_a_service_table(tmp_path):
    path = tmp_path / "all.json"
    path.write_text(json.dumps({"policy": {"default_block_size": 6}, "drafter": {"drafter": "random"}}))
    assert load_config(PolicyServiceConfig, ["--config", str(path)], env={}).default_block_size == 6
    assert load_config(DrafterServiceConfig, [], env={"BLOCKPILOT_DRAFTER_CONFIG": str(path)}).drafter == "random"


@pytest.mark.parametrize(
    "argv, env, fragment",
    [
        ([], {"BLOCKPILOT_VERIFIER_PORT": "70000"}, "port must be a port number in 1..65535, got 70000 (from env BLOCKPILOT_VERIFIER_PORT)"),
        (["--port", "abc"], {}, "port expects int, got 'abc' (from flag --port)"),
        (["--policy-timeout-s", "nan"], {}, "policy_timeout_s must be a finite number"),
        (["--redis-url", "http://x"], {}, "redis_url must be a redis:// URL"),
        (["--drafter-address", "nohostport"], {}, "got 'nohostport'"),
        (["--log-level", "LOUD"], {}, "log_level must be one of"),
        (["--max-streams", "0"], {}, "max_streams must be a finite number >= 1, got 0"),
    ],
)
def test_bad_values_are_quoted_with_their_source(argv, env, fragment):
    with pytest.raises(InvalidArgumentError) as info:
        load_config(VerifierServiceConfig, argv, env=env)
    assert fragment in str(info.value)


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [")
    with pytest.raises(InvalidArgumentError, match="not valid TOML"):
        load_config(VerifierServiceConfig, ["--config", str(bad)], env={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prot = 1\n")
    with pytest.raises(InvalidArgumentError, match=r"unknown verifier setting\(s\) \['prot'\]"):
        load_config(VerifierServiceConfig, ["--config", str(unknown)], env={})
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_config(VerifierServiceConfig, ["--config", str(tmp_path / "missing.toml")], env={})
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text('port = "x"\n')
    with pytest.raises(InvalidArgumentError, match=f"from config file {wrong_type}"):
        load_config(VerifierServiceConfig, ["--config", str(wrong_type)], env={})


def test_direct_construction_is_validated_too():
    with pytest.raises(InvalidArgumentError, match="got -1"):
        DrafterServiceConfig(port=-1)
    assert math.isclose(DrafterServiceConfig(step_delay_s=0.5).step_delay_s, 0.5)


def test_prompt_lookup_is_on_by_default_and_switchable():
    assert load_config(VerifierServiceConfig, [], env={}).prompt_lookup is True
    assert load_config(VerifierServiceConfig, [], env={"BLOCKPILOT_VERIFIER_PROMPT_LOOKUP": "off"}).prompt_lookup is False
    assert load_config(VerifierServiceConfig, ["--prompt-lookup", "false"], env={}).prompt_lookup is False
    with pytest.raises(InvalidArgumentError, match="prompt_lookup"):
        load_config(VerifierServiceConfig, [], env={"BLOCKPILOT_VERIFIER_PROMPT_LOOKUP": "maybe"})


def test_ragged_batches_auto_is_per_backend():
    from blockpilot.serving.verifier import ragged_batches

    assert ragged_batches("auto", "torch") and not ragged_batches("auto", "onnxruntime")
    assert ragged_batches("on", "onnxruntime") and not ragged_batches("off", "torch")


def test_tracing_export_is_off_by_default_and_the_endpoint_is_checked():
    from blockpilot.config import GatewayServiceConfig

    for cls in (VerifierServiceConfig, DrafterServiceConfig, PolicyServiceConfig, GatewayServiceConfig):
        cfg = load_config(cls, [], env={})
        assert (cfg.otlp_endpoint, cfg.trace_file) == ("", "")
        on = load_config(cls, [], env={env_name(cls.SERVICE, "otlp_endpoint"): "http://jaeger:4317"})
        assert on.otlp_endpoint == "http://jaeger:4317"
    with pytest.raises(InvalidArgumentError, match="otlp_endpoint must be an http:// .* got 'jaeger:4317'"):
        load_config(PolicyServiceConfig, ["--otlp-endpoint", "jaeger:4317"], env={})
