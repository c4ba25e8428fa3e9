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
