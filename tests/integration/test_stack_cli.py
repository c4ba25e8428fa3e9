"""`blockpilot up / status / generate --server / down` as a user runs them (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from redis_required import no_redis

from service_stack import free_port

pytestmark = pytest.mark.timeout(400)


def cli(*args, env, timeout=240):
    return subprocess.run([sys.executable, "-m", "blockpilot.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


def stack_flags():
    flags = []
    for name in ("verifier", "drafter", "policy"):
        flags += [f"--{name}-port", str(free_port()), f"--{name}-metrics-port", str(free_port())]
    return flags + ["--gateway-metrics-port", str(free_port()), "--gateway-port", str(free_port())]


def gateway_call(flags, path, body=None, token=None, ca=None):
    """(HTTP status, JSON body) of a gateway call (HTTPS when `ca` is given)."""
    import ssl
    import urllib.error
    import urllib.request

    url = f"{'https' if ca else 'http'}://127.0.0.1:{flags[-1]}{path}"
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers=headers)
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_up_status_generate_down_with_an_own_redis(tiny_llama_dir, tmp_path):
    if not __import__("shutil").which("redis-server"):
        no_redis("redis-server is not installed")
    env = {**os.environ, "BLOCKPILOT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("BLOCKPILOT_RUN_DIR", None)
    redis_port = free_port()  # nothing answers there: `up` starts its own redis-server
    flags = stack_flags()
    verifier = f"127.0.0.1:{flags[1]}"
    up = cli("up", "--target", str(tiny_llama_dir), "--drafter", "random", "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
             "--timeout", "200", *flags, env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "started" in up.stdout and f"verifier   {verifier} SERVING" in up.stdout
        state = json.loads((tmp_path / "cache" / "run" / "stack.json").read_text())
        assert state["redis"]["pid"] and all((tmp_path / "cache" / "run" / f"{n}.pid").exists() for n in state["services"])
        again = cli("up", "--target", str(tiny_llama_dir), *flags, env=env)
        assert again.returncode != 0 and "already running" in again.stderr
        status = cli("status", env=env)
        assert status.returncode == 0 and status.stdout.count("SERVING") == 4 and "gateway" in status.stdout, status.stdout
        # What the verifier serves (GetServerInfo): its drafter and its limits.
        assert "drafter random (block size" in status.stdout and "limits: context" in status.stdout, status.stdout
        # The gateway is up in front of the verifier: a token-id prompt through the OpenAI API.
        code, reply = gateway_call(flags, "/v1/completions", {"model": "blockpilot", "prompt": [5, 6, 7], "max_tokens": 4})
        assert code == 200 and reply["usage"]["completion_tokens"] == 4, reply
        # The tiny target has no tokenizer: a text prompt is refused with one clear line.
        refused = cli("generate", "--server", verifier, "--raw", "hello", env=env)
        assert refused.returncode == 1 and "no tokenizer" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    finally:
        down = cli("down", env=env)
    assert down.returncode == 0 and down.stdout.count("stopped") == 5, down.stdout  # 4 services + redis
    assert cli("status", env=env).returncode == 1
    for pid in [s["pid"] for s in state["services"].values()] + [state["redis"]["pid"]]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_up_secure_runs_tls_tokens_and_a_redis_user(tiny_llama_dir, tmp_path):
    if not __import__("shutil").which("redis-server"):
        no_redis("redis-server is not installed")
    import redis

    env = {**os.environ, "BLOCKPILOT_RUN_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    redis_port = free_port()
    flags = stack_flags()
    verifier = f"127.0.0.1:{flags[1]}"
    up = cli("up", "--secure", "--target", str(tiny_llama_dir), "--drafter", "random", "--redis-url",
             f"redis://127.0.0.1:{redis_port}/0", "--timeout", "200", *flags, env=env)
    secure = tmp_path / "run" / "secure"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert up.stdout.count("SERVING") == 4 and "--tls-ca" in up.stdout and "ACL user blockpilot" in up.stdout
        files = sorted(p.name for p in secure.iterdir())
        assert {"ca.pem", "token", "admin-token", "redis-password"} <= set(files)
        assert all((secure / name).stat().st_mode & 0o777 == 0o600 for name in files)
        assert "password" not in up.stdout.replace("redis-password", "")  # the secret itself is never printed
        status = cli("status", env=env)
        assert status.returncode == 0 and status.stdout.count("SERVING") == 4 and "answers" in status.stdout, status.stdout
        # GetServerInfo needs the data token, which `status` takes from the stack's material.
        assert "drafter random (block size" in status.stdout and "server info:" not in status.stdout, status.stdout
        # The gateway serves HTTPS with the stack's certificate and forwards the caller's token.
        request = {"model": "blockpilot", "prompt": [5, 6, 7], "max_tokens": 4}
        token = (secure / "token").read_text().strip()
        assert gateway_call(flags, "/v1/completions", request, token=token, ca=secure / "ca.pem")[0] == 200
        assert gateway_call(flags, "/v1/completions", request, token="wrong", ca=secure / "ca.pem")[0] == 401
        client = ["--tls-ca", str(secure / "ca.pem"), "--token-file", str(secure / "token")]
        # The tiny target has no tokenizer: "no tokenizer" means the request passed TLS and the token check.
        through = cli("generate", "--server", verifier, *client, "--raw", "hello", env=env)
        assert through.returncode == 1 and "no tokenizer" in through.stderr, through.stderr
        no_token = cli("generate", "--server", verifier, "--tls-ca", str(secure / "ca.pem"), "--raw", "hello", env=env)
        assert "UNAUTHENTICATED" in no_token.stderr, no_token.stderr
        plaintext = cli("generate", "--server", verifier, "--raw", "hello", env=env)
        assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr, plaintext.stderr
        with pytest.raises(redis.exceptions.AuthenticationError):  # the default user is off
            redis.Redis(port=redis_port, socket_timeout=2).ping()
        password = (secure / "redis-password").read_text().strip()
        assert redis.Redis(port=redis_port, username="blockpilot", password=password, socket_timeout=2).ping()
    finally:
        down = cli("down", env=env)
    assert down.returncode == 0 and down.stdout.count("stopped") == 5, down.stdout


@pytest.mark.default_model
def test_generate_through_the_stack_prints_the_in_process_json(tmp_path):
    run_env = {**os.environ, "BLOCKPILOT_RUN_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    flags = stack_flags()
    verifier = f"127.0.0.1:{flags[1]}"
    # The shipped drafter and the default backend (onnxruntime): what `make demo` runs.
    up = cli("up", *flags, env=run_env, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        args = ["--json", "--max-new-tokens", "24", "--block-size", "8", "Name three primary colors."]
        remote = cli("generate", "--server", verifier, *args, env=run_env)
        local = cli("generate", *args, env=run_env)
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"id": f"p{i}", "turns": [text]}) + "\n"
                                   for i, text in enumerate(["Name three colors.", "Count to five."])))
        bench = cli("bench", str(prompts), "--server", verifier, "--concurrency", "1,2", "--requests", "2",
                    "--max-new-tokens", "8", "--compare-off", "--out", str(tmp_path / "bench.json"),
                    "--plot", str(tmp_path / "bench.png"), env=run_env)
    finally:
        cli("down", env=run_env)
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    remote_report, local_report = json.loads(remote.stdout), json.loads(local.stdout)
    for key in ("prompt_token_ids", "token_ids", "text", "block_size", "acceptance_lengths", "finish_reason", "drafter"):
        assert remote_report[key] == local_report[key], key
    assert local_report["backend"] == "onnxruntime"
    # The load generator: every level answered, outputs the same at every concurrency.
    assert bench.returncode == 0, bench.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(l["concurrency"], l["block_size"]) for l in report["levels"]] == [(1, "auto"), (1, "plain"), (2, "auto"), (2, "plain")]
    assert all(l["requests"] == 2 and not l["errors"] and 0 < l["tokens"] <= 16 for l in report["levels"])
    assert [l["identical_to_first_run"] for l in report["levels"][2:]] == ["2/2", "2/2"]
    assert report["machine"]["cpu"] and "x_plain" in report["levels"][0]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
