"""Tokenizer and chat template of a target model directory (transformers' fast tokenizer, local only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from blockpilot.errors import InvalidArgumentError, ModelFormatError

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
# Arguments of apply_chat_template that this class sets itself or that would change what it returns;
# a caller's chat-template kwargs may not name them.
RESERVED_TEMPLATE_ARGS = frozenset({"conversation", "messages", "add_generation_prompt", "tokenize", "return_dict",
                                    "return_tensors", "return_assistant_tokens_mask", "continue_final_message",
                                    "chat_template", "padding", "truncation", "max_length", "tokenizer_kwargs"})


def check_template_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse chat-template arguments that are not identifiers or that this class sets itself."""
    bad = sorted(k for k in kwargs if not (isinstance(k, str) and k.isidentifier()))
    if bad:
        raise InvalidArgumentError(f"chat template argument names must be identifiers, got {bad}")
    reserved = sorted(RESERVED_TEMPLATE_ARGS.intersection(kwargs))
    if reserved:
        raise InvalidArgumentError(f"chat template arguments {reserved} are set by the server and cannot be passed")


class ChatTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelFormatError(f"cannot load a tokenizer from '{model_dir}': {detail}") from None
        self.vocab_size = len(self._tok)
        self.has_chat_template = bool(getattr(self._tok, "chat_template", None))
        self.stop_token_ids = self._stop_ids(model_dir)

    def _stop_ids(self, model_dir: Path) -> tuple[int, ...]:
        """End-of-sequence ids: generation_config's, the tokenizer's eos, and the chat end-of-turn."""
        ids: list[int] = []
        gen_cfg = model_dir / "generation_config.json"
        if gen_cfg.exists():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.extend(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tok.eos_token_id is not None:
            ids.append(self._tok.eos_token_id)
        for marker in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
            token_id = self._tok.convert_tokens_to_ids(marker)
            if isinstance(token_id, int) and token_id != self._tok.unk_token_id and token_id is not None:
                ids.append(token_id)
        return tuple(dict.fromkeys(int(i) for i in ids))

    def token_id(self, token: str) -> int | None:
        """Id of a token given as text (e.g. a special token), None when the vocabulary lacks it."""
        token_id = self._tok.convert_tokens_to_ids(token)
        return int(token_id) if isinstance(token_id, int) and token_id != self._tok.unk_token_id else None

    def encode_chat(self, messages: Sequence[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        """Token ids of a conversation, ending with the prompt for the assistant's next turn.
        template_kwargs: extra variables of the chat template (e.g. enable_thinking=False)."""
        if not messages:
            raise InvalidArgumentError("the conversation has no messages")
        for i, message in enumerate(messages):
            if message.get("role") not in CHAT_ROLES:
                raise InvalidArgumentError(f"message {i} has role {message.get('role')!r}; expected one of {CHAT_ROLES}")
            if not message.get("content", "").strip():
                raise InvalidArgumentError(f"message {i} ({message['role']}) is empty")
        if not self.has_chat_template:
            raise InvalidArgumentError("this model has no chat template; send the prompt as raw text")
        template_kwargs = dict(template_kwargs or {})
        check_template_kwargs(template_kwargs)
        ids = self._tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, **template_kwargs)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def encode_raw(self, text: str) -> list[int]:
        if not text.strip():
            raise InvalidArgumentError("the prompt is empty")
        return [int(i) for i in self._tok.encode(text, add_special_tokens=False)]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas for streaming, at a cost per push that
    does not grow with the output.

    Decoding token by token would split multi-byte characters and lose the spaces a tokenizer
    attaches to word starts; decoding only a window of the latest tokens, with the tokens before
    them as context, does neither (as in TGI / vLLM): the delta is decode(context + new) minus
    decode(context). A trailing U+FFFD (an incomplete UTF-8 sequence) is held back until the next
    token completes it.
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.context_start = 0  # first token of the context window
        self.emitted_upto = 0  # tokens whose text has been emitted (the context ends here)

    def push(self, token_ids: Sequence[int]) -> str:
        self.token_ids.extend(token_ids)
        context = self.tokenizer.decode(self.token_ids[self.context_start : self.emitted_upto])
        text = self.tokenizer.decode(self.token_ids[self.context_start :])
        if text.endswith("\ufffd") or len(text) <= len(context):
            return ""  # an incomplete character, or no text yet: wait for the next token
        delta = text[len(context):]
        self.context_start, self.emitted_upto = self.emitted_upto, len(self.token_ids)
        return delta
