"""Assemble a ready-to-run engine (target, tokenizer, drafter, decoder) from user-facing names.

The CLI, the benchmarks and the services all load models through `load_engine`, so "which target,
which drafter, which default block size" is decided in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blockpilot.backends.base import VerifierBackend, backend_name, backend_precision, checked_weights_digest
from blockpilot.backends.loader import BackendOptions, default_export_layers, load_backend, place_beside
from blockpilot.decoding.corpus import CorpusNgrams
from blockpilot.decoding.drafting import DraftProvider, LocalDrafter
from blockpilot.decoding.speculative import SpeculativeDecoder
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.placement import Placement, check_backend_placement, drafter_run_precision
from blockpilot.models.store import is_default_target, resolve_drafter, resolve_target
from blockpilot.models.target import TargetModel
from blockpilot.models.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

# The drafter trained for the default target ships in the repository's models/ folder.
SHIPPED_DRAFTER_NAME = "SmolLM2-135M-Instruct-DFlash"
RANDOM_DRAFTER = "random"
NO_DRAFTER = "none"
# Corpus n-grams of the default target's own responses (decoding/corpus.py) ship beside it.
SHIPPED_CORPUS_NAME = "SmolLM2-135M-Instruct-ngrams"
AUTO_CORPUS = "auto"
NO_CORPUS = "none"


def shipped_drafter_dir() -> Path | None:
    """The project's own trained drafter for the default target, if this checkout has one."""
    path = Path(__file__).resolve().parent.parent / "models" / SHIPPED_DRAFTER_NAME
    return path if (path / "config.json").is_file() else None


def resolve_corpus(choice: str, target: TargetModel, digest: str | None = None) -> CorpusNgrams | None:
    """The corpus n-grams prompt lookup proposes from (see decoding/corpus.py).

    choice: 'auto' = the shipped table where it was counted over this target's own responses
    (same weights digest), else none; 'none'; or a table folder, refused unless it was counted
    over this target's responses (another model's habits would only be wrong drafts).
    digest: the target's weights digest where already known (a graph backend's checked export:
    backends.base.checked_weights_digest), else computed here (~0.5 s for the default model)."""
    if choice == NO_CORPUS:
        return None
    from blockpilot.backends.onnx_export import weights_digest

    if choice == AUTO_CORPUS:
        path = Path(__file__).resolve().parent.parent / "models" / SHIPPED_CORPUS_NAME
        if not path.is_dir():
            return None
        corpus = CorpusNgrams.load(path)
        if corpus.info.get("vocab_size") != target.config.vocab_size or \
                corpus.info.get("target", {}).get("weights_digest") != (digest or weights_digest(target)):
            return None
        log.info("prompt lookup: corpus n-grams %s (%d trigrams, %d bigrams)", path, len(corpus.trigram), len(corpus.bigram))
        return corpus
    corpus = CorpusNgrams.load(choice)
    made_from = corpus.info.get("target", {}).get("weights_digest")
    if made_from != (digest or weights_digest(target)):
        raise FailedPreconditionError(f"the corpus n-grams at '{choice}' were counted over another target's responses "
                                      f"(weights digest {str(made_from)[:12]}...): make a table for this target with "
                                      "`blockpilot drafter corpus`")
    return corpus


@dataclass
class Engine:
    """target: the torch TargetModel (its embedding and output projection also serve the drafter);
    verifier_target: what the decoder verifies with (the torch target itself, or an ONNX Runtime /
    TensorRT backend over an export of it)."""

    target_dir: Path
    tokenizer: ChatTokenizer
    target: TargetModel
    drafter: DraftProvider | None
    drafter_name: str
    decoder: SpeculativeDecoder
    verifier_target: VerifierBackend | None = None
    placement: Placement = Placement()
    corpus: CorpusNgrams | None = None  # prompt lookup's corpus n-grams (resolve_corpus)

    @property
    def default_block_size(self) -> int:
        """The drafter's trained block size, or 1 (autoregressive) without a drafter."""
        return self.drafter.block_size if self.drafter is not None else 1

    @property
    def template_defaults(self) -> dict[str, Any]:
        """The chat-template arguments the drafter was trained with ({} without a drafter or when
        its config names none): a chat prompt's defaults, under the caller's own."""
        return self.drafter.chat_template_kwargs if isinstance(self.drafter, LocalDrafter) else {}

    @property
    def backend(self) -> str:
        """'torch', 'onnxruntime' or 'tensorrt'."""
        return backend_name(self.verifier_target if self.verifier_target is not None else self.target)

    @property
    def precision(self) -> str:
        """'fp32', 'int4' (onnxruntime on the CPU) or TensorRT's precision."""
        return backend_precision(self.verifier_target if self.verifier_target is not None else self.target)


def load_engine(target: str | None = None, drafter: str | None = None, *, random_drafter_block_size: int = 8,
                backend: BackendOptions | None = None, placement: Placement | None = None,
                lookup_corpus: str = AUTO_CORPUS) -> Engine:
    """Load a target, its drafter and the backend that verifies.

    target: None/"default" (SmolLM2-135M-Instruct), a Hugging Face directory, a GGUF file or a
        Hugging Face repository id (see blockpilot.models.store.resolve_target).
    drafter: None = the shipped drafter when the target is the default one, else no drafter;
        "none" = no drafter; "random" = a randomly initialised drafter (testing); else a DFlash
        checkpoint directory or Hugging Face repository id.
    lookup_corpus: the corpus n-grams of prompt lookup (resolve_corpus: 'auto', 'none' or a folder).
    backend: which verifier backend runs the target (default: the torch engine); a graph backend's
        export must return the drafter's target layers (checked; exported on demand if none given).
    placement: dtype and device of the torch engine (target, drafter, KV caches); default float32
        on the CPU. A graph backend runs an export of the dtype on the device its runtime picks, so
        it takes the default device only.
    """
    backend = backend or BackendOptions()
    placement = placement or Placement()
    check_backend_placement(placement, backend.name)
    device = placement.torch_device()  # before any download or load: a missing GPU is said at once
    target_dir = resolve_target(target)
    target_model = TargetModel.from_pretrained(target_dir, dtype=placement.torch_dtype, device=device)
    tokenizer = ChatTokenizer(target_dir)
    is_default = is_default_target(target)

    model: DFlashDrafter | None = None
    name = NO_DRAFTER
    if drafter is None and is_default:
        shipped = shipped_drafter_dir()
        if shipped is not None:
            drafter, name = str(shipped), SHIPPED_DRAFTER_NAME
    if drafter == RANDOM_DRAFTER:
        model = DFlashDrafter.random(target_model.config, block_size=random_drafter_block_size,
                                     mask_token_id=untrained_mask_token(tokenizer)).to(device=device, dtype=placement.torch_dtype)
        name = RANDOM_DRAFTER
    elif drafter not in (None, NO_DRAFTER):
        model = DFlashDrafter.from_pretrained(resolve_drafter(drafter), dtype=placement.torch_dtype, device=device)
        name = name if name != NO_DRAFTER else str(Path(drafter).expanduser())
    if model is not None:
        model.config.check_target(target_model.config)
    layers = model.config.target_layer_ids if model is not None else None
    verifier = load_backend(target_model, backend, drafter_layers=layers, source=str(target_dir),
                            default_layers=default_export_layers(target_model, is_default) if layers is None else ())
    place_beside(verifier, target_model, *([model] if model is not None else []))
    # Drafts never change the output: the drafter may run in a cheaper precision (see LocalDrafter).
    precision = drafter_run_precision(placement, target_model.device)
    provider: DraftProvider | None = LocalDrafter(model, target_model, precision=precision) if model is not None else None
    return Engine(target_dir, tokenizer, target_model, provider, name, SpeculativeDecoder(verifier, provider),
                  verifier_target=verifier, placement=placement,
                  corpus=resolve_corpus(lookup_corpus, target_model, checked_weights_digest(verifier)))


def untrained_mask_token(tokenizer: ChatTokenizer) -> int:
    # Any fixed token works for an untrained drafter; use the first stop token (always in vocabulary).
    return tokenizer.stop_token_ids[0] if tokenizer.stop_token_ids else 0


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise InvalidArgumentError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
