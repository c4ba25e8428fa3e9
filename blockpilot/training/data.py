"""Drafter training data: the target's own responses to training prompts (the DFlash recipe).

Every training prompt is answered greedily, and a fixed share of them (chosen by a hash of the
prompt id, so the choice does not depend on order) also at temperature 1. Jobs run through a
*refilling batch*: a batch of rows decoded one token per forward, where a finished row is
replaced by the next prompt of the queue instead of idling until the longest row of its batch
ends (see `RefillingBatch`). Responses land in a `ResponseStore` folder of binary shards, written
every `shard_records` records, so an interrupted run loses at most one shard's worth of work and
a rerun resumes where the folder stands (pairs present are skipped).

`generate_batch` (a plain left-padded batch) stays for callers that want one fixed batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from blockpilot.benchmarking import interleave, read_jsonl_prompts
from blockpilot.decoding import acceptance
from blockpilot.errors import InvalidArgumentError, NotFoundError
from blockpilot.models.kv_cache import KVCache
from blockpilot.models.target import TargetModel
from blockpilot.models.tokenizer import ChatTokenizer
from blockpilot.training.shards import ResponseRecord, ResponseStore, records_from_jsonl

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class DataConfig:
    """prompts_per_file: prompts taken from each training file, a fixed-seed shuffle (None = all;
        the same seed with a larger number gives a superset, so the data grows by rerunning).
    sample_fraction: share of prompts also answered at temperature 1 (besides greedy).
    max_prompt_tokens: longer prompts are skipped (they would dominate the batch's width).
    batch_size: rows of the refilling batch.
    refill_min: free rows that trigger a refill (smaller: less idle compute, more refills).
    shard_records: records per shard written to the folder.
    precision: "fp32", "bf16" (weights and cache in bfloat16) or "auto" (bf16 where the CPU has
        native BF16 instructions, else fp32; see `native_bf16`)."""

    prompts_per_file: int | None = None
    sample_fraction: float = 0.5
    max_new_tokens: int = 192
    batch_size: int = 32
    refill_min: int = 4
    max_prompt_tokens: int = 384
    shard_records: int = 256
    precision: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        if not 0 <= self.sample_fraction <= 1:
            raise InvalidArgumentError(f"sample_fraction must be in [0, 1], got {self.sample_fraction}")
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("max_new_tokens", "batch_size", "refill_min", "max_prompt_tokens", "shard_records"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts_per_file is not None and self.prompts_per_file < 1:
            raise InvalidArgumentError(f"prompts_per_file must be >= 1, got {self.prompts_per_file}")


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX-BF16), read at run time:
    without them bf16 matmuls are emulated and slower than fp32 (the machine changes between
    sessions, so this is never assumed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


def sample_mode_chosen(prompt_id: str, fraction: float, seed: int) -> bool:
    """Whether a prompt is also answered at temperature 1: a hash of (seed, id), so the choice of a
    prompt never depends on which other prompts a run sees."""
    digest = hashlib.sha256(f"{seed}|{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def job_seed(seed: int, prompt_id: str, mode: str) -> int:
    """The sampling seed of one job (its T=1 draws do not depend on the batch it lands in)."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{prompt_id}|{mode}".encode()).digest()[:8], "big") >> 1


def collect_prompts(sources: Sequence[Path], cfg: DataConfig) -> list[dict]:
    """A fixed-seed sample of each training file, interleaved across files."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files.extend(sorted(source.glob("*.jsonl")))
        elif source.is_file():
            files.append(source)
        else:
            raise NotFoundError(f"no prompt file or folder '{source}'")
    if not files:
        raise NotFoundError(f"no *.jsonl files in {[str(s) for s in sources]}")
    rng = random.Random(cfg.seed)
    per_file = []
    for path in files:
        prompts = read_jsonl_prompts(path)
        rng.shuffle(prompts)
        per_file.append(prompts[: cfg.prompts_per_file] if cfg.prompts_per_file else prompts)
    return interleave(per_file)


@torch.inference_mode()
def generate_batch(
    target: TargetModel,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    stop_ids: set[int],
    temperature: float,
    generator: torch.Generator,
) -> list[tuple[list[int], str]]:
    """Decode a left-padded batch; returns (response ids, finish reason) per prompt."""
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    capacity = width + max_new_tokens
    tokens = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    key_valid = torch.zeros(batch, capacity, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        pad = width - len(prompt)
        tokens[row, pad:] = torch.tensor(prompt)
        positions[row, pad:] = torch.arange(len(prompt))
        key_valid[row, pad:width] = True
    lengths = torch.tensor([len(p) for p in prompts])
    cache = target.new_cache(capacity, batch_size=batch)
    logits = target(tokens, cache, positions, num_logits=1, key_valid=key_valid).logits[:, -1]
    responses: list[list[int]] = [[] for _ in prompts]
    finish = [""] * batch
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = acceptance.probs_from_logits(logits, temperature)
            next_tokens = acceptance.sample_categorical(probs, acceptance.draw_uniforms(generator, batch).float())
        else:
            next_tokens = logits.argmax(dim=-1)
        for row in range(batch):
            if finish[row]:
                continue
            token = int(next_tokens[row])
            responses[row].append(token)
            if token in stop_ids:
                finish[row] = "stop"
            elif len(responses[row]) >= max_new_tokens:
                finish[row] = "length"
        if all(finish) or step == max_new_tokens - 1:
            break
        slot = width + step
        key_valid[:, slot] = True
        logits = target(next_tokens[:, None], cache, (lengths + step)[:, None], key_valid=key_valid).logits[:, -1]
    return [(r, f or "length") for r, f in zip(responses, finish)]


@dataclass(frozen=True)
class Job:
    """One (prompt, mode) pair to answer; mode "greedy" or "sample" (temperature 1)."""

    id: str
    dataset: str
    mode: str
    prompt_ids: tuple[int, ...]
    seed: int = 0


@dataclass
class _Row:
    job: Job
    response: list[int]
    position: int  # position of the next token this row feeds
    generator: torch.Generator | None  # sample rows only


@dataclass
class BatchStats:
    """forwards: decode forwards run; row_steps: rows x forwards; live_row_steps: of those, rows that
    were decoding (the rest idled until a refill); refills: cache rebuilds; prefill_tokens:
    prompt tokens prefilled (padding included)."""

    forwards: int = 0
    row_steps: int = 0
    live_row_steps: int = 0
    refills: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0

    @property
    def row_utilization(self) -> float:
        return self.live_row_steps / self.row_steps if self.row_steps else 0.0


class RefillingBatch:
    """Decode a stream of jobs through one batch of rows: a finished row makes room for the next job.

    Layout: all rows share the cache's write slot (each forward adds one token per row at slot
    `cache.length`), and key_valid [R, capacity] marks the slots each row attends to. A refill
    rebuilds the cache: the rows still decoding keep their entries (without the leading slots no
    live row uses), and the new jobs' prompts, prefilled together in a separate left-padded pass,
    are right-aligned to end at the same slot. A row's positions (so its rotary phases) are its
    own, independent of its slots, and it attends exactly to its own prompt and response, so it
    decodes what it would decode alone, up to floating-point differences between batch shapes
    (the tests compare greedy rows with batch-1 decoding).

    refill_min: the free rows that trigger a refill (idle rows cost compute until then; each
    refill costs a cache copy and a prefill). When the queue is empty, the same rebuild drops
    finished rows so the tail of a run does not decode idle rows.
    """

    def __init__(self, target: TargetModel, stop_ids: Sequence[int], max_new_tokens: int, batch_size: int,
                 refill_min: int) -> None:
        if batch_size < 1 or refill_min < 1 or max_new_tokens < 1:
            raise InvalidArgumentError("batch_size, refill_min and max_new_tokens must be >= 1")
        self.target = target
        self.stop_ids = set(stop_ids)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.refill_min = min(refill_min, batch_size)
        self.rows: list[_Row | None] = []
        self.cache: KVCache = target.new_cache(1, batch_size=1)
        self.key_valid = torch.zeros(0, 1, dtype=torch.bool)
        self.next_tokens = torch.zeros(0, dtype=torch.long)
        self.stats = BatchStats()

    @torch.inference_mode()
    def run(self, jobs, on_done: Callable[[Job, list[int], str], None]) -> BatchStats:
        """Answer every job of the iterable `jobs`; on_done(job, response ids, finish reason) is
        called as each one finishes (in finishing order)."""
        self._on_done = on_done
        queue = iter(jobs)
        exhausted = False
        while True:
            alive = sum(1 for row in self.rows if row is not None)
            free = self.batch_size - alive
            if not exhausted and (free >= self.refill_min or alive == 0):
                new_jobs = []
                for job in queue:
                    new_jobs.append(job)
                    if len(new_jobs) == free:
                        break
                else:
                    exhausted = True
                self._rebuild(new_jobs)
            elif exhausted and alive and len(self.rows) - alive >= self.refill_min:
                self._rebuild([])
            if not any(row is not None for row in self.rows):
                if exhausted:
                    return self.stats
                continue
            self._step()

    def _step(self) -> None:
        slot = self.cache.length
        alive = torch.tensor([row is not None for row in self.rows])
        self.key_valid[:, slot] = alive
        positions = torch.tensor([row.position if row is not None else 0 for row in self.rows])[:, None]
        logits = self.target(self.next_tokens[:, None], self.cache, positions, num_logits=1, key_valid=self.key_valid).logits[:, -1]
        self.stats.forwards += 1
        self.stats.row_steps += len(self.rows)
        self.stats.live_row_steps += int(alive.sum())
        for row in self.rows:
            if row is not None:
                row.position += 1
        self._choose(logits, list(range(len(self.rows))))

    def _choose(self, logits: torch.Tensor, indices: list[int]) -> None:
        """Pick each live row's next token from its logits row (logits[k] belongs to rows[indices[k]])."""
        picked = logits.float().argmax(dim=-1)
        sampled = [k for k, i in enumerate(indices) if self.rows[i] is not None and self.rows[i].generator is not None]
        if sampled:
            probs = acceptance.probs_from_logits(logits[sampled], 1.0)
            uniforms = torch.cat([acceptance.draw_uniforms(self.rows[indices[k]].generator, 1) for k in sampled])
            picked[sampled] = acceptance.sample_categorical(probs, uniforms.float())
        for k, i in enumerate(indices):
            row = self.rows[i]
            if row is None:
                continue
            token = int(picked[k])
            self.next_tokens[i] = token
            row.response.append(token)
            self.stats.generated_tokens += 1
            reason = "stop" if token in self.stop_ids else "length" if len(row.response) >= self.max_new_tokens else ""
            if reason:
                self.rows[i] = None
                self._on_done(row.job, row.response, reason)

    def _rebuild(self, new_jobs: list[Job]) -> None:
        """A new cache holding the live rows (compacted) followed by `new_jobs`, prefilled."""
        live = [i for i, row in enumerate(self.rows) if row is not None]
        old_end = self.cache.length
        first = 0
        if live:
            used = self.key_valid[live, :old_end].any(dim=0).nonzero()
            first = int(used[0]) if len(used) else old_end
        span = old_end - first
        width = max((len(job.prompt_ids) for job in new_jobs), default=0)
        if new_jobs:
            prefill, prefill_valid, logits = self._prefill(new_jobs, width)
        end = max(span, width)
        rows = len(live) + len(new_jobs)
        cache = self.target.new_cache(end + self.max_new_tokens, batch_size=rows)
        # Masked slots are still multiplied by a zero weight, so they must hold finite numbers
        # (the cache is allocated uninitialised: a NaN there would poison the row).
        cache.keys[:, :, :, :end].zero_()
        cache.values[:, :, :, :end].zero_()
        key_valid = torch.zeros(rows, cache.capacity, dtype=torch.bool)
        if live:
            index = torch.tensor(live)
            cache.keys[:, : len(live), :, end - span : end] = self.cache.keys[:, index, :, first:old_end]
            cache.values[:, : len(live), :, end - span : end] = self.cache.values[:, index, :, first:old_end]
            key_valid[: len(live), end - span : end] = self.key_valid[index, first:old_end]
        if new_jobs:
            cache.keys[:, len(live) :, :, end - width : end] = prefill.keys
            cache.values[:, len(live) :, :, end - width : end] = prefill.values
            key_valid[len(live) :, end - width : end] = prefill_valid
        cache.length = end
        next_tokens = torch.zeros(rows, dtype=torch.long)
        if live:
            next_tokens[: len(live)] = self.next_tokens[torch.tensor(live)]
        new_rows = [_Row(job, [], len(job.prompt_ids),
                         torch.Generator().manual_seed(job.seed) if job.mode == "sample" else None) for job in new_jobs]
        self.rows = [self.rows[i] for i in live] + new_rows
        self.cache, self.key_valid, self.next_tokens = cache, key_valid, next_tokens
        self.stats.refills += 1
        if new_jobs:
            self._choose(logits, list(range(len(live), rows)))

    def _prefill(self, jobs: list[Job], width: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """Left-padded prefill of the new jobs: (their cache, its key_valid [n, width], last logits [n, V])."""
        count = len(jobs)
        tokens = torch.zeros(count, width, dtype=torch.long)
        positions = torch.zeros(count, width, dtype=torch.long)
        valid = torch.zeros(count, width, dtype=torch.bool)
        for row, job in enumerate(jobs):
            pad = width - len(job.prompt_ids)
            tokens[row, pad:] = torch.tensor(job.prompt_ids)
            positions[row, pad:] = torch.arange(len(job.prompt_ids))
            valid[row, pad:] = True
        cache = self.target.new_cache(width, batch_size=count)
        logits = self.target(tokens, cache, positions, num_logits=1, key_valid=valid).logits[:, -1]
        self.stats.prefill_tokens += count * width
        return cache, valid, logits


def plan_jobs(prompts: Sequence[dict], tokenizer: ChatTokenizer, cfg: DataConfig, done: set[tuple[str, str]],
              skipped: list[str] | None = None):
    """The jobs not in `done`, in prompt order (greedy, then sample where chosen); prompts are
    tokenized lazily, and ids of prompts over max_prompt_tokens are appended to `skipped`."""
    for prompt in prompts:
        modes = ["greedy"] + (["sample"] if sample_mode_chosen(prompt["id"], cfg.sample_fraction, cfg.seed) else [])
        modes = [m for m in modes if (prompt["id"], m) not in done]
        if not modes:
            continue
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt["text"]}])
        if len(ids) > cfg.max_prompt_tokens:
            if skipped is not None:
                skipped.append(prompt["id"])
            continue
        for mode in modes:
            yield Job(prompt["id"], prompt["dataset"], mode, tuple(ids), job_seed(cfg.seed, prompt["id"], mode))


def generate_dataset(
    target: TargetModel,
    tokenizer: ChatTokenizer,
    sources: Sequence[Path],
    out_dir: Path,
    cfg: DataConfig,
    *,
    target_info: dict,
    generator_info: dict | None = None,
    progress: bool = True,
    max_jobs: int | None = None,
) -> dict:
    """Answer the training prompts of `sources` into the data folder `out_dir` (resumable).

    target_info: {"name", "weights_digest", "vocab_size"} of the target (the folder refuses
    another target's responses). generator_info: settings recorded with every shard (precision,
    threads, CPU, ...). max_jobs: stop after that many jobs (benchmarks; None = all)."""
    cfg.validate()
    store = ResponseStore(out_dir)
    store.bind_target(target_info)
    prompts = collect_prompts(sources, cfg)
    done = store.keys()
    wanted = sum(1 + sample_mode_chosen(p["id"], cfg.sample_fraction, cfg.seed) for p in prompts)
    have = sum(1 for p in prompts for m in ("greedy", "sample") if (p["id"], m) in done)
    todo_estimate = max(0, wanted - have) if max_jobs is None else min(max_jobs, max(0, wanted - have))
    log.info("%d prompts, about %d jobs to do, %d records already in '%s'", len(prompts), todo_estimate, len(done), out_dir)
    settings = {"code": "refilling-batch/1", **{k: v for k, v in asdict(cfg).items() if k != "prompts_per_file"},
                **(generator_info or {})}
    skipped: list[str] = []
    jobs = plan_jobs(prompts, tokenizer, cfg, done, skipped)
    if max_jobs is not None:
        jobs = (job for _, job in zip(range(max_jobs), jobs))
    batch = RefillingBatch(target, tokenizer.stop_token_ids, cfg.max_new_tokens, cfg.batch_size, cfg.refill_min)
    pending: list[ResponseRecord] = []
    written = {"records": 0, "response_tokens": 0, "shards": 0}
    bar = tqdm(total=todo_estimate, desc="responses", unit="resp", disable=not progress)
    started = time.perf_counter()

    def flush() -> None:
        entry = store.write_shard(pending, settings)
        pending.clear()
        if entry is not None:
            written["records"] += entry["records"]
            written["response_tokens"] += entry["response_tokens"]
            written["shards"] += 1

    def on_done(job: Job, response: list[int], reason: str) -> None:
        pending.append(ResponseRecord(job.id, job.dataset, job.mode, list(job.prompt_ids), response, reason))
        bar.update(1)
        bar.set_postfix(tokens_per_s=f"{batch.stats.generated_tokens / (time.perf_counter() - started):.0f}",
                        rows_busy=f"{batch.stats.row_utilization:.0%}")
        if len(pending) >= cfg.shard_records:
            flush()

    try:
        batch.run(jobs, on_done)
    finally:  # an interrupted run keeps every finished response
        flush()
        bar.close()
    elapsed = time.perf_counter() - started
    stats = batch.stats
    return {"written": written, "skipped_long_prompts": len(skipped), "seconds": elapsed,
            "generated_tokens": stats.generated_tokens,
            "tokens_per_s": stats.generated_tokens / elapsed if elapsed else 0.0,
            "row_utilization": stats.row_utilization, "refills": stats.refills, "forwards": stats.forwards,
            "store": store.summary(), "settings": settings}


def import_jsonl(path: Path, out_dir: Path, target_info: dict, generator_info: dict) -> dict | None:
    """Move the records of a JSONL file of the earlier format into a data folder (one shard)."""
    store = ResponseStore(out_dir)
    store.bind_target(target_info)
    return store.write_shard(list(records_from_jsonl(path)), generator_info)


def read_dataset(path: Path, limit_tokens: int | None = None) -> list[dict]:
    """Records of a data folder (`ResponseStore`) or of a JSONL file of the earlier format, as
    dicts {"id", "dataset", "mode", "prompt_ids", "response_ids", "finish_reason"}.
    limit_tokens: only the first records holding that many response tokens (folders only)."""
    path = Path(path)
    if path.is_dir():
        return [record.as_dict() for record in ResponseStore.open_existing(path).records(limit_tokens)]
    if limit_tokens is not None:
        raise InvalidArgumentError("a token limit needs a data folder, not a JSONL file")
    if not path.is_file():
        raise NotFoundError(f"no drafter dataset at '{path}' (make one with `blockpilot drafter data`)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # cut by an interrupted `drafter data` run; it is redone on resume
                log.warning("'%s': ignoring an incomplete last line", path)
                continue
            raise InvalidArgumentError(f"'{path}' line {number} is not valid JSON") from None
    return records
