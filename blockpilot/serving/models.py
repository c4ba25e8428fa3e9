"""Model loading for the services: like runtime.load_engine, but a target without a tokenizer is
allowed (prompts then come as token ids), and the target and the drafter load in different
processes (the drafter service needs the target's embedding and lm_head too).

The verifier may run its target on another backend (VerifierServiceConfig.backend: ONNX Runtime or
TensorRT over an ONNX export); its drafter is remote, so the layers the export returns come from
the config (`onnx_layers`), by default those of the drafter the stack serves by default.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from blockpilot.backends.base import VerifierBackend
from blockpilot.backends.loader import BackendOptions, default_export_layers, load_backend
from blockpilot.decoding.drafting import LocalDrafter, draft_precision
from blockpilot.errors import InvalidArgumentError, ModelFormatError, NotFoundError
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.store import is_default_target, resolve_target
from blockpilot.models.target import TargetModel
from blockpilot.models.tokenizer import ChatTokenizer
from blockpilot.runtime import NO_DRAFTER, RANDOM_DRAFTER, SHIPPED_DRAFTER_NAME, untrained_mask_token, shipped_drafter_dir

log = logging.getLogger(__name__)

@dataclass
class ServedTarget:
    """model: what the verifier verifies with (the torch TargetModel, or an ONNX Runtime / TensorRT
    backend over an export of it); torch_model: the torch TargetModel itself (the drafter's
    embedding and output projection). Both are the same object on the torch backend."""

    name: str
    target_dir: Path
    model: TargetModel | VerifierBackend
    tokenizer: ChatTokenizer | None
    torch_model: TargetModel | None = None

    def __post_init__(self) -> None:
        if self.torch_model is None:
            self.torch_model = self.model

    @property
    def is_default(self) -> bool:
        return is_default_target(self.name)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        if self.tokenizer is not None:
            return self.tokenizer.stop_token_ids
        return ()


def load_served_target(name: str = "default", *, backend: BackendOptions | None = None,
                       drafter_layers: tuple[int, ...] | None = None) -> ServedTarget:
    """backend: the verifier backend (default: torch). drafter_layers: the target layers the
    (remote) drafter reads, which a graph backend's export must return (None: not known; an
    on-demand export then returns blockpilot.backends.loader.default_export_layers)."""
    target_dir = resolve_target(None if is_default_target(name) else name)
    model = TargetModel.from_pretrained(target_dir)
    try:
        tokenizer = ChatTokenizer(target_dir)
    except ModelFormatError as err:
        log.warning("target %s has no usable tokenizer (%s): prompts must be token ids", target_dir, str(err).splitlines()[0])
        tokenizer = None
    backend = backend or BackendOptions()
    if backend.name == "torch":
        return ServedTarget(name, target_dir, model, tokenizer)
    verifier = load_backend(model, backend, drafter_layers=drafter_layers, source=str(target_dir),
                            default_layers=default_export_layers(model, is_default_target(name)))
    log.info("verifier backend %s (%s), export layers %s", backend.name, backend.precision, list(verifier.hidden_layer_ids))
    return ServedTarget(name, target_dir, verifier, tokenizer, torch_model=model)


def load_verifier_target(config) -> ServedTarget:
    """The verifier service's target as its config (VerifierServiceConfig) describes it."""
    layers = parse_layers(config.onnx_layers) if config.onnx_layers else None
    options = BackendOptions(name=config.backend, precision=config.precision, onnx=config.onnx_path or None,
                             threads=config.threads)
    return load_served_target(config.target, backend=options, drafter_layers=layers)


def parse_layers(text: str) -> tuple[int, ...]:
    """'1,9,17' (or spaces) -> (1, 9, 17)."""
    try:
        return tuple(int(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise InvalidArgumentError(f"layer ids must be integers separated by commas, got {text!r}") from None


def random_mask_token(target: ServedTarget) -> int:
    """The mask token of a 'random' drafter: the same as `blockpilot generate --drafter random`."""
    if target.tokenizer is not None:
        return untrained_mask_token(target.tokenizer)
    config = json.loads((target.target_dir / "config.json").read_text())
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return int(eos) if isinstance(eos, int) and 0 <= eos < target.torch_model.config.vocab_size else 0


def load_served_drafter(target: ServedTarget, drafter: str = "", *, random_block_size: int = 8) -> tuple[LocalDrafter | None, str]:
    """'' = the engine's default (the shipped drafter of the default target, else none); 'none';
    'random'; or a DFlash checkpoint directory. Returns (drafter or None, name)."""
    if drafter == "":
        shipped = shipped_drafter_dir() if target.is_default else None
        if shipped is None:
            return None, NO_DRAFTER
        return LocalDrafter(DFlashDrafter.from_pretrained(shipped), target.torch_model, precision=draft_precision(target.torch_model.device)), SHIPPED_DRAFTER_NAME
    if drafter == NO_DRAFTER:
        return None, NO_DRAFTER
    if drafter == RANDOM_DRAFTER:
        model = DFlashDrafter.random(target.torch_model.config, block_size=random_block_size, mask_token_id=random_mask_token(target))
        return LocalDrafter(model, target.torch_model, precision=draft_precision(target.torch_model.device)), RANDOM_DRAFTER
    path = Path(drafter).expanduser()
    if not path.exists():
        raise NotFoundError(f"drafter path '{drafter}' does not exist (give a DFlash checkpoint directory, 'random' or 'none')")
    return LocalDrafter(DFlashDrafter.from_pretrained(path), target.torch_model, precision=draft_precision(target.torch_model.device)), str(path)
