"""`blockpilot generate` as a user runs it: a real process, the default model, its exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockpilot.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", "--block-size", "0", "hi"], "must be >= 1"),
        (["generate", "--temperature", "-1", "hi"], "finite number >= 0"),
        (["generate", "--temperature", "nan", "hi"], "finite number >= 0"),
        (["generate", "--max-new-tokens", "abc", "hi"], "expected an integer"),
        (["generate", "   "], "the prompt is empty"),
        (["generate", "--drafter", "/nonexistent/drafter", "hi"], "does not exist"),
        (["generate", "--drafter", "none", "--block-size", "4", "hi"], "needs a drafter"),
        (["generate"], "required"),
        (["generate", "--raw", "--chat-template-kwargs", '{"a": 1}', "hi"], "not with --raw"),
        (["generate", "--chat-template-kwargs", "[1]", "hi"], "expected a JSON object"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(args, fragment):
    done = run_cli(*args, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_unknown_target_is_one_line_error():
    done = run_cli("generate", "--target", "/no/such/model", "hi", timeout=120)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "/no/such/model" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.default_model
def test_json_output_contract_and_lossless_across_block_sizes():
    reports = []
    for extra in (["--drafter", "none"], ["--drafter", "random", "--block-size", "5"]):
        done = run_cli("generate", "--json", "--logprobs", "--max-new-tokens", "24", *extra, "Name three primary colors.")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)  # exactly one JSON object on stdout
        for key in ("prompt_token_ids", "token_ids", "text", "block_size", "acceptance_lengths", "tau",
                    "ttft_s", "decode_tokens_per_s", "finish_reason"):
            assert key in report, key
        assert report["finish_reason"] in ("stop", "length")
        assert len(report["token_ids"]) == 1 + sum(report["acceptance_lengths"])
        reports.append(report)
    plain, speculative = reports
    assert plain["block_size"] == 1 and speculative["block_size"] == 5
    assert speculative["token_ids"] == plain["token_ids"]
    assert speculative["text"] == plain["text"] and plain["text"].strip()
    # Each token's log-probability, the same whichever block size committed it (up to rounding).
    assert [row[0] for row in speculative["logprobs"]] == speculative["token_ids"]
    assert [row[1] for row in speculative["logprobs"]] == pytest.approx([row[1] for row in plain["logprobs"]], abs=1e-3)


@pytest.mark.default_model
def test_streamed_text_and_stats_line():
    done = run_cli("generate", "--max-new-tokens", "12", "--raw", "The capital of France is")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "tokens/s" in done.stderr
