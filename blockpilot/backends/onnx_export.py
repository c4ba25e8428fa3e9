"""Export the target to ONNX (with its KV cache as explicit inputs/outputs), and find exports again.

An export is a folder:
    model.onnx, model.onnx.data   the graph of blockpilot.backends.graph.TargetGraph (fp32, weights
                                  as external data so the 2 GB protobuf limit never applies)
    export.json                   what it was made from: target, architecture, the hidden layers it
                                  returns, dtype, opset, a digest of the weights, the numeric check

Why the metadata: an export returns the hidden states of fixed layers and bakes in fixed weights. A
runtime must refuse an export of other weights (the output would silently be another model's) or of
other layers than its drafter reads, and say so; export.json is what it checks against.

Every export is checked twice before it is published: `onnx.checker` (full check, shape inference
included) and a numeric check (ONNX Runtime vs the torch engine on a prefill and a block step after
a rollback). Exports are written to a temporary sibling folder and renamed into place, so a crash
never leaves a half-written export where a runtime would find it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from blockpilot.backends.graph import INPUT_NAMES, TargetGraph, output_names
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, ModelFormatError, NotFoundError
from blockpilot.models.store import cache_root
from blockpilot.models.target import TargetModel

log = logging.getLogger(__name__)

FORMAT = "blockpilot-onnx-target"
FORMAT_VERSION = 1
# Opset 18: every op the graph uses exists there, and TensorRT 10's ONNX parser and ONNX Runtime
# both support it (newer opsets add nothing this graph needs).
DEFAULT_OPSET = 18
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the weights (external data), written by the exporter beside the graph
METADATA_FILE = "export.json"
# Largest error an export may show in its own numeric check (see numeric_check); the tests hold the
# tiny exports to 1e-4 absolute, this only catches a broken export.
EXPORT_CHECK_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportMetadata:
    """Contents of export.json (see the module docstring)."""

    target: str
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    hidden_layer_ids: tuple[int, ...]
    weights_digest: str
    dtype: str = "float32"
    opset: int = DEFAULT_OPSET
    batch_size: int = 1
    inputs: tuple[str, ...] = INPUT_NAMES
    outputs: tuple[str, ...] = ()
    check_max_error: float | None = None
    torch_version: str = ""
    onnx_version: str = ""
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> "ExportMetadata":
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFoundError(f"'{path.parent}' is not an ONNX export of this project (no {path.name})") from None
        except json.JSONDecodeError as err:
            raise ModelFormatError(f"'{path}' is not valid JSON: {err}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ModelFormatError(f"'{path}' does not describe a {FORMAT} export (format {raw.get('format') if isinstance(raw, dict) else None!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ModelFormatError(
                f"'{path}' has format_version {raw.get('format_version')!r}; this build reads version {FORMAT_VERSION}: export again"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ModelFormatError(f"'{path}' has unknown fields {unknown}")
        try:
            for key in ("hidden_layer_ids", "inputs", "outputs"):
                if key in raw:
                    raw[key] = tuple(raw[key])
            return cls(**raw)
        except TypeError as err:
            raise ModelFormatError(f"'{path}' is not a complete export description: {err}") from None


@dataclass(frozen=True)
class OnnxExport:
    """An export folder whose metadata has been read."""

    directory: Path
    metadata: ExportMetadata

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def hidden_layer_ids(self) -> tuple[int, ...]:
        return self.metadata.hidden_layer_ids


def weights_digest(target: TargetModel) -> str:
    """A digest of the target's parameters (names, dtypes, shapes, bytes).

    Why the tensors and not the files: the same weights reach the engine from a safetensors folder,
    a GGUF converted in another cache, or a test's random model; what the export must agree with is
    the numbers. About 0.5 s for the 135M default model."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(target.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def read_export(directory: str | Path) -> OnnxExport:
    """Open an export folder (refusing one with missing files or foreign metadata)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise NotFoundError(f"ONNX export folder '{directory}' does not exist")
    metadata = ExportMetadata.from_file(directory / METADATA_FILE)
    for name in (MODEL_FILE, DATA_FILE):
        if not (directory / name).is_file():
            raise ModelFormatError(f"the ONNX export '{directory}' lacks {name}: export again")
    return OnnxExport(directory, metadata)


def check_export_matches(export: OnnxExport, target: TargetModel, digest: str | None = None) -> None:
    """Refuse an export made from another model: architecture first (a clear message), then the
    weights digest (same architecture, other weights)."""
    meta, cfg = export.metadata, target.config
    expected = {
        "model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size, "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
    }
    wrong = {k: (getattr(meta, k), v) for k, v in expected.items() if getattr(meta, k) != v}
    if wrong:
        detail = ", ".join(f"{k} {got!r} (target: {want!r})" for k, (got, want) in wrong.items())
        raise FailedPreconditionError(f"the ONNX export at '{export.directory}' is of another architecture: {detail}")
    digest = digest or weights_digest(target)
    if meta.weights_digest != digest:
        raise FailedPreconditionError(
            f"the ONNX export at '{export.directory}' was made from other weights than the loaded target "
            f"(digest {meta.weights_digest[:12]}..., target {digest[:12]}...; exported from '{meta.target}'): export again"
        )


def export_onnx(
    target: TargetModel,
    out_dir: str | Path,
    hidden_layer_ids: Sequence[int] = (),
    *,
    source: str = "",
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    digest: str | None = None,
) -> OnnxExport:
    """Export `target` (fp32) into `out_dir`, check it, and publish it atomically.

    hidden_layer_ids: the drafter's target layers, returned as the `hidden` output (may be empty for
        a target served without a drafter).
    source: where the target came from (recorded in export.json).
    overwrite: replace an existing export in `out_dir` (a folder with other files is never replaced).
    """
    out_dir = Path(out_dir).expanduser()
    if target.dtype != torch.float32:
        raise InvalidArgumentError(f"ONNX export needs the float32 target, got {target.dtype}")
    layers = tuple(int(i) for i in hidden_layer_ids)
    cfg = target.config
    bad = [i for i in layers if not 0 <= i < cfg.num_hidden_layers]
    if bad or len(set(layers)) != len(layers):
        raise InvalidArgumentError(
            f"hidden layer ids {list(layers)} must be distinct and within [0, {cfg.num_hidden_layers})"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / METADATA_FILE).is_file():
            raise InvalidArgumentError(f"'{out_dir}' exists and is not an ONNX export: give an empty or new folder")
        if not overwrite:
            raise InvalidArgumentError(f"'{out_dir}' already holds an ONNX export (pass --force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        started = time.monotonic()
        log.info("exporting the target to ONNX (layers %s, opset %d) into %s ...", list(layers), opset, out_dir)
        _torch_export(TargetGraph(target, layers).eval(), tmp / MODEL_FILE, opset, cfg.max_position_embeddings)
        import onnx

        onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        metadata = ExportMetadata(
            target=source, model_type=cfg.model_type, num_hidden_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, hidden_layer_ids=layers,
            weights_digest=digest or weights_digest(target), opset=opset, outputs=output_names(bool(layers)),
            torch_version=torch.__version__, onnx_version=onnx.__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        (tmp / METADATA_FILE).write_text(metadata.to_json())
        diff = numeric_check(OnnxExport(tmp, metadata), target)
        if diff > EXPORT_CHECK_TOLERANCE:
            raise ModelFormatError(
                f"the ONNX export disagrees with the torch engine (scaled error {diff:.3g} > {EXPORT_CHECK_TOLERANCE}); not published"
            )
        metadata = dataclasses.replace(metadata, check_max_error=diff)
        (tmp / METADATA_FILE).write_text(metadata.to_json())
        if out_dir.exists():
            trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(out_dir)
        log.info("ONNX export done in %.1f s (ORT vs torch: scaled error %.2g): %s", time.monotonic() - started, diff, out_dir)
        return OnnxExport(out_dir, metadata)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _torch_export(graph: TargetGraph, path: Path, opset: int, max_positions: int) -> None:
    """torch.onnx.export (the dynamo exporter) with dynamic sequence, cache and logit counts.

    Example sizes are >= 2 on purpose: torch.export specialises dimensions whose example is 0 or 1."""
    from torch.export import Dim

    cfg = graph.target.config
    limit = max(max_positions, 8)
    steps = Dim("steps", min=1, max=limit)
    past = Dim("past", min=0, max=limit)
    num_logits = Dim("num_logits", min=1, max=limit)
    kv = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim)
    example = (
        torch.tensor([[1, 2, 3]]), torch.tensor([[5, 6, 7]]), torch.tensor([1, 2]),
        torch.zeros(5, *kv), torch.zeros(5, *kv),
    )
    dynamic = {"input_ids": {1: steps}, "position_ids": {1: steps}, "logit_index": {0: num_logits},
               "past_keys": {0: past}, "past_values": {0: past}}
    # The exporter reports progress on stdout, warns about optional packages it does not need and
    # logs every optimizer rewrite (thousands of lines at INFO); `blockpilot generate --json` owns
    # stdout, so keep it quiet (our own log lines say what happens).
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, example, str(path), input_names=list(INPUT_NAMES),
                output_names=list(output_names(bool(graph.hidden_layer_ids))), dynamic_shapes=dynamic,
                opset_version=opset, dynamo=True, external_data=True, verbose=False,
            )
    except ImportError as err:
        raise FailedPreconditionError(f"ONNX export needs a package that is not installed: {err}") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


@torch.inference_mode()
def numeric_check(export: OnnxExport, target: TargetModel, *, prompt_len: int = 7, block: int = 4, keep: int = 2) -> float:
    """Largest error of ONNX Runtime against torch over logits, hidden states, final state and new
    K/V, for a prefill of `prompt_len` random tokens, a block of `block` tokens, a rollback to `keep`
    of them, and a second block on top of the rolled-back cache (the speculative loop's pattern).

    Each tensor's error is max|ORT - torch| / max(1, max|torch|): absolute for values of order 1,
    relative for the residual stream, whose "attention sink" entries reach 10^4 in real models
    (SmolLM2: 2.6e4, where fp32 rounding alone is ~2e-3)."""
    from blockpilot.backends.onnxruntime_backend import OnnxRuntimeTarget

    layers = export.hidden_layer_ids
    ort_target = OnnxRuntimeTarget(export, target, verify_weights=False, threads=1)
    generator = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    capacity = prompt_len + 2 * block
    caches = (target.new_cache(capacity), ort_target.new_cache(capacity))
    worst = 0.0
    steps = [(prompt_len, None), (block, prompt_len + keep), (block, None)]
    for count, rollback in steps:
        tokens = torch.randint(vocab, (1, count), generator=generator)
        outs = [model(tokens, cache, hidden_layer_ids=layers) for model, cache in zip((target, ort_target), caches)]
        pairs = [(a, b) for a, b in zip(outs[0].__dict__.values(), outs[1].__dict__.values()) if a is not None]
        start = caches[0].length - count
        pairs += [(getattr(caches[0], name)[:, :, :, start : start + count], getattr(caches[1], name)[:, :, :, start : start + count])
                  for name in ("keys", "values")]
        for a, b in pairs:
            worst = max(worst, float((a - b).abs().max()) / max(1.0, float(a.abs().max())))
        if rollback is not None:
            for cache in caches:
                cache.truncate(rollback)
    return worst


# ---- exports made on demand ---------------------------------------------------------------------


def export_key(target: TargetModel, hidden_layer_ids: Sequence[int], digest: str, opset: int = DEFAULT_OPSET) -> str:
    """Cache folder name of an on-demand export: model type, weights digest, layers, opset, format."""
    layers = "-".join(str(i) for i in hidden_layer_ids) or "none"
    return f"{target.config.model_type}-{digest[:16]}-layers{layers}-opset{opset}-v{FORMAT_VERSION}"


def cached_export(
    target: TargetModel,
    hidden_layer_ids: Sequence[int],
    *,
    source: str = "",
    cache_dir: str | Path | None = None,
    digest: str | None = None,
) -> OnnxExport:
    """The export of this target with these layers from `$BLOCKPILOT_CACHE/onnx/`, made (once, under
    a lock, so concurrent services do not export twice) when it is not there yet."""
    digest = digest or weights_digest(target)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "onnx"
    out = root / export_key(target, hidden_layer_ids, digest)
    if (out / METADATA_FILE).is_file():
        return read_export(out)
    with _lock(root / f".{out.name}.lock"):
        if (out / METADATA_FILE).is_file():
            return read_export(out)
        log.warning("no ONNX export of this target with layers %s yet: exporting into %s once "
                    "(about a minute for the default model)", list(hidden_layer_ids), out)
        return export_onnx(target, out, hidden_layer_ids, source=source, digest=digest, overwrite=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process exporting to ONNX (lock %s)", path)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def describe(export: OnnxExport) -> dict[str, Any]:
    """A short JSON-able summary (CLI output)."""
    meta = export.metadata
    files = [p for p in export.directory.iterdir() if p.is_file()]
    return {
        "export": str(export.directory), "target": meta.target, "model_type": meta.model_type,
        "hidden_layer_ids": list(meta.hidden_layer_ids), "dtype": meta.dtype, "opset": meta.opset,
        "weights_digest": meta.weights_digest, "check_max_error": meta.check_max_error,
        "size_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1),
    }
