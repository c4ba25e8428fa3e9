"""OpenTelemetry tracing across the stack: one request through the gateway is one trace whose spans
come from the gateway, the verifier, the policy and the drafter (each process writes its spans to
a JSON-lines file given by its `trace_file` setting), the trace id is in the gateway's response
header and log line, and a gRPC caller's own trace context continues into the verifier, which
names the trace in its trailing metadata."""

from __future__ import annotations

import json
import shutil
import urllib.request

import grpc
import pytest

from blockpilot.client import build_request
from blockpilot.v1 import verifier_pb2_grpc
from service_stack import Service, wait_until
from tiny_models import add_char_chat_tokenizer

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-chat"
GENERATE = "/blockpilot.v1.Verifier/Generate"
DECIDE = "/blockpilot.v1.Policy/Decide"
DRAFT = "/blockpilot.v1.Drafter/Draft"


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tracing")
    model = folder / "model"
    shutil.copytree(tiny_llama_dir, model)
    add_char_chat_tokenizer(model)
    (folder / "policies").mkdir()  # the fixed default size answers AUTO requests
    files = {name: folder / f"{name}-spans.jsonl" for name in ("policy", "drafter", "verifier", "gateway")}
    policy = Service("policy", folder, redis_url="memory", repository=folder / "policies", default_policy="default",
                     trace_file=files["policy"]).start()
    drafter = Service("drafter", folder, target=model, drafter="random", random_block_size=4,
                      trace_file=files["drafter"]).start()
    verifier = Service("verifier", folder, target=model, drafter_address=f"127.0.0.1:{drafter.port}",
                       policy_address=f"127.0.0.1:{policy.port}", redis_url="memory", load_aware_drafts=False,
                       trace_file=files["verifier"]).start()
    gateway = Service("gateway", folder, verifier_address=verifier.address, model_name=MODEL, request_timeout_s=60,
                      trace_file=files["gateway"]).start()
    services = {"policy": policy, "drafter": drafter, "verifier": verifier, "gateway": gateway}
    try:
        for service in services.values():
            service.wait_serving(timeout=180)
        yield services, files
    finally:
        for service in (gateway, verifier, drafter, policy):
            service.stop()


def spans(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trace_id_of(span: dict) -> str:
    return span["context"]["trace_id"].removeprefix("0x")


def spans_of_trace(files, trace_id: str) -> dict[str, list[dict]]:
    return {name: [s for s in spans(path) if trace_id_of(s) == trace_id] for name, path in files.items()}


def named(found: list[dict], name: str, kind: str) -> dict | None:
    return next((s for s in found if s["name"] == name and s["kind"] == f"SpanKind.{kind}"), None)


def test_one_request_is_one_trace_across_every_service(stack):
    services, files = stack
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 12,
                       "block_size": "auto"}).encode()
    request = urllib.request.Request(f"http://{services['gateway'].address}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        trace_id = response.headers["x-trace-id"]
        json.load(response)
    assert trace_id and len(trace_id) == 32 and int(trace_id, 16)

    # Server spans end after their reply is sent: wait for the outermost one.
    assert wait_until(lambda: named(spans_of_trace(files, trace_id)["gateway"], "POST /v1/chat/completions", "SERVER"),
                      timeout=10)
    found = spans_of_trace(files, trace_id)
    gateway_server = named(found["gateway"], "POST /v1/chat/completions", "SERVER")
    gateway_call = named(found["gateway"], GENERATE, "CLIENT")
    verifier_server = named(found["verifier"], GENERATE, "SERVER")
    decide_call, draft_call = named(found["verifier"], DECIDE, "CLIENT"), named(found["verifier"], DRAFT, "CLIENT")
    decide_server, draft_server = named(found["policy"], DECIDE, "SERVER"), named(found["drafter"], DRAFT, "SERVER")
    assert None not in (gateway_server, gateway_call, verifier_server, decide_call, draft_call, decide_server, draft_server), found
    # Each hop's server span is the child of its caller's client span, and the calls of the
    # verifier are children of its Generate span.
    assert gateway_call["parent_id"] == gateway_server["context"]["span_id"]
    assert verifier_server["parent_id"] == gateway_call["context"]["span_id"]
    assert decide_call["parent_id"] == draft_call["parent_id"] == verifier_server["context"]["span_id"]
    assert decide_server["parent_id"] == decide_call["context"]["span_id"]
    assert draft_server["parent_id"] == draft_call["context"]["span_id"]
    assert {s["resource"]["attributes"]["service.name"] for name in found for s in found[name]} == {
        "blockpilot-gateway", "blockpilot-verifier", "blockpilot-policy", "blockpilot-drafter"}
    # Health checks, polled while the stack started, are not traced.
    assert not any("Health" in s["name"] for path in files.values() for s in spans(path))
    # The gateway's log line of the request names the trace.
    assert wait_until(lambda: f"trace_id={trace_id}" in services["gateway"].log(), timeout=5)


def test_a_grpc_callers_trace_continues_and_the_verifier_names_it(stack):
    services, files = stack
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with grpc.insecure_channel(services["verifier"].address) as channel:
        call = verifier_pb2_grpc.VerifierStub(channel).Generate(
            build_request(prompt="once upon a time", max_new_tokens=8, block_size=4), timeout=60,
            metadata=(("traceparent", f"00-{caller_trace}-{caller_span}-01"),))
        messages = list(call)
        assert messages[-1].WhichOneof("payload") == "final"
        assert dict(call.trailing_metadata())["x-trace-id"] == caller_trace
        assert messages[-1].final.trace_id == caller_trace  # also a field of the final message
    assert wait_until(lambda: named(spans_of_trace(files, caller_trace)["verifier"], GENERATE, "SERVER"), timeout=10)
    found = spans_of_trace(files, caller_trace)
    assert named(found["verifier"], GENERATE, "SERVER")["parent_id"] == f"0x{caller_span}"
    assert named(found["drafter"], DRAFT, "SERVER") is not None
    # An error ends with the trace id too.
    with grpc.insecure_channel(services["verifier"].address) as channel:
        call = verifier_pb2_grpc.VerifierStub(channel).Generate(build_request(prompt="x", block_size=99), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(dict(info.value.trailing_metadata())["x-trace-id"]) == 32
