"""benchmarks/gpu_check.sh without a GPU: it parses, and on a CPU-only machine it ends within seconds
with exit status 3 and a summary that names every stage it skipped and why, while still checking the
public pair's preconditions (the weights in the Hugging Face cache, offline) that need no GPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_models import hub_home  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
GPU_STAGES = ("prepare", "engine", "benchmark", "tests", "public-b1", "public-b16", "public-lossless", "public-eval",
              "public-papers", "public-trt-engine", "public-trt")
# Seconds a skip-only run may take on a loaded 2-core machine (it takes about 10 s).
QUICK_S = 120


def run_check(out: Path, hf_home: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The check as a CPU-only machine runs it: no GPU visible (CUDA_VISIBLE_DEVICES empty, so a
    machine with one behaves alike), this interpreter, the given Hugging Face cache."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PUBLIC_", "GPU_CHECK_"))}
    environ.update({"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(hf_home)}, **env)
    started = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=environ, capture_output=True, text=True,
                            timeout=QUICK_S * 2)
    return result, time.monotonic() - started


def stage_table(out: Path) -> dict[str, str]:
    """The summary's closing table: stage -> status and reason."""
    text = (out / "summary.txt").read_text(encoding="utf-8")
    assert "\n== stages\n" in text, text
    table = text.split("\n== stages\n", 1)[1]
    return dict(re.match(r"(\S+)\s+(.*)", line).groups() for line in table.splitlines() if line and not line.startswith("["))


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_shellcheck_finds_nothing():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_usage_without_a_results_folder():
    environ = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_without_a_gpu_every_gpu_stage_is_skipped_with_its_reason(tmp_path):
    result, elapsed = run_check(tmp_path / "out", tmp_path / "empty_hf_home")
    assert result.returncode == 3, result.stderr[-3000:]
    assert elapsed < QUICK_S
    stages = stage_table(tmp_path / "out")
    assert stages["env"].startswith("FAILED")
    assert set(GPU_STAGES) | {"env", "public-weights"} == set(stages)
    for name in GPU_STAGES:
        assert stages[name].startswith("SKIPPED: environment incomplete: a CUDA GPU visible to torch"), (name, stages[name])
    # The pair's weights are looked up all the same, offline, and their absence is named with the fix.
    weights = stages["public-weights"]
    assert weights.startswith("SKIPPED: weights absent: ")
    for repo in ("Qwen/Qwen3-4B", "z-lab/Qwen3-4B-DFlash-b16"):
        assert f"'{repo}'" in weights and f"hf download {repo}" in weights
    assert "weights absent (see public-weights)" in stages["public-b1"]
    summary = (tmp_path / "out" / "summary.txt").read_text(encoding="utf-8")
    assert "RESULT: environment incomplete" in summary
    assert not list((tmp_path / "out").glob("public_*.json")), "no public stage may have run"


def test_without_a_gpu_the_pair_in_the_cache_is_found(tmp_path, hub_home):  # noqa: F811 (fixture)
    """With the pair in the cache (tiny stand-ins by repository id), public-weights passes on the CPU
    and writes their snapshot folders; the stages that need the GPU are still skipped."""
    result, _ = run_check(tmp_path / "out", hub_home, PUBLIC_TARGET="tiny-org/tiny-qwen3",
                          PUBLIC_DRAFTER="tiny-org/tiny-qwen3-dflash")
    assert result.returncode == 3, result.stderr[-3000:]
    stages = stage_table(tmp_path / "out")
    assert stages["public-weights"].startswith("ok"), stages["public-weights"]
    folders = (tmp_path / "out" / "public_models.txt").read_text(encoding="utf-8").split()
    assert [Path(f).parent.parent.name for f in folders] == ["models--tiny-org--tiny-qwen3", "models--tiny-org--tiny-qwen3-dflash"]
    assert all((Path(f) / "config.json").is_file() for f in folders)
    for name in GPU_STAGES:
        assert stages[name].startswith("SKIPPED: environment incomplete"), (name, stages[name])
        assert "weights absent" not in stages[name]


def test_a_spent_budget_skips_with_the_time_left(tmp_path):
    result, _ = run_check(tmp_path / "out", tmp_path / "empty_hf_home", GPU_CHECK_BUDGET_S="0")
    assert result.returncode == 3, result.stderr[-3000:]
    weights = stage_table(tmp_path / "out")["public-weights"]
    assert re.match(r"SKIPPED: -?\d+s left of the 0s budget, it needs at least \d+s", weights), weights


def test_the_public_pair_commands_take_the_flags_the_script_passes():
    """The public stages run these commands with no probe of their flags: each must parse."""
    from blockpilot.cli import build_parser

    parser = build_parser()
    script = SCRIPT.read_text(encoding="utf-8")
    template = re.search(r"^TEMPLATE_KWARGS='(.*)'$", script, re.M).group(1)
    placement = ["--dtype", "bfloat16", "--device", "cuda"]
    for argv in (
        ["generate", "--target", "Qwen/Qwen3-4B", "--drafter", "z-lab/Qwen3-4B-DFlash-b16", "--backend", "torch", *placement,
         "--chat-template-kwargs", template, "--prompt-lookup", "off", "--max-new-tokens", "128", "--json",
         "--block-size", "16", "prompt"],
        ["drafter", "eval", "--target", "t", "--drafter", "d", "--datasets-dir", "s", "--datasets", "gsm8k",
         "--prompts-per-dataset", "2", "--max-new-tokens", "128", "--radius", "0", "--block-size", "16", "--no-temperature",
         "--no-lookup", "--backend", "torch", *placement, "--chat-template-kwargs", template, "--out", "o.json"],
        ["export", "trt", "--target", "t", "--drafter", "d", "--precision", "bf16", "--dtype", "bfloat16",
         "--max-block-size", "16", "--max-context", "2048"],
    ):
        args = parser.parse_args(argv)
        assert getattr(args, "dtype", "bfloat16") == "bfloat16", argv[:2]
    assert "--device cuda" in script and "--dtype bfloat16 --device cuda --prompts 2" in script
    help_text = subprocess.run([sys.executable, "benchmarks/backends.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120).stdout
    for flag in ("--dtype", "--device", "--trt-precision", "--trt-max-context"):
        assert flag in help_text, flag
