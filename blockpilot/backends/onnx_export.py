"""Export the target to ONNX (with its KV cache as explicit inputs/outputs), and find exports again.

An export is a folder:
    model.onnx, model.onnx.data   the graph (weights as external data so the 2 GB protobuf limit
                                  never applies), one of two kinds (`graph` in export.json):
                                  "portable": blockpilot.backends.graph.TargetGraph through
                                      torch.onnx.export, standard ops only, in the dtype the target
                                      was loaded in: float32, or float16 / bfloat16 exported from a
                                      target loaded so (no fp32 detour), for ONNX Runtime's GPU
                                      providers and TensorRT (ONNX Runtime's CPU provider runs
                                      float32 and float16 graphs, not bfloat16: it lacks the kernels);
                                  "fused": blockpilot.backends.fused_graph, ONNX Runtime's fused CPU
                                      ops, fp32 or int4 (the GGUF's own codes), what the onnxruntime
                                      backend runs on the CPU
    export.json                   what it was made from: target, architecture, the hidden layers it
                                  returns, graph, dtype, precision, opset, a digest of the weights,
                                  the numeric check (and for int4: where the codes came from, the
                                  compute precision chosen and the timings it was chosen by)

Why the metadata: an export returns the hidden states of fixed layers and bakes in fixed weights at
a fixed dtype. A runtime must refuse an export of other weights (the output would silently be
another model's), of another dtype than it was asked to run, or of other layers than its drafter
reads, and say so; export.json is what it checks against.

Every export is checked twice before it is published: `onnx.checker` (full check, shape inference
included) and a numeric check (ONNX Runtime vs the torch engine at the same dtype on a prefill and a
block step after a rollback), the latter where ONNX Runtime here runs the dtype (a bfloat16 export
on a machine without a GPU provider is published unchecked, said in the log and by a null
check_max_error). Exports are written to a temporary sibling folder and renamed into place, so a crash
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
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch

from blockpilot.backends import FP32, INT4, PRECISIONS
from blockpilot.backends.fused_graph import FUSED_INPUTS, OPSET as FUSED_OPSET
from blockpilot.backends.graph import INPUT_NAMES, TargetGraph, output_names
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, ModelFormatError, NotFoundError
from blockpilot.models.store import cache_root
from blockpilot.models.target import TargetModel

if TYPE_CHECKING:
    from blockpilot.backends.gguf_codes import GgufCodes

log = logging.getLogger(__name__)

FORMAT = "blockpilot-onnx-target"
FORMAT_VERSION = 4  # 2: lone_token_ms; 3: per thread count; 4: padded and unpadded curves (unpadded_cost_ms), each timed on one session at a time
# Opset 18: every op the graph uses exists there, and TensorRT 10's ONNX parser and ONNX Runtime
# both support it (newer opsets add nothing this graph needs).
DEFAULT_OPSET = 18
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the weights (external data), written by the exporter beside the graph
METADATA_FILE = "export.json"
# Largest error an export may show in its own numeric check (see numeric_check); the tests hold the
# tiny exports to 1e-4 absolute, this only catches a broken export.
EXPORT_CHECK_TOLERANCE = 1e-4
# int4 at accuracy level 4 quantizes the activations to 8 bits: its difference from the fp32 engine
# is precision, not a bug (default model, random tokens: 0.18 scaled, logits within ~3). The codes
# themselves are checked strictly at level 1 (see _write_fused); this bound only catches a broken
# graph at the chosen level.
INT4_CHECK_TOLERANCE = 0.5
PORTABLE, FUSED = "portable", "fused"
GRAPHS = (PORTABLE, FUSED)
# A 16-bit export is held to its own rounding: ONNX Runtime and torch sum in other orders, and one
# ulp of a logit is ~1e-3 (float16) or ~8e-3 (bfloat16) of its size.
CHECK_TOLERANCE_16BIT = {"float16": 2e-2, "bfloat16": 1e-1}
# export.json's dtype -> the precision name the backends report (backends.base.backend_precision).
DTYPE_PRECISION = {"float32": FP32, "float16": "fp16", "bfloat16": "bf16"}
INT4_ACCURACY_LEVELS = (4, 1)  # MatMulNBits compute precisions tried for int4 (see _write_fused)
INT4_EXACT_LEVEL = 1  # fp32 activations: the level whose output must match the fp32 engine


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
    graph: str = "portable"
    precision: str = "fp32"
    # int4 only: MatMulNBits' accuracy_level, what it was chosen by (per level tried: ms of a 2-token
    # plus an 8-token step, whether rows are invariant), and where the codes came from (GGUF file,
    # tensors left in fp32, largest difference of the de-quantized codes from the fp32 weights:
    # 0.0 = exact).
    accuracy_level: int | None = None
    accuracy_levels: dict | None = None
    # Fused graphs, per thread count measured ("1" and the exporting process's count): ms of a
    # verify pass of k = 1..VERIFY_COST_SIZES tokens on 128 cached ones ({threads: {k: ms}}; the
    # fastest of a few rounds, made non-decreasing in k: see settle_curve), from which the engine
    # picks its prompt-lookup lengths (blockpilot.decoding.lookup.lengths_for_cost).
    verify_cost_ms: dict | None = None
    # Fused graphs where a lone token's one-row matmuls give exact numbers on the exporting CPU
    # (onnxruntime_fused.lone_rows_match; the backend checks again where it runs): the same curve as
    # such a backend runs its passes, every k on the sessions graph and k = 1 unpadded
    # ({threads: {k: ms}}, settled); else None.
    unpadded_cost_ms: dict | None = None
    quantization: dict | None = None
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


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'float16' or 'bfloat16' (export.json's and the placement's spelling)."""
    return str(dtype).removeprefix("torch.")


def check_export_dtype(export: OnnxExport, dtype: str) -> None:
    """Refuse an export of another dtype than the one asked for, saying how to make the right one."""
    have = export.metadata.dtype
    if have != dtype:
        fix = (f"blockpilot export onnx --dtype {dtype}" + (" --graph portable" if dtype != "float32" else "")
               + f" --out DIR, or run with --dtype {have}")
        raise FailedPreconditionError(f"the ONNX export at '{export.directory}' is {have}, but {dtype} was asked for; "
                                      f"export the target in {dtype} ({fix})")


def check_export_matches(export: OnnxExport, target: TargetModel, digest: str | None = None) -> None:
    """Refuse an export made from another model: dtype and architecture first (clear messages),
    then the weights digest (same architecture, other weights)."""
    check_export_dtype(export, dtype_name(target.dtype))
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
    graph: str = PORTABLE,
    precision: str = FP32,
    codes: "GgufCodes | None" = None,
) -> OnnxExport:
    """Export `target` into `out_dir` at the dtype it was loaded in, check it, and publish it atomically.

    hidden_layer_ids: the drafter's target layers, returned as the `hidden` output (may be empty for
        a target served without a drafter).
    source: where the target came from (recorded in export.json).
    overwrite: replace an existing export in `out_dir` (a folder with other files is never replaced).
    graph: 'portable' (standard ops, the target's dtype) or 'fused' (ONNX Runtime's CPU ops, a
        float32 target; see the module docstring).
    precision: 'fp32' or 'int4' (fused only; `codes` are the GGUF's own, from backends.gguf_codes);
        a float16 / bfloat16 target exports its own dtype (recorded as precision fp16 / bf16).
    """
    out_dir = Path(out_dir).expanduser()
    dtype = dtype_name(target.dtype)
    check_graph_precision(graph, precision, dtype)
    if precision == INT4 and codes is None:
        raise InvalidArgumentError("an int4 export needs the GGUF's codes (backends.gguf_codes.read_gguf_codes)")
    if graph == FUSED:
        from blockpilot.backends.fused_graph import fused_unsupported_reason

        reason = fused_unsupported_reason(target.config)
        if reason:
            raise InvalidArgumentError(f"the fused graph cannot run this target: {reason}; export --graph portable")
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
        log.info("exporting the target to ONNX (%s graph, %s, layers %s) into %s ...", graph,
                 precision if dtype == "float32" else DTYPE_PRECISION[dtype], list(layers), out_dir)
        import onnx

        metadata = ExportMetadata(
            target=source, model_type=cfg.model_type, num_hidden_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, hidden_layer_ids=layers,
            weights_digest=digest or weights_digest(target), opset=opset, graph=graph, dtype=dtype,
            precision=precision if dtype == "float32" else DTYPE_PRECISION[dtype],
            torch_version=torch.__version__, onnx_version=onnx.__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        if graph == PORTABLE:
            _torch_export(TargetGraph(target, layers).eval(), tmp / MODEL_FILE, opset, cfg.max_position_embeddings)
            metadata = dataclasses.replace(metadata, outputs=output_names(bool(layers)))
        else:
            metadata = _write_fused(target, layers, precision, codes, tmp, metadata)
        onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        (tmp / METADATA_FILE).write_text(metadata.to_json())
        unchecked = numeric_check_unavailable(dtype)
        if unchecked:
            diff = None
            log.warning("the %s ONNX export is not checked numerically here (%s): onnx.checker passed; it is "
                        "published with check_max_error null", dtype, unchecked)
        else:
            diff = numeric_check(OnnxExport(tmp, metadata), target)
            tolerance = (INT4_CHECK_TOLERANCE if precision == INT4
                         else CHECK_TOLERANCE_16BIT.get(dtype, EXPORT_CHECK_TOLERANCE))
            if diff > tolerance:
                raise ModelFormatError(
                    f"the ONNX export disagrees with the torch engine (scaled error {diff:.3g} > {tolerance}); not published"
                )
        metadata = dataclasses.replace(metadata, check_max_error=diff)
        (tmp / METADATA_FILE).write_text(metadata.to_json())
        if out_dir.exists():
            trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(out_dir)
        log.info("ONNX export done in %.1f s (ORT vs torch: scaled error %s): %s", time.monotonic() - started,
                 "not checked" if diff is None else f"{diff:.2g}", out_dir)
        return OnnxExport(out_dir, metadata)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_graph_precision(graph: str, precision: str, dtype: str = "float32") -> None:
    if graph not in GRAPHS:
        raise InvalidArgumentError(f"unknown ONNX graph {graph!r} (choose one of {', '.join(GRAPHS)})")
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"unknown precision {precision!r} (choose one of {', '.join(PRECISIONS)})")
    if dtype not in DTYPE_PRECISION:
        raise InvalidArgumentError(f"unknown dtype {dtype!r} (choose one of {', '.join(DTYPE_PRECISION)})")
    if dtype != "float32" and precision == INT4:
        raise InvalidArgumentError(f"int4 quantizes the float32 weights of the fused CPU graph; a {dtype} export "
                                   f"keeps its {dtype} weights (precision fp32 or auto)")
    if precision == INT4 and graph != FUSED:
        raise InvalidArgumentError("int4 runs on the fused graph (ONNX Runtime's MatMulNBits), not the portable one")
    if dtype != "float32" and graph == FUSED:
        raise InvalidArgumentError(f"the fused graph runs ONNX Runtime's float32 CPU ops; a {dtype} export is the "
                                   f"portable graph (--graph portable)")


def numeric_check_unavailable(dtype: str) -> str | None:
    """Why ONNX Runtime cannot run a `dtype` export on this machine (the numeric check is then
    skipped), or None: it runs on the GPU provider when there is one, else on the CPU's."""
    from blockpilot.backends.onnxruntime_backend import choose_provider, provider_dtype_problem

    return provider_dtype_problem(choose_provider("auto"), dtype)


def _write_fused(target: TargetModel, layers: tuple[int, ...], precision: str, codes, folder: Path,
                 metadata: ExportMetadata) -> ExportMetadata:
    """Write the fused graph into `folder`. For int4: first with fp32 activations (accuracy level
    1), which must match the torch engine as closely as an fp32 export does (this proves the codes
    and their layout: a wrong nibble order or row permutation would be off by order 1); then at the
    compute precision that runs fastest here among those whose rows are invariant (level 4: int8
    activations, or 1; timed on a 2-token and an 8-token pass, see onnxruntime_fused for row
    invariance), recorded with its timings, its verify-cost curve and the codes' provenance."""
    import onnx

    from blockpilot.backends.fused_graph import FUSED_OUTPUTS, GraphWeights, build_fused_graph

    def write(weights: GraphWeights) -> None:
        (folder / DATA_FILE).unlink(missing_ok=True)  # onnx.save appends to an existing data file
        for stale in folder.glob("sessions-*.onnx"):  # rewritten from the graph of another compute precision
            stale.unlink()
        onnx.save(build_fused_graph(target, layers, weights), str(folder / MODEL_FILE), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=DATA_FILE)

    outputs = FUSED_OUTPUTS if layers else tuple(o for o in FUSED_OUTPUTS if o != "hidden")
    metadata = dataclasses.replace(metadata, opset=FUSED_OPSET, inputs=FUSED_INPUTS, outputs=outputs)
    if precision == FP32:
        write(GraphWeights())
        return dataclasses.replace(metadata, **_cost_curves(OnnxExport(folder, metadata), target))
    levels: dict[str, dict] = {}
    measured: dict[int, tuple] = {}  # level -> _measure's answer at this process's thread count
    codes_error = None
    for level in INT4_ACCURACY_LEVELS:
        write(GraphWeights(precision, codes.weights, level))
        candidate = OnnxExport(folder, dataclasses.replace(metadata, accuracy_level=level))
        if level == INT4_EXACT_LEVEL:
            codes_error = numeric_check(candidate, target)
            if codes_error > EXPORT_CHECK_TOLERANCE:
                raise ModelFormatError(
                    f"the int4 graph with fp32 activations disagrees with the fp32 engine (scaled error {codes_error:.3g} > "
                    f"{EXPORT_CHECK_TOLERANCE}): the GGUF codes were not laid out as the engine's weights; not published"
                )
        measured[level] = _measure(candidate, target, check_rows=True)
        curve, invariant, _ = measured[level]
        levels[str(level)] = {"ms": round(curve["2"] + curve["8"], 2), "row_invariant": invariant}
    usable = [level for level in INT4_ACCURACY_LEVELS if levels[str(level)]["row_invariant"]]
    if not usable:
        raise FailedPreconditionError(
            "on this CPU no int4 compute precision gives a token the same logits in every pass, so speculative output "
            "could differ from block size 1: use --precision fp32"
        )
    best = min(usable, key=lambda level: levels[str(level)]["ms"])
    log.info("int4 compute precision: accuracy_level %d (per level: %s)", best, levels)
    if best != INT4_ACCURACY_LEVELS[-1]:
        write(GraphWeights(precision, codes.weights, best))
    chosen = dataclasses.replace(metadata, accuracy_level=best)
    return dataclasses.replace(
        chosen, accuracy_levels=levels,
        **_cost_curves(OnnxExport(folder, chosen), target, {torch.get_num_threads(): measured[best]}),
        quantization={"source": codes.source, "quantized": len(codes.weights), "left_fp32": list(codes.left_fp32),
                      "max_abs_difference": codes.max_abs_difference, "fp32_activations_check_error": codes_error},
    )


VERIFY_COST_SIZES = 12  # the longest default lookup proposal (11) plus its anchor


def measured_thread_counts() -> tuple[int, ...]:
    """The thread counts an export times its verify passes at: one (a serving process runs one
    pass per core, each on one thread) and this process's count (`blockpilot generate`'s)."""
    return tuple(sorted({1, torch.get_num_threads()}))


def _cost_curves(export: OnnxExport, target: TargetModel, known: Mapping[int, tuple] | None = None) -> dict[str, dict | None]:
    """verify_cost_ms and unpadded_cost_ms of the export's metadata, per measured_thread_counts().
    known: {threads: _measure's answer} already timed on this graph (not timed again)."""
    padded, unpadded = {}, {}
    for threads in measured_thread_counts():
        curve, _, unpadded_curve = (known or {}).get(threads) or _measure(export, target, check_rows=False, threads=threads)
        padded[str(threads)] = curve
        if unpadded_curve is not None:
            unpadded[str(threads)] = unpadded_curve
    log.info("verify cost (ms of a pass of 1..%d tokens, per thread count): padded %s; unpadded %s",
             VERIFY_COST_SIZES, padded, unpadded or "not exact here")
    return {"verify_cost_ms": padded, "unpadded_cost_ms": unpadded or None}


def settle_curve(fastest: Mapping[int, float]) -> dict[int, float]:
    """A measured cost curve {k: seconds} made non-decreasing in k: each k's cost becomes the
    lowest measured at k or above. Other processes only ever add time, and a pass of more tokens
    never does less work, so a k whose passes all met a busy moment is priced by a larger k that
    did not (measured on a Zen 4: one export's k = 2 timed 1.41 x k = 1 and k = 3 1.19 x, and
    prompt lookup then proposed 5 tokens where 1-3 pay)."""
    sizes = sorted(fastest)
    settled, lowest = {}, float("inf")
    for k in reversed(sizes):
        lowest = min(lowest, fastest[k])
        settled[k] = lowest
    return {k: settled[k] for k in sizes}


def _measure(export: OnnxExport, target: TargetModel, *, check_rows: bool, threads: int | None = None,
             context: int = 128, rounds: int = 6) -> tuple[dict[str, float], bool, dict[str, float] | None]:
    """({k: ms} of a verify pass of k = 1..VERIFY_COST_SIZES tokens (logits of every token) on
    `context` cached tokens as a padded backend runs them (the main graph, one token padded to two
    rows); whether rows are invariant (check_row_invariance; True when not checked); the same curve
    as an unpadded backend runs them where a lone token's one-row matmuls are exact here
    (lone_rows_match; every pass on the sessions graph, one token unpadded; else None)), on
    `threads` threads (None: torch's count), each settled (settle_curve). The k passes are timed
    round-robin and the fastest round of each kept; the two curves are timed one after the other:
    alternating the graphs' sessions lets one's idle threads spin on the cores the other needs
    (measured on a 2-core Zen 4 at 2 threads: a lone token timed between the padded curve's passes
    read 9.5 to 21 ms from run to run, timed apart 10.6 to 10.8)."""
    from blockpilot.backends.onnxruntime_fused import FusedOnnxRuntimeTarget, check_row_invariance, lone_rows_match

    backend = FusedOnnxRuntimeTarget(export, target, threads=threads, verify_weights=False, check_rows=False)
    invariant = True
    if check_rows:
        try:
            check_row_invariance(backend)
        except FailedPreconditionError:
            invariant = False
    lone_exact = invariant and lone_rows_match(backend)
    generator = torch.Generator().manual_seed(0)
    cache = backend.new_cache(context + VERIFY_COST_SIZES)
    backend(torch.randint(target.config.vocab_size, (1, context), generator=generator), cache, num_logits=1)
    blocks = {k: torch.randint(target.config.vocab_size, (1, k), generator=generator) for k in range(1, VERIFY_COST_SIZES + 1)}

    def curve() -> dict[str, float]:
        best = {k: float("inf") for k in blocks}
        for _ in range(rounds + 1):  # the first round warms up (and counts only if it is the fastest)
            for k, block in blocks.items():
                began = time.perf_counter()
                backend(block, cache)
                best[k] = min(best[k], time.perf_counter() - began)
                cache.truncate(context)
        return {str(k): round(v * 1000, 3) for k, v in settle_curve(best).items()}

    padded = curve()  # lone_rows_invariant is off (check_rows=False above)
    unpadded = None
    if lone_exact:
        backend.lone_rows_invariant = True
        unpadded = curve()
    return padded, invariant, unpadded


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
    device, dtype = graph.target.device, graph.target.dtype  # the cache inputs take the target's dtype
    example = (
        torch.tensor([[1, 2, 3]], device=device), torch.tensor([[5, 6, 7]], device=device),
        torch.tensor([1, 2], device=device), torch.zeros(5, *kv, dtype=dtype, device=device),
        torch.zeros(5, *kv, dtype=dtype, device=device),
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
    layers = export.hidden_layer_ids
    if export.metadata.graph == FUSED:
        from blockpilot.backends.onnxruntime_fused import FusedOnnxRuntimeTarget

        ort_target = FusedOnnxRuntimeTarget(export, target, verify_weights=False, threads=1, check_rows=False)
    else:
        from blockpilot.backends.onnxruntime_backend import OnnxRuntimeTarget

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
            # In float32 on the torch side's device: a 16-bit difference would round the error itself.
            a, b = a.float(), b.to(a.device).float()
            worst = max(worst, float((a - b).abs().max()) / max(1.0, float(a.abs().max())))
        if rollback is not None:
            for cache in caches:
                cache.truncate(rollback)
    return worst


# ---- exports made on demand ---------------------------------------------------------------------


def export_key(target: TargetModel, hidden_layer_ids: Sequence[int], digest: str, opset: int = DEFAULT_OPSET,
               graph: str = PORTABLE, precision: str = FP32) -> str:
    """Cache folder name of an on-demand export: model type, weights digest, layers, opset, format
    (and graph and precision for a fused graph, the dtype for a 16-bit one; the digest differs by
    dtype too, the name says it)."""
    layers = "-".join(str(i) for i in hidden_layer_ids) or "none"
    if graph == FUSED:
        return f"{target.config.model_type}-{digest[:16]}-layers{layers}-fused-{precision}-v{FORMAT_VERSION}"
    dtype = dtype_name(target.dtype)
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return f"{target.config.model_type}-{digest[:16]}-layers{layers}-opset{opset}{suffix}-v{FORMAT_VERSION}"


def cached_export_dir(target: TargetModel, hidden_layer_ids: Sequence[int], digest: str, *, graph: str = PORTABLE,
                      precision: str = FP32, cache_dir: str | Path | None = None) -> Path:
    """Where cached_export keeps (or would make) this export."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "onnx"
    return root / export_key(target, hidden_layer_ids, digest, graph=graph, precision=precision)


def is_cached(directory: Path) -> bool:
    return (directory / METADATA_FILE).is_file()


def cached_export(
    target: TargetModel,
    hidden_layer_ids: Sequence[int],
    *,
    source: str = "",
    cache_dir: str | Path | None = None,
    digest: str | None = None,
    graph: str = PORTABLE,
    precision: str = FP32,
    codes: "GgufCodes | None" = None,
) -> OnnxExport:
    """The export of this target with these layers (graph, precision) from `$BLOCKPILOT_CACHE/onnx/`,
    made (once, under a lock, so concurrent services do not export twice) when it is not there yet.
    An int4 export needs `codes` only when it has to be made."""
    check_graph_precision(graph, precision, dtype_name(target.dtype))
    digest = digest or weights_digest(target)
    out = cached_export_dir(target, hidden_layer_ids, digest, graph=graph, precision=precision, cache_dir=cache_dir)
    if is_cached(out):
        return read_export(out)
    with _lock(out.parent / f".{out.name}.lock"):
        if is_cached(out):
            return read_export(out)
        log.warning("no %s %s %s ONNX export of this target with layers %s yet: exporting into %s once "
                    "(about a minute for the default model)", graph, dtype_name(target.dtype), precision,
                    list(hidden_layer_ids), out)
        if precision == INT4 and codes is None:
            from blockpilot.backends.gguf_codes import codes_for_target

            codes = codes_for_target(target, source)
        return export_onnx(target, out, hidden_layer_ids, source=source, digest=digest, overwrite=True,
                           graph=graph, precision=precision, codes=codes)


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
        "hidden_layer_ids": list(meta.hidden_layer_ids), "graph": meta.graph, "precision": meta.precision,
        "accuracy_level": meta.accuracy_level, "dtype": meta.dtype, "opset": meta.opset,
        "weights_digest": meta.weights_digest, "check_max_error": meta.check_max_error,
        "size_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1),
    }
