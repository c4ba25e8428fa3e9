"""The onnxruntime backend on the CPU (issue #14): the fused graph at fp32 (against the torch engine)
and at int4 (a GGUF's own Q4_1 / Q8_0 codes), the row invariance its losslessness rests on, the
speculative loop's losslessness at both precisions, and the checks that refuse what cannot run.

Tiny random Llama (plain, and with tied embeddings + attention bias + Llama-3.1 RoPE) and Qwen3
targets; the int4 ones are built so that their fp32 weights are exactly their codes (as a converted
GGUF model's are), with a real GGUF file beside them."""

from __future__ import annotations

import dataclasses

import json

import pytest
import torch

from blockpilot.backends import onnxruntime_fused
from blockpilot.backends.gguf_codes import codes_for_target, read_gguf_codes
from blockpilot.backends.loader import BackendOptions, load_backend
from blockpilot.backends.onnx_export import cached_export, export_onnx, measured_thread_counts, read_export, settle_curve
from blockpilot.backends.onnxruntime_fused import FusedOnnxRuntimeTarget, nearest_measured
from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError
from blockpilot.models.store import COMPLETE_MARKER
from blockpilot.models.target import TargetModel
from fake_drafters import OracleDrafter
from tiny_models import build_tiny_hf_model, quantized_tiny_model, save_tiny_hf_model

pytestmark = pytest.mark.timeout(600)

TOLERANCE = 1e-4  # fp32: ONNX Runtime vs the torch engine
LAYERS = {"llama": (2,), "qwen3": (1, 3), "llama-variant": (0, 3)}
LLAMA_VARIANT = dict(tie_word_embeddings=True, attention_bias=True, rope_parameters={
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64})
PROMPTS = ([5, 6, 7, 8, 9, 10], [40, 3, 77, 12, 12, 90, 31, 8, 64])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """name -> (model_dir, gguf_path, TargetModel) of the tiny quantized targets."""
    made = {}
    # GroupQueryAttention takes head sizes that are multiples of 16 (Qwen3's real ones are 128).
    for name, model_type, overrides in (("llama", "llama", {}), ("qwen3", "qwen3", {"head_dim": 32}),
                                        ("llama-variant", "llama", LLAMA_VARIANT)):
        model_dir, gguf = quantized_tiny_model(model_type, tmp_path_factory.mktemp(name), seed=3, **overrides)
        made[name] = (model_dir, gguf, TargetModel.from_pretrained(model_dir))
    return made


@pytest.fixture(scope="module")
def backends(quantized, tmp_path_factory):
    """(name, precision) -> FusedOnnxRuntimeTarget, exported once each."""
    root = tmp_path_factory.mktemp("fused")
    made = {}
    for name, (model_dir, gguf, target) in quantized.items():
        for precision in ("fp32", "int4"):
            codes = read_gguf_codes(gguf, target) if precision == "int4" else None
            export = export_onnx(target, root / f"{name}-{precision}", LAYERS[name], source=str(model_dir), graph="fused",
                                 precision=precision, codes=codes)
            made[name, precision] = FusedOnnxRuntimeTarget(export, target, threads=1)
    return made


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("name", LAYERS)
@torch.inference_mode()
def test_fp32_matches_the_torch_engine(backends, quantized, name):
    target = quantized[name][2]
    backend = backends[name, "fp32"]
    generator = torch.Generator().manual_seed(5)
    caches = [target.new_cache(40), backend.new_cache(40)]
    worst = 0.0
    # prefill, a block, a rollback, a block on the rolled-back cache, a single token
    for count, rollback in [(9, None), (5, 11), (4, None), (1, None)]:
        tokens = torch.randint(target.config.vocab_size, (1, count), generator=generator)
        outs = [model(tokens, cache, hidden_layer_ids=LAYERS[name]) for model, cache in zip((target, backend), caches)]
        for key in ("logits", "hidden", "final_state"):
            worst = max(worst, max_diff(getattr(outs[0], key), getattr(outs[1], key)))
        assert caches[0].length == caches[1].length
        if rollback is not None:
            for cache in caches:
                cache.truncate(rollback)
    assert worst <= TOLERANCE, worst


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
@torch.inference_mode()
def test_a_token_gets_the_same_numbers_in_any_pass(backends, name, precision):
    """Row invariance: the logits and features of a token do not depend on how many tokens share
    its pass (a verify block, single steps, any split), exactly."""
    backend = backends[name, precision]
    generator = torch.Generator().manual_seed(11)
    prompt = torch.randint(backend.config.vocab_size, (1, 7), generator=generator)
    tokens = torch.randint(backend.config.vocab_size, (1, 6), generator=generator)
    cache = backend.new_cache(20)
    backend(prompt, cache, num_logits=0)
    splits = {"block": [6], "singles": [1] * 6, "2+4": [2, 4], "3+1+2": [3, 1, 2]}
    results = {}
    for label, sizes in splits.items():
        cache.truncate(7)
        logits, hidden, start = [], [], 0
        for size in sizes:
            out = backend(tokens[:, start : start + size], cache, hidden_layer_ids=LAYERS[name])
            logits.append(out.logits[0])
            hidden.append(out.hidden[0])
            start += size
        results[label] = (torch.cat(logits), torch.cat(hidden))
    for label, (logits, hidden) in results.items():
        assert torch.equal(logits, results["block"][0]), label
        assert torch.equal(hidden, results["block"][1]), label


def test_a_lone_token_without_padding_would_break_row_invariance(backends, monkeypatch):
    """Why single tokens are padded: on this CPU a one-row pass takes other kernels. The start-up
    check refuses a backend whose rows are not invariant (here: padding switched off)."""
    backend = backends["llama", "int4"]
    monkeypatch.setattr(onnxruntime_fused, "MIN_PASS_ROWS", 1)
    with pytest.raises(FailedPreconditionError, match="other logits in a pass of several tokens than alone"):
        FusedOnnxRuntimeTarget(backend.export, backend.torch_target, threads=1)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_lone_token_runs_unpadded_only_where_its_one_row_numbers_are_exact(backends, precision):
    """The start-up check decides per CPU; either way a lone token gets a block's numbers, and
    the verify-cost curve prices passes as the backend runs them (unpadded: all on the sessions graph)."""
    backend = backends["llama", precision]
    exact = onnxruntime_fused.lone_rows_match(backend)
    assert backend.lone_rows_invariant == exact
    meta = backend.export.metadata
    assert (meta.unpadded_cost_ms is not None) == exact  # measured on this CPU at export
    prompt, block = torch.tensor([PROMPTS[0]]), torch.tensor([[5, 9, 2, 7]])
    cache = backend.new_cache(32)
    backend(prompt, cache)
    together = backend(block, cache).logits[0]
    cache.truncate(len(PROMPTS[0]))
    alone = torch.cat([backend(block[:, i : i + 1], cache).logits[0] for i in range(4)])
    assert torch.equal(alone, together)
    # The export timed its passes at one thread and at this process's count; the backend prices by its own.
    curves = [meta.verify_cost_ms] + ([meta.unpadded_cost_ms] if exact else [])
    for per_threads in curves:
        assert set(per_threads) == {str(t) for t in measured_thread_counts()}
        for curve in per_threads.values():
            costs = [curve[str(k)] for k in range(1, len(curve) + 1)]
            assert costs == sorted(costs)  # settled: a longer pass is never priced below a shorter one
    padded = {k: float(v) for k, v in meta.verify_cost_ms["1"].items()}
    halved = {k: v / 2 for k, v in padded.items()}
    priced = FusedOnnxRuntimeTarget.__new__(FusedOnnxRuntimeTarget)
    priced.export = dataclasses.replace(backend.export, metadata=dataclasses.replace(
        meta, unpadded_cost_ms={"1": {**halved, "1": padded["1"] / 4}}))
    priced.threads = 1
    for invariant, expected in ((True, halved["2"] / (padded["1"] / 4)), (False, padded["2"] / padded["1"])):
        priced.lone_rows_invariant = invariant
        assert priced.verify_cost[2] == pytest.approx(expected)
    priced.export = dataclasses.replace(backend.export, metadata=dataclasses.replace(meta, unpadded_cost_ms=None))
    priced.lone_rows_invariant = True
    assert priced.verify_cost[2] == pytest.approx(padded["2"] / padded["1"])  # none measured: the padded curve


def test_a_measured_curve_is_settled_and_priced_at_the_nearest_thread_count():
    """Hand-built: a k whose passes all met a busy moment (k = 2 here) takes the cost of a larger k
    measured lower; thread counts not measured take the nearest measured one (the lower on a tie)."""
    assert settle_curve({1: 10.0, 2: 16.0, 3: 13.5, 4: 15.0, 5: 14.6, 6: 17.0}) == {
        1: 10.0, 2: 13.5, 3: 13.5, 4: 14.6, 5: 14.6, 6: 17.0}
    assert settle_curve({1: 1.0, 2: 2.0, 3: 3.0}) == {1: 1.0, 2: 2.0, 3: 3.0}
    measured = {"1": "one", "2": "two", "8": "eight"}
    assert [nearest_measured(measured, t) for t in (1, 2, 3, 5, 6, 16)] == ["1", "2", "2", "2", "8", "8"]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("name", ["llama", "qwen3", "llama-variant"])
def test_speculative_decoding_is_lossless_at_each_precision(backends, quantized, name, precision):
    """Every block size, mostly-right drafts and prompt lookup give the backend's own block-size-1
    tokens; at fp32 those are also the torch engine's."""
    backend = backends[name, precision]
    target = quantized[name][2]
    params = SamplingParams(max_new_tokens=40)
    for prompt in PROMPTS:
        plain = SpeculativeDecoder(backend).generate(prompt, params, 1, lookup=LOOKUP_OFF)
        if precision == "fp32":
            assert plain.token_ids == SpeculativeDecoder(target).generate(prompt, params, 1, lookup=LOOKUP_OFF).token_ids
        for block_size in (2, 3, 5, 8):
            oracle = OracleDrafter(prompt + plain.token_ids, target.config.vocab_size, 0.7, target_layer_ids=LAYERS[name])
            for lookup in (LOOKUP_OFF, LookupConfig()):
                out = SpeculativeDecoder(backend, oracle).generate(prompt, params, block_size, lookup=lookup)
                assert out.token_ids == plain.token_ids, (block_size, lookup.enabled)


def test_int4_export_records_its_codes_and_compute_precision(backends, quantized):
    backend = backends["llama", "int4"]
    meta = read_export(backend.export.directory).metadata
    assert (meta.graph, meta.precision, backend.precision) == ("fused", "int4", "int4")
    assert meta.accuracy_level in (1, 4) and set(meta.accuracy_levels) == {"1", "4"}
    assert meta.accuracy_levels[str(meta.accuracy_level)]["row_invariant"]
    assert meta.quantization["source"] == str(quantized["llama"][1])
    assert meta.quantization["max_abs_difference"] == 0.0 and meta.quantization["left_fp32"] == []
    # with fp32 activations the codes give the fp32 engine's numbers: the layout is right
    assert meta.quantization["fp32_activations_check_error"] <= TOLERANCE
    assert meta.check_max_error is not None


def test_codes_of_other_weights_are_refused(quantized, tmp_path):
    _, gguf, _ = quantized["llama"]
    other = TargetModel.from_pretrained(quantized_tiny_model("llama", tmp_path, seed=4)[0])
    with pytest.raises(FailedPreconditionError, match="the target was not converted from this file"):
        read_gguf_codes(gguf, other)


def test_int4_needs_the_gguf_the_target_came_from(quantized, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path / "cache"))
    plain = TargetModel.from_pretrained(tiny_llama_dir)
    with pytest.raises(FailedPreconditionError, match="was not converted from one"):
        codes_for_target(plain, tiny_llama_dir)
    # A model-store directory names its GGUF in its completion marker: int4 then finds the codes.
    model_dir, gguf, target = quantized["llama"]
    (model_dir / COMPLETE_MARKER).write_text(json.dumps({"source": {"path": str(gguf)}}))
    assert codes_for_target(target, model_dir).max_abs_difference == 0.0
    backend = load_backend(target, BackendOptions("onnxruntime", precision="int4", threads=1), drafter_layers=None,
                           default_layers=LAYERS["llama"], source=str(model_dir))
    assert backend.precision == "int4"


def test_precision_choices_are_checked(backends, quantized, tmp_path):
    with pytest.raises(InvalidArgumentError, match="precision int4 runs on the onnxruntime backend"):
        BackendOptions("torch", precision="int4")
    with pytest.raises(InvalidArgumentError, match="unknown precision 'int8'"):
        BackendOptions("onnxruntime", precision="int8")
    model_dir, gguf, target = quantized["llama"]
    with pytest.raises(InvalidArgumentError, match="int4 runs on the fused graph"):
        export_onnx(target, tmp_path / "x", (2,), graph="portable", precision="int4", codes=read_gguf_codes(gguf, target))
    with pytest.raises(InvalidArgumentError, match="needs the GGUF's codes"):
        export_onnx(target, tmp_path / "y", (2,), graph="fused", precision="int4")
    # An export has one precision: asking for another is an error, not a silent switch.
    int4_dir = backends["llama", "int4"].export.directory
    with pytest.raises(InvalidArgumentError, match="is int4, but precision fp32 was asked for"):
        load_backend(target, BackendOptions("onnxruntime", precision="fp32", onnx=int4_dir), drafter_layers=LAYERS["llama"])
    # auto takes the export's own precision
    auto = load_backend(target, BackendOptions("onnxruntime", onnx=int4_dir, threads=1), drafter_layers=LAYERS["llama"])
    assert auto.precision == "int4"


@torch.inference_mode()
def test_the_cache_is_used_to_its_capacity(backends):
    """A single token at the last slot is padded into the cache's headroom, never past it."""
    backend = backends["llama", "int4"]
    cache = backend.new_cache(5)
    backend(torch.tensor([[1, 2, 3, 4]]), cache)
    backend(torch.tensor([[5]]), cache)
    assert cache.length == 5 == cache.capacity
    with pytest.raises(Exception, match="KV cache full"):
        backend(torch.tensor([[6]]), cache)
    with pytest.raises(InvalidArgumentError, match="positions other than the slots"):
        backend(torch.tensor([[6]]), backend.new_cache(4), torch.tensor([3]))


def test_architectures_the_fused_graph_cannot_run_are_refused_or_run_portable(tiny_qwen3_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path / "cache"))
    target = TargetModel.from_pretrained(tiny_qwen3_dir)  # head_dim 24
    with pytest.raises(InvalidArgumentError, match="head_dim 24 is not a multiple of 16"):
        export_onnx(target, tmp_path / "x", (1, 3), graph="fused")
    backend = load_backend(target, BackendOptions("onnxruntime", threads=1), drafter_layers=(1, 3), source=str(tiny_qwen3_dir))
    assert backend.export.metadata.graph == "portable"


def test_cached_fused_exports_are_keyed_by_precision(quantized, tmp_path):
    model_dir, gguf, target = quantized["llama"]
    fp32 = cached_export(target, (2,), source=str(model_dir), cache_dir=tmp_path, graph="fused")
    int4 = cached_export(target, (2,), source=str(model_dir), cache_dir=tmp_path, graph="fused", precision="int4",
                         codes=read_gguf_codes(gguf, target))
    assert fp32.directory != int4.directory and "fused-int4" in int4.directory.name
    assert cached_export(target, (2,), source=str(model_dir), cache_dir=tmp_path, graph="fused", precision="int4").directory == int4.directory



@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_a_batch_of_sessions_gives_each_its_own_numbers(backends, name, precision):
    """Continuous batching on this backend: sessions of different lengths and block widths (one
    of them a lone token) in one pass of the sessions graph get exactly their one-session logits
    and features, and each pool row advances by its own width."""
    backend = backends[name, precision]
    generator = torch.Generator().manual_seed(5)
    vocab = backend.config.vocab_size
    prompts = [torch.randint(vocab, (1, n), generator=generator) for n in (3, 9, 6)]
    blocks = torch.randint(vocab, (3, 5), generator=generator)
    widths = [5, 1, 3]
    pool = backend.new_batch_cache(24, 4)
    alone = []
    for row, prompt in enumerate(prompts):
        cache = backend.new_cache(24)
        backend(prompt, cache)
        pool.load_row(row, cache)
        out = backend(blocks[row : row + 1, : widths[row]], cache, hidden_layer_ids=LAYERS[name])
        alone.append((out.logits[0], out.hidden[0]))
    pool.rows_in_use = 3
    out = backend(blocks, pool, hidden_layer_ids=LAYERS[name], row_widths=widths)
    assert pool.lengths[:3].tolist() == [8, 10, 9]
    for row, (logits, hidden) in enumerate(zip(out.logits[0].split(widths), out.hidden[0].split(widths))):
        assert torch.equal(logits, alone[row][0]), row
        assert torch.equal(hidden, alone[row][1]), row
    with pytest.raises(InvalidArgumentError, match="one row per pool row in use"):
        backend(blocks[:2], pool, row_widths=[1, 1])
    # One session with a lone token: still its one-session numbers (never a one-row matmul).
    single = backend.new_batch_cache(24, 2)
    cache = backend.new_cache(24)
    backend(prompts[0], cache)
    single.load_row(0, cache)
    single.rows_in_use = 1
    expected = backend(blocks[:1, :1], cache).logits[0]
    assert torch.equal(backend(blocks[:1, :1], single, row_widths=[1]).logits[0], expected)
    assert single.lengths[0].item() == cache.length


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_batched_decoding_on_the_fused_graph_equals_one_at_a_time(backends, quantized, precision):
    """The BatchDecoder runs ragged steps on this backend: sessions with mixed prompts, block
    sizes, lookup and drafts, arriving as rows free up and leaving, each get their one-at-a-time
    tokens."""
    from blockpilot.decoding.batch import BatchDecoder, supports_ragged_batch

    backend = backends["llama", precision]
    target = quantized["llama"][2]
    assert supports_ragged_batch(backend)
    prompts = [[5, 6, 7, 8, 9, 10], [40, 3, 77, 12, 12, 90, 31, 8, 64], [7], [9, 9, 9, 9, 2, 9, 9, 9]] * 2
    work = [(prompt, SamplingParams(max_new_tokens=10 + 3 * i), 1 + i % 5) for i, prompt in enumerate(prompts)]
    alone = [SpeculativeDecoder(backend).generate(prompt, params, 1, lookup=LOOKUP_OFF).token_ids for prompt, params, _ in work]
    # One drafter serves every session: right for the first prompt's text, so mostly wrong for the
    # others, which changes what gets accepted, never the tokens.
    oracle = OracleDrafter(prompts[0] + alone[0], target.config.vocab_size, 0.7, target_layer_ids=LAYERS["llama"])
    for max_sessions in (3, 8):
        batch = BatchDecoder(SpeculativeDecoder(backend, oracle), max_sessions=max_sessions, capacity=96, max_block_size=16)
        results = batch.run(work, lookup=LookupConfig())
        assert [r.token_ids for r in results] == alone
        assert batch.active == 0 and batch.pool.rows_in_use == 0
        assert {"lookup", "dflash"} <= {s for r in results for s in r.step_sources}


def test_a_ragged_scheduler_loads_every_sessions_graph_before_serving(backends):
    from blockpilot.serving.scheduler import DecodeScheduler

    backend = backends["llama", "int4"]
    backend._sessions_graphs.clear()  # as a fresh process
    scheduler = DecodeScheduler(backend, max_sessions=3, capacity=32, max_capacity=64, max_block_size=4, ragged=True)
    try:
        assert sorted(backend._sessions_graphs) == [1, 2, 3]  # none is loaded mid-batch
    finally:
        scheduler.close()
