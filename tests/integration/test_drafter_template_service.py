"""Through the services: the drafter service reports its checkpoint's trained-with chat-template
arguments in Describe, and the verifier renders chat prompts with them, under its config's and the
request's, at every block size (the tiny chat template prints "nothink\n" when enable_thinking is
false)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import grpc
import pytest
from google.protobuf.json_format import MessageToDict

from blockpilot.client import BlockPilotClient
from blockpilot.models.config import TargetConfig
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.v1 import drafter_pb2, drafter_pb2_grpc
from service_stack import Service
from tiny_models import add_char_chat_tokenizer

pytestmark = pytest.mark.timeout(300)

TRAINED = {"enable_thinking": False}
MESSAGES = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("drafter_template")
    model = folder / "model"
    shutil.copytree(tiny_llama_dir, model)
    add_char_chat_tokenizer(model)
    drafter = DFlashDrafter.random(TargetConfig.from_dir(model), block_size=4, mask_token_id=0, seed=3)
    drafter.config = replace(drafter.config, chat_template_kwargs=TRAINED)
    checkpoint = drafter.save_pretrained(folder / "drafter")
    drafter_service = Service("drafter", folder, target=model, drafter=checkpoint).start()
    verifier = Service("verifier", folder, target=model, drafter_address=f"127.0.0.1:{drafter_service.port}",
                       policy_address="", redis_url="memory", load_aware_drafts=False,
                       chat_template_kwargs='{"style": "plain"}').start()
    try:
        for service in (drafter_service, verifier):
            service.wait_serving(timeout=180)
        yield {"drafter": drafter_service, "verifier": verifier}
    finally:
        for service in (verifier, drafter_service):
            service.stop()


def test_describe_reports_them(stack):
    with grpc.insecure_channel(stack["drafter"].address) as channel:
        reply = drafter_pb2_grpc.DrafterStub(channel).Describe(drafter_pb2.DescribeRequest(), timeout=30)
    assert reply.has_drafter and MessageToDict(reply.chat_template_kwargs) == TRAINED


def test_the_verifier_renders_with_them_and_a_request_overrides_them(stack):
    with BlockPilotClient(stack["verifier"].address) as client:
        def reply(**request):
            return client.generate(messages=MESSAGES, max_new_tokens=4, return_prompt_token_ids=True, timeout=60, **request)

        drafted = reply(block_size=4)
        assert drafted.chat_template_kwargs == {**TRAINED, "style": "plain"} and drafted.fallback_reason == ""
        plain = reply(block_size="off")  # block size 1: the same prompt, the same output
        assert (plain.prompt_token_ids, plain.token_ids) == (drafted.prompt_token_ids, drafted.token_ids)
        thinking = reply(block_size=4, chat_template_kwargs={"enable_thinking": True})
        assert thinking.chat_template_kwargs == {"enable_thinking": True, "style": "plain"}
        assert len(drafted.prompt_token_ids) == len(thinking.prompt_token_ids) + len("nothink\n")
