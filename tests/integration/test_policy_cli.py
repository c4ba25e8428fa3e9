"""`blockpilot policy sweep | train | eval` as a user runs them: real processes, a tiny random target
with a character-level chat tokenizer, a random drafter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from blockpilot.policy.metadata import PolicyMetadata


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockpilot.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def add_chat_tokenizer(model_dir) -> None:
    """One token per character plus ChatML markers; ids stay below the tiny vocabulary (97)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789 .,?!\n":
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(model_dir)


def write_prompts(folder, names, count):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": f"{name}/{i}", "dataset": name, "turns": [f"question {i} about {name}?"]}) + "\n" for i in range(count)))


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("policy_cli")
    model = root / "model"
    shutil.copytree(tiny_llama_dir, model)
    add_chat_tokenizer(model)
    write_prompts(root / "datasets" / "train", ["alpha_train", "beta_train"], 6)
    write_prompts(root / "datasets", ["gamma", "delta"], 3)
    return root, ["--target", model, "--drafter", "random", "--random-drafter-block-size", "4", "--threads", "1"]


def test_sweep_train_eval_end_to_end(setup):
    root, model_args = setup
    common = ["--max-new-tokens", "10", "--cost-repeats", "1", "--no-progress", *model_args]
    # Prompts the drafter was trained on are left out.
    (root / "drafter_data.jsonl").write_text(json.dumps({"id": "alpha_train/0", "mode": "greedy"}) + "\n")
    done = run_cli("policy", "sweep", "--prompts", root / "datasets" / "train", "--out", root / "sweep-train",
                   "--exclude-ids-from", root / "drafter_data.jsonl", *common)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["swept"] == 11 and summary["block_sizes"] == [1, 2, 3, 4, 5, 6, 7]  # 4 ± 3, >= 2, plus 1
    # The cost model timed the backend the verifier serves with by default.
    assert json.loads((root / "sweep-train" / "manifest.json").read_text())["cost_model"]["backend"] == "onnxruntime"

    done = run_cli("policy", "train", "--sweep", root / "sweep-train", "--repository", root / "repo", "--name", "tiny",
                   "--widths", "8", "--ranks", "4", "--top-k", "4", "--epochs", "5", "--folds", "2", "--holdout", "0.34",
                   "--quiet", "--threads", "1")
    assert done.returncode == 0, done.stderr
    trained = json.loads(done.stdout)
    assert trained["policy_version"] == "tiny/1"
    meta = PolicyMetadata.load(root / "repo" / "tiny" / "1")
    assert meta.candidates == (2, 3, 4, 5, 6, 7) and meta.drafter.startswith("random@")

    # The evaluation sweep is made by `eval` itself, reusing the training sweep's cost model.
    done = run_cli("policy", "eval", "--policy", root / "repo" / "tiny" / "1", "--sweep", root / "sweep-eval",
                   "--out", root / "report", "--prompts", root / "datasets", "--cost-model", root / "sweep-train", *common)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["prompts"] == 6 and report["sweep"]["swept"] == 6
    assert report["speedup"]["autoregressive"] == 1.0 and set(report["tau"]) >= {"policy", "oracle", "B=2"}
    assert {p.name for p in (root / "report").iterdir()} == {"report.json", "report.md", "tau_by_block_size.png", "chosen_sizes.png"}
    manifest = json.loads((root / "sweep-eval" / "manifest.json").read_text())
    assert manifest["cost_model_source"] == "given"
    assert manifest["cost_model"] == json.loads((root / "sweep-train" / "manifest.json").read_text())["cost_model"]


@pytest.mark.parametrize("args, status, fragment", [
    (["policy", "sweep", "--prompts", "x.jsonl", "--out", "o", "--candidates", "0"], 2, "must be >= 1"),
    (["policy", "sweep", "--out", "o"], 2, "required"),
    (["policy", "train", "--sweep", "/no/such/sweep", "--repository", "r", "--name", "p"], 1, "no sweep at '/no/such/sweep'"),
    (["policy", "train", "--sweep", "s", "--repository", "r", "--name", "p", "--holdout", "1.5"], 2, "between 0 and 1"),
    (["policy", "eval", "--policy", "/no/such/policy/1", "--sweep", "s", "--out", "o"], 1, "no model.onnx"),
    (["policy"], 2, "required"),
])
def test_bad_arguments_exit_nonzero_with_one_line(args, status, fragment):
    done = run_cli(*args, timeout=120)
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
