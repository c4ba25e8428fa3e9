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
