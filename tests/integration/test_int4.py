"""The int4 precision with the default model (issue #14): the GGUF's own codes are exactly the fp32
weights the engine loads, speculative decoding on the int4 backend equals its own block-size-1
output, and the command line names and checks the precision."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from blockpilot.backends.gguf_codes import codes_for_target
from blockpilot.backends.loader import BackendOptions
from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig
from blockpilot.decoding.speculative import SamplingParams
from blockpilot.runtime import load_engine

PROMPTS = ("Write a Python function that checks whether a number is prime.", "Why is the sky blue?")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockpilot.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def int4_engine():
    return load_engine(None, None, backend=BackendOptions("onnxruntime", precision="int4", threads=1))


@pytest.mark.default_model
def test_the_default_gguf_codes_are_the_engine_weights(int4_engine):
    codes = codes_for_target(int4_engine.target, int4_engine.target_dir)
    assert codes.max_abs_difference == 0.0 and codes.left_fp32 == ()
    assert len(codes.weights) == 4 * int4_engine.target.config.num_hidden_layers + 1  # + the output projection
    meta = int4_engine.verifier_target.export.metadata
    assert (meta.precision, meta.graph) == ("int4", "fused")
    assert meta.quantization["fp32_activations_check_error"] <= 1e-4


@pytest.mark.default_model
def test_int4_speculation_equals_int4_plain_decoding(int4_engine):
    engine = int4_engine
    assert engine.precision == "int4" and engine.drafter is not None
    params = SamplingParams(max_new_tokens=48)
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        plain = engine.decoder.generate(ids, params, 1, lookup=LOOKUP_OFF)
        for block_size, lookup in ((1, LookupConfig()), (4, LOOKUP_OFF), (8, LookupConfig())):
            out = engine.decoder.generate(ids, params, block_size, lookup=lookup)
            assert out.token_ids == plain.token_ids, (prompt, block_size, lookup.enabled)


@pytest.mark.default_model
def test_generate_names_the_precision_it_ran():
    done = run_cli("generate", "--json", "--max-new-tokens", "8", "--threads", "1", "Hi")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["backend"], report["precision"]) == ("onnxruntime", "int4")  # auto: the default model's own codes
    done = run_cli("generate", "--json", "--max-new-tokens", "8", "--threads", "1", "--precision", "fp32", "Hi")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["precision"] == "fp32"


def test_int4_of_a_target_without_gguf_codes_is_one_clear_error(tiny_llama_dir, tmp_path):
    done = run_cli("export", "onnx", "--target", str(tiny_llama_dir), "--precision", "int4", "--out", str(tmp_path / "x"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "was not converted from one" in lines[0], done.stderr
    done = run_cli("generate", "--backend", "torch", "--precision", "int4", "hi", timeout=60)
    assert done.returncode == 2 and "runs on the onnxruntime backend" in done.stderr
