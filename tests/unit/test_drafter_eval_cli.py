"""`blockpilot drafter eval --drafter ORG/NAME`: a drafter by Hugging Face repository id, resolved
through the (offline) Hugging Face cache as generate and the services resolve it."""

from __future__ import annotations

import json

from hub_models import hub_home, offline_hub  # noqa: F401 (fixtures)


def eval_argv(drafter: str, datasets, out) -> list[str]:
    return ["drafter", "eval", "--target", "tiny-org/tiny-llama", "--drafter", drafter, "--datasets-dir", str(datasets),
            "--datasets", "tiny", "--prompts-per-dataset", "1", "--max-new-tokens", "6", "--radius", "0",
            "--no-temperature", "--no-lookup", "--backend", "torch", "--threads", "1", "--out", str(out)]


def test_drafter_eval_takes_a_repository_id(offline_hub, tmp_path, capsys):
    from blockpilot.cli import main

    (tmp_path / "tiny.jsonl").write_text(json.dumps({"id": "p1", "turns": ["Tell me about block diffusion."]}) + "\n")
    assert main(eval_argv("tiny-org/tiny-llama-dflash", tmp_path, tmp_path / "report.json")) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["drafter"] == "tiny-org/tiny-llama-dflash" and report["trained_block_size"] == 8
    assert [row["decodes"]["dflash"]["equals_ar"] for row in report["prompts"]] == [True]
    capsys.readouterr()
    assert main(eval_argv("tiny-org/absent-dflash", tmp_path, tmp_path / "other.json")) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("blockpilot drafter: error: drafter 'tiny-org/absent-dflash' is neither a "
                                              "local path nor in the Hugging Face cache"), err


def test_drafter_eval_takes_dtype_and_the_template_arguments(offline_hub, tmp_path, capsys):
    """In bfloat16 the decodes stay lossless against bfloat16's own block size 1; the template
    arguments reach the prompts (the tiny template prints 'nothink\\n') and the report names them."""
    from blockpilot.cli import main

    (tmp_path / "tiny.jsonl").write_text(json.dumps({"id": "p1", "turns": ["Tell me about block diffusion."]}) + "\n")
    argv = eval_argv("tiny-org/tiny-llama-dflash", tmp_path, tmp_path / "plain.json")
    assert main(argv) == 0
    asked = eval_argv("tiny-org/tiny-llama-dflash", tmp_path, tmp_path / "bf16.json")
    assert main(asked + ["--dtype", "bfloat16", "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    plain, bf16 = (json.loads((tmp_path / name).read_text()) for name in ("plain.json", "bf16.json"))
    assert (plain["dtype"], plain["device"], plain["chat_template_kwargs"]) == ("float32", "cpu", {})
    assert (bf16["dtype"], bf16["device"], bf16["chat_template_kwargs"]) == ("bfloat16", "cpu", {"enable_thinking": False})
    assert bf16["drafter_precision"] == "bf16"  # a bfloat16 engine drafts as loaded
    assert bf16["prompts"][0]["prompt_tokens"] == plain["prompts"][0]["prompt_tokens"] + len("nothink\n")
    assert [row["decodes"]["dflash"]["equals_ar"] for row in bf16["prompts"]] == [True]
    capsys.readouterr()


def test_drafter_eval_refuses_a_device_it_cannot_use(offline_hub, tmp_path, capsys):
    import torch

    from blockpilot.cli import main

    (tmp_path / "tiny.jsonl").write_text(json.dumps({"id": "p1", "turns": ["hi"]}) + "\n")
    argv = eval_argv("tiny-org/tiny-llama-dflash", tmp_path, tmp_path / "r.json")
    backend = argv.index("--backend") + 1
    assert main(argv[:backend] + ["onnxruntime"] + argv[backend + 1:] + ["--device", "cuda"]) == 2
    assert "sets the torch backend" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(argv + ["--device", "cuda"]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "needs an NVIDIA GPU" in err, err
    assert not (tmp_path / "r.json").exists()
