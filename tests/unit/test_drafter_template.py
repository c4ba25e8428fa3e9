"""A drafter's trained-with chat-template arguments (its config.json's `chat_template_kwargs`) are
the default of every chat prompt: in the verifier (under its config's and the request's, whatever
the block size) and in process (`blockpilot generate`, under --chat-template-kwargs). The tiny
chat template prints "nothink\n" when enable_thinking is false."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import replace

import pytest

from blockpilot.config import VerifierServiceConfig
from blockpilot.decoding.drafting import LocalDrafter
from blockpilot.errors import DrafterUnavailableError, ModelFormatError
from blockpilot.models.drafter import DFlashDrafter, DrafterConfig
from blockpilot.serving.models import load_served_target
from blockpilot.serving.verifier import GenerateSpec, LocalDrafterSource, VerifierCore
from tiny_models import add_char_chat_tokenizer

TRAINED = {"enable_thinking": False}
MESSAGES = ({"role": "user", "content": "tell me a story"},)


@pytest.fixture(scope="module")
def chat_target_dir(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_target") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    add_char_chat_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def target(chat_target_dir):
    return load_served_target(str(chat_target_dir))


@pytest.fixture(scope="module")
def drafter_dir(target, tmp_path_factory):
    """A drafter checkpoint whose config.json names the options it was trained with."""
    model = DFlashDrafter.random(target.torch_model.config, block_size=4, mask_token_id=0, seed=2)
    model.config = replace(model.config, chat_template_kwargs=TRAINED)
    return model.save_pretrained(tmp_path_factory.mktemp("drafter"))


def test_the_config_names_them_at_the_top_or_in_dflash_config(drafter_dir):
    raw = json.loads((drafter_dir / "config.json").read_text())
    assert raw["chat_template_kwargs"] == TRAINED and "chat_template_kwargs" not in raw["dflash_config"]
    assert DFlashDrafter.from_pretrained(drafter_dir).config.chat_template_kwargs == TRAINED
    del raw["chat_template_kwargs"]
    assert DrafterConfig.from_hf_dict(raw).chat_template_kwargs == {}
    raw["dflash_config"]["chat_template_kwargs"] = {"enable_thinking": True, "style": "dflash"}
    raw["chat_template_kwargs"] = {"enable_thinking": False}
    assert DrafterConfig.from_hf_dict(raw).chat_template_kwargs == {"enable_thinking": False, "style": "dflash"}
    raw["chat_template_kwargs"] = None
    assert DrafterConfig.from_hf_dict(raw).chat_template_kwargs == {"enable_thinking": True, "style": "dflash"}


@pytest.mark.parametrize("value, message", [
    ([["enable_thinking", False]], r"chat_template_kwargs must be a JSON object of chat-template arguments, got \[\["),
    ({"add_generation_prompt": False}, r"chat_template_kwargs: chat template arguments \['add_generation_prompt'\]"),
])
def test_bad_options_are_refused_naming_the_key(drafter_dir, value, message):
    raw = json.loads((drafter_dir / "config.json").read_text())
    with pytest.raises(ModelFormatError, match=message):
        DrafterConfig.from_hf_dict({**raw, "chat_template_kwargs": value})
    raw["dflash_config"]["chat_template_kwargs"] = value
    del raw["chat_template_kwargs"]
    with pytest.raises(ModelFormatError, match="dflash_config." + message):
        DrafterConfig.from_hf_dict(raw)


class UnreachableDrafter:
    """A drafter service that cannot be reached (counts the calls)."""

    def __init__(self) -> None:
        self.calls = 0

    def template_defaults(self):
        self.calls += 1
        raise DrafterUnavailableError("the drafter service is unreachable: UNAVAILABLE")

    def provider(self, **_):
        self.calls += 1
        raise DrafterUnavailableError("the drafter service is unreachable: UNAVAILABLE")

    def known_target_layer_ids(self):
        return None


def prepare(target, drafter, spec: GenerateSpec, config_kwargs: str = ""):
    core = VerifierCore(VerifierServiceConfig(chat_template_kwargs=config_kwargs), target, drafter, None, None)
    try:
        return asyncio.run(core._prepare(spec))
    finally:
        core.close()


def test_the_verifier_renders_with_them_under_its_config_and_the_request(target, drafter_dir):
    source = LocalDrafterSource(LocalDrafter(DFlashDrafter.from_pretrained(drafter_dir), target.torch_model))
    tokenizer = target.tokenizer
    thinking = tokenizer.encode_chat(list(MESSAGES), {})
    no_thinking = tokenizer.encode_chat(list(MESSAGES), TRAINED)
    assert len(no_thinking) == len(thinking) + len("nothink\n")
    # The drafter's default, whatever the block size (a prompt renders the same undrafted).
    for mode, size in (("auto", 0), ("fixed", 4), ("off", 0)):
        turn = prepare(target, source, GenerateSpec(messages=MESSAGES, mode=mode, block_size=size))
        assert (turn.prompt_ids, turn.template_kwargs, turn.reasons) == (no_thinking, TRAINED, []), mode
    # The verifier's config over the drafter's, the request's over both.
    turn = prepare(target, source, GenerateSpec(messages=MESSAGES), '{"style": "plain"}')
    assert turn.template_kwargs == {"enable_thinking": False, "style": "plain"} and turn.prompt_ids == no_thinking
    turn = prepare(target, source, GenerateSpec(messages=MESSAGES), '{"enable_thinking": true}')
    assert turn.template_kwargs == {"enable_thinking": True} and turn.prompt_ids == thinking
    turn = prepare(target, source, GenerateSpec(messages=MESSAGES, chat_template_kwargs={"enable_thinking": True}),
                   '{"style": "plain"}')
    assert turn.template_kwargs == {"enable_thinking": True, "style": "plain"} and turn.prompt_ids == thinking
    # Text and token prompts have no template.
    assert prepare(target, source, GenerateSpec(text="tell me")).template_kwargs == {}


def test_an_unreachable_drafter_renders_without_them_as_a_counted_fallback(target):
    drafter = UnreachableDrafter()
    turn = prepare(target, drafter, GenerateSpec(messages=MESSAGES, mode="fixed", block_size=4), '{"style": "plain"}')
    assert turn.template_kwargs == {"style": "plain"} and turn.reasons == ["drafter_unavailable"]
    assert turn.recorder is None and drafter.calls == 1  # not asked again for the draft stream


def test_generate_in_process_renders_with_them_and_the_flag_overrides(chat_target_dir, drafter_dir, capsys):
    from blockpilot.cli import main

    def prompt(*flags: str) -> tuple[list[int], dict]:
        argv = ["generate", "--target", str(chat_target_dir), "--backend", "torch", "--block-size", "4",
                "--max-new-tokens", "2", "--json", *flags, "tell me a story"]
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return report["prompt_token_ids"], report["chat_template_kwargs"]

    trained, kwargs = prompt("--drafter", str(drafter_dir))
    assert kwargs == TRAINED
    overridden, kwargs = prompt("--drafter", str(drafter_dir), "--chat-template-kwargs", '{"enable_thinking": true}')
    assert kwargs == {"enable_thinking": True}
    assert len(trained) == len(overridden) + len("nothink\n")
    random_ids, kwargs = prompt("--drafter", "random")  # a drafter that names none: the template's own defaults
    assert kwargs == {} and random_ids == overridden


def test_a_token_prompt_with_template_arguments_keeps_its_tokens():
    """The client sends the prompt whatever else it sends: the verifier then answers that template
    arguments apply to messages only, not that the prompt is missing."""
    from blockpilot.client import build_request

    request = build_request(token_ids=[5, 6], chat_template_kwargs=TRAINED)
    assert request.WhichOneof("prompt") == "token_ids" and list(request.token_ids.ids) == [5, 6]
