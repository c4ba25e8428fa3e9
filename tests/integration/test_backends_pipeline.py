"""The pipeline with the verifier service on the onnxruntime backend (issue #6): drafter and verifier
as real processes on loopback (tiny random Llama, 'random' drafter, in-memory session store,
in-process fixed policy), the verifier configured with `backend=onnxruntime` and an ONNX export of
the target. Its output must equal the torch engine's own greedy decoding, token for token, at every
block size and across the turns of a session (whose cache the verifier keeps and grows)."""

from __future__ import annotations

import grpc
import pytest

from blockpilot.backends.onnx_export import export_onnx
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.models.drafter import default_target_layer_ids
from blockpilot.models.target import TargetModel
from blockpilot.v1 import verifier_pb2 as pb
from blockpilot.v1 import verifier_pb2_grpc
from service_stack import Service

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

PROMPT = [5, 6, 7, 8, 9, 10]
DRAFTER_BLOCK = 8


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return TargetModel.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def export_dir(target, tiny_llama_dir, tmp_path_factory):
    # The layers the drafter service's 'random' drafter reads (DFlash's one-layer default).
    layers = default_target_layer_ids(target.config.num_hidden_layers, 1)
    return export_onnx(target, tmp_path_factory.mktemp("export") / "onnx", layers, source=str(tiny_llama_dir)).directory


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, export_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stack")
    drafter = Service("drafter", folder, target=tiny_llama_dir, drafter="random", random_block_size=DRAFTER_BLOCK).start()
    verifier = Service("verifier", folder, target=tiny_llama_dir, drafter_address=f"127.0.0.1:{drafter.port}",
                       policy_address="", redis_url="memory", backend="onnxruntime", onnx_path=export_dir,
                       ragged_batches="on").start()  # the sessions graph through the service ("auto": per session)
    try:
        for service in (drafter, verifier):
            service.wait_serving(timeout=240)
        channel = grpc.insecure_channel(verifier.address)
        yield {"stub": verifier_pb2_grpc.VerifierStub(channel), "verifier": verifier, "drafter": drafter}
        channel.close()
    finally:
        for service in (verifier, drafter):
            service.stop()


def generate(stub, prompt, max_new_tokens, mode, block_size=0, **kwargs):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingOptions(max_new_tokens=max_new_tokens),
                                 block_size_mode=mode, block_size=block_size, **kwargs)
    messages = list(stub.Generate(request, timeout=120))
    final = messages[-1]
    assert final.WhichOneof("payload") == "final"
    assert [t for m in messages[:-1] for t in m.delta.token_ids] == list(final.final.token_ids)
    return final.final, final.session_id


def test_verifier_on_onnxruntime_equals_the_torch_engine(stack, target):
    stub = stack["stub"]
    reference = SpeculativeDecoder(target).generate(PROMPT, SamplingParams(max_new_tokens=40), 1).token_ids
    for mode, size, expected_size in [(pb.BLOCK_SIZE_MODE_OFF, 0, 1), (pb.BLOCK_SIZE_MODE_FIXED, 4, 4),
                                      (pb.BLOCK_SIZE_MODE_FIXED, 8, 8), (pb.BLOCK_SIZE_MODE_AUTO, 0, DRAFTER_BLOCK)]:
        final, _ = generate(stub, PROMPT, 40, mode, size)
        assert list(final.token_ids) == reference, (mode, size)
        assert final.block_size == expected_size and final.fallback_reason == ""
    log = stack["verifier"].log()
    assert "onnxruntime backend:" in log and "CPUExecutionProvider" in log
    assert stack["verifier"].metric("blockpilot_drafts_total") > 0


def test_session_turns_on_onnxruntime_reuse_the_cache_and_equal_one_shot(stack, target):
    stub = stack["stub"]
    first, session = generate(stub, PROMPT, 16, pb.BLOCK_SIZE_MODE_FIXED, 4, new_session=True)
    assert session
    conversation = PROMPT + list(first.token_ids) + [11, 12, 13]
    second, same = generate(stub, conversation, 24, pb.BLOCK_SIZE_MODE_FIXED, 4, session_id=session)
    assert same == session
    assert second.usage.cached_prompt_tokens > len(PROMPT)  # the first turn's cache was reused
    one_shot = SpeculativeDecoder(target).generate(conversation, SamplingParams(max_new_tokens=24), 1).token_ids
    assert list(second.token_ids) == one_shot
