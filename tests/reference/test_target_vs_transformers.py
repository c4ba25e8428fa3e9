"""Our target engine against `transformers` on the same weights (fp32, tiny random configs)."""

from __future__ import annotations

import pytest
import torch

from blockpilot.models.target import TargetModel
from tiny_models import build_tiny_hf_model, save_tiny_hf_model

TOLERANCE = 1e-4

VARIANTS = {
    "llama": dict(model_type="llama"),
    "qwen3": dict(model_type="qwen3"),
    "llama-tied-bias": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True),
    "llama3-rope": dict(
        model_type="llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    kwargs = dict(VARIANTS[request.param])
    model_type = kwargs.pop("model_type")
    hf = build_tiny_hf_model(model_type, seed=3, **kwargs)
    ours = TargetModel.from_pretrained(save_tiny_hf_model(hf, tmp_path_factory.mktemp(request.param)))
    return hf, ours


def test_prefill_logits_and_hidden_states_match(pair):
    hf, ours = pair
    tokens = torch.randint(3, hf.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        cache = ours.new_cache(64)
        out = ours(tokens, cache, hidden_layer_ids=[0, 2, 3])
    assert (out.logits - ref.logits).abs().max().item() <= TOLERANCE
    expected_hidden = torch.cat([ref.hidden_states[i + 1] for i in (0, 2)], dim=-1)
    assert (out.hidden[..., : 2 * hf.config.hidden_size] - expected_hidden).abs().max().item() <= TOLERANCE
    # The last layer's output in transformers is after the final norm; ours is the raw residual
    # stream, which the final norm maps onto it.
    last = ours.norm(out.hidden[..., 2 * hf.config.hidden_size :])
    assert (last - ref.hidden_states[-1]).abs().max().item() <= TOLERANCE


def test_incremental_blocks_with_rollback_match_full_forward(pair):
    """Prefill, then blocks of several tokens, some partly rolled back: every kept position's logits
    equal those of one full forward over the committed sequence."""
    hf, ours = pair
    gen = torch.Generator().manual_seed(1)
    sequence = torch.randint(3, hf.config.vocab_size, (1, 60), generator=gen)
    cache = ours.new_cache(80)
    committed = 12
    with torch.no_grad():
        ours(sequence[:, :committed], cache, num_logits=0)
        got: dict[int, torch.Tensor] = {}
        for block, keep in [(5, 2), (1, 1), (8, 8), (4, 0), (6, 3), (3, 3)]:
            # Feed `block` tokens but keep only `keep` of them (the rest is a rejected draft, here
            # replaced by junk tokens to prove the rollback forgets them).
            feed = sequence[:, committed : committed + block].clone()
            feed[:, keep:] = (feed[:, keep:] + 7) % hf.config.vocab_size
            out = ours(feed, cache)
            for i in range(keep):
                got[committed + i] = out.logits[0, i]
            committed += keep
            cache.truncate(committed)
        ref = hf(sequence[:, :committed]).logits[0]
    for position, logits in got.items():
        assert (logits - ref[position]).abs().max().item() <= TOLERANCE, position


def test_batched_left_padded_rows_match_single_rows(pair):
    """Batched generation (used to make training data) gives each row what it gets alone."""
    hf, ours = pair
    gen = torch.Generator().manual_seed(2)
    lengths = [9, 14, 5]
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    key_valid = torch.zeros(len(prompts), 32, dtype=torch.bool)
    positions = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        pad = width - len(prompt)
        tokens[row, pad:] = prompt
        key_valid[row, pad:] = True
        positions[row, pad:] = torch.arange(len(prompt))
    with torch.no_grad():
        batch_cache = ours.new_cache(32, batch_size=len(prompts))
        batched = ours(tokens, batch_cache, positions, num_logits=1, key_valid=key_valid).logits[:, 0]
        for row, prompt in enumerate(prompts):
            alone = ours(prompt[None], ours.new_cache(32), num_logits=1).logits[0, 0]
            assert (batched[row] - alone).abs().max().item() <= TOLERANCE


def test_bf16_weights_run_in_bf16_and_track_transformers(tiny_llama_dir):
    """bf16 weights (training-data generation on CPUs with native BF16) keep the activations and
    the cache in bf16 (rotary tables are fp32 and cast, as transformers does) and stay close to
    transformers' own bf16 model: rounding differs, so the bound is loose, but a wrong dtype mix
    (fp32 queries against a bf16 cache) fails outright."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    ours = TargetModel.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    tokens = torch.randint(3, hf.config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        cache = ours.new_cache(32)
        out = ours(tokens[:, :15], cache)
        step = ours(tokens[:, 15:], cache)
    assert cache.keys.dtype == torch.bfloat16 and out.logits.dtype == torch.bfloat16
    got = torch.cat([out.logits, step.logits], dim=1).float()
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 0.05 * scale
