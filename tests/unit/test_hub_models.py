"""Targets and drafters by Hugging Face repository id: the cache first, HF_HUB_OFFLINE honoured,
one clear line naming the repository when it is missing, local paths first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blockpilot.errors import NotFoundError
from blockpilot.models.store import is_hub_repo_id, resolve_drafter, resolve_target
from hub_models import REVISION, hub_home, offline_hub  # noqa: F401 (fixtures)


@pytest.mark.parametrize("text, expected", [
    ("Qwen/Qwen3-4B", True), ("z-lab/Qwen3-4B-DFlash-b16", True), ("meta-llama/Llama-3.1-8B-Instruct", True),
    ("default", False), ("/abs/model", False), ("./org/name", False), ("~/org/name", False), ("org/name/extra", False),
    ("org/model.gguf", False), ("org/", False), ("", False),
])
def test_repository_ids_are_told_from_paths(text, expected):
    assert is_hub_repo_id(text) is expected


def test_repository_ids_resolve_to_their_cached_snapshots_offline(offline_hub):
    for repo_id in ("tiny-org/tiny-llama", "tiny-org/tiny-qwen3"):
        target = resolve_target(repo_id)
        assert target.parent.name == "snapshots" and target.name == REVISION and (target / "config.json").is_file()
        assert (target / "tokenizer.json").is_file()  # tokenizer and chat template come from the repository
        drafter = resolve_drafter(f"{repo_id}-dflash")
        assert (drafter / "model.safetensors").is_file() and drafter.name == REVISION
    # What `blockpilot up` hands the verifier for the drafter service (and `export onnx --drafter`).
    from blockpilot.backends.loader import served_drafter_layers

    checkpoint = json.loads((resolve_drafter("tiny-org/tiny-qwen3-dflash") / "config.json").read_text())
    assert served_drafter_layers("tiny-org/tiny-qwen3", "tiny-org/tiny-qwen3-dflash") == \
        tuple(checkpoint["dflash_config"]["target_layer_ids"])


def test_a_cached_snapshot_is_used_without_contacting_the_hub(offline_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert resolve_target("tiny-org/tiny-llama").name == REVISION
    assert resolve_drafter("tiny-org/tiny-llama-dflash").name == REVISION


def _one_line(message: str) -> str:
    assert "\n" not in message and "Traceback" not in message
    for class_name in ("LocalEntryNotFoundError", "ConnectError", "HfHubHTTPError", "OfflineModeIsEnabled"):
        assert class_name not in message
    return message


def test_a_missing_repository_offline_is_one_clear_line(offline_hub):
    with pytest.raises(NotFoundError) as info:
        resolve_target("tiny-org/no-such-model")
    message = _one_line(str(info.value))
    assert "'tiny-org/no-such-model'" in message and "HF_HUB_OFFLINE=1" in message and "hf download" in message
    with pytest.raises(NotFoundError, match="drafter 'tiny-org/no-such-drafter' is neither a local path"):
        resolve_drafter("tiny-org/no-such-drafter")


def test_a_missing_repository_with_the_hub_unreachable_is_one_clear_line(offline_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(NotFoundError) as info:
        resolve_target("tiny-org/no-such-model")
    message = _one_line(str(info.value))
    assert "'tiny-org/no-such-model'" in message and "cannot be reached" in message


def test_a_partial_snapshot_names_what_it_lacks(offline_hub, tmp_path):
    from hub_models import snapshot_dir

    snapshot = snapshot_dir(offline_hub / "hub", "tiny-org/config-only")
    (snapshot / "config.json").write_text("{}")
    with pytest.raises(NotFoundError, match=r"'tiny-org/config-only' is in the Hugging Face cache .* without \*\.safetensors"):
        resolve_target("tiny-org/config-only")


def test_a_local_directory_named_like_a_repository_is_a_path(offline_hub, tmp_path, monkeypatch):
    import shutil

    local = tmp_path / "tiny-org" / "tiny-llama"
    shutil.copytree(resolve_target("tiny-org/tiny-llama"), local)
    monkeypatch.chdir(tmp_path)
    assert resolve_target("tiny-org/tiny-llama") == local.absolute()
    assert resolve_drafter(str(local)) == local.absolute()


def test_generate_by_repository_ids_uses_the_repository_tokenizer_and_is_lossless(offline_hub, capsys):
    from blockpilot.cli import main

    reports = []
    for block_size in ("1", "8"):
        code = main(["generate", "--target", "tiny-org/tiny-llama", "--drafter", "tiny-org/tiny-llama-dflash", "--backend",
                     "torch", "--block-size", block_size, "--prompt-lookup", "off", "--max-new-tokens", "24", "--json", "hello"])
        out = capsys.readouterr()
        assert code == 0, out.err
        reports.append(json.loads(out.out))
    plain, drafted = reports
    assert drafted["drafter"] == "tiny-org/tiny-llama-dflash" and drafted["block_size"] == 8
    assert drafted["target"].endswith(REVISION)
    # The repository's chat template (tests/tiny_models.add_char_chat_tokenizer) wrapped the prompt.
    assert plain["prompt_token_ids"][0] == 3  # <|im_start|>
    assert drafted["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) >= 1


def test_cli_missing_drafter_repository_is_one_line_and_nonzero(offline_hub, capsys):
    from blockpilot.cli import main

    code = main(["generate", "--target", "tiny-org/tiny-llama", "--drafter", "tiny-org/no-such-dflash", "--backend", "torch",
                 "--block-size", "4", "hi"])
    err = capsys.readouterr().err
    assert code == 1
    assert _one_line(err.strip()).startswith("blockpilot generate: error: drafter 'tiny-org/no-such-dflash'")


def test_cli_process_missing_target_repository_is_one_line_and_nonzero(offline_hub):
    """As a user runs it: a real process, HF_HOME and HF_HUB_OFFLINE=1 from the environment."""
    env = {**os.environ, "HF_HOME": str(offline_hub), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "blockpilot.cli", "generate", "--target", "Qwen/Qwen3-4B", "--backend",
                           "torch", "hi"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and done.stdout == ""
    line = _one_line(done.stderr.strip())
    assert "'Qwen/Qwen3-4B'" in line and "HF_HUB_OFFLINE=1" in line


def test_prepare_fetches_the_target_and_the_drafter_by_id(offline_hub, capsys):
    """`blockpilot prepare`, as compose's model-prepare runs it (here offline: both are cached)."""
    from blockpilot.cli import main

    code = main(["prepare", "--target", "tiny-org/tiny-qwen3", "--drafter", "tiny-org/tiny-qwen3-dflash", "--backend", "torch"])
    out = capsys.readouterr()
    assert code == 0, out.err
    target, drafter = out.out.split()
    assert target == str(resolve_target("tiny-org/tiny-qwen3")) and drafter == str(resolve_drafter("tiny-org/tiny-qwen3-dflash"))
    assert main(["prepare", "--target", "tiny-org/tiny-qwen3", "--drafter", "", "--backend", "torch"]) == 0
    assert capsys.readouterr().out.split() == [target]
