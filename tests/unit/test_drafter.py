"""The DFlash drafter: checkpoint format, round trip, and cached drafting == one-shot drafting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blockpilot.decoding.drafting import DraftRequest, LocalDrafter
from blockpilot.errors import ModelFormatError, NotFoundError
from blockpilot.models.drafter import DFlashDrafter, DrafterConfig, default_target_layer_ids
from blockpilot.models.target import TargetModel


@pytest.fixture(scope="module")
def target(tiny_qwen3_dir):
    return TargetModel.from_pretrained(tiny_qwen3_dir)


@pytest.fixture(scope="module")
def drafter(target):
    return DFlashDrafter.random(target.config, num_hidden_layers=2, block_size=6, target_layer_ids=[0, 2], mask_token_id=4, seed=3)


def test_default_target_layer_ids_follow_dflash():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(32, 5) == [1, 8, 15, 22, 29]
    assert default_target_layer_ids(30, 1) == [15]


def test_checkpoint_uses_the_published_format(drafter, tmp_path):
    drafter.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["block_size"] == 6 and config["num_target_layers"] == 4 and config["num_hidden_layers"] == 2
    assert config["dflash_config"] == {"target_layer_ids": [0, 2], "mask_token_id": 4}
    names = set(load_file(str(tmp_path / "model.safetensors")))
    expected = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"layers.{i}.self_attn.{p}_norm.weight" for p in "qk"}
        expected |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"layers.{i}.{p}_layernorm.weight" for p in ("input", "post_attention")}
    assert names == expected


def test_round_trip_drafts_identically(drafter, target, tmp_path):
    loaded = DFlashDrafter.from_pretrained(drafter.save_pretrained(tmp_path))
    assert loaded.config == drafter.config
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    context = torch.randn(9, 2 * target.config.hidden_size)
    request = DraftRequest(anchor=7, start=9, num_draft=5, context=context, context_start=0)
    a = LocalDrafter(drafter, target).open_session(32).propose(request)
    b = LocalDrafter(loaded, target).open_session(32).propose(request)
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_load_equals_the_fp32_load_cast(target, tmp_path, dtype):
    """Read straight into the dtype (no fp32 model first): every tensor, the RoPE table and the
    draft vocabulary (integers, never cast) equal those of the fp32 load cast with Module.to."""
    vocab = torch.tensor([9, 2, 4, 7, 0, 5])
    source = DFlashDrafter.random(target.config, num_hidden_layers=2, block_size=6, mask_token_id=4, seed=8, draft_vocab=vocab)
    folder = source.save_pretrained(tmp_path)
    direct = DFlashDrafter.from_pretrained(folder, dtype=dtype)
    cast = DFlashDrafter.from_pretrained(folder).to(dtype)
    assert direct.config == cast.config and direct.draft_vocab.dtype == torch.long
    assert torch.equal(direct.draft_vocab, vocab) and direct.rotary.inv_freq.dtype == dtype
    for (name, a), (_, b) in zip(direct.state_dict().items(), cast.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(direct.rotary.inv_freq, cast.rotary.inv_freq)
    assert not any(p.is_meta or p.requires_grad for p in direct.parameters())


def test_weights_of_another_shape_are_refused_by_name(drafter, tmp_path):
    from safetensors.torch import save_file

    folder = drafter.save_pretrained(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["norm.weight"] = torch.ones(3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFormatError, match=r"norm.weight \[3\] \(config: \[\d+\]\)"):
        DFlashDrafter.from_pretrained(folder)
    del state["norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFormatError, match=r"missing \['norm.weight'\]"):
        DFlashDrafter.from_pretrained(folder)


def test_block_size_may_live_inside_dflash_config(drafter):
    raw = drafter.config.to_hf_dict()
    raw["dflash_config"]["block_size"] = 12
    del raw["block_size"]
    assert DrafterConfig.from_hf_dict(raw).block_size == 12


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(architectures=["DFlash2DraftModel"]), "unsupported drafter architecture"),
        (lambda c: c.update(use_sliding_window=True), "sliding-window"),
        (lambda c: c["dflash_config"].update(mask_token_id=10_000), "mask_token_id"),
        (lambda c: c["dflash_config"].update(target_layer_ids=[0, 9]), "target_layer_ids"),
        (lambda c: c.pop("num_target_layers"), "num_target_layers"),
    ],
)
def test_bad_configs_are_refused_clearly(drafter, change, message):
    raw = drafter.config.to_hf_dict()
    change(raw)
    with pytest.raises(ModelFormatError, match=message):
        DrafterConfig.from_hf_dict(raw)


def test_missing_checkpoint_and_wrong_target_are_refused(drafter, target, tmp_path):
    with pytest.raises(NotFoundError):
        DFlashDrafter.from_pretrained(tmp_path / "nope")
    other = DrafterConfig.for_target(target.config)
    bad = DrafterConfig(**{**other.__dict__, "num_target_layers": 7, "target_layer_ids": (1,)})
    with pytest.raises(ModelFormatError, match="num_target_layers"):
        bad.check_target(target.config)


def test_cached_context_equals_one_shot_context(drafter, target):
    """Feeding the context in pieces over several steps (the draft KV cache) gives the same block
    output as feeding all of it at once to a fresh cache."""
    gen = torch.Generator().manual_seed(0)
    width = 2 * target.config.hidden_size
    context = torch.randn(1, 20, width, generator=gen)
    block = target.embed(torch.tensor([[5, 4, 4, 4, 4, 4]]))
    block_positions = torch.arange(20, 26)[None]
    with torch.no_grad():
        one_shot = drafter(block, context, drafter.new_cache(32), block_positions, torch.arange(20)[None])
        cache = drafter.new_cache(32)
        for lo, hi in [(0, 8), (8, 9), (9, 15)]:
            # An intermediate draft (its block must not linger in the cache).
            drafter(target.embed(torch.tensor([[3, 4, 4]])), context[:, lo:hi], cache,
                     torch.arange(hi, hi + 3)[None], torch.arange(lo, hi)[None])
            assert cache.length == hi
        pieces = drafter(block, context[:, 15:], cache, block_positions, torch.arange(15, 20)[None])
    assert (pieces - one_shot).abs().max().item() < 1e-5


def test_block_attention_is_not_causal(drafter, target):
    """Changing a later block token changes earlier positions' outputs (bidirectional block)."""
    context = torch.randn(1, 4, 2 * target.config.hidden_size)
    positions = torch.arange(4, 8)[None]
    with torch.no_grad():
        a = drafter(target.embed(torch.tensor([[5, 4, 4, 4]])), context, drafter.new_cache(16), positions, torch.arange(4)[None])
        b = drafter(target.embed(torch.tensor([[5, 4, 4, 9]])), context, drafter.new_cache(16), positions, torch.arange(4)[None])
    assert not torch.allclose(a[0, 1], b[0, 1])


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("temperature, sampling", [(0.0, "greedy"), (1.0, "sample")])
def test_a_cheaper_drafter_drafts_for_an_fp32_target_without_changing_its_output(tiny_target, temperature, sampling, precision):
    """The drafter may run in a cheaper precision than the target: drafts change, output does not."""
    from blockpilot.decoding.lookup import LOOKUP_OFF
    from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
    from blockpilot.models.drafter import int8_linear_supported

    if precision == "int8" and not int8_linear_supported():
        pytest.skip("this torch build has no x86 int8 linear kernels")
    model = DFlashDrafter.random(tiny_target.config, num_hidden_layers=1, block_size=6, seed=1)
    cheaper = LocalDrafter(model, tiny_target, precision=precision)
    assert cheaper.precision == precision
    if precision == "bf16":
        assert cheaper.dtype == torch.bfloat16 and cheaper.head.weight.dtype == torch.bfloat16
    assert tiny_target.lm_head.weight.dtype == torch.float32  # the target keeps its own
    params = SamplingParams(temperature=temperature, max_new_tokens=30, seed=5, draft_sampling=sampling)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    plain = SpeculativeDecoder(tiny_target).generate(prompt, params, 1, lookup=LOOKUP_OFF)
    drafted = SpeculativeDecoder(tiny_target, cheaper).generate(prompt, params, 6, lookup=LOOKUP_OFF)
    if temperature == 0:
        assert drafted.token_ids == plain.token_ids
    else:  # sampled drafts: the rule gets q from the same (float) logits the draft was drawn from
        assert len(drafted.token_ids) == 30
    assert "dflash" in drafted.step_sources


def test_int8_drafts_mostly_agree_with_fp32_drafts(tiny_target):
    """int8 weights move the draft logits a little: the argmax drafts stay mostly the same, and
    the int8 copy leaves the caller's fp32 drafter untouched."""
    from blockpilot.decoding.drafting import DraftRequest
    from blockpilot.models.drafter import int8_linear_supported

    if not int8_linear_supported():
        pytest.skip("this torch build has no x86 int8 linear kernels")
    model = DFlashDrafter.random(tiny_target.config, num_hidden_layers=1, block_size=6, seed=1)
    fp32, int8 = LocalDrafter(model, tiny_target), LocalDrafter(model, tiny_target, precision="int8")
    assert isinstance(model.fc, torch.nn.Linear) and not isinstance(int8.drafter.fc, torch.nn.Linear)
    # the output projection too (it is the largest weight of a pass: 16K draft tokens x hidden)
    assert type(int8.head._int8) is not torch.nn.Linear and type(int8.head._int8).__module__.startswith("torch.ao.nn.quantized")
    width = len(model.target_layer_ids) * tiny_target.config.hidden_size
    context = torch.randn(40, width, generator=torch.Generator().manual_seed(0))
    agree = total = 0
    for anchor_pos in range(8, 40, 4):
        request = DraftRequest(anchor=7, start=anchor_pos, num_draft=5, context=context[:anchor_pos], context_start=0)
        a = fp32.open_session(64).propose(request).tokens
        b = int8.open_session(64).propose(request).tokens
        agree += int((a == b).sum())
        total += a.numel()
    assert agree >= 0.8 * total


def _random_requests(target, count, *, temperature=0.0, seed=0):
    """Sessions at different points: different block sizes, held context and new context rows."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * target.config.hidden_size
    requests = []
    for i in range(count):
        held, new, num_draft = 3 * i, 1 + (5 * i) % 7, 1 + (3 * i) % 9
        requests.append((torch.randn(held, width, generator=gen), DraftRequest(
            anchor=5 + i, start=held + new, num_draft=num_draft, context=torch.randn(new, width, generator=gen),
            context_start=held, temperature=temperature, sample=temperature > 0,
            uniforms=torch.rand(num_draft, generator=gen) if temperature > 0 else None)))
    return requests


def _opened(local, held):
    """A session whose cache already holds `held` context rows (an earlier step's)."""
    session = local.open_session(64)
    if held.shape[0]:
        with torch.no_grad():
            local.drafter.forward(local.target.embed(torch.tensor([[3, 4]])), held[None], session.cache,
                                  torch.arange(held.shape[0], held.shape[0] + 2)[None], torch.arange(held.shape[0])[None])
    return session


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_one_pass_for_many_sessions_drafts_as_each_session_alone(drafter, target, temperature):
    """propose_together (the drafter service's batched pass) gives every session the draft, the
    draft distribution and the cache it gets drafting alone; six sessions with block sizes 2..10,
    held contexts 0..15 and 1..7 new context rows."""
    from blockpilot.decoding.drafting import propose_together

    local = LocalDrafter(drafter, target)
    requests = _random_requests(target, 6, temperature=temperature)
    alone = [_opened(local, held) for held, _ in requests]
    together = [_opened(local, held) for held, _ in requests]
    expected = [session.propose(request) for session, (_, request) in zip(alone, requests)]
    got = propose_together(together, [request for _, request in requests])
    for one, many, a, b in zip(expected, got, alone, together):
        assert torch.equal(one.tokens, many.tokens)
        if temperature > 0:
            assert (one.probs - many.probs).abs().max().item() < 1e-5
        assert a.cache.length == b.cache.length
        end = a.cache.length
        assert (a.cache.keys[:, :, :, :end] - b.cache.keys[:, :, :, :end]).abs().max().item() < 1e-5


def test_a_full_cache_fails_its_own_check_and_changes_nothing(drafter, target):
    from blockpilot.errors import FailedPreconditionError, ResourceExhaustedError

    local = LocalDrafter(drafter, target)
    session = local.open_session(4)
    request = DraftRequest(anchor=5, start=5, num_draft=3, context=torch.randn(5, 2 * target.config.hidden_size), context_start=0)
    with pytest.raises(ResourceExhaustedError, match="capacity of 4"):
        session.check(request)
    assert session.cache.length == 0
    session.close()
    with pytest.raises(FailedPreconditionError, match="closed"):
        session.check(request)
