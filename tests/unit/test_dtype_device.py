"""dtype and device of the torch engine: the lossless contract per placement (speculative output ==
the same engine's block-size-1 output at the same dtype and device), and clear refusals."""

from __future__ import annotations

import pytest
import torch

from blockpilot.backends.base import BackendUnavailableError
from blockpilot.backends.loader import BackendOptions
from blockpilot.config import DrafterServiceConfig, VerifierServiceConfig
from blockpilot.decoding.drafting import DraftRequest
from blockpilot.decoding.lookup import LOOKUP_OFF
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError
from blockpilot.models.placement import Placement
from blockpilot.runtime import load_engine
from fake_drafters import OracleDrafter
from hub_models import hub_home, offline_hub  # noqa: F401 (fixtures)

TORCH_BACKEND = BackendOptions("torch")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_speculative_output_equals_block_size_1_at_the_same_dtype(offline_hub, family, dtype):
    engine = load_engine(f"tiny-org/tiny-{family}", f"tiny-org/tiny-{family}-dflash", backend=TORCH_BACKEND,
                         placement=Placement(dtype, "cpu"))
    wanted = getattr(torch, dtype)
    target = engine.target
    assert target.dtype == wanted and target.device.type == "cpu"
    assert target.new_cache(8).keys.dtype == wanted
    if dtype != "float32":  # float32 on the CPU drafts in the machine's cheaper precision (int8 / bf16)
        assert engine.drafter.dtype == wanted and engine.drafter.precision == "bf16"
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Tell me about block diffusion."}])
    params = SamplingParams(max_new_tokens=40)
    plain = engine.decoder.generate(prompt, params, 1, lookup=LOOKUP_OFF)
    assert len(plain.token_ids) == 40
    for block_size in (4, 8):
        drafted = engine.decoder.generate(prompt, params, block_size, lookup=LOOKUP_OFF)
        assert drafted.token_ids == plain.token_ids, (family, dtype, block_size)
        # Drafts that are mostly right: long accepted runs, the bonus token, cache roll-backs.
        oracle = OracleDrafter(list(prompt) + plain.token_ids, target.config.vocab_size, 0.8, seed=block_size)
        accepted = SpeculativeDecoder(target, oracle).generate(prompt, params, block_size, lookup=LOOKUP_OFF)
        assert accepted.token_ids == plain.token_ids, (family, dtype, block_size, "oracle")
        assert max(accepted.acceptance_lengths) >= 3


def test_float16_loads_and_is_lossless_too(offline_hub):
    engine = load_engine("tiny-org/tiny-llama", "tiny-org/tiny-llama-dflash", backend=TORCH_BACKEND,
                         placement=Placement("float16", "cpu"))
    assert engine.target.dtype == torch.float16 and engine.drafter.dtype == torch.float16
    prompt, params = [5, 6, 7, 8, 9], SamplingParams(max_new_tokens=16)
    plain = engine.decoder.generate(prompt, params, 1, lookup=LOOKUP_OFF)
    assert engine.decoder.generate(prompt, params, 8, lookup=LOOKUP_OFF).token_ids == plain.token_ids


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_before_anything_loads(device):
    with pytest.raises(FailedPreconditionError, match=f"device '{device}' needs an NVIDIA GPU, but torch sees none"):
        Placement("float32", device).torch_device()
    # Before the target is even looked up: the missing GPU is the first thing said.
    with pytest.raises(FailedPreconditionError, match="needs an NVIDIA GPU"):
        load_engine("tiny-org/not-looked-up", backend=TORCH_BACKEND, placement=Placement("bfloat16", device))


@no_gpu
def test_cli_cuda_without_a_gpu_is_one_line_and_nonzero(capsys):
    from blockpilot.cli import main

    code = main(["generate", "--backend", "torch", "--device", "cuda", "--drafter", "none", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "Traceback" not in err
    assert err.startswith("blockpilot generate: error: device 'cuda' needs an NVIDIA GPU")


@pytest.mark.parametrize("argv, fragment", [
    (["--dtype", "fp16"], "invalid choice: 'fp16'"),
    (["--device", "gpu", "--backend", "torch"], "device must be 'cpu', 'cuda' or 'cuda:N' (N = the GPU's index), got 'gpu'"),
    (["--device", "cuda:0"], "device 'cuda:0' sets the torch backend; the onnxruntime backend runs on the device its runtime picks"),
    (["--device", "cpu", "--server", "127.0.0.1:1"], "--dtype and --device are the server's settings"),
])
def test_cli_bad_placements_are_usage_errors(capsys, argv, fragment):
    from blockpilot.cli import main

    try:
        code = main(["generate", *argv, "hi"])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and fragment in err, err


def test_service_configs_check_dtype_and_device_quoting_the_value():
    from blockpilot.config import load_config

    assert DrafterServiceConfig(dtype="bfloat16", device="cuda:0").device == "cuda:0"
    with pytest.raises(InvalidArgumentError, match=r"drafter config: dtype must be one of .* got 'half' \(from flag --dtype\)"):
        load_config(DrafterServiceConfig, ["--dtype", "half"])
    with pytest.raises(InvalidArgumentError, match=r"verifier config: device must be .* got 'cuda:x' \(from env BLOCKPILOT_VERIFIER_DEVICE\)"):
        load_config(VerifierServiceConfig, [], env={"BLOCKPILOT_VERIFIER_DEVICE": "cuda:x"})


def test_a_graph_backend_takes_the_dtype_but_not_the_device(offline_hub, monkeypatch):
    from blockpilot.backends import onnx_export
    from blockpilot.serving.models import load_verifier_target

    with pytest.raises(InvalidArgumentError, match="device 'cuda' sets the torch backend; the tensorrt backend runs on the "
                                                   "device its runtime picks"):
        load_verifier_target(VerifierServiceConfig(target="tiny-org/tiny-llama", backend="tensorrt", device="cuda"))
    # The dtype picks the export's: bfloat16 has no kernels on ONNX Runtime's CPU provider, which is
    # said before anything is exported (tests/unit/test_export_dtype.py runs float16 there).
    monkeypatch.setattr(onnx_export, "cached_export", lambda *a, **k: pytest.fail("exported before refusing"))
    with pytest.raises(BackendUnavailableError, match="cannot run a bfloat16 graph here: ONNX Runtime's CPU provider"):
        load_verifier_target(VerifierServiceConfig(target="tiny-org/tiny-llama", backend="onnxruntime", dtype="bfloat16"))


@no_gpu
def test_cli_bfloat16_on_the_default_backend_without_a_gpu_is_one_line(offline_hub, capsys):
    from blockpilot.cli import main

    code = main(["generate", "--target", "tiny-org/tiny-llama", "--drafter", "none", "--dtype", "bfloat16", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "cannot run a bfloat16 graph here" in err and "backend torch" in err, err


def test_the_verifier_config_places_the_torch_target(offline_hub):
    from blockpilot.serving.models import load_verifier_target

    served = load_verifier_target(VerifierServiceConfig(target="tiny-org/tiny-qwen3", backend="torch", dtype="bfloat16"))
    assert served.model.dtype == torch.bfloat16 and served.placement == Placement("bfloat16", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (the GPU check of a lent machine)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_placement_is_lossless_and_the_slim_drafter_target_drafts_the_same(offline_hub, dtype):
    from blockpilot.serving.models import load_drafter_target, load_served_drafter, load_served_target

    placement = Placement(dtype, "cuda")
    engine = load_engine("tiny-org/tiny-qwen3", "tiny-org/tiny-qwen3-dflash", backend=TORCH_BACKEND, placement=placement)
    assert engine.target.device.type == "cuda" and engine.target.new_cache(8).keys.is_cuda
    assert next(engine.drafter.drafter.parameters()).is_cuda
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Tell me about block diffusion."}])
    params = SamplingParams(max_new_tokens=40)
    plain = engine.decoder.generate(prompt, params, 1, lookup=LOOKUP_OFF)
    for block_size in (4, 8):
        assert engine.decoder.generate(prompt, params, block_size, lookup=LOOKUP_OFF).token_ids == plain.token_ids
    slim, _ = load_served_drafter(load_drafter_target("tiny-org/tiny-qwen3", placement=placement), "tiny-org/tiny-qwen3-dflash")
    full, _ = load_served_drafter(load_served_target("tiny-org/tiny-qwen3", placement=placement), "tiny-org/tiny-qwen3-dflash")
    width = len(slim.target_layer_ids) * slim.target.config.hidden_size
    context = torch.randn(9, width, generator=torch.Generator().manual_seed(0))
    step = DraftRequest(anchor=7, start=9, num_draft=7, context=context, context_start=0)
    assert slim.open_session(64).propose(step).tokens.tolist() == full.open_session(64).propose(step).tokens.tolist()
