"""Model loading for the services: like runtime.load_engine, but a target without a tokenizer is
allowed (prompts then come as token ids), and the target and the drafter load in different
processes (the drafter service needs the target's embedding and lm_head too)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from blockpilot.decoding.drafting import LocalDrafter
from blockpilot.errors import ModelFormatError, NotFoundError
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.store import resolve_target
from blockpilot.models.target import TargetModel
from blockpilot.models.tokenizer import ChatTokenizer
from blockpilot.runtime import NO_DRAFTER, RANDOM_DRAFTER, SHIPPED_DRAFTER_NAME, untrained_mask_token, shipped_drafter_dir

log = logging.getLogger(__name__)

_DEFAULT_NAMES = ("", "default", "smollm2-135m-instruct")


@dataclass
class ServedTarget:
    name: str
    target_dir: Path
    model: TargetModel
    tokenizer: ChatTokenizer | None

    @property
    def is_default(self) -> bool:
        return self.name.lower() in _DEFAULT_NAMES

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        if self.tokenizer is not None:
            return self.tokenizer.stop_token_ids
        return ()


def load_served_target(name: str = "default") -> ServedTarget:
    target_dir = resolve_target(None if name.lower() in _DEFAULT_NAMES else name)
    model = TargetModel.from_pretrained(target_dir)
    try:
        tokenizer = ChatTokenizer(target_dir)
    except ModelFormatError as err:
        log.warning("target %s has no usable tokenizer (%s): prompts must be token ids", target_dir, str(err).splitlines()[0])
        tokenizer = None
    return ServedTarget(name, target_dir, model, tokenizer)


def random_mask_token(target: ServedTarget) -> int:
    """The mask token of a 'random' drafter: the same as `blockpilot generate --drafter random`."""
    if target.tokenizer is not None:
        return untrained_mask_token(target.tokenizer)
    config = json.loads((target.target_dir / "config.json").read_text())
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return int(eos) if isinstance(eos, int) and 0 <= eos < target.model.config.vocab_size else 0


def load_served_drafter(target: ServedTarget, drafter: str = "", *, random_block_size: int = 8) -> tuple[LocalDrafter | None, str]:
    """'' = the engine's default (the shipped drafter of the default target, else none); 'none';
    'random'; or a DFlash checkpoint directory. Returns (drafter or None, name)."""
    if drafter == "":
        shipped = shipped_drafter_dir() if target.is_default else None
        if shipped is None:
            return None, NO_DRAFTER
        return LocalDrafter(DFlashDrafter.from_pretrained(shipped), target.model), SHIPPED_DRAFTER_NAME
    if drafter == NO_DRAFTER:
        return None, NO_DRAFTER
    if drafter == RANDOM_DRAFTER:
        model = DFlashDrafter.random(target.model.config, block_size=random_block_size, mask_token_id=random_mask_token(target))
        return LocalDrafter(model, target.model), RANDOM_DRAFTER
    path = Path(drafter).expanduser()
    if not path.exists():
        raise NotFoundError(f"drafter path '{drafter}' does not exist (give a DFlash checkpoint directory, 'random' or 'none')")
    return LocalDrafter(DFlashDrafter.from_pretrained(path), target.model), str(path)
