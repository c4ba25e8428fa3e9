"""Model loading for the services: like runtime.load_engine, but a target without a tokenizer is
allowed (prompts then come as token ids), and the target and the drafter load in different
processes: the drafter service holds only the target's embedding and lm_head (load_drafter_target).

The verifier may run its target on another backend (VerifierServiceConfig.backend: ONNX Runtime or
TensorRT over an ONNX export); its drafter is remote, so the layers the export returns come from
the config (`onnx_layers`), by default those of the drafter the stack serves by default.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from blockpilot.backends.base import VerifierBackend, checked_weights_digest
from blockpilot.backends.loader import BackendOptions, default_export_layers, load_backend
from blockpilot.decoding.corpus import CorpusNgrams
from blockpilot.decoding.drafting import LocalDrafter
from blockpilot.errors import InvalidArgumentError, ModelFormatError
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.placement import Placement, check_backend_placement, drafter_run_precision
from blockpilot.models.store import is_default_target, resolve_drafter, resolve_target
from blockpilot.models.target import TargetEmbedHead, TargetModel
from blockpilot.models.tokenizer import ChatTokenizer
from blockpilot.runtime import (AUTO_CORPUS, NO_DRAFTER, RANDOM_DRAFTER, SHIPPED_DRAFTER_NAME, resolve_corpus,
                                untrained_mask_token, shipped_drafter_dir)

log = logging.getLogger(__name__)

@dataclass
class ServedTarget:
    """model: what the verifier verifies with (the torch TargetModel, or an ONNX Runtime / TensorRT
    backend over an export of it), or in the drafter service the target's embedding and lm_head
    alone (TargetEmbedHead); torch_model: the torch module the drafter's embedding and output
    projection come from. Both are the same object unless a graph backend verifies.
    placement: the dtype and device of the torch module (and of a drafter loaded beside it).
    corpus: prompt lookup's corpus n-grams (runtime.resolve_corpus; None: none)."""

    name: str
    target_dir: Path
    model: TargetModel | TargetEmbedHead | VerifierBackend
    tokenizer: ChatTokenizer | None
    torch_model: TargetModel | TargetEmbedHead | None = None
    placement: Placement = Placement()
    corpus: CorpusNgrams | None = None

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
                       drafter_layers: tuple[int, ...] | None = None, placement: Placement | None = None,
                       lookup_corpus: str = AUTO_CORPUS) -> ServedTarget:
    """backend: the verifier backend (default: torch). drafter_layers: the target layers the
    (remote) drafter reads, which a graph backend's export must return (None: not known; an
    on-demand export then returns blockpilot.backends.loader.default_export_layers).
    placement: dtype and device of the torch backend (default float32 on the CPU).
    lookup_corpus: prompt lookup's corpus n-grams ('auto', 'none' or a folder: runtime.resolve_corpus)."""
    backend = backend or BackendOptions()
    placement = placement or Placement()
    check_backend_placement(placement, backend.name)
    device = placement.torch_device()  # before any download or load: a missing GPU is said at once
    target_dir = resolve_target(None if is_default_target(name) else name)
    model = TargetModel.from_pretrained(target_dir, dtype=placement.torch_dtype, device=device)
    tokenizer = _served_tokenizer(target_dir)
    if backend.name == "torch":
        return ServedTarget(name, target_dir, model, tokenizer, placement=placement, corpus=resolve_corpus(lookup_corpus, model))
    verifier = load_backend(model, backend, drafter_layers=drafter_layers, source=str(target_dir),
                            default_layers=default_export_layers(model, is_default_target(name)))
    log.info("verifier backend %s (%s), export layers %s", backend.name, backend.precision, list(verifier.hidden_layer_ids))
    return ServedTarget(name, target_dir, verifier, tokenizer, torch_model=model, placement=placement,
                        corpus=resolve_corpus(lookup_corpus, model, checked_weights_digest(verifier)))


def load_drafter_target(name: str = "default", *, placement: Placement | None = None) -> ServedTarget:
    """The target as the drafter service needs it: its embedding and lm_head only (TargetEmbedHead,
    read alone from the safetensors files; the decoder layers are never loaded), and its tokenizer
    (the 'random' drafter's mask token)."""
    placement = placement or Placement()
    device = placement.torch_device()
    target_dir = resolve_target(None if is_default_target(name) else name)
    embed_head = TargetEmbedHead.from_pretrained(target_dir, dtype=placement.torch_dtype, device=device)
    return ServedTarget(name, target_dir, embed_head, _served_tokenizer(target_dir), placement=placement)


def _served_tokenizer(target_dir: Path) -> ChatTokenizer | None:
    try:
        return ChatTokenizer(target_dir)
    except ModelFormatError as err:
        log.warning("target %s has no usable tokenizer (%s): prompts must be token ids", target_dir, str(err).splitlines()[0])
        return None


def load_verifier_target(config) -> ServedTarget:
    """The verifier service's target as its config (VerifierServiceConfig) describes it."""
    layers = parse_layers(config.onnx_layers) if config.onnx_layers else None
    options = BackendOptions(name=config.backend, precision=config.precision, onnx=config.onnx_path or None,
                             threads=config.threads)
    return load_served_target(config.target, backend=options, drafter_layers=layers,
                              placement=Placement(config.dtype, config.device), lookup_corpus=config.lookup_corpus)


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
    'random'; or a DFlash checkpoint directory or Hugging Face repository id. The drafter takes
    the target's placement. Returns (drafter or None, name)."""
    placement, head = target.placement, target.torch_model
    dtype = placement.torch_dtype
    if drafter == "":
        shipped = shipped_drafter_dir() if target.is_default else None
        if shipped is None:
            return None, NO_DRAFTER
        model, name = DFlashDrafter.from_pretrained(shipped, dtype=dtype, device=head.device), SHIPPED_DRAFTER_NAME
    elif drafter == NO_DRAFTER:
        return None, NO_DRAFTER
    elif drafter == RANDOM_DRAFTER:
        model = DFlashDrafter.random(head.config, block_size=random_block_size, mask_token_id=random_mask_token(target))
        model, name = model.to(device=head.device, dtype=dtype), RANDOM_DRAFTER
    else:
        model = DFlashDrafter.from_pretrained(resolve_drafter(drafter), dtype=dtype, device=head.device)
        name = str(Path(drafter).expanduser())
    return LocalDrafter(model, head, precision=drafter_run_precision(placement, head.device)), name
