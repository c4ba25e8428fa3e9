"""The HTTP gateway with the official `openai` package as its client, over a real socket, in front
of a real verifier and drafter (tiny random target with a one-character-per-token chat tokenizer;
the verifier requires a bearer token, which the gateway forwards)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request

import grpc
import openai
import pytest
from google.protobuf.json_format import MessageToDict

import blockpilot
from blockpilot.client import AsyncBlockPilotClient, BlockPilotClient
from blockpilot.errors import BlockPilotError
from blockpilot.serving.security import ClientSecurity
from blockpilot.v1 import verifier_pb2
from service_stack import Service, wait_until
from tiny_models import add_char_chat_tokenizer

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-chat"
TOKEN = "gateway-test-token"
MESSAGES = [{"role": "user", "content": "tell me a story about the sea"}]
SERVER_TEMPLATE_KWARGS = {"style": "plain"}  # the verifier's default chat-template arguments (unused by the template)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gateway")
    model = folder / "model"
    shutil.copytree(tiny_llama_dir, model)
    add_char_chat_tokenizer(model)
    (folder / "tokens").write_text(TOKEN + "\n")
    drafter = Service("drafter", folder, target=model, drafter="random", random_block_size=4).start()
    verifier = Service("verifier", folder, target=model, drafter_address=f"127.0.0.1:{drafter.port}", policy_address="",
                       redis_url="memory", token_file=folder / "tokens", load_aware_drafts=False,
                       chat_template_kwargs=json.dumps(SERVER_TEMPLATE_KWARGS)).start()
    gateway = Service("gateway", folder, verifier_address=verifier.address, model_name=MODEL, request_timeout_s=60).start()
    try:
        for service in (drafter, verifier, gateway):
            service.wait_serving(timeout=180)
        yield {"drafter": drafter, "verifier": verifier, "gateway": gateway, "token_file": folder / "tokens",
               "client": openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=TOKEN, max_retries=0, timeout=60)}
    finally:
        for service in (gateway, verifier, drafter):
            service.stop()


def grpc_reply(stack, **request):
    with BlockPilotClient(stack["verifier"].address, security=ClientSecurity(token_file=str(stack["token_file"]))) as client:
        return client.generate(timeout=60, **request)


def test_chat_completion_equals_the_grpc_result(stack):
    client = stack["client"]
    reply = grpc_reply(stack, messages=MESSAGES, max_new_tokens=40, block_size=4)
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0,
                                          extra_body={"block_size": 4}, user="tester")
    assert reply.text and done.choices[0].message.content == reply.text
    assert done.choices[0].message.role == "assistant" and done.object == "chat.completion" and done.model == MODEL
    assert done.choices[0].finish_reason == reply.finish_reason
    usage = done.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (reply.usage["prompt_tokens"], reply.usage["completion_tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    record = usage.model_extra["blockpilot"]
    assert record["block_size"] == 4 and record["tau"] == pytest.approx(reply.tau)
    assert record["acceptance_lengths"] == reply.acceptance_lengths
    # max_completion_tokens is the same limit; the newer name.
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=40,
                                           extra_body={"block_size": 4})
    assert again.choices[0].message.content == reply.text


def test_top_p_and_top_k_are_passed_through(stack):
    """Sampled with a seed, the gateway's text equals the gRPC reply for the same top-p / top-k."""
    client = stack["client"]
    sampling = dict(temperature=1.0, seed=5, top_k=8, top_p=0.6)
    reply = grpc_reply(stack, messages=MESSAGES, max_new_tokens=30, block_size=4, **sampling)
    plain = grpc_reply(stack, messages=MESSAGES, max_new_tokens=30, block_size=4, temperature=1.0, seed=5)
    assert reply.text != plain.text  # the truncation changed the sample: it was honoured
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, temperature=1.0, seed=5,
                                          top_p=0.6, extra_body={"top_k": 8, "block_size": 4})
    assert done.choices[0].message.content == reply.text


def test_streamed_chat_equals_the_whole_reply(stack):
    client = stack["client"]
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.model_extra["blockpilot"]["policy_version"] == "fixed-v1"
    # Without include_usage no usage chunk; the raw stream ends with [DONE].
    request = urllib.request.Request(f"http://{stack['gateway'].address}/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 5,
                                                      "stream": True}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_completions_text_and_token_ids(stack):
    client = stack["client"]
    reply = grpc_reply(stack, prompt="once upon a time", max_new_tokens=20, block_size="off")
    done = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=20, extra_body={"block_size": "off"})
    assert done.choices[0].text == reply.text and done.object == "text_completion"
    assert done.usage.model_extra["blockpilot"]["block_size"] == 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="once upon a time", max_tokens=20, stream=True) if c.choices)
    assert streamed == reply.text
    ids = [5, 6, 7, 8, 9, 10]
    by_ids = grpc_reply(stack, token_ids=ids, max_new_tokens=12)
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=12).choices[0].text == by_ids.text


def test_stop_strings_cut_the_text_and_end_the_stream(stack):
    client = stack["client"]
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60).choices[0].message.content
    assert len(full) > 20
    stop = full[12:14]
    cut = full[:full.find(stop)]
    before = stack["gateway"].metric("blockpilot_gateway_stop_strings_total")
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, stop=[stop, "never-seen"])
    assert done.choices[0].message.content == cut and done.choices[0].finish_reason == "stop"
    # The generation was ended early: fewer tokens than the full reply, counts still reported.
    assert done.usage.prompt_tokens > 0 and cut and 0 < done.usage.completion_tokens < 60
    assert done.usage.model_extra["blockpilot"]["block_size"] >= 1
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert stack["gateway"].metric("blockpilot_gateway_stop_strings_total") == before + 2


def test_errors_are_openai_bodies_with_mapped_statuses(stack):
    client = stack["client"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert info.value.status_code == 400 and "'n' must be 1" in info.value.body["message"]
    assert info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match=r"'top_p' must be in \(0, 1\]"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_p=1.5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    # The verifier's own refusals, mapped from their gRPC status.
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"session_id": "no-such-session"})
    assert info.value.body["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100000)
    assert "max_new_tokens" in info.value.body["message"]
    intruder = openai.OpenAI(base_url=f"http://{stack['gateway'].address}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        intruder.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert info.value.status_code == 401
    # Not JSON at all: a 400 with the same body shape, no class names.
    request = urllib.request.Request(f"http://{stack['gateway'].address}/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    body = json.loads(info.value.read())
    assert info.value.code == 400 and body["error"]["message"] == "the request body is not valid JSON"


def test_sessions_continue_through_the_gateway(stack):
    client = stack["client"]
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, extra_body={"new_session": True})
    session = first.model_extra["blockpilot"]["session_id"]
    conversation = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                               {"role": "user", "content": "and then?"}]
    second = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=10,
                                            extra_body={"session_id": session})
    assert second.model_extra["blockpilot"]["session_id"] == session
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_a_client_disconnect_cancels_the_generation(stack):
    gateway, verifier = stack["gateway"], stack["verifier"]
    cancelled = verifier.metric("blockpilot_requests_total", service="verifier", status="CANCELLED")
    gone = gateway.metric("blockpilot_gateway_disconnects_total")
    stream = stack["client"].completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=400, stream=True,
                                                extra_body={"block_size": "off", "prompt_lookup": False})
    next(iter(stream))
    stream.close()
    assert wait_until(lambda: verifier.metric("blockpilot_requests_total", service="verifier", status="CANCELLED") == cancelled + 1,
                      timeout=10)
    assert gateway.metric("blockpilot_gateway_disconnects_total") == gone + 1
    assert verifier.metric("blockpilot_inflight_requests", service="verifier") == 0


def test_server_info_over_grpc_and_in_models(stack):
    """GetServerInfo on both clients (a data-plane call: the token is needed), and the same info
    under `blockpilot` in the gateway's GET /v1/models."""
    security = ClientSecurity(token_file=str(stack["token_file"]))
    with BlockPilotClient(stack["verifier"].address, security=security) as client:
        info = client.server_info(timeout=30)
    context = json.loads((stack["verifier"].flags["target"] / "config.json").read_text())["max_position_embeddings"]
    assert (info.version, info.target, info.backend, info.precision) == (blockpilot.__version__, "model", "torch", "fp32")
    assert (info.drafter, info.drafter_block_size, info.drafter_max_block_size) == ("random", 4, 64)
    assert info.default_policy == "default" and info.replica_id
    assert (info.limits.context_length, info.limits.max_prompt_tokens, info.limits.max_new_tokens,
            info.limits.default_max_new_tokens, info.limits.max_streams, info.limits.max_block_size) == (context, context, 4096, 128, 16, 64)

    async def async_info(token_file: str) -> verifier_pb2.GetServerInfoResponse:
        async with AsyncBlockPilotClient(stack["verifier"].address, security=ClientSecurity(token_file=token_file)) as client:
            return await client.server_info(timeout=30)

    assert asyncio.run(async_info(str(stack["token_file"]))) == info
    with pytest.raises(BlockPilotError) as refused:  # the same token rule as Generate
        asyncio.run(async_info(""))
    assert refused.value.status_code == grpc.StatusCode.UNAUTHENTICATED

    [model] = stack["client"].models.list().data
    assert model.id == MODEL
    assert model.model_extra["blockpilot"] == MessageToDict(info, preserving_proto_field_name=True,
                                                            always_print_fields_with_no_presence=True)
    assert model.model_extra["blockpilot"]["limits"]["max_block_size"] == 64
    intruder = openai.OpenAI(base_url=f"http://{stack['gateway'].address}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        intruder.models.list()


def test_models_health_and_metrics(stack):
    client = stack["client"]
    assert [m.id for m in client.models.list().data] == [MODEL]
    base = f"http://{stack['gateway'].address}"
    with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read()) == {"status": "ok", "verifier": "SERVING"}
    assert stack["gateway"].metric("blockpilot_gateway_requests_total", endpoint="chat", status="200") > 0
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:  # on the API port too
        assert b"blockpilot_gateway_requests_total" in response.read()
    assert stack["gateway"].metric("blockpilot_gateway_time_to_first_token_seconds_count", endpoint="chat") > 0


def test_health_is_503_when_the_verifier_is_gone_and_the_gateway_drains(stack, tmp_path):
    gateway = Service("gateway", tmp_path, verifier_address=f"127.0.0.1:{stack['drafter'].port}", model_name=MODEL).start()
    try:
        # The drafter answers gRPC health but not for the verifier service: NOT SERVING -> 503.
        deadline = time.monotonic() + 60
        from service_stack import http_status

        while http_status(f"http://{gateway.address}/health") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http_status(f"http://{gateway.address}/health") == 503
    finally:
        assert gateway.stop() == 0  # SIGTERM: uvicorn's graceful shutdown, exit status 0


def test_logprobs_of_the_chosen_tokens(stack):
    client = stack["client"]
    reply = grpc_reply(stack, messages=MESSAGES, max_new_tokens=30, block_size=4, logprobs=True)
    assert [t for t, _, _ in reply.logprobs] == reply.token_ids and all(lp <= 0 for _, lp, _ in reply.logprobs)
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, logprobs=True,
                                          extra_body={"block_size": 4})
    content = done.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx([lp for _, lp, _ in reply.logprobs], abs=1e-6)
    assert "".join(e.token for e in content if e.token not in SPECIAL_TOKENS) == done.choices[0].message.content
    assert all(bytes(e.bytes) == e.token.encode() and e.top_logprobs == [] for e in content)
    # Streamed: the chunks carry the same entries, each with the text it sends.
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, logprobs=True, stream=True,
                                                 extra_body={"block_size": 4}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # A stop string drops the tokens after the cut (one token per step here: exactly the cut text's).
    cut_at = done.choices[0].message.content[10:12]
    for stream in (False, True):
        answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, logprobs=True, stop=cut_at,
                                                stream=stream, extra_body={"block_size": "off", "prompt_lookup": False})
        parts = list(answer) if stream else [answer]
        entries = [e for c in parts if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        cut = done.choices[0].message.content.split(cut_at)[0]
        assert "".join(e.token for e in entries if e.token not in SPECIAL_TOKENS) == cut
    # Completions: logprobs=0 is the chosen tokens; alternatives are refused.
    text = client.completions.create(model=MODEL, prompt="once upon", max_tokens=12, logprobs=0,
                                     extra_body={"block_size": 4}).choices[0]
    assert len(text.logprobs.token_logprobs) == len(text.logprobs.tokens) == len(text.logprobs.text_offset) > 0
    assert text.logprobs.text_offset[0] == 0
    with pytest.raises(openai.BadRequestError, match="alternative tokens"):
        client.completions.create(model=MODEL, prompt="once upon", max_tokens=4, logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2)


def test_chat_template_kwargs_reach_the_rendered_prompt(stack):
    client = stack["client"]
    plain = grpc_reply(stack, messages=MESSAGES, max_new_tokens=4, return_prompt_token_ids=True)
    assert plain.chat_template_kwargs == SERVER_TEMPLATE_KWARGS  # the verifier's default, reported
    asked = grpc_reply(stack, messages=MESSAGES, max_new_tokens=4, return_prompt_token_ids=True,
                       chat_template_kwargs={"enable_thinking": False})
    assert asked.chat_template_kwargs == {**SERVER_TEMPLATE_KWARGS, "enable_thinking": False}
    assert len(asked.prompt_token_ids) == len(plain.prompt_token_ids) + len("nothink\n")  # the template's branch
    http = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert http.usage.prompt_tokens == len(asked.prompt_token_ids)
    with pytest.raises(openai.BadRequestError, match="set by the server"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    with pytest.raises(openai.BadRequestError, match="chat/completions only"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={"chat_template_kwargs": {"x": 1}})
    with pytest.raises(BlockPilotError, match="messages prompt only"):
        grpc_reply(stack, prompt="hi", max_new_tokens=4, chat_template_kwargs={"enable_thinking": False})


def test_the_final_message_names_the_trace(stack):
    reply = grpc_reply(stack, messages=MESSAGES, max_new_tokens=4)
    assert len(reply.trace_id) == 32 and int(reply.trace_id, 16) != 0
