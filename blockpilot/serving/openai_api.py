"""The OpenAI API's request and response shapes, mapped onto the verifier's Generate (used by the
HTTP gateway; no I/O here).

Requests: the body of /v1/chat/completions or /v1/completions becomes `build_request` arguments
(blockpilot.client) plus what the gateway itself does (stop strings, streaming, usage in the
stream). What Generate cannot honour is refused with a message naming the field, never ignored:
n > 1, penalties, top_logprobs > 0 (alternatives), tools. top_p is honoured (in (0, 1]), and so are
logprobs (chat: `logprobs: true`; completions: `logprobs: 0`): the chosen tokens' log-probabilities
under the target's raw distribution (LogprobTrail). Extra fields of this server: top_k (0 = off),
block_size (a number, "auto" or "off"), policy, prompt_lookup, session_id, new_session, and
chat_template_kwargs (chat only, e.g. {"enable_thinking": false}).

Responses: OpenAI's objects; `usage` carries the counts plus the acceptance record under the one
extension key `blockpilot` (tau, block_size, policy_version, arm, ...).

Errors: every failure becomes (HTTP status, {"error": {"message", "type", "code"}}) in
`error_response`, the one place where gRPC status codes map to HTTP statuses.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import grpc

from blockpilot.errors import BlockPilotError, InvalidArgumentError

EXTENSION = "blockpilot"  # the one key under which responses carry this server's own fields
MAX_STOP_STRINGS = 4  # as OpenAI's API

# gRPC status -> (HTTP status, OpenAI error type). The one mapping of the gateway.
_HTTP_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),  # a session used by two streams at once
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI fields that Generate cannot honour, with the value that means "not used": any other value
# is refused (a client asking for them would otherwise get something it did not ask for).
_NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "top_logprobs": 0,
            "logit_bias": {}, "tools": [], "tool_choice": "none", "functions": [], "response_format": {"type": "text"},
            "best_of": 1, "echo": False, "suffix": "", "store": False, "modalities": ["text"], "reasoning_effort": None,
            "prediction": None, "audio": None, "web_search_options": None}


def error_body(message: str, error_type: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": error_type, "code": code, "param": None}}


def error_response(err: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) of a failed request. A BlockPilotError keeps its message
    (a client's typed error carries the verifier's status code); anything else is the caller's to
    log, and the client gets a generic 500."""
    if isinstance(err, BlockPilotError):
        code = getattr(err, "status_code", None) or getattr(grpc.StatusCode, err.grpc_code, grpc.StatusCode.INTERNAL)
        status, error_type = _HTTP_BY_CODE.get(code, (500, "internal_error"))
        return status, error_body(str(err), error_type, code.name.lower())
    return 500, error_body("internal error (details are in the gateway log)", "internal_error", "internal")


@dataclass
class Completion:
    """One parsed request: what goes to Generate (`generate_args`) and what the gateway does."""

    chat: bool
    model: str
    stream: bool
    include_usage: bool  # streams: a last chunk with usage (stream_options.include_usage)
    stop: tuple[str, ...]
    user: str
    generate_args: dict[str, Any] = field(default_factory=dict)
    logprobs: bool = False  # report the chosen tokens' log-probabilities
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())


def _expect(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise InvalidArgumentError(f"'{name}' must be {what}, got {value!r}")
    return value


def _int_in(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = _expect(body, name, (int,), "an integer")
    if value is not None and (value < low or (high is not None and value > high)):
        raise InvalidArgumentError(f"'{name}' must be {'>= ' + str(low) if high is None else f'in {low}..{high}'}, got {value}")
    return value


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (other part kinds are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else part
                raise InvalidArgumentError(f"{where}: only text content parts are supported, got {kind!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidArgumentError(f"{where}: 'content' must be a string or a list of text parts")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidArgumentError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidArgumentError(f"{where}: role {role!r} is not supported (use one of {sorted(_ROLES)})")
        if message.get("tool_calls") or message.get("function_call"):
            raise InvalidArgumentError(f"{where}: tool calls are not supported")
        out.append({"role": _ROLES[role], "content": _text_content(message.get("content"), where)})
    return out


def _prompt(body: dict) -> dict:
    """/v1/completions' prompt: a string, or token ids (a list of integers); one prompt only."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"token_ids": prompt}
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidArgumentError("one prompt per request: 'prompt' lists several (send one request each)")
    raise InvalidArgumentError("'prompt' must be a non-empty string or a non-empty list of token ids")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidArgumentError("'stop' must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidArgumentError(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    return tuple(dict.fromkeys(stops))


def parse(body: Any, *, chat: bool, model_name: str) -> Completion:
    """A request body -> Completion; what is wrong raises InvalidArgumentError (a 400) naming the
    field, or NotFoundError for another model."""
    from blockpilot.errors import NotFoundError

    if not isinstance(body, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgumentError("'model' is required (see GET /v1/models)")
    if model != model_name:
        raise NotFoundError(f"the model {model!r} does not exist here; this server serves {model_name!r}")
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and value != neutral and not (name == "tool_choice" and value == "auto" and not body.get("tools")):
            raise InvalidArgumentError(f"'{name}' is not supported by this server (got {value!r})")
    n = _int_in(body, "n", 1)
    if n not in (None, 1):
        raise InvalidArgumentError(f"'n' must be 1: this server returns one choice per request (got {n})")
    max_tokens = _int_in(body, "max_tokens", 1)
    max_completion = _int_in(body, "max_completion_tokens", 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise InvalidArgumentError("'max_tokens' and 'max_completion_tokens' disagree: give one")
    temperature = _expect(body, "temperature", (int, float), "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise InvalidArgumentError(f"'temperature' must be in 0..2, got {temperature}")
    top_p = _expect(body, "top_p", (int, float), "a number")
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidArgumentError(f"'top_p' must be in (0, 1] (1 = off), got {top_p}")
    top_k = _int_in(body, "top_k", 0, 2 ** 32 - 1)
    seed = _int_in(body, "seed", 0, 2 ** 64 - 1)
    stream = _expect(body, "stream", (bool,), "true or false") or False
    options = _expect(body, "stream_options", (dict,), "an object") or {}
    include_usage = options.get("include_usage") is True
    user = _expect(body, "user", (str,), "a string") or ""
    args: dict[str, Any] = _prompt(body) if not chat else {"messages": _messages(body)}
    args.update(max_new_tokens=max_tokens or max_completion or 0, temperature=float(temperature or 0.0), seed=seed,
                top_k=top_k or 0, top_p=1.0 if top_p is None else float(top_p))
    block_size = body.get("block_size")
    if block_size is not None:
        if block_size not in ("auto", "off") and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
            raise InvalidArgumentError(f"'block_size' must be 'auto', 'off' or an integer >= 1, got {block_size!r}")
        args["block_size"] = block_size
    policy = _expect(body, "policy", (str,), "a policy name")
    if policy:
        args["policy"] = policy
    lookup = _expect(body, "prompt_lookup", (bool,), "true or false")
    if lookup is not None:
        args["prompt_lookup"] = lookup
    session_id = _expect(body, "session_id", (str,), "a session id string")
    if session_id:
        args["session_id"] = session_id
    if _expect(body, "new_session", (bool,), "true or false"):
        args["new_session"] = True
    template_kwargs = _expect(body, "chat_template_kwargs", (dict,), "an object of chat template arguments")
    if template_kwargs:
        if not chat:
            raise InvalidArgumentError("'chat_template_kwargs' applies to /v1/chat/completions only")
        args["chat_template_kwargs"] = template_kwargs
    logprobs = _logprobs_asked(body, chat)
    if logprobs:
        args["logprobs"] = True
    return Completion(chat=chat, model=model, stream=stream, include_usage=include_usage, stop=_stop(body), user=user,
                      generate_args=args, logprobs=logprobs)


def _logprobs_asked(body: dict, chat: bool) -> bool:
    """Chat asks with `logprobs: true`; completions with `logprobs: N`, of which only 0 (the chosen
    tokens, no alternatives) is served."""
    if chat:
        return bool(_expect(body, "logprobs", (bool,), "true or false"))
    count = _int_in(body, "logprobs", 0)
    if count:
        raise InvalidArgumentError(f"'logprobs' must be 0 (the chosen tokens' log-probabilities): this server does not "
                                   f"report alternative tokens (got {count})")
    return count == 0


class StopMatcher:
    """Cuts generated text at the first stop string. push() returns the text that may be sent now:
    it holds back the longest tail that could still begin a stop string, so a stop string split
    across deltas is never sent in part."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""  # all text so far (up to the cut once stopped)
        self.sent = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self.flush()
        ready = len(self.text) - self.hold
        if ready <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:ready], ready
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class LogprobTrail:
    """The chosen tokens' log-probabilities of one generation, handed out as the text they belong to
    is sent. Log-probabilities come per verifier delta (a step's tokens); `add` records each delta's
    entries with the offset of its text in the whole generated text, `take(upto)` returns the
    entries of the deltas whose text starts before `upto` (None: all) that were not taken yet. So a
    stop string that cuts the text drops the tokens after the cut, and a streamed chunk carries the
    tokens of the text it sends (a delta's text held back by a partial stop string waits for the
    chunk that sends it)."""

    def __init__(self) -> None:
        self._deltas: list[tuple[int, list[tuple[int, float, str]]]] = []
        self._taken = 0
        self._next_offset = 0  # offset in the text of each entry taken so far (completions' text_offset)

    def add(self, text_offset: int, entries: Sequence[tuple[int, float, str]]) -> None:
        self._deltas.append((text_offset, list(entries)))

    def take(self, upto: int | None) -> list[tuple[int, float, str]]:
        out: list[tuple[int, float, str]] = []
        while self._taken < len(self._deltas) and (upto is None or self._deltas[self._taken][0] < upto):
            out.extend(self._deltas[self._taken][1])
            self._taken += 1
        return out

    @staticmethod
    def chat_json(entries: list[tuple[int, float, str]]) -> dict:
        """Chat's `logprobs` object: one content entry per token, no alternatives."""
        return {"content": [{"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")), "top_logprobs": []}
                            for _, lp, text in entries]}

    def completion_json(self, entries: list[tuple[int, float, str]]) -> dict:
        """Completions' `logprobs` object (tokens, token_logprobs, text_offset; no alternatives)."""
        offsets = []
        for _, _, text in entries:
            offsets.append(self._next_offset)
            self._next_offset += len(text)
        return {"tokens": [text for _, _, text in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": None, "text_offset": offsets}


@dataclass
class Outcome:
    """What a generation left for the response: counts and the acceptance record (from the final
    message, or from the first delta and the deltas when a stop string ended it early)."""

    text: str = ""
    finish_reason: str = "length"
    session_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    acceptance_lengths: list[int] = field(default_factory=list)
    block_size: int = 0
    policy_version: str = ""
    arm: str = ""
    fallback_reason: str = ""
    cached_prompt_tokens: int = 0
    logprobs: LogprobTrail | None = None  # requests that asked for them
    stopped: bool = False  # a stop string cut the text

    def usage(self) -> dict:
        steps = self.acceptance_lengths
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_prompt_tokens},
                EXTENSION: {"tau": sum(steps) / len(steps) if steps else 0.0, "block_size": self.block_size,
                            "policy_version": self.policy_version, "arm": self.arm,
                            "acceptance_lengths": steps, "fallback_reason": self.fallback_reason}}


def logprobs_json(c: Completion, outcome: Outcome, upto: int | None) -> dict | None:
    """The `logprobs` of a choice: the entries not sent yet whose text starts before `upto`."""
    trail = outcome.logprobs
    if trail is None:
        return None
    entries = trail.take(upto)
    return trail.chat_json(entries) if c.chat else trail.completion_json(entries)


def response(c: Completion, outcome: Outcome) -> dict:
    """The whole (non-streamed) response object."""
    logprobs = logprobs_json(c, outcome, len(outcome.text) if outcome.stopped else None)
    if c.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "finish_reason": outcome.finish_reason,
                  "logprobs": logprobs}
    else:
        choice = {"index": 0, "text": outcome.text, "finish_reason": outcome.finish_reason, "logprobs": logprobs}
    body = {"id": c.id, "object": "chat.completion" if c.chat else "text_completion", "created": c.created,
            "model": c.model, "choices": [choice], "usage": outcome.usage()}
    if outcome.session_id:
        body[EXTENSION] = {"session_id": outcome.session_id}
    return body


def chunk(c: Completion, text: str | None = None, finish_reason: str | None = None, *, role: bool = False,
          usage: dict | None = None, session_id: str = "", logprobs: dict | None = None) -> dict:
    """One streamed chunk: text and/or a finish reason (with the logprobs of its tokens when
    asked), the assistant role (chat's first chunk), or the usage chunk (no choices)."""
    if usage is not None:
        choices = []
    elif c.chat:
        delta: dict = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}]
    body = {"id": c.id, "object": "chat.completion.chunk" if c.chat else "text_completion", "created": c.created,
            "model": c.model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    if session_id:
        body[EXTENSION] = {"session_id": session_id}
    return body
