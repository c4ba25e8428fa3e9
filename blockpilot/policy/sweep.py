"""`blockpilot policy sweep`: τ, steps and decode tokens/s of every prompt at every block size.

A sweep is a folder (one output, resumable):

    manifest.json              what was swept: mode, block sizes, target and drafter fingerprints,
                               max_new_tokens, feature kinds and widths, the cost model (replay)
    records.jsonl              one line per (prompt, block size), see RECORD below
    features-<kind>.f32        one row per prompt of raw little-endian float32 [rows, dim] for each
                               kind in FEATURE_KINDS; a record's `feature_row` indexes it
                               (np.fromfile(path, "<f4").reshape(-1, dim), or np.memmap)

RECORD = {"id", "dataset", "block_size", "mode": "replay"|"decode", "tau", "steps", "tokens",
          "decode_s", "decode_tokens_per_s", "acceptance_lengths", "verify_sizes",
          "prompt_tokens", "new_tokens", "finish_reason", "feature_row", "greedy_mismatches",
          "step_sources", "baseline_decode_s"}
  tau = tokens / steps (0 without a step); tokens = tokens committed by decode steps (the
  prefill's first token excluded, as GenerationResult counts them); decode_s: measured (decode) or
  from the cost model (replay); verify_sizes: tokens verified per step; greedy_mismatches: replay:
  recorded tokens that differ from the single-sequence argmax (0 = the replay is exact); decode:
  tokens that differ from the block-size-1 output (0 = lossless). Block size 1 is always
  swept besides the candidates. step_sources: each step's draft source ("dflash", "lookup", "" =
  one token). baseline_decode_s: plain autoregressive decoding of the same tokens (block size 1,
  prompt lookup off), the baseline of every speed-up; with lookup off it is block size 1's
  decode_s. With `prompt_lookup` on (manifest), every size is decoded with prompt lookup as the
  verifier runs it (block size 1 then means lookup drafts only).

Every prompt's feature rows are appended first, then all its record lines in one write, so an
interrupted sweep leaves at most one incomplete prompt at the end; resuming cuts it off (records
and feature rows) and redoes it. Prompts are skipped by id, never by position.

Two modes (research/papers.md §1: labels come from an offline sweep at temperature 0):
- decode: SpeculativeDecoder runs the request at block size 1 and at every candidate: exact τ,
  measured decode tokens/s. About (candidates + 1) x max_new_tokens target passes per prompt.
- replay (default): the target's greedy continuation is generated once (batched), the target's
  features of the whole sequence are computed once (the prefill exactly as the decoding loop runs
  it, then the continuation teacher-forced), and for every block size the greedy loop is replayed
  with the same drafter session calls the real loop makes: at temperature 0 the output is the same
  at every block size, so a draft token is accepted iff it equals the recorded token. τ and steps are
  the real loop's up to float non-batch-invariance (`greedy_mismatches` counts recorded tokens that
  differ from the single-sequence argmax). Decode tokens/s come from a cost model measured once per
  sweep on this machine: seconds of a verify pass of k tokens at a typical context length plus a
  drafter pass drafting k - 1 tokens, summed over the replayed steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from blockpilot.backends.base import VerifierBackend, backend_name
from blockpilot.decoding import acceptance
from blockpilot.decoding.drafting import DraftProvider, DraftRequest
from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig
from blockpilot.decoding.replay import replay_greedy
from blockpilot.decoding.speculative import PrefillInfo, SamplingParams, SpeculativeDecoder
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from blockpilot.models.target import TargetModel
from blockpilot.policy.features import feature_dim, feature_vectors
from blockpilot.policy.metadata import FEATURE_KINDS

log = logging.getLogger(__name__)

SWEEP_FORMAT = "blockpilot-policy-sweep/1"
MANIFEST_FILE = "manifest.json"
RECORDS_FILE = "records.jsonl"
MODES = ("replay", "decode")
BASELINE_BLOCK_SIZE = 1
# Manifest fields that must agree for a sweep to be resumed (anything else may differ).
_IDENTITY_FIELDS = ("format", "mode", "block_sizes", "candidates", "target", "drafter", "max_new_tokens", "feature_dims",
                    "prompt_lookup")


def feature_file(directory: Path, kind: str) -> Path:
    return Path(directory) / f"features-{kind}.f32"


def default_candidates(trained_block_size: int, radius: int = 3) -> tuple[int, ...]:
    """The drafter's training size ± radius, clipped to >= 2 (block size 1 is the autoregressive
    baseline, which every sweep measures anyway; pass it explicitly to make it a candidate)."""
    if radius < 0:
        raise InvalidArgumentError(f"radius must be >= 0, got {radius}")
    return tuple(b for b in range(trained_block_size - radius, trained_block_size + radius + 1) if b >= 2)


@dataclass(frozen=True)
class SweepConfig:
    """candidates: block sizes the policy chooses from (ascending, distinct, >= 1).
    mode: "replay" or "decode" (see the module docstring).
    max_new_tokens: tokens generated per prompt (the same at every block size).
    max_prompt_tokens: longer prompts are skipped (they would dominate padded generation batches).
    batch_size: prompts generated together in replay mode.
    cost_repeats: timed repetitions per verify/draft size in the cost model (median taken).
    lookup: prompt lookup as the decoding loop runs it (LOOKUP_OFF: DFlash drafts only)."""

    candidates: tuple[int, ...]
    mode: str = "replay"
    max_new_tokens: int = 128
    max_prompt_tokens: int = 384
    batch_size: int = 16
    cost_repeats: int = 10
    lookup: LookupConfig = LOOKUP_OFF

    def __post_init__(self) -> None:
        candidates = tuple(self.candidates)
        if not candidates or any(not isinstance(c, int) or c < 1 for c in candidates) or list(candidates) != sorted(set(candidates)):
            raise InvalidArgumentError(f"candidates must be distinct block sizes >= 1 in ascending order, got {list(self.candidates)!r}")
        object.__setattr__(self, "candidates", candidates)
        if self.mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("max_new_tokens", "max_prompt_tokens", "batch_size", "cost_repeats"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Every size swept: the candidates and block size 1."""
        return tuple(sorted({BASELINE_BLOCK_SIZE, *self.candidates}))

    @property
    def max_verify_size(self) -> int:
        """The longest target pass a step can make (a lookup copy may exceed the block size)."""
        return max(max(self.block_sizes), self.lookup.max_tokens + 1 if self.lookup.enabled else 1)


# ---- the greedy loop, replayed ------------------------------------------------------------------




# ---- cost model (replay mode) ------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Seconds per step on the machine that ran the sweep.

    verify_s[k]: a target pass over k block tokens (logits of every position and the drafter's
    layers, as the loop asks) plus the greedy check, at `context_tokens` cached tokens.
    draft_s[k]: a drafter pass drafting k - 1 tokens with one new context token (k >= 2).
    threads: the verifier backend's threads (a graph backend's own; torch's for the torch target).
    Per-step bookkeeping of the loop (a few list operations) is left out."""

    def covers(self, max_block_size: int, max_verify_size: int | None = None) -> bool:
        return all(k in self.verify_s for k in range(1, max(max_block_size, max_verify_size or 0) + 1)) and \
            all(k in self.draft_s for k in range(2, max_block_size + 1))

    context_tokens: int
    verify_s: dict[int, float]
    draft_s: dict[int, float]
    threads: int
    machine: str = ""
    backend: str = "torch"

    def step_s(self, verify_size: int) -> float:
        return self.verify_s[verify_size] + (self.draft_s[verify_size] if verify_size > 1 else 0.0)

    def decode_s(self, verify_sizes: Sequence[int], sources: Sequence[str]) -> float:
        """Seconds of these steps (per step: tokens verified and draft source); only "dflash"
        steps pay a drafter pass."""
        return sum(self.verify_s[k] + (self.draft_s[k] if source == "dflash" else 0.0) for k, source in zip(verify_sizes, sources))

    def to_json(self) -> dict:
        data = asdict(self)
        data["verify_s"] = {str(k): v for k, v in self.verify_s.items()}
        data["draft_s"] = {str(k): v for k, v in self.draft_s.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> "CostModel":
        return cls(int(data["context_tokens"]), {int(k): float(v) for k, v in data["verify_s"].items()},
                   {int(k): float(v) for k, v in data["draft_s"].items()}, int(data["threads"]), data.get("machine", ""),
                   data.get("backend", "torch"))


@torch.inference_mode()
def measure_cost_model(target: VerifierBackend, provider: DraftProvider, max_block_size: int, context_tokens: int,
                       repeats: int = 5, seed: int = 0, max_verify_size: int | None = None) -> CostModel:
    """Time every verify size 1..max(max_block_size, max_verify_size) and every draft size
    2..max_block_size (the replayed loop's last step may verify fewer tokens than the block size;
    a lookup copy may verify more).

    The sizes are timed round-robin, `repeats` rounds after a warm-up round, and the fastest run of
    each size is kept: on a shared machine other processes only ever add time, and round-robin
    spreads a slow spell over all sizes instead of one."""
    generator = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    layers = tuple(provider.target_layer_ids)
    longest = max(max_block_size, max_verify_size or 0)
    capacity = context_tokens + longest + 1
    cache = target.new_cache(capacity)
    prompt = torch.randint(vocab, (1, context_tokens), generator=generator)
    prefill = target(prompt, cache, num_logits=1, hidden_layer_ids=layers)
    blocks = {k: torch.randint(vocab, (1, k), generator=generator) for k in range(1, longest + 1)}
    calls = (max_block_size - 1) * (repeats + 1)
    session = provider.open_session(capacity + calls)
    verify_times: dict[int, list[float]] = {k: [] for k in blocks}
    draft_times: dict[int, list[float]] = {k: [] for k in range(2, max_block_size + 1)}
    try:
        context = prefill.hidden[0]
        anchor = int(prompt[0, -1])
        # Fill the draft cache with the context once; each timed call then adds one new context
        # token, as a step with one accepted token does (the context grows by `calls` tokens in
        # all, negligible next to context_tokens).
        session.propose(DraftRequest(anchor=anchor, start=context_tokens - 1, num_draft=1, context=context[:-1], context_start=0))
        position = context_tokens
        for _ in range(repeats + 1):
            for k, block in blocks.items():
                started = time.perf_counter()
                out = target(block, cache, num_logits=None, hidden_layer_ids=layers)
                acceptance.greedy_verify(block[0, 1:], out.logits[0])
                verify_times[k].append(time.perf_counter() - started)
                cache.truncate(context_tokens)
            for k in draft_times:
                started = time.perf_counter()
                session.propose(DraftRequest(anchor=anchor, start=position, num_draft=k - 1, context=context[-1:],
                                             context_start=position - 1))
                draft_times[k].append(time.perf_counter() - started)
                position += 1
    finally:
        session.close()
    # The first round is the warm-up (allocations, caches).
    return CostModel(context_tokens, {k: min(v[1:]) for k, v in verify_times.items()},
                     {k: min(v[1:]) for k, v in draft_times.items()}, getattr(target, "threads", torch.get_num_threads()),
                     f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}".strip(), backend_name(target))


def read_cost_model(path: Path) -> CostModel:
    """A cost model from a sweep folder, its manifest.json, or a JSON file holding CostModel.to_json()."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"no cost model at '{path}'") from None
    except json.JSONDecodeError as err:
        raise InvalidArgumentError(f"'{path}' is not valid JSON: {err}") from None
    data = data.get("cost_model", data) if "verify_s" not in data else data
    if not data:
        raise InvalidArgumentError(f"'{path}' holds no cost model (a decode-mode sweep has none)")
    try:
        return CostModel.from_json(data)
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidArgumentError(f"'{path}' is not a cost model: {err}") from None


# ---- the sweep folder --------------------------------------------------------------------------


@dataclass
class Sweep:
    """A sweep read back: manifest, records grouped by prompt (file order), feature access."""

    directory: Path
    manifest: dict
    prompts: list[dict] = field(default_factory=list)  # [{"id", "dataset", "feature_row", "by_size": {B: record}}]

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(self.manifest["block_sizes"])

    @property
    def candidates(self) -> tuple[int, ...]:
        return tuple(self.manifest["candidates"])

    def features(self, kind: str) -> np.ndarray:
        """[rows, dim] float32, memory-mapped (read-only); row r belongs to the prompt with feature_row r."""
        dims = self.manifest["feature_dims"]
        if kind not in dims:
            raise InvalidArgumentError(f"this sweep has no '{kind}' features (it has {sorted(dims)})")
        path = feature_file(self.directory, kind)
        rows = len(self.prompts)
        if rows == 0:
            return np.zeros((0, dims[kind]), dtype=np.float32)
        return np.memmap(path, dtype="<f4", mode="r", shape=(rows, dims[kind]))

    def digest(self) -> str:
        """sha256 of records.jsonl (the `data_digest` of policies trained on this sweep)."""
        return file_sha256(self.directory / RECORDS_FILE)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_records(directory: Path, block_sizes: Sequence[int]) -> tuple[list[dict], int]:
    """Complete prompts in file order and the byte length of the file that holds them."""
    path = Path(directory) / RECORDS_FILE
    if not path.exists():
        return [], 0
    wanted = set(block_sizes)
    prompts: list[dict] = []
    current: dict | None = None
    good_bytes = 0
    offset = 0
    with path.open("rb") as handle:
        raw_lines = handle.readlines()
    for number, raw in enumerate(raw_lines, 1):
        offset += len(raw)
        if not raw.strip():
            continue
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("cut line")
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            if number == len(raw_lines):
                break  # cut by an interruption: its prompt is redone
            raise InvalidArgumentError(f"'{path}' line {number} is not a JSON record") from None
        if current is None or record["id"] != current["id"]:
            if current is not None:
                # A new prompt starts: the previous one must be complete (only the last may not be).
                raise InvalidArgumentError(f"'{path}': prompt {current['id']!r} has block sizes "
                                           f"{sorted(current['by_size'])}, expected {sorted(wanted)}")
            current = {"id": record["id"], "dataset": record["dataset"], "feature_row": record["feature_row"], "by_size": {}}
        current["by_size"][int(record["block_size"])] = record
        if set(current["by_size"]) == wanted:
            if current["feature_row"] != len(prompts):
                raise InvalidArgumentError(f"'{path}': prompt {current['id']!r} has feature_row {current['feature_row']}, "
                                           f"expected {len(prompts)}")
            prompts.append(current)
            current = None
            good_bytes = offset
    return prompts, good_bytes


def load_sweep(directory: Path) -> Sweep:
    """Read a sweep folder (complete prompts only; an interrupted tail is ignored)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise NotFoundError(f"no sweep at '{directory}' (expected {MANIFEST_FILE}; make one with `blockpilot policy sweep`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidArgumentError(f"'{manifest_path}' is not valid JSON: {err}") from None
    if manifest.get("format") != SWEEP_FORMAT:
        raise InvalidArgumentError(f"'{manifest_path}' has format {manifest.get('format')!r}, expected {SWEEP_FORMAT!r}")
    prompts, _ = _read_records(directory, manifest["block_sizes"])
    for kind, dim in manifest["feature_dims"].items():
        size = feature_file(directory, kind).stat().st_size if feature_file(directory, kind).exists() else 0
        if size < len(prompts) * dim * 4:
            raise InvalidArgumentError(f"'{feature_file(directory, kind)}' holds fewer rows than the {len(prompts)} prompts of the sweep")
    return Sweep(directory, manifest, prompts)


class SweepWriter:
    """Opens (or resumes) a sweep folder for appending prompts."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest_path = self.directory / MANIFEST_FILE
        if manifest_path.exists():
            existing = json.loads(manifest_path.read_text())
            diffs = [f"{key}: {existing.get(key)!r} there, {manifest.get(key)!r} now" for key in _IDENTITY_FIELDS
                     if existing.get(key) != manifest.get(key)]
            if diffs:
                raise FailedPreconditionError(f"'{self.directory}' holds a different sweep ({'; '.join(diffs)}); "
                                              f"use another --out folder")
            self.manifest = existing
        else:
            self.manifest = manifest
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        self.dims: dict[str, int] = dict(self.manifest["feature_dims"])
        prompts, good_bytes = _read_records(self.directory, self.manifest["block_sizes"])
        self.done = {p["id"] for p in prompts}
        self.rows = len(prompts)
        # Cut an interrupted tail: record lines of an incomplete prompt, feature rows without records.
        records = self.directory / RECORDS_FILE
        if records.exists() and records.stat().st_size != good_bytes:
            log.info("cutting an interrupted prompt off the end of %s", records)
            os.truncate(records, good_bytes)
        for kind, dim in self.dims.items():
            path = feature_file(self.directory, kind)
            want = self.rows * dim * 4
            have = path.stat().st_size if path.exists() else 0
            if have < want:
                raise InvalidArgumentError(f"'{path}' holds fewer rows than the {self.rows} prompts recorded")
            if have > want:
                os.truncate(path, want)

    def cost_model(self) -> CostModel | None:
        data = self.manifest.get("cost_model")
        return CostModel.from_json(data) if data else None

    def set_cost_model(self, cost: CostModel, source: str) -> None:
        self.manifest["cost_model"] = cost.to_json()
        self.manifest["cost_model_source"] = source
        (self.directory / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2) + "\n")

    def append(self, records: list[dict], features: dict[str, np.ndarray]) -> None:
        """One prompt: its feature rows first, then all its records in one write."""
        for kind, dim in self.dims.items():
            row = np.ascontiguousarray(features[kind], dtype="<f4").reshape(-1)
            if row.shape[0] != dim:
                raise ValueError(f"{kind} feature has {row.shape[0]} values, expected {dim}")
            with feature_file(self.directory, kind).open("ab") as handle:
                handle.write(row.tobytes())
        text = "".join(json.dumps({**r, "feature_row": self.rows}) + "\n" for r in records)
        with (self.directory / RECORDS_FILE).open("a") as handle:
            handle.write(text)
        self.done.add(records[0]["id"])
        self.rows += 1


# ---- running a sweep ---------------------------------------------------------------------------


@dataclass
class SweepModels:
    """What a sweep runs: the target, its drafter (in-process or remote), their fingerprints
    (features.model_fingerprint) and the tokenizer (encode_chat, stop_token_ids).

    verifier: the backend that times the cost model and runs decode mode, so tokens/s are those
    of the backend users serve with (None: the torch target). Replay's features always come
    from the torch target: they are the same up to float rounding on every backend."""

    target: TargetModel
    drafter: DraftProvider
    tokenizer: object
    target_name: str
    drafter_name: str
    verifier: object | None = None

    @property
    def timed_target(self):
        return self.verifier if self.verifier is not None else self.target


def read_ids(paths: Sequence[Path]) -> set[str]:
    """The "id" of every line of these JSONL files (prompt files, ...) and the prompt ids of
    `drafter data` folders."""
    from blockpilot.training.shards import ResponseStore

    ids: set[str] = set()
    for path in paths:
        path = Path(path)
        if path.is_dir():
            ids |= ResponseStore.open_existing(path).prompt_ids()
            continue
        if not path.is_file():
            raise NotFoundError(f"no file '{path}' to read prompt ids from")
        with path.open() as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    ids.add(json.loads(line)["id"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InvalidArgumentError(f"'{path}' line {number} has no JSON \"id\"") from None
    return ids


def select_prompts(sources: Sequence[Path], per_file: int, seed: int = 0, exclude_ids: set[str] = frozenset()) -> list[dict]:
    """A fixed-seed sample of `per_file` prompts from each *.jsonl file (files, or folders of them,
    not recursive), leaving out `exclude_ids` before sampling, interleaved across files.

    Excluding the prompts the drafter was trained on matters: the drafter accepts more on prompts
    it has seen, which would bias the labels towards larger blocks. The same seed with a larger
    per_file gives a superset, so a sweep can be grown by resuming it with a larger sample."""
    from blockpilot.benchmarking import interleave, read_jsonl_prompts

    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files.extend(sorted(source.glob("*.jsonl")))
        elif source.is_file():
            files.append(source)
        else:
            raise NotFoundError(f"no prompt file or folder '{source}'")
    if not files:
        raise NotFoundError(f"no *.jsonl files in {[str(s) for s in sources]}")
    samples = []
    for path in files:
        prompts = [p for p in read_jsonl_prompts(path) if p["id"] not in exclude_ids]
        # Seeded per file (by name), so adding or removing another file leaves this sample alone.
        rng = random.Random(f"{seed}:{path.name}")
        rng.shuffle(prompts)
        samples.append(prompts[:per_file])
    return interleave(samples)


def prepare_prompts(prompts: Sequence[dict], tokenizer, max_prompt_tokens: int) -> tuple[list[dict], int]:
    """Tokenize with the chat template (as the verifier does); drop prompts over the length cap."""
    kept, skipped = [], 0
    seen: set[str] = set()
    for prompt in prompts:
        if prompt["id"] in seen:
            raise InvalidArgumentError(f"prompt id {prompt['id']!r} appears twice")
        seen.add(prompt["id"])
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt["text"]}])
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        kept.append({**prompt, "prompt_ids": ids})
    return kept, skipped


def _record(prompt: dict, block_size: int, mode: str, lengths: Sequence[int], verify_sizes: Sequence[int], decode_s: float,
            new_tokens: int, finish_reason: str, greedy_mismatches: int, sources: Sequence[str] = (),
            baseline_decode_s: float | None = None) -> dict:
    tokens = int(sum(lengths))
    steps = len(lengths)
    return {"id": prompt["id"], "dataset": prompt["dataset"], "block_size": block_size, "mode": mode,
            "tau": tokens / steps if steps else 0.0, "steps": steps, "tokens": tokens, "decode_s": decode_s,
            "decode_tokens_per_s": tokens / decode_s if decode_s > 0 else 0.0,
            "acceptance_lengths": list(lengths), "verify_sizes": list(verify_sizes),
            "prompt_tokens": len(prompt["prompt_ids"]), "new_tokens": new_tokens, "finish_reason": finish_reason,
            "greedy_mismatches": greedy_mismatches, "step_sources": list(sources),
            "baseline_decode_s": decode_s if baseline_decode_s is None else baseline_decode_s}


@torch.inference_mode()
def prefill_like_the_loop(target: TargetModel, prompt_ids: Sequence[int], layer_ids: Sequence[int], capacity: int):
    """The decoding loop's prefill call, verbatim (so features are bitwise what the verifier sees).
    Returns (PrefillInfo, cache holding the prompt, drafter context features of the prompt [P, F])."""
    cache = target.new_cache(capacity)
    out = target(torch.tensor([list(prompt_ids)], dtype=torch.long, device=target.device), cache, num_logits=1,
                 hidden_layer_ids=tuple(layer_ids))
    info = PrefillInfo(len(prompt_ids), out.logits[0, -1], out.hidden[0, -1] if out.hidden is not None else None,
                       target.norm(out.final_state[0, -1]))
    return info, cache, out.hidden[0] if out.hidden is not None else None


@torch.inference_mode()
def replay_prompt(models: SweepModels, prompt: dict, response: Sequence[int], finish_reason: str, cfg: SweepConfig,
                  cost: CostModel, stop_ids: Sequence[int]) -> tuple[list[dict], dict[str, np.ndarray], dict]:
    """Records at every swept size for one prompt whose greedy continuation is `response`."""
    target = models.target
    prompt_ids = prompt["prompt_ids"]
    sequence = list(prompt_ids) + list(response)
    timings = {}
    started = time.perf_counter()
    info, cache, prompt_context = prefill_like_the_loop(target, prompt_ids, models.drafter.target_layer_ids, len(sequence))
    features = feature_vectors(info)
    mismatches = int(int(info.last_logits.argmax()) != response[0])
    context = prompt_context
    if len(response) > 1:
        # The continuation teacher-forced (all but its last token, which never enters the target).
        rest = target(torch.tensor([list(response[:-1])], device=target.device), cache, num_logits=None,
                      hidden_layer_ids=tuple(models.drafter.target_layer_ids))
        context = torch.cat([prompt_context, rest.hidden[0]])
        predicted = rest.logits[0].argmax(-1).tolist()
        mismatches += sum(p != t for p, t in zip(predicted, response[1:]))
    timings["features_s"] = time.perf_counter() - started
    started = time.perf_counter()
    records = []
    autoregressive = replay_greedy(None, sequence, len(prompt_ids), context, 1, cfg.max_new_tokens, stop_ids)
    baseline_s = cost.decode_s(autoregressive.verify_sizes, autoregressive.sources)
    for size in cfg.block_sizes:
        result = replay_greedy(models.drafter if size > 1 else None, sequence, len(prompt_ids), context, size,
                               cfg.max_new_tokens, stop_ids, cfg.lookup)
        records.append(_record(prompt, size, "replay", result.acceptance_lengths, result.verify_sizes,
                               cost.decode_s(result.verify_sizes, result.sources), len(response), finish_reason, mismatches,
                               result.sources, baseline_s))
        if result.acceptance_lengths and 1 + sum(result.acceptance_lengths) != len(response):
            raise ValueError(f"replay of {prompt['id']!r} at block size {size} commits {1 + sum(result.acceptance_lengths)} "
                             f"tokens; the recorded continuation has {len(response)}")
    timings["replay_s"] = time.perf_counter() - started
    return records, features, timings


def decode_prompt(models: SweepModels, decoder: SpeculativeDecoder, prompt: dict, cfg: SweepConfig,
                  stop_ids: Sequence[int]) -> tuple[list[dict], dict[str, np.ndarray], dict]:
    """Records at every swept size for one prompt by real decoding (block size 1 first; its
    prefill hook yields the features exactly as the verifier computes them)."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, stop_token_ids=tuple(stop_ids))
    captured: dict[str, PrefillInfo] = {}

    def hook(info: PrefillInfo) -> int:
        captured["info"] = info
        return BASELINE_BLOCK_SIZE

    started = time.perf_counter()
    baseline = decoder.generate(prompt["prompt_ids"], params, hook)  # plain autoregressive decoding
    features = feature_vectors(captured["info"])
    results = {BASELINE_BLOCK_SIZE: baseline} if not cfg.lookup.enabled else {}
    for size in cfg.block_sizes:
        if size not in results:
            results[size] = decoder.generate(prompt["prompt_ids"], params, size, lookup=cfg.lookup)
    reference = baseline.token_ids
    records = []
    for size in cfg.block_sizes:
        result = results[size]
        # At temperature 0 every block size must give the baseline's output (losslessness);
        # a difference is counted like the replay's argmax mismatches.
        mismatches = sum(a != b for a, b in zip(result.token_ids, reference)) + abs(len(result.token_ids) - len(reference))
        records.append(_record(prompt, size, "decode", result.acceptance_lengths, result.verify_sizes, result.decode_s,
                               len(result.token_ids), result.finish_reason, mismatches, result.step_sources,
                               baseline.decode_s))
    return records, features, {"decode_s": time.perf_counter() - started}


def sweep_manifest(models: SweepModels, cfg: SweepConfig) -> dict:
    return {
        "format": SWEEP_FORMAT,
        "mode": cfg.mode,
        "candidates": list(cfg.candidates),
        "block_sizes": list(cfg.block_sizes),
        "target": models.target_name,
        "drafter": models.drafter_name,
        "drafter_block_size": int(models.drafter.block_size),
        "max_new_tokens": cfg.max_new_tokens,
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "prompt_lookup": cfg.lookup.describe() if cfg.lookup.enabled else None,
        "temperature": 0.0,
        "feature_dims": {kind: feature_dim(models.target.config, kind) for kind in FEATURE_KINDS},
        "feature_dtype": "<f4",
        "cost_model": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_sweep(models: SweepModels, prompts: Sequence[dict], out_dir: Path, cfg: SweepConfig, *,
              cost_model: CostModel | None = None, progress: bool = True,
              on_prompt_done: Callable[[int], None] | None = None) -> dict:
    """Sweep `prompts` ([{"id", "dataset", "text"}]) into `out_dir`, resuming what is there.

    cost_model (replay mode): use this one instead of measuring (e.g. the training sweep's, so
    training and evaluation sweeps share it); a resumed sweep keeps the one it started with.
    on_prompt_done(n) is called after the n-th prompt of this run is written (tests interrupt there)."""
    from blockpilot.training.data import generate_batch

    if cfg.mode == "decode" and cost_model is not None:
        raise InvalidArgumentError("a cost model applies to replay mode only; decode mode measures tokens/s")
    if max(cfg.block_sizes) > models.drafter.max_block_size:
        raise InvalidArgumentError(f"block size {max(cfg.block_sizes)} exceeds the drafter's maximum {models.drafter.max_block_size}")
    writer = SweepWriter(out_dir, sweep_manifest(models, cfg))
    stop_ids = tuple(models.tokenizer.stop_token_ids)
    prepared, skipped_long = prepare_prompts(prompts, models.tokenizer, cfg.max_prompt_tokens)
    limit = models.target.config.max_position_embeddings
    too_long = [p["id"] for p in prepared if len(p["prompt_ids"]) + cfg.max_new_tokens + 1 > limit]
    if too_long:
        raise InvalidArgumentError(f"prompt {too_long[0]!r} + max_new_tokens exceeds the target's context of {limit} tokens")
    todo = [p for p in prepared if p["id"] not in writer.done]
    summary = {"prompts": len(prepared), "skipped_long": skipped_long, "done_before": len(prepared) - len(todo),
               "swept": 0, "mode": cfg.mode, "block_sizes": list(cfg.block_sizes)}
    log.info("%d prompts (%d over %d tokens skipped), %d already swept", len(prepared), skipped_long,
             cfg.max_prompt_tokens, summary["done_before"])
    totals: dict[str, float] = {}
    started = time.perf_counter()
    count = 0

    def finish_prompt(records: list[dict], features: dict[str, np.ndarray], timings: dict) -> None:
        nonlocal count
        writer.append(records, features)
        for key, value in timings.items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
        bar.update(1)
        by_size = {r["block_size"]: r for r in records}
        trained = models.drafter.block_size
        bar.set_postfix(s_per_prompt=f"{(time.perf_counter() - started) / count:.1f}",
                        tau=f"{by_size.get(trained, records[-1])['tau']:.2f}")
        if on_prompt_done is not None:
            on_prompt_done(count)

    bar = tqdm(total=len(todo), desc=f"sweep ({cfg.mode})", unit="prompt", disable=not progress, file=sys.stderr)
    try:
        if cfg.mode == "decode":
            decoder = SpeculativeDecoder(models.timed_target, models.drafter)
            for prompt in todo:
                finish_prompt(*decode_prompt(models, decoder, prompt, cfg, stop_ids))
        elif todo:
            cost = writer.cost_model()
            if cost is not None and cost_model is not None and cost != cost_model:
                log.warning("resuming with the cost model this sweep started with, not the one given")
            if cost is None and cost_model is not None:
                if not cost_model.covers(max(cfg.block_sizes), cfg.max_verify_size):
                    raise InvalidArgumentError(f"the given cost model does not cover block sizes up to {max(cfg.block_sizes)} "
                                               f"and verify sizes up to {cfg.max_verify_size}")
                cost = cost_model
                writer.set_cost_model(cost, "given")
            elif cost is None:
                lengths = sorted(len(p["prompt_ids"]) for p in prepared)
                context = lengths[len(lengths) // 2] + cfg.max_new_tokens // 2
                measured = time.perf_counter()
                cost = measure_cost_model(models.timed_target, models.drafter, max(cfg.block_sizes), context, cfg.cost_repeats,
                                          max_verify_size=cfg.max_verify_size)
                totals["cost_model_s"] = time.perf_counter() - measured
                writer.set_cost_model(cost, "measured")
            # Batches of similar prompt lengths (little padding) within windows of the prompt order,
            # so an interrupted sweep still covers every file evenly.
            window = cfg.batch_size * 8
            for lo in range(0, len(todo), window):
                chunk = sorted(todo[lo : lo + window], key=lambda p: len(p["prompt_ids"]))
                for b in range(0, len(chunk), cfg.batch_size):
                    batch = chunk[b : b + cfg.batch_size]
                    generation = time.perf_counter()
                    responses = generate_batch(models.target, [p["prompt_ids"] for p in batch], cfg.max_new_tokens,
                                               set(stop_ids), 0.0, torch.Generator())
                    share = (time.perf_counter() - generation) / len(batch)
                    for prompt, (response, reason) in zip(batch, responses):
                        records, features, timings = replay_prompt(models, prompt, response, reason, cfg, cost, stop_ids)
                        finish_prompt(records, features, {"generate_s": share, **timings})
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    per_prompt = (elapsed - totals.get("cost_model_s", 0.0)) / count if count else 0.0
    summary.update(swept=count, seconds=elapsed, seconds_per_prompt=per_prompt,
                   seconds_per_prompt_by_part={k: v / count for k, v in totals.items() if k != "cost_model_s"} if count else {},
                   cost_model_s=totals.get("cost_model_s", 0.0))
    sweep = load_sweep(out_dir)
    summary["total_prompts_in_sweep"] = len(sweep.prompts)
    summary["greedy_mismatch_prompts"] = sum(1 for p in sweep.prompts if any(r["greedy_mismatches"] for r in p["by_size"].values()))
    summary["mean_tau"] = {str(b): _mean(p["by_size"][b]["tau"] for p in sweep.prompts) for b in sweep.block_sizes}
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
