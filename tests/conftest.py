from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Tests import their helpers (tiny_models) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

# Tiny models: one thread is fastest, and leaves the other core to a parallel job.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from tiny_models import build_tiny_hf_model, save_tiny_hf_model

    return save_tiny_hf_model(build_tiny_hf_model("llama", seed=0), tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    from tiny_models import build_tiny_hf_model, save_tiny_hf_model

    return save_tiny_hf_model(build_tiny_hf_model("qwen3", seed=1), tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="session")
def tiny_target(tiny_llama_dir):
    """The tiny llama as the engine's TargetModel (shared by the batching and scheduler tests)."""
    from blockpilot.models.target import TargetModel

    return TargetModel.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_drafter(tiny_target):
    """A random one-layer DFlash drafter (block size 6) in process, bound to tiny_target."""
    from blockpilot.decoding.drafting import LocalDrafter
    from blockpilot.models.drafter import DFlashDrafter

    return LocalDrafter(DFlashDrafter.random(tiny_target.config, num_hidden_layers=1, block_size=6, seed=1), tiny_target)


@pytest.fixture(scope="session")
def tiny_decoder(tiny_target, tiny_drafter):
    from blockpilot.decoding.speculative import SpeculativeDecoder

    return SpeculativeDecoder(tiny_target, tiny_drafter)
