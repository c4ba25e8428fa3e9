"""The ONNX export and the TensorRT build at the target's dtype (no fp32 detour): float16 / bfloat16
graphs exported from a target loaded in that dtype, what ONNX Runtime's CPU provider runs of them,
the refusal of an export of another dtype (saying how to make the right one), and the TensorRT
precision an export builds at (the build itself where a GPU and TensorRT are present)."""

from __future__ import annotations

import dataclasses
import json

import onnx
import onnxruntime
import pytest
import torch

from blockpilot.backends import onnx_export
from blockpilot.backends.base import BackendUnavailableError, backend_precision
from blockpilot.backends.loader import BackendOptions, load_backend
from blockpilot.backends.onnx_export import OnnxExport, check_export_matches, export_onnx, weights_digest
from blockpilot.backends.onnxruntime_backend import CPU_DTYPES, OnnxRuntimeTarget
from blockpilot.backends.tensorrt_backend import EngineSpec, TensorRTTarget, engine_precision, tensorrt_unavailable_reason
from blockpilot.decoding.drafting import LocalDrafter
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.target import TargetModel
from fake_drafters import OracleDrafter

pytestmark = pytest.mark.timeout(600)

TRT_REASON = tensorrt_unavailable_reason()
ELEMENT = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}
LAYERS = {"float16": (2,), "bfloat16": (1, 3)}
PROMPTS = ([5, 6, 7, 8, 9, 10], [40, 3, 77, 12, 12, 90, 31, 8, 64])


@pytest.fixture(scope="module")
def exports(tiny_llama_dir, tiny_qwen3_dir, tmp_path_factory):
    """dtype -> (model dir, the target loaded in it, its export): the tiny Llama in float16, the
    tiny Qwen3 (two feature layers) in bfloat16."""
    root = tmp_path_factory.mktemp("dtype-exports")
    made = {}
    for dtype, model_dir in (("float16", tiny_llama_dir), ("bfloat16", tiny_qwen3_dir)):
        target = TargetModel.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        made[dtype] = (model_dir, target, export_onnx(target, root / dtype, LAYERS[dtype], source=str(model_dir),
                                                      graph="portable"))
    return made


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16bit_export_is_the_portable_graph_in_its_own_dtype(exports, dtype):
    _, target, export = exports[dtype]
    meta = export.metadata
    assert (meta.dtype, meta.graph, meta.precision) == (dtype, "portable", {"float16": "fp16", "bfloat16": "bf16"}[dtype])
    assert meta.weights_digest == weights_digest(target)
    onnx.checker.check_model(str(export.model_path), full_check=True)
    graph = onnx.load(str(export.model_path), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert all(types[name] == ELEMENT[dtype] for name in ("past_keys", "past_values", "logits", "hidden", "final_state",
                                                          "new_keys", "new_values")), types
    # The weights are in the dtype (the exporter stores the matmuls' transposed, under its own
    # names); the only float32 constants are the RoPE inverse frequencies (the angles are computed
    # in float32, as the engine does) and scalars.
    size = {t.name: int(torch.tensor(list(t.dims), dtype=torch.long).prod()) for t in graph.initializer}
    narrow = sum(size[t.name] for t in graph.initializer if t.data_type == ELEMENT[dtype])
    assert narrow >= sum(p.numel() for p in target.parameters())
    wide = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert all(size[t.name] <= target.config.head_dim // 2 for t in wide), [(t.name, size[t.name]) for t in wide]


@torch.inference_mode()
def test_a_float16_export_runs_on_the_cpu_provider_and_decodes_losslessly(exports):
    _, target, export = exports["float16"]
    assert export.metadata.check_max_error is not None and export.metadata.check_max_error <= 2e-2
    ort = OnnxRuntimeTarget(export, target, provider="cpu", threads=1)
    assert ort.dtype == torch.float16 and ort.new_cache(8).keys.dtype == torch.float16
    assert backend_precision(ort) == "fp16"
    layers = LAYERS["float16"]
    random_drafter = LocalDrafter(DFlashDrafter.random(target.config, block_size=6, mask_token_id=0, target_layer_ids=layers)
                                  .to(torch.float16), target)
    params = SamplingParams(max_new_tokens=32)
    for prompt in PROMPTS:
        plain = SpeculativeDecoder(ort).generate(prompt, params, 1)
        oracle = OracleDrafter(prompt + plain.token_ids, target.config.vocab_size, 0.7, target_layer_ids=layers)
        drafted = SpeculativeDecoder(ort, oracle).generate(prompt, params, 8)
        assert drafted.token_ids == plain.token_ids
        assert max(drafted.acceptance_lengths) > 2
        assert SpeculativeDecoder(ort, random_drafter).generate(prompt, params, 6).token_ids == plain.token_ids


def test_bfloat16_is_published_unchecked_and_refused_by_the_cpu_provider(exports):
    _, target, export = exports["bfloat16"]
    assert export.metadata.check_max_error is None  # no runtime here runs it (the log says so)
    with pytest.raises(BackendUnavailableError, match="cannot run a bfloat16 graph here: ONNX Runtime's CPU provider "
                                                      "has no bfloat16 kernels .*provider cuda .*backend tensorrt"):
        OnnxRuntimeTarget(export, target, provider="cpu")


def test_cpu_dtypes_is_what_the_installed_onnxruntime_runs(exports):
    """The rule the backend refuses by, checked against ONNX Runtime itself: when a release runs
    bfloat16 on the CPU, this fails and CPU_DTYPES should gain it."""
    for dtype, (_, _, export) in exports.items():
        try:
            onnxruntime.InferenceSession(str(export.model_path), providers=["CPUExecutionProvider"])
            runs = True
        except onnxruntime.capi.onnxruntime_pybind11_state.NotImplemented:
            runs = False
        assert runs == (dtype in CPU_DTYPES), (onnxruntime.__version__, dtype, runs)


def test_a_backend_refuses_an_export_of_another_dtype_saying_how_to_export_it(exports, tiny_llama_dir):
    _, _, export = exports["float16"]
    fp32 = TargetModel.from_pretrained(tiny_llama_dir)
    with pytest.raises(FailedPreconditionError, match=r"is float16, but float32 was asked for; export the target in "
                                                      r"float32 \(blockpilot export onnx --dtype float32 --out DIR, or "
                                                      r"run with --dtype float16\)"):
        load_backend(fp32, BackendOptions("onnxruntime", onnx=export.directory), drafter_layers=LAYERS["float16"])
    bf16 = TargetModel.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    with pytest.raises(FailedPreconditionError, match=r"is float16, but bfloat16 was asked for; export the target in "
                                                      r"bfloat16 \(blockpilot export onnx --dtype bfloat16 --graph portable "
                                                      r"--out DIR, or run with --dtype float16\)"):
        check_export_matches(export, bf16)  # what both graph backends check first


def test_on_demand_exports_take_the_targets_dtype(tiny_llama_dir, monkeypatch, tmp_path):
    from blockpilot.models.placement import Placement
    from blockpilot.serving.models import load_served_target

    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path))
    served = load_served_target(str(tiny_llama_dir), backend=BackendOptions("onnxruntime", ort_provider="cpu"),
                                drafter_layers=(2,), placement=Placement("float16"))
    backend = served.model
    meta = backend.export.metadata
    assert (meta.dtype, meta.graph) == ("float16", "portable") and backend.export.directory.name.endswith(f"-float16-v{onnx_export.FORMAT_VERSION}")
    assert backend.dtype == served.torch_model.dtype == torch.float16 and served.placement == Placement("float16")
    # bfloat16 on the CPU provider: refused before a minute of exporting, saying what runs it.
    monkeypatch.setattr(onnx_export, "cached_export", lambda *a, **k: pytest.fail("exported before refusing"))
    bf16 = TargetModel.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="cannot run a bfloat16 graph here"):
        load_backend(bf16, BackendOptions("onnxruntime", ort_provider="cpu"), drafter_layers=(2,))
    with pytest.raises(InvalidArgumentError, match="int4 quantizes the float32 weights of the fused CPU graph; a float16 "
                                                   "export keeps its float16 weights"):
        onnx_export.check_graph_precision("fused", "int4", "float16")


def test_the_tensorrt_precision_is_the_exports_dtype(exports):
    fp16, bf16 = exports["float16"][2], exports["bfloat16"][2]
    fp32 = OnnxExport(fp16.directory, dataclasses.replace(fp16.metadata, dtype="float32"))
    assert engine_precision(fp16) == "fp16" and engine_precision(bf16) == "bf16"
    assert engine_precision(fp32) == "fp16"  # a float32 export: TensorRT's usual fp16 unless asked
    assert [engine_precision(fp32, p) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert engine_precision(bf16, "bf16") == "bf16"
    with pytest.raises(FailedPreconditionError, match=r"is float16, so its TensorRT engine is fp16, but precision bf16 was "
                                                      r"asked for; export the target in bfloat16 \(blockpilot export onnx "
                                                      r"--graph portable --dtype bfloat16 --out DIR\)"):
        engine_precision(fp16, "bf16")
    with pytest.raises(InvalidArgumentError, match="unknown TensorRT precision 'int8'"):
        BackendOptions("tensorrt", trt_precision="int8")


def test_cli_export_onnx_takes_the_dtype(tiny_llama_dir, tmp_path, capsys):
    from blockpilot.cli import main

    out = tmp_path / "bf16"
    assert main(["export", "onnx", "--target", str(tiny_llama_dir), "--dtype", "bfloat16", "--hidden-layers", "1",
                 "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["dtype"], report["graph"], report["precision"], report["check_max_error"]) == ("bfloat16", "portable",
                                                                                                    "bf16", None)
    assert json.loads((out / "export.json").read_text())["dtype"] == "bfloat16"
    for argv, fragment in (
        (["--graph", "fused", "--dtype", "float16"], "a float16 export is the portable graph (--graph portable)"),
        (["--precision", "int4", "--dtype", "bfloat16"], "int4 quantizes the float32 weights"),
    ):
        assert main(["export", "onnx", "--target", str(tiny_llama_dir), *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and fragment in err, err


needs_tensorrt = pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")


@needs_tensorrt
@torch.inference_mode()
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tensorrt_builds_a_16bit_export_at_its_precision_and_decodes_losslessly(exports, dtype, tmp_path):
    _, target, export = exports[dtype]
    spec = EngineSpec(precision=engine_precision(export), max_block_size=8, prefill_chunk=16, max_context=128)
    trt = TensorRTTarget(export, target, spec=spec, cache_dir=tmp_path / "trt")
    assert trt.dtype == getattr(torch, dtype)
    params = SamplingParams(max_new_tokens=32)
    for prompt in PROMPTS:
        plain = SpeculativeDecoder(trt).generate(prompt, params, 1)
        oracle = OracleDrafter(prompt + plain.token_ids, target.config.vocab_size, 0.7, target_layer_ids=LAYERS[dtype])
        assert SpeculativeDecoder(trt, oracle).generate(prompt, params, 8).token_ids == plain.token_ids
