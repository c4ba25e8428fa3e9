"""Policy decision latency over real gRPC: p50 / p99 of Decide as the verifier pays it
(blockpilot.serving.policy.RemotePolicy: encoding the feature, the call, decoding the answer) for a
fixed-size policy and for an ONNX policy that reads a 49,152-dim last_logits feature (the default
target's vocabulary). Goal (issue 5): p50 <= 2 ms.

    .venv/bin/python benchmarks/policy_latency.py --out runs/policy_latency.json

Setup: the policy service as its own process (`python -m services.policy`) on a free loopback port,
its Redis an own redis-server when one is installed (the experiment lookup, one GET per Decide of a
non-fixed name, is then part of the figure), else the in-memory store (--redis-url to choose).
The ONNX policy is built here, shaped like the shipped predictor (blockpilot/policy/predictor.py):
standardization, Linear(49152 -> 32), ReLU, Linear(32 -> 256), ReLU, Linear(256 -> 256), ReLU,
Linear(256 -> 5); --policy-dir adds a real published version (<repository>/<name>/<version>).
Requests are sequential (one verifier asking), after --warmup calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_policy(root: Path, name: str, feature_dim: int, candidates=(6, 7, 8, 9, 10), rank: int = 32,
                 width: int = 256, seed: int = 0) -> Path:
    """<root>/<name>/1/ with a predictor-shaped ONNX graph and its metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from blockpilot.policy.metadata import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, PolicyMetadata

    rng = np.random.default_rng(seed)

    def dense(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    tensors = {"mean": rng.standard_normal(feature_dim).astype(np.float32),
               "inv_std": (1.0 / (0.5 + rng.random(feature_dim))).astype(np.float32),
               "w0": dense(feature_dim, rank), "w1": dense(rank, width), "b1": np.zeros(width, np.float32),
               "w2": dense(width, width), "b2": np.zeros(width, np.float32), "w3": dense(width, len(candidates)),
               "b3": np.zeros(len(candidates), np.float32)}
    node = helper.make_node
    nodes = [node("Sub", [INPUT_NAME, "mean"], ["c"]), node("Mul", ["c", "inv_std"], ["z"]),
             node("MatMul", ["z", "w0"], ["p"]), node("Relu", ["p"], ["p1"]),
             node("MatMul", ["p1", "w1"], ["h1"]), node("Add", ["h1", "b1"], ["h1b"]), node("Relu", ["h1b"], ["a1"]),
             node("MatMul", ["a1", "w2"], ["h2"]), node("Add", ["h2", "b2"], ["h2b"]), node("Relu", ["h2b"], ["a2"]),
             node("MatMul", ["a2", "w3"], ["h3"]), node("Add", ["h3", "b3"], [OUTPUT_NAME])]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", feature_dim])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", len(candidates)])],
                              [numpy_helper.from_array(v, k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    version = root / name / "1"
    version.mkdir(parents=True)
    onnx.save(model, str(version / MODEL_FILE))
    PolicyMetadata(name=name, version=1, candidates=tuple(candidates), feature_kind="last_logits",
                   feature_dim=feature_dim, normalization="standardize (benchmark graph)").save(version)
    return version


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    import redis

    port = free_port()
    process = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                                "no", "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis(port=port, socket_timeout=0.2).ping():
                return process, f"redis://127.0.0.1:{port}/0"
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def wait_serving(address: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    from blockpilot.serving.stack import health_status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the policy service exited: {log.read_text()[-2000:]}")
        if health_status(address, "blockpilot.v1.Policy", timeout_s=0.5) == "SERVING":
            return
        time.sleep(0.2)
    raise RuntimeError(f"the policy service was not SERVING after {timeout} s")


def percentiles(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000
    return {"n": len(samples), "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}


async def measure(address: str, cases: list[tuple[str, str, dict]], requests: int, warmup: int) -> dict:
    from blockpilot.serving.policy import PolicyFeatures, RemotePolicy

    policy = RemotePolicy(address, timeout_s=5.0)
    results = {}
    try:
        for label, name, features in cases:
            spec = await policy.describe(name)
            request = PolicyFeatures(features, 100, 8, 16, "bench-session", name)
            decision = None
            for _ in range(warmup):
                decision = await policy.decide(request)
            samples = []
            for _ in range(requests):
                started = time.perf_counter()
                decision = await policy.decide(request)
                samples.append(time.perf_counter() - started)
            results[label] = {"policy": name, "features": [f"{f.kind}[{f.dim}]" for f in spec.features],
                              "policy_version": decision.policy_version, "block_size": decision.block_size,
                              **percentiles(samples)}
    finally:
        await policy.close()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="timed Decide calls per policy")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--feature-dim", type=int, default=49152)
    parser.add_argument("--redis-url", default="", help="'' = an own redis-server if installed, else 'memory'")
    parser.add_argument("--providers", default="cpu", choices=["auto", "cpu", "cuda"], help="the service's onnx_providers")
    parser.add_argument("--policy-dir", type=Path, default=None,
                        help="also time this published version folder (<repository>/<name>/<version>)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    folder = Path(tempfile.mkdtemp(prefix="policy-latency-"))
    repository = folder / "policies"
    build_policy(repository, "bench", args.feature_dim)
    cases = [("fixed", "fixed-8", {}),
             ("onnx", "bench", {"last_logits": np.random.default_rng(1).standard_normal(args.feature_dim).astype(np.float32)})]
    if args.policy_dir is not None:
        from blockpilot.policy.metadata import PolicyMetadata

        meta = PolicyMetadata.load(args.policy_dir)
        shutil.copytree(args.policy_dir, repository / meta.name / str(meta.version))
        vector = np.random.default_rng(2).standard_normal(meta.feature_dim).astype(np.float32)
        cases.append(("published", meta.name, {meta.feature_kind: vector}))
    redis_process = None
    redis_url = args.redis_url
    if not redis_url:
        if shutil.which("redis-server"):
            redis_process, redis_url = start_redis(folder)
        else:
            redis_url = "memory"
    port = free_port()
    log = folder / "policy.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    service = subprocess.Popen([sys.executable, "-m", "services.policy", "--port", str(port), "--metrics-port", "0",
                                "--repository", str(repository), "--redis-url", redis_url, "--poll-interval-s", "0",
                                "--onnx-providers", args.providers], cwd=ROOT, env=env, stdout=open(log, "wb"),
                               stderr=subprocess.STDOUT)
    setup = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
             "onnxruntime": ort.__version__, "onnx_providers": args.providers, "redis": redis_url,
             "feature_dim": args.feature_dim, "requests": args.requests, "warmup": args.warmup,
             "client": "RemotePolicy.decide (grpc.aio), sequential, one process; service: python -m services.policy"}
    print("setup: " + json.dumps(setup))
    try:
        wait_serving(f"127.0.0.1:{port}", service, log)
        results = asyncio.run(measure(f"127.0.0.1:{port}", cases, args.requests, args.warmup))
    finally:
        service.terminate()
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
    for label, row in results.items():
        print(f"{label:<10} {row['policy']:<12} {','.join(row['features']) or '-':<20} p50 {row['p50_ms']:.3f} ms  "
              f"p99 {row['p99_ms']:.3f} ms  mean {row['mean_ms']:.3f} ms  (block size {row['block_size']}, "
              f"{row['policy_version']})")
    report = {"setup": setup, "results": results, "goal": "p50 <= 2 ms",
              "met": all(r["p50_ms"] <= 2.0 for r in results.values())}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
