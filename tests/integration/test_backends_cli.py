"""`blockpilot export onnx | trt` and `blockpilot generate --backend` as a user runs them: real
processes, exit codes, one JSON object on stdout, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blockpilot.backends.tensorrt_backend import tensorrt_unavailable_reason

TRT_REASON = tensorrt_unavailable_reason()


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockpilot.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line_error(done: subprocess.CompletedProcess, status: int, fragment: str) -> None:
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_export_onnx_writes_a_checked_export(tiny_llama_dir, tmp_path):
    out = tmp_path / "export"
    done = run_cli("export", "onnx", "--target", str(tiny_llama_dir), "--hidden-layers", "1", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # exactly one JSON object
    assert report["export"] == str(out) and report["hidden_layer_ids"] == [1, 3] and report["dtype"] == "float32"
    assert report["check_max_error"] <= 1e-4
    # plus the one-session graph the export's lone-token check ran (fused_graph.sessions_graph)
    from blockpilot.backends.fused_graph import SESSIONS_GRAPH_VERSION

    sessions_graph = f"sessions-v{SESSIONS_GRAPH_VERSION}-1.onnx"
    assert {p.name for p in out.iterdir()} - {sessions_graph} == {"model.onnx", "model.onnx.data", "export.json"}
    again = run_cli("export", "onnx", "--target", str(tiny_llama_dir), "--hidden-layers", "1", "--out", str(out))
    one_line_error(again, 2, "already holds an ONNX export (pass --force to replace it)")


@pytest.mark.parametrize("args, fragment", [
    (["export", "onnx", "--hidden-layers", "40", "--out", "{tmp}/x"], "must be distinct and within [0, 4)"),
    (["export", "onnx", "--hidden-layers", "1", "--drafter", "random", "--out", "{tmp}/x"], "not both"),
    (["export", "onnx", "--drafter", "{tmp}/no-drafter", "--out", "{tmp}/x"], "no-drafter' does not exist"),
    (["export", "onnx", "--dtype", "float16", "--graph", "fused", "--out", "{tmp}/x"], "a float16 export is the portable graph"),
])
def test_export_onnx_bad_arguments_are_one_line_errors(tiny_llama_dir, tmp_path, args, fragment):
    args = [a.format(tmp=tmp_path) for a in args]
    done = run_cli(*args[:2], "--target", str(tiny_llama_dir), *args[2:])
    status = 1 if "does not exist" in fragment else 2
    one_line_error(done, status, fragment)


@pytest.mark.parametrize("args, fragment", [
    (["generate", "--backend", "torch", "--onnx", "exports/missing", "hi"], "needs --backend onnxruntime or tensorrt"),
    (["generate", "--backend", "onnx", "hi"], "invalid choice: 'onnx'"),
    (["generate", "--server", "127.0.0.1:1", "--backend", "onnxruntime", "hi"], "are the server's settings"),
])
def test_generate_backend_arguments_are_checked(args, fragment):
    one_line_error(run_cli(*args, timeout=60), 2, fragment)


def test_generate_with_a_missing_export_on_the_default_backend_is_one_line():
    one_line_error(run_cli("generate", "--onnx", "exports/missing", "hi", timeout=120), 1, "does not exist")


def test_prepare_makes_the_default_backends_export_once(tiny_llama_dir, tmp_path):
    """`prepare` exports for the default backend (onnxruntime) so the verifier's first start does
    not; `--backend torch` needs no export and makes none."""
    env = {**__import__("os").environ, "BLOCKPILOT_CACHE": str(tmp_path / "cache")}
    torch_only = run_cli("prepare", "--target", str(tiny_llama_dir), "--backend", "torch", env=env)
    assert torch_only.returncode == 0 and torch_only.stdout.strip() == str(tiny_llama_dir), torch_only.stderr
    assert not (tmp_path / "cache" / "onnx").exists()
    done = run_cli("prepare", "--target", str(tiny_llama_dir), env=env)
    assert done.returncode == 0, done.stderr
    model_dir, export_dir = done.stdout.strip().splitlines()
    assert model_dir == str(tiny_llama_dir) and export_dir.startswith(str(tmp_path / "cache" / "onnx"))
    assert json.loads((Path(export_dir) / "export.json").read_text())["hidden_layer_ids"]
    again = run_cli("prepare", "--target", str(tiny_llama_dir), env=env)  # cached: the same folder, no new export
    assert again.returncode == 0 and again.stdout.strip().splitlines()[1] == export_dir and "exporting" not in again.stderr


def test_prepare_exports_at_the_verifiers_dtype(tiny_llama_dir, tmp_path):
    """A float16 verifier on onnxruntime runs a float16 export: prepare --dtype float16 makes that
    one (the portable graph), not the float32 one; bfloat16, which the CPU provider cannot run, is
    one line before any export."""
    import onnxruntime

    env = {**__import__("os").environ, "BLOCKPILOT_CACHE": str(tmp_path / "cache")}
    done = run_cli("prepare", "--target", str(tiny_llama_dir), "--dtype", "float16", env=env)
    assert done.returncode == 0, done.stderr
    meta = json.loads((Path(done.stdout.strip().splitlines()[1]) / "export.json").read_text())
    assert (meta["dtype"], meta["graph"]) == ("float16", "portable"), meta
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        refused = run_cli("prepare", "--target", str(tiny_llama_dir), "--dtype", "bfloat16", env=env)
        assert refused.returncode == 1 and "cannot run a bfloat16 graph here" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr


def test_export_trt_without_a_gpu_says_what_is_missing(tiny_llama_dir):
    if TRT_REASON is None:
        pytest.skip("TensorRT and a GPU are present here: the refusal does not apply")
    done = run_cli("export", "trt", "--target", str(tiny_llama_dir), timeout=120)
    one_line_error(done, 1, TRT_REASON)


@pytest.mark.default_model
def test_generate_on_tensorrt_without_a_gpu_refuses_in_one_line():
    if TRT_REASON is None:
        pytest.skip("TensorRT and a GPU are present here: the refusal does not apply")
    one_line_error(run_cli("generate", "--backend", "tensorrt", "--max-new-tokens", "4", "hi"), 1, TRT_REASON)


@pytest.mark.default_model
@pytest.mark.slow
def test_generate_on_onnxruntime_equals_torch_on_the_default_model():
    """The default model through `generate --backend onnxruntime --precision fp32` (exported on demand
    into the cache once), block size 1 and speculative: the same tokens as the torch backend. (At
    int4, the default model's own precision, see tests/integration/test_int4.py.)"""
    reports = {}
    for backend, extra in [("torch", ["--block-size", "1"]), ("onnxruntime", ["--block-size", "1", "--precision", "fp32"]),
                           ("onnxruntime", ["--block-size", "4", "--precision", "fp32"])]:
        done = run_cli("generate", "--json", "--backend", backend, "--drafter", "random", "--max-new-tokens", "24",
                       "--threads", "1", *extra, "Name three primary colors.", timeout=600)
        assert done.returncode == 0, done.stderr
        reports[(backend, extra[1])] = json.loads(done.stdout)
    reference = reports[("torch", "1")]["token_ids"]
    assert reference and all(r["token_ids"] == reference for r in reports.values())
    assert reports[("onnxruntime", "4")]["backend"] == "onnxruntime" and reports[("onnxruntime", "4")]["block_size"] == 4
    assert reports[("onnxruntime", "4")]["precision"] == "fp32"
