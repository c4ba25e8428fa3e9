"""Tiny random models built inside the tests (no files, no hub), shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_VOCAB = 97


def tiny_hf_config(model_type: str = "llama", **overrides):
    """A transformers config for a tiny random Llama or Qwen3."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if model_type == "qwen3":
        common.setdefault("head_dim", 24)
        return Qwen3Config(**common)
    return LlamaConfig(**common)


def build_tiny_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A transformers model with random weights, fp32, eval mode.

    Weights are drawn with a larger std than the default init so that logits are far from uniform
    (distinct argmaxes, confident predictions): a random model that is uniform everywhere would make
    greedy comparisons and acceptance tests meaningless.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_hf_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model.eval()


def save_tiny_hf_model(model, out_dir: Path) -> Path:
    """Write a transformers model as a Hugging Face directory (config.json + model.safetensors)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(out_dir / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"))
    return out_dir
