"""Verifier backends (issue #6): the ONNX export of the target with its KV cache, ONNX Runtime against
the torch engine (prefill, blocks, rollback), losslessness of the decoding loop on the onnxruntime
backend, the checks that refuse a mismatched export, and the TensorRT backend (run where a GPU and
TensorRT are present, its refusal checked where they are not).

Tiny random Llama (plain, and with tied embeddings + attention bias + Llama-3.1 RoPE) and Qwen3
targets; each is exported once for the module (a few seconds each)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch

from blockpilot.backends import onnx_export
from blockpilot.backends.base import BackendUnavailableError, VerifierBackend
from blockpilot.backends.cache import SeqMajorKVCache
from blockpilot.backends.loader import BackendOptions, load_backend
from blockpilot.backends.onnx_export import cached_export, check_export_matches, export_onnx, read_export, weights_digest
from blockpilot.backends.onnxruntime_backend import OnnxRuntimeTarget
from blockpilot.backends.tensorrt_backend import EngineSpec, TensorRTTarget, tensorrt_unavailable_reason
from blockpilot.config import VerifierServiceConfig
from blockpilot.decoding.drafting import LocalDrafter
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.errors import (FailedPreconditionError, InvalidArgumentError, ModelFormatError, NotFoundError,
                               ResourceExhaustedError)
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.target import TargetModel
from fake_drafters import OracleDrafter
from tiny_models import build_tiny_hf_model, save_tiny_hf_model

pytestmark = pytest.mark.timeout(600)

TOLERANCE = 1e-4  # fp32: ONNX Runtime vs the torch engine (the bound)
# llama: the layer a 'random' drafter of a 4-layer target reads (DFlash's one-layer default);
# qwen3: two layers, so the concatenated hidden output is covered; llama-variant: tied embeddings,
# attention bias and Llama-3.1 RoPE scaling in one model.
LAYERS = {"llama": (2,), "qwen3": (1, 3), "llama-variant": (0, 3)}
LLAMA_VARIANT = dict(tie_word_embeddings=True, attention_bias=True, rope_parameters={
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64})
PROMPTS = ([5, 6, 7, 8, 9, 10], [40, 3, 77, 12, 12, 90, 31, 8, 64])
TRT_REASON = tensorrt_unavailable_reason()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("blockpilot-cache")


def _exported(name, model_dir, cache_dir):
    target = TargetModel.from_pretrained(model_dir)
    export = cached_export(target, LAYERS[name], source=str(model_dir), cache_dir=cache_dir / "onnx")
    return name, target, export


@pytest.fixture(scope="module")
def llama(tiny_llama_dir, cache_dir):
    return _exported("llama", tiny_llama_dir, cache_dir)


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_dir, cache_dir):
    return _exported("qwen3", tiny_qwen3_dir, cache_dir)


@pytest.fixture(scope="module")
def llama_variant(tmp_path_factory, cache_dir):
    model_dir = save_tiny_hf_model(build_tiny_hf_model("llama", seed=3, **LLAMA_VARIANT), tmp_path_factory.mktemp("variant"))
    return _exported("llama-variant", model_dir, cache_dir)


@pytest.fixture(scope="module", params=["llama", "qwen3", "llama-variant"])
def exported(request):
    return request.getfixturevalue(request.param.replace("-", "_"))


@pytest.fixture(scope="module")
def ort_targets(request):
    """ONNX Runtime backends by model name, made on first use."""
    made = {}

    def get(name):
        if name not in made:
            _, target, export = request.getfixturevalue(name.replace("-", "_"))
            made[name] = OnnxRuntimeTarget(export, target, provider="cpu")
        return made[name]

    return get


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float().cpu() - b.float().cpu()).abs().max())


# ---- the export -----------------------------------------------------------------------------------


def test_export_is_a_checked_onnx_graph_with_dynamic_lengths(exported):
    name, target, export = exported
    cfg = target.config
    onnx.checker.check_model(str(export.model_path), full_check=True)
    graph = onnx.load(str(export.model_path), load_external_data=False).graph

    def dims(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    inputs, outputs = dims(graph.input), dims(graph.output)
    kv = [cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim]
    steps, past = inputs["input_ids"][1], inputs["past_keys"][0]
    assert isinstance(steps, str) and isinstance(past, str) and steps != past  # symbolic, independent
    assert inputs["input_ids"][0] == 1 and inputs["past_keys"][1:] == kv and inputs["past_values"] == inputs["past_keys"]
    assert isinstance(inputs["logit_index"][0], str)
    assert outputs["logits"][2] == cfg.vocab_size
    assert outputs["hidden"] == [1, steps, len(LAYERS[name]) * cfg.hidden_size]
    assert outputs["final_state"] == [1, steps, cfg.hidden_size]
    assert outputs["new_keys"] == [steps, *kv] and outputs["new_values"] == [steps, *kv]
    meta = json.loads((export.directory / "export.json").read_text())
    assert meta["hidden_layer_ids"] == list(LAYERS[name]) and meta["dtype"] == "float32" and meta["opset"] == 18
    assert meta["weights_digest"] == weights_digest(target)
    assert meta["check_max_error"] is not None and meta["check_max_error"] <= TOLERANCE


@torch.inference_mode()
def test_onnxruntime_matches_torch_for_prefill_and_blocks_after_rollback(exported, ort_targets):
    name, target, _ = exported
    ort = ort_targets(name)
    layers = LAYERS[name]
    generator = torch.Generator().manual_seed(3)
    caches = [target.new_cache(40), ort.new_cache(40)]
    worst = {"logits": 0.0, "hidden": 0.0, "final_state": 0.0, "kv": 0.0}
    # (new tokens, num_logits, roll back to this many tokens afterwards)
    steps = [(11, 1, None), (6, None, 13), (5, None, 14), (1, None, None), (8, None, 15), (7, 3, None)]
    for count, num_logits, rollback in steps:
        tokens = torch.randint(target.config.vocab_size, (1, count), generator=generator)
        out_torch, out_ort = (model(tokens, cache, num_logits=num_logits, hidden_layer_ids=layers)
                              for model, cache in zip((target, ort), caches))
        expected_rows = count if num_logits is None else num_logits
        assert out_ort.logits.shape == (1, expected_rows, target.config.vocab_size)
        for key in ("logits", "hidden", "final_state"):
            worst[key] = max(worst[key], max_diff(getattr(out_torch, key), getattr(out_ort, key)))
        assert caches[0].length == caches[1].length
        end = caches[0].length
        for which in ("keys", "values"):
            worst["kv"] = max(worst["kv"], max_diff(getattr(caches[0], which)[:, :, :, :end], getattr(caches[1], which)[:, :, :, :end]))
        if rollback is not None:
            for cache in caches:
                cache.truncate(rollback)
    assert max(worst.values()) <= TOLERANCE, worst


@torch.inference_mode()
def test_speculative_decoding_on_onnxruntime_is_token_identical_to_torch(exported, ort_targets):
    name, target, _ = exported
    ort = ort_targets(name)
    layers = LAYERS[name]
    random_drafter = LocalDrafter(DFlashDrafter.random(target.config, block_size=6, mask_token_id=0, target_layer_ids=layers),
                                  target)
    params = SamplingParams(max_new_tokens=40)
    for prompt in PROMPTS:
        reference = SpeculativeDecoder(target).generate(prompt, params, 1)
        oracle = OracleDrafter(prompt + reference.token_ids, target.config.vocab_size, 0.7, target_layer_ids=layers)
        runs = {
            "ort block 1": SpeculativeDecoder(ort).generate(prompt, params, 1),
            "ort random drafter": SpeculativeDecoder(ort, random_drafter).generate(prompt, params, 6),
            "ort oracle drafter": SpeculativeDecoder(ort, oracle).generate(prompt, params, 8),
            "torch oracle drafter": SpeculativeDecoder(target, oracle).generate(prompt, params, 8),
        }
        for label, result in runs.items():
            assert result.token_ids == reference.token_ids, (name, label)
        # The oracle's drafts were accepted (long accepted runs and rollbacks both happened).
        accepted = runs["ort oracle drafter"].acceptance_lengths
        assert max(accepted) > 2 and min(accepted) < 8, accepted


@torch.inference_mode()
def test_policy_feature_from_the_final_state_works_on_onnxruntime(exported, ort_targets):
    name, target, _ = exported
    seen = {}

    def hook(label):
        def decide(info):
            assert info.final_hidden is not None
            seen[label] = (info.last_logits, info.final_hidden, info.last_hidden)
            return 4
        return decide

    drafter = OracleDrafter([0] * 64, target.config.vocab_size, 0.0, target_layer_ids=LAYERS[name])
    for label, model in (("torch", target), ("ort", ort_targets(name))):
        SpeculativeDecoder(model, drafter).generate(PROMPTS[1], SamplingParams(max_new_tokens=6), hook(label))
    for a, b in zip(seen["torch"], seen["ort"]):
        assert max_diff(a, b) <= TOLERANCE


@torch.inference_mode()
def test_io_binding_and_session_run_give_the_same_step(llama):
    _, target, export = llama
    bound, plain = (OnnxRuntimeTarget(export, target, provider="cpu", io_binding=flag, verify_weights=False) for flag in (True, False))
    caches = [bound.new_cache(20), plain.new_cache(20)]
    tokens = torch.tensor([[3, 4, 5, 6, 7]])
    outs = [model(tokens, cache, hidden_layer_ids=LAYERS["llama"]) for model, cache in zip((bound, plain), caches)]
    assert max_diff(outs[0].logits, outs[1].logits) <= 1e-6
    assert max_diff(caches[0].key_buffer[:5], caches[1].key_buffer[:5]) <= 1e-6


# ---- the cache ------------------------------------------------------------------------------------


@torch.inference_mode()
def test_sequence_major_cache_keeps_the_kv_cache_api(llama, ort_targets):
    """The torch engine runs on it unchanged, and the verifier's way of growing a session cache
    (copying keys[:, :, :, :n] into a larger cache) works on it."""
    _, target, _ = llama
    ort = ort_targets("llama")
    prompt = torch.tensor([PROMPTS[1]])
    plain, seq_major = target.new_cache(16), ort.new_cache(16)
    assert isinstance(seq_major, SeqMajorKVCache)
    a, b = target(prompt, plain), target(prompt, seq_major)
    assert max_diff(a.logits, b.logits) <= 1e-5
    # Grow the ORT cache the way the verifier does, then keep decoding on it.
    small = ort.new_cache(len(PROMPTS[1]) + 1)
    ort(prompt, small)
    grown = ort.new_cache(32)
    grown.keys[:, :, :, : small.length] = small.keys[:, :, :, : small.length]
    grown.values[:, :, :, : small.length] = small.values[:, :, :, : small.length]
    grown.length = small.length
    reference = ort.new_cache(32)
    ort(prompt, reference)
    step = torch.tensor([[11, 12]])
    assert max_diff(ort(step, grown).logits, ort(step, reference).logits) == 0.0


def test_bad_inputs_are_typed_errors(llama, ort_targets):
    _, target, _ = llama
    ort = ort_targets("llama")
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(InvalidArgumentError, match="key_valid"):
        ort(tokens, ort.new_cache(8), key_valid=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(InvalidArgumentError, match=r"shape \[1, T>=1\]"):
        ort(torch.ones(2, 3, dtype=torch.long), ort.new_cache(8))
    with pytest.raises(InvalidArgumentError, match="SeqMajorKVCache"):
        ort(tokens, target.new_cache(8))
    with pytest.raises(InvalidArgumentError, match="batch 1"):
        ort.new_cache(8, batch_size=2)
    with pytest.raises(ResourceExhaustedError, match="capacity of 2"):
        ort(tokens, ort.new_cache(2))
    with pytest.raises(FailedPreconditionError, match=r"target layers \[2\].*reads layers \[0, 1\]"):
        ort(tokens, ort.new_cache(8), hidden_layer_ids=(0, 1))


# ---- refusing mismatched exports ------------------------------------------------------------------


def test_an_export_of_other_weights_architecture_or_layers_is_refused(llama, qwen3, tmp_path):
    _, llama_target, llama_export = llama
    _, qwen3_target, qwen3_export = qwen3
    with pytest.raises(FailedPreconditionError, match="another architecture: model_type 'qwen3'"):
        load_backend(llama_target, BackendOptions("onnxruntime", onnx=qwen3_export.directory), drafter_layers=None)
    other = TargetModel.from_pretrained(save_tiny_hf_model(build_tiny_hf_model("llama", seed=7), tmp_path / "other"))
    with pytest.raises(FailedPreconditionError, match="made from other weights"):
        load_backend(other, BackendOptions("onnxruntime", onnx=llama_export.directory), drafter_layers=None)
    with pytest.raises(FailedPreconditionError, match=r"layers \[2\], but the drafter reads layers \[1, 3\]"):
        load_backend(llama_target, BackendOptions("onnxruntime", onnx=llama_export.directory), drafter_layers=(1, 3))
    with pytest.raises(InvalidArgumentError, match="only used by the onnxruntime and tensorrt"):
        BackendOptions("torch", onnx=llama_export.directory)
    with pytest.raises(InvalidArgumentError, match="unknown verifier backend 'onnx'"):
        BackendOptions("onnx")


def test_export_folders_are_validated(llama, tmp_path):
    _, target, export = llama
    with pytest.raises(NotFoundError, match="does not exist"):
        read_export(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotFoundError, match="no export.json"):
        read_export(tmp_path / "plain")
    copy = tmp_path / "copy"
    shutil.copytree(export.directory, copy)
    meta = json.loads((copy / "export.json").read_text())
    (copy / "export.json").write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(ModelFormatError, match="format_version 99"):
        read_export(copy)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(InvalidArgumentError, match="is not an ONNX export"):
        export_onnx(target, tmp_path / "busy", (1,))
    with pytest.raises(InvalidArgumentError, match="already holds an ONNX export"):
        export_onnx(target, export.directory, (1,))
    with pytest.raises(InvalidArgumentError, match=r"within \[0, 4\)"):
        export_onnx(target, tmp_path / "new", (4,))
    check_export_matches(export, target)  # the real pair passes


def test_on_demand_exports_are_cached_and_reused(llama, tiny_llama_dir, cache_dir, monkeypatch):
    _, target, _ = llama
    # On the CPU the onnxruntime backend runs the fused graph (blockpilot.backends.fused_graph).
    export = cached_export(target, LAYERS["llama"], source=str(tiny_llama_dir), cache_dir=cache_dir / "onnx", graph="fused")

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache holds this export")

    monkeypatch.setenv("BLOCKPILOT_CACHE", str(cache_dir))
    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    backend = load_backend(target, BackendOptions("onnxruntime", ort_provider="cpu"), drafter_layers=LAYERS["llama"])
    assert backend.export.directory == export.directory and isinstance(backend, VerifierBackend)
    assert backend.precision == "fp32"
    # No drafter: the default layers pick the same export.
    again = load_backend(target, BackendOptions("onnxruntime"), drafter_layers=None, default_layers=LAYERS["llama"])
    assert again.export.directory == export.directory
    assert load_backend(target, BackendOptions("torch"), drafter_layers=None) is target


def test_verifier_config_selects_the_backend(llama, tiny_llama_dir):
    from blockpilot.serving.models import load_verifier_target

    _, _, export = llama
    config = VerifierServiceConfig(target=str(tiny_llama_dir), backend="onnxruntime", onnx_path=str(export.directory))
    served = load_verifier_target(config)
    assert isinstance(served.model, OnnxRuntimeTarget) and isinstance(served.torch_model, TargetModel)
    assert served.model.hidden_layer_ids == LAYERS["llama"]
    with pytest.raises(FailedPreconditionError, match=r"reads layers \[1\]"):
        load_verifier_target(VerifierServiceConfig(target=str(tiny_llama_dir), backend="onnxruntime",
                                                   onnx_path=str(export.directory), onnx_layers="1"))
    with pytest.raises(InvalidArgumentError, match="backend must be one of .* got 'tensorrt-llm'"):
        VerifierServiceConfig(backend="tensorrt-llm")


# ---- TensorRT -------------------------------------------------------------------------------------


def test_tensorrt_refuses_to_start_without_a_gpu_with_one_clear_message(llama, monkeypatch):
    if TRT_REASON is None:
        pytest.skip("TensorRT and a GPU are present here: the refusal does not apply")
    _, target, export = llama
    monkeypatch.setattr(onnx_export, "cached_export", lambda *a, **k: pytest.fail("exported before refusing"))
    with pytest.raises(BackendUnavailableError) as info:
        load_backend(target, BackendOptions("tensorrt"), drafter_layers=LAYERS["llama"])
    assert str(info.value) == TRT_REASON and "\n" not in TRT_REASON
    assert info.value.grpc_code == "FAILED_PRECONDITION"
    with pytest.raises(BackendUnavailableError):
        TensorRTTarget(export, target)


needs_tensorrt = pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")


def trt_spec(precision: str) -> EngineSpec:
    # One spec per precision, so the tests of a model share its engines (through the engine cache).
    return EngineSpec(precision=precision, max_block_size=8, prefill_chunk=16, max_context=128)


@needs_tensorrt
@torch.inference_mode()
def test_tensorrt_fp32_matches_torch_including_chunked_prefill(exported, cache_dir):
    name, target, export = exported
    layers = LAYERS[name]
    trt = TensorRTTarget(export, target, spec=trt_spec("fp32"), cache_dir=cache_dir / "trt")
    generator = torch.Generator().manual_seed(5)
    caches = [target.new_cache(90), trt.new_cache(90)]
    worst = 0.0
    # a 40-token prefill (three chunks of the prefill profile), blocks and a rollback
    for count, num_logits, rollback in [(40, 1, None), (8, None, 43), (5, None, None), (1, None, None)]:
        tokens = torch.randint(target.config.vocab_size, (1, count), generator=generator)
        outs = [model(tokens, cache, num_logits=num_logits, hidden_layer_ids=layers) for model, cache in zip((target, trt), caches)]
        for key in ("logits", "hidden", "final_state"):
            worst = max(worst, max_diff(getattr(outs[0], key), getattr(outs[1], key)))
        if rollback is not None:
            for cache in caches:
                cache.truncate(rollback)
    assert worst <= TOLERANCE, worst


@needs_tensorrt
@torch.inference_mode()
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_speculative_decoding_is_lossless(exported, cache_dir, precision):
    """Block size 1 and speculative decoding on the same engine give the same tokens (and, in fp32,
    the torch engine's tokens)."""
    name, target, export = exported
    trt = TensorRTTarget(export, target, spec=trt_spec(precision), cache_dir=cache_dir / "trt")
    params = SamplingParams(max_new_tokens=40)
    for prompt in PROMPTS:
        plain = SpeculativeDecoder(trt).generate(prompt, params, 1)
        oracle = OracleDrafter(prompt + plain.token_ids, target.config.vocab_size, 0.7, target_layer_ids=LAYERS[name])
        assert SpeculativeDecoder(trt, oracle).generate(prompt, params, 8).token_ids == plain.token_ids
        if precision == "fp32":
            assert plain.token_ids == SpeculativeDecoder(target).generate(prompt, params, 1).token_ids
