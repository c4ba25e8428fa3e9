"""Tiny random targets and DFlash drafters in a Hugging Face cache (huggingface_hub's layout:
<cache>/models--ORG--NAME/snapshots/<revision>/..., refs/main), resolved by repository id offline.

huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, when it is imported: `offline_hub` points the
imported module at the temporary cache (and sets the variables for child processes too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from tiny_models import add_char_chat_tokenizer, build_tiny_hf_model, save_tiny_hf_model

REVISION = "0123456789abcdef0123456789abcdef01234567"
# repository id -> (model family, sharded weights); each target has a drafter at "<id>-dflash".
TARGETS = {"tiny-org/tiny-llama": ("llama", False), "tiny-org/tiny-qwen3": ("qwen3", True)}
DRAFTER_LAYERS = {"llama": 1, "qwen3": 2}


def snapshot_dir(hub_cache: Path, repo_id: str) -> Path:
    """Create the cache entry of `repo_id` (refs/main -> REVISION) and return its empty snapshot folder."""
    from huggingface_hub.file_download import repo_folder_name

    repo = hub_cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def save_sharded(model, out_dir: Path) -> Path:
    """A Hugging Face directory whose weights are split over two shards with an index, as large
    checkpoints are (the resolver then fetches only the shards the index names)."""
    model.config.to_json_file(out_dir / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(out_dir / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out_dir


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory) -> Path:
    """HF_HOME holding every TARGETS entry (weights, tokenizer with a chat template) and its random
    DFlash drafter (block size 8)."""
    from blockpilot.models.config import TargetConfig
    from blockpilot.models.drafter import DFlashDrafter

    home = tmp_path_factory.mktemp("hf_home")
    for seed, (repo_id, (family, sharded)) in enumerate(TARGETS.items()):
        target = snapshot_dir(home / "hub", repo_id)
        model = build_tiny_hf_model(family, seed=seed)
        (save_sharded if sharded else save_tiny_hf_model)(model, target)
        add_char_chat_tokenizer(target)
        drafter = DFlashDrafter.random(TargetConfig.from_dir(target), num_hidden_layers=DRAFTER_LAYERS[family],
                                       block_size=8, mask_token_id=0, seed=seed + 10)
        drafter.save_pretrained(snapshot_dir(home / "hub", f"{repo_id}-dflash"))
    return home


@pytest.fixture
def offline_hub(hub_home, monkeypatch) -> Path:
    """The cache of `hub_home` with HF_HUB_OFFLINE=1, for this process and its children."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_home
