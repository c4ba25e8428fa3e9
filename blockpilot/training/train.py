"""DFlash drafter training, scaled to a CPU (research/papers.md §3).

Recipe:
- random anchors inside each response; a block is [anchor, mask x (B - 1)] at positions
  anchor .. anchor + B - 1, labelled with the sequence's next B - 1 tokens;
- the context of a block = target features of the tokens strictly before its anchor, exactly what
  the decoding loop has fed the drafter when that anchor opens a step;
- many blocks per sequence in one forward: block tokens attend to their own block (bidirectional)
  and to the context before their anchor, never to other blocks;
- loss: cross-entropy at block positions k = 1..B-1 weighted exp(-(k-1)/gamma), normalised by the
  weights; the target's embedding and lm_head are frozen and shared; optionally distilled from the
  target's own top-k logits at each position (see `distill_targets`);
- AdamW, linear warm-up then cosine decay, gradient clipping; resumable checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Collection, Sequence

import torch
from torch.nn import functional as F
from tqdm import tqdm

from blockpilot.errors import InvalidArgumentError
from collections import Counter

from blockpilot.models.drafter import DFlashDrafter, DraftHead
from blockpilot.models.target import TargetModel

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """num_draft_layers / target_layer_ids / block_size: the drafter's shape (see DrafterConfig).
    gamma: loss decay over block positions (DFlash: 7 for B=16, 5 for B=10, 4 for B=8).
    anchors_per_sequence: blocks packed into one forward per sequence.
    sequences_per_step: sequences whose losses make one optimizer step.
    holdout_fraction: share of prompt ids kept out of training for evaluation.
    draft_vocab_size: the K most frequent response tokens form the draft vocabulary (None = all).
    accept_until_fail: weight in [0, 1] of the accept-until-fail loss mixed with the decayed one
        (0 = off, 1 = truncated only); it applies from step accept_until_fail_after on (a warm-up:
        an untrained drafter fails at position 1 and the truncated loss would see little else).
    distill: 0 = labels are the recorded response tokens (v0.2); W in (0, 1] = labels are the
        target's own argmax at each position (a T = 1 response's sampled token is noise for greedy
        verification) and the loss is (1 - W) * CE(argmax) + W * CE(target's top-k distribution).
    teacher_top_k: logits of the target kept per position for distillation (k)."""

    num_draft_layers: int = 1
    target_layer_ids: tuple[int, ...] | None = None
    block_size: int = 8
    mask_token_id: int = 0
    gamma: float = 4.0
    anchors_per_sequence: int = 32
    sequences_per_step: int = 4
    steps: int = 1000
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    holdout_fraction: float = 0.05
    draft_vocab_size: int | None = 8192
    eval_every: int = 200
    eval_sequences: int = 24
    save_every: int = 100
    accept_until_fail: float = 0.0
    accept_until_fail_after: int = 0
    distill: float = 0.0
    teacher_top_k: int = 32
    seed: int = 0

    def validate(self) -> None:
        if self.block_size < 2:
            raise InvalidArgumentError(f"block_size must be >= 2, got {self.block_size}")
        if self.gamma <= 0:
            raise InvalidArgumentError(f"gamma must be > 0, got {self.gamma}")
        if self.steps < 1 or self.anchors_per_sequence < 1 or self.sequences_per_step < 1:
            raise InvalidArgumentError("steps, anchors_per_sequence and sequences_per_step must be >= 1")
        if not 0 <= self.accept_until_fail <= 1:
            raise InvalidArgumentError(f"accept_until_fail must be in [0, 1], got {self.accept_until_fail}")
        if not 0 <= self.distill <= 1:
            raise InvalidArgumentError(f"distill must be in [0, 1], got {self.distill}")
        if self.teacher_top_k < 1:
            raise InvalidArgumentError(f"teacher_top_k must be >= 1, got {self.teacher_top_k}")


@dataclass
class PackedBlocks:
    """Blocks of one sequence packed for one drafter forward (A anchors, B block size, S context).

    tokens [A*B]: [x_a, mask, ..., mask] per anchor; positions [A*B]: a .. a+B-1;
    labels [A*B]: x_{a+k} at block position k >= 1 (IGNORE at k = 0 and past the sequence end);
    weights [A*B]: exp(-(k-1)/gamma) where labelled, else 0;
    mask [A*B, S + A*B] bool: block token of anchor a sees context j < a and its own block."""

    anchors: list[int]
    tokens: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor


def pack_blocks(token_ids: Sequence[int], anchors: Sequence[int], block_size: int, mask_token_id: int, gamma: float) -> PackedBlocks:
    seq_len = len(token_ids)
    count = len(anchors)
    ids = torch.tensor(token_ids, dtype=torch.long)
    offsets = torch.arange(block_size)
    anchor_t = torch.tensor(list(anchors), dtype=torch.long)
    positions = (anchor_t[:, None] + offsets[None, :]).reshape(-1)  # [A*B]
    tokens = torch.full((count, block_size), mask_token_id, dtype=torch.long)
    tokens[:, 0] = ids[anchor_t]
    in_range = positions < seq_len
    labels = torch.where(in_range, ids[positions.clamp(max=seq_len - 1)], torch.full_like(positions, IGNORE)).view(count, block_size)
    labels[:, 0] = IGNORE
    decay = torch.exp(-(offsets.float() - 1) / gamma)
    weights = torch.where(labels != IGNORE, decay[None, :].expand(count, block_size), torch.zeros(()))
    context_visible = torch.arange(seq_len)[None, :] < anchor_t.repeat_interleave(block_size)[:, None]  # [A*B, S]
    block_of = torch.arange(count).repeat_interleave(block_size)
    same_block = block_of[:, None] == block_of[None, :]  # [A*B, A*B]
    return PackedBlocks(list(anchors), tokens.reshape(-1), positions, labels.reshape(-1), weights.reshape(-1),
                        torch.cat([context_visible, same_block], dim=1))


def sample_anchors(prompt_len: int, seq_len: int, count: int, rng: random.Random) -> list[int]:
    """Random anchor positions inside the response: the anchor is a committed token (the first
    response token at the earliest) that has at least one following token to predict."""
    low, high = prompt_len, seq_len - 2
    if high < low:
        return []
    population = range(low, high + 1)
    return sorted(rng.sample(population, min(count, len(population))))


def accept_until_fail_mask(hits: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Block positions the greedy loop would reach: hits, labelled [A, B] bool (position k of
    anchor a: the drafter's argmax is right / there is a label) -> keep [A, B] bool.

    Position k >= 1 is kept when every position 1..k-1 of its block was right: the loss then
    covers the accepted prefix and the first wrong position (the one that ends the step), and
    nothing after it, which verification would never accept anyway (DFlash v2, GRIFFIN)."""
    reached = torch.ones_like(hits)
    reached[:, 0] = False
    if hits.shape[1] > 2:
        reached[:, 2:] = hits[:, 1:-1].int().cumprod(dim=1).bool()
    return reached & labelled


@dataclass(frozen=True)
class Teacher:
    """The target's top-k logits at every position of a sequence (S positions, k kept):
    ids [S, k] long, sorted by logit (ids[:, 0] is the argmax); logits [S, k] float32.
    Row j is the target's distribution for the token at position j + 1."""

    ids: torch.Tensor
    logits: torch.Tensor


def distill_targets(ids: torch.Tensor, logits: torch.Tensor, index_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-k distribution restricted to the draft vocabulary, renormalised.

    ids, logits [N, k]: the teacher's top-k token ids and logits; index_of [V]: target id -> draft
    index (-1 outside). Returns draft_index [N, k] (0 where outside: its probability is 0) and
    probs [N, k] = softmax over the ids inside the draft vocabulary (a row with none is all 0)."""
    draft_index = index_of[ids]
    inside = draft_index >= 0
    probs = torch.softmax(logits.float().masked_fill(~inside, float("-inf")), dim=-1).nan_to_num(0.0)
    return draft_index.clamp(min=0), probs


def drafter_loss(drafter: DFlashDrafter, head: DraftHead, embed: torch.nn.Embedding,
                 features: torch.Tensor, packed: PackedBlocks, accept_until_fail: float = 0.0,
                 teacher: Teacher | None = None, distill: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Weighted CE over the packed blocks of one sequence. features [S, F] (target, frozen).
    Labels outside the draft vocabulary cannot be proposed and carry no loss (they still end an
    accepted prefix). accept_until_fail: weight of the truncated loss (see accept_until_fail_mask)
    mixed with the decayed loss: (1 - w) * decayed + w * truncated.
    teacher: labels become the target's argmax (rows positions - 1), and with distill = W the
    per-token loss is (1 - W) * CE(argmax) + W * soft CE against `distill_targets`."""
    seq_len = features.shape[0]
    hidden = drafter(
        embed(packed.tokens)[None],
        features[None],
        None,
        packed.positions[None],
        torch.arange(seq_len)[None],
        mask=packed.mask[None, None],
    )[0]
    labels = packed.labels
    rows = (packed.positions - 1).clamp(max=seq_len - 1)  # the target's row for the token at each position
    if teacher is not None:
        labels = torch.where(labels != IGNORE, teacher.ids[rows, 0], labels)
    draft_labels = head.index_of[labels.clamp(min=0)]
    predicted = (packed.weights > 0) & (draft_labels >= 0)
    logits = head.logits(hidden[predicted])
    labels = draft_labels[predicted]
    weights = packed.weights[predicted]
    losses = F.cross_entropy(logits, labels, reduction="none")
    if teacher is not None and distill > 0:
        index, probs = distill_targets(teacher.ids[rows[predicted]], teacher.logits[rows[predicted]], head.index_of)
        soft = -(probs * F.log_softmax(logits, dim=-1).gather(-1, index)).sum(-1)
        losses = (1 - distill) * losses + distill * soft
    loss = (losses * weights).sum() / weights.sum()
    with torch.no_grad():
        hits = logits.argmax(-1) == labels
    if accept_until_fail > 0:
        grid = torch.zeros_like(predicted)
        grid[predicted] = hits
        block = drafter.block_size
        keep = accept_until_fail_mask(grid.view(-1, block), (packed.weights > 0).view(-1, block)).view(-1)[predicted]
        kept = weights * keep
        truncated = (losses * kept).sum() / kept.sum().clamp(min=1e-12)
        loss = (1 - accept_until_fail) * loss + accept_until_fail * truncated
    with torch.no_grad():
        first = (packed.positions[predicted] - torch.tensor(packed.anchors).repeat_interleave(drafter.block_size)[predicted]) == 1
    return loss, {"predicted": int(predicted.sum()), "first_hits": int(hits[first].sum()), "first_total": int(first.sum()),
                  "hits": int(hits.sum())}


class FeatureCache:
    """Target features per training sequence, computed once (the target is frozen).

    directory: optional folder where features persist across runs (float16, one file per
    sequence, named by a digest of its token ids), so a restarted or second run skips the target
    forward, which dominates the first pass over the data. store_layer_ids: a superset of
    layer_ids to compute and store, so runs that compare target-layer choices share one store.
    float16 storage rounds features by ~1e-3 relative; drafters see float32 at inference.
    With a directory, features are read from disk at each use (the data outgrows memory: 2M
    response tokens with their prompts are ~12 GB in float16); without one they stay in memory.
    compute_target: the model that computes them (default `target`); a bfloat16 copy is ~2.5x
    faster on CPUs with native BF16 and rounds features by ~4e-3 relative, so its store is kept
    apart ("-bf16").
    teacher_top_k: also keep the target's top-k logits at every position (a `Teacher`, for
    distillation), from the same forward pass; stored beside the features as
    `<digest>.top<k>.pt` (int32 ids, float16 logits: ~4 bytes x 2k per token), so a store made
    without them is completed, not recomputed from scratch."""

    def __init__(self, target: TargetModel, layer_ids: Sequence[int], directory: Path | None = None,
                 store_layer_ids: Sequence[int] | None = None, compute_target: TargetModel | None = None,
                 teacher_top_k: int = 0) -> None:
        self.target = compute_target if compute_target is not None else target
        self.layer_ids = tuple(layer_ids)
        self.store_layer_ids = tuple(store_layer_ids) if store_layer_ids else self.layer_ids
        self.teacher_top_k = teacher_top_k
        missing = [i for i in self.layer_ids if i not in self.store_layer_ids]
        if missing:
            raise InvalidArgumentError(f"feature store layers {list(self.store_layer_ids)} lack drafter layers {missing}")
        hidden = target.config.hidden_size
        self._columns = torch.cat([torch.arange(hidden) + self.store_layer_ids.index(i) * hidden for i in self.layer_ids])
        self._identity = self.store_layer_ids == self.layer_ids
        precision = "-bf16" if self.target.dtype == torch.bfloat16 else ""
        self.directory = Path(directory) / ("layers-" + "-".join(map(str, self.store_layer_ids)) + precision) if directory else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._store: dict[int, tuple[torch.Tensor, Teacher | None]] = {}

    @staticmethod
    def _digest(token_ids: Sequence[int]) -> str:
        return hashlib.sha1(json.dumps(list(token_ids)).encode()).hexdigest()[:20]

    def _paths(self, token_ids: Sequence[int]) -> tuple[Path, Path] | None:
        """(features file, teacher file) of a sequence in the store; None without a directory."""
        if self.directory is None:
            return None
        digest = self._digest(token_ids)
        return self.directory / f"{digest}.pt", self.directory / f"{digest}.top{self.teacher_top_k}.pt"

    @torch.no_grad()  # not inference_mode: the features feed an autograd graph (the drafter's)
    def _compute(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, Teacher | None]:
        """features [S, L*H] and the teacher (None unless teacher_top_k), float32."""
        tokens = torch.tensor([list(token_ids)])
        out = self.target(tokens, self.target.new_cache(len(token_ids)), num_logits=None if self.teacher_top_k else 0,
                          hidden_layer_ids=self.store_layer_ids)
        teacher = None
        if self.teacher_top_k:
            logits, ids = out.logits[0].float().topk(self.teacher_top_k, dim=-1)
            teacher = Teacher(ids, logits)
        return out.hidden[0].float(), teacher

    @staticmethod
    def _save(value: dict | torch.Tensor, path: Path) -> None:
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # runs sharing a store never write one file
        torch.save(value, partial)
        partial.replace(path)  # atomic: an interrupted run never leaves a cut file

    def fetch(self, index: int, token_ids: Sequence[int]) -> tuple[torch.Tensor, Teacher | None]:
        """features [S, F] float32 of the drafter's layers and the teacher (None unless teacher_top_k)."""
        cached = self._store.get(index)
        if cached is not None:
            return cached
        paths = self._paths(token_ids)
        features = teacher = None
        if paths is not None:
            if paths[0].exists():
                features = torch.load(paths[0], weights_only=True).float()
            if self.teacher_top_k and paths[1].exists():
                stored = torch.load(paths[1], weights_only=True)
                teacher = Teacher(stored["ids"].long(), stored["logits"].float())
        if features is None or (self.teacher_top_k and teacher is None):
            computed, computed_teacher = self._compute(token_ids)
            # With a store, use what every later read of the files gives (float16-rounded).
            if features is None:
                features = computed
                if paths is not None:
                    self._save(computed.half(), paths[0])
                    features = computed.half().float()
            if self.teacher_top_k and teacher is None:
                teacher = computed_teacher
                if paths is not None:
                    self._save({"ids": teacher.ids.int(), "logits": teacher.logits.half()}, paths[1])
                    teacher = Teacher(teacher.ids, teacher.logits.half().float())
        result = (features if self._identity else features[:, self._columns].contiguous(), teacher)
        if self.directory is None:
            self._store[index] = result
        return result

    def get(self, index: int, token_ids: Sequence[int]) -> torch.Tensor:
        """features [S, F] float32 of the drafter's layers."""
        return self.fetch(index, token_ids)[0]

    def precompute(self, sequences: Sequence[Sequence[int]], offset: int = 0, progress: bool = True) -> None:
        """Compute what the store lacks for sequences[i] (index offset + i), with a progress bar."""
        for i, token_ids in enumerate(tqdm(sequences, desc="target features", disable=not progress)):
            paths = self._paths(token_ids)
            if paths is not None and paths[0].exists() and (not self.teacher_top_k or paths[1].exists()):
                continue
            self.fetch(offset + i, token_ids)


@torch.no_grad()
def replay_tau(drafter: DFlashDrafter, target: TargetModel, head: DraftHead, features: torch.Tensor,
               token_ids: Sequence[int], prompt_len: int, block_size: int, max_steps: int = 64) -> list[int]:
    """Acceptance lengths of the greedy loop replayed over a recorded greedy response with
    teacher-forced features: the response is the target's own greedy continuation, so a draft
    token is accepted iff it equals the recorded one. Much cheaper than decoding."""
    seq_len = len(token_ids)
    ids = torch.tensor(token_ids)
    anchor = prompt_len
    lengths = []
    while anchor < seq_len - 1 and len(lengths) < max_steps:
        steps = min(block_size, seq_len - anchor)
        block = torch.full((1, steps), drafter.config.mask_token_id, dtype=torch.long)
        block[0, 0] = ids[anchor]
        hidden = drafter(target.embed(block), features[None, :anchor], None,
                         torch.arange(anchor, anchor + steps)[None], torch.arange(anchor)[None])
        draft = head.token_ids(head.logits(hidden[0, 1:]).argmax(-1))
        truth = ids[anchor + 1 : anchor + steps]
        accepted = int((draft == truth).int().cumprod(0).sum())
        # The bonus token exists only while the recorded sequence goes on.
        lengths.append(min(accepted + 1, seq_len - 1 - anchor))
        anchor += accepted + 1
    return lengths


def build_draft_vocab(records: list[dict], size: int | None, vocab_size: int) -> torch.Tensor | None:
    """The `size` most frequent tokens of the training responses (ids sorted ascending)."""
    if not size or size >= vocab_size:
        return None
    counts = Counter(token for record in records for token in record["response_ids"])
    chosen = [token for token, _ in counts.most_common(size)]
    # Pad with the lowest unused ids so the size is exactly `size` (small datasets).
    if len(chosen) < size:
        present = set(chosen)
        chosen += [t for t in range(vocab_size) if t not in present][: size - len(chosen)]
    log.info("draft vocabulary: %d tokens covering %.1f%% of training response tokens", size,
             100 * sum(counts[t] for t in chosen) / max(1, sum(counts.values())))
    return torch.tensor(sorted(chosen), dtype=torch.long)


def lr_at(step: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(cfg.steps * cfg.warmup_ratio))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def split_records(records: list[dict], holdout_fraction: float, seed: int,
                  holdout_ids: Collection[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Split by prompt id (both modes of a prompt fall on the same side).

    holdout_ids: hold out exactly these ids instead of a seeded share. A run that continues from
    another drafter (`--init-from`) on a grown data file passes that run's held-out ids, so the
    held-out figures never include prompts the starting drafter was trained on."""
    if holdout_ids is not None:
        held = set(holdout_ids)
    else:
        ids = sorted({r["id"] for r in records})
        random.Random(seed).shuffle(ids)
        held = set(ids[: max(1, int(len(ids) * holdout_fraction))])
    train = [r for r in records if r["id"] not in held and r["response_ids"]]
    holdout = [r for r in records if r["id"] in held and r["response_ids"]]
    return train, holdout


def train_drafter(
    target: TargetModel,
    records: list[dict],
    out_dir: Path,
    cfg: TrainConfig,
    *,
    init_from: Path | None = None,
    progress: bool = True,
    feature_dir: Path | None = None,
    feature_layer_ids: Sequence[int] | None = None,
    holdout_ids: Collection[str] | None = None,
    feature_target: TargetModel | None = None,
    features_on_demand: bool = False,
) -> dict:
    """Train (or resume) a drafter; writes out_dir/drafter (DFlash format) and out_dir/state.pt.

    feature_dir / feature_layer_ids: a persistent feature store shared by runs (see FeatureCache);
    all features are computed before the first step so the step timing shows training alone,
    unless features_on_demand: then each sequence's features are computed (and stored) when a step
    first draws it, which costs less when the run sees only part of the data.
    feature_target: the model that computes them (e.g. a bfloat16 copy; default `target`)."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "state.pt"
    ids_path = out_dir / "holdout_ids.json"
    if holdout_ids is None and ids_path.exists():  # a resumed run keeps its own split
        holdout_ids = json.loads(ids_path.read_text())
    train, holdout = split_records(records, cfg.holdout_fraction, cfg.seed, holdout_ids)
    if not train:
        raise InvalidArgumentError("no training records with a response")
    ids_path.write_text(json.dumps(sorted({r["id"] for r in holdout})) + "\n")

    if state_path.exists():
        drafter = DFlashDrafter.from_pretrained(out_dir / "drafter")
        saved = torch.load(state_path, weights_only=False)
        state = TrainState(**saved["state"])
        log.info("resuming from step %d", state.step)
    else:
        saved = None
        state = TrainState()
        if init_from is not None:
            drafter = DFlashDrafter.from_pretrained(init_from)
        else:
            vocab = build_draft_vocab(train, cfg.draft_vocab_size, target.config.vocab_size)
            drafter = DFlashDrafter.random(target.config, seed=cfg.seed, draft_vocab=vocab, num_hidden_layers=cfg.num_draft_layers,
                                           block_size=cfg.block_size, target_layer_ids=cfg.target_layer_ids,
                                           mask_token_id=cfg.mask_token_id)
    drafter.train().requires_grad_(True)
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
    features = FeatureCache(target, drafter.target_layer_ids, feature_dir, feature_layer_ids, compute_target=feature_target,
                            teacher_top_k=cfg.teacher_top_k if cfg.distill > 0 else 0)
    if not features_on_demand:
        features.precompute([r["prompt_ids"] + r["response_ids"] for r in train], progress=progress)
    eval_greedy = [r for r in holdout if r["mode"] == "greedy"][: cfg.eval_sequences]
    features.precompute([r["prompt_ids"] + r["response_ids"] for r in eval_greedy], offset=len(train), progress=progress)
    head = DraftHead(target.lm_head.weight.detach(), drafter.draft_vocab)
    embed = target.embed_tokens

    def save() -> None:
        drafter.save_pretrained(out_dir / "drafter")
        torch.save({"state": asdict(state), "optimizer": optimizer.state_dict(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, state_path)

    order = list(range(len(train)))
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", disable=not progress)
    window: list[dict] = []
    started = time.perf_counter() - state.seconds
    while state.step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, cfg)
        optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "predicted": 0, "first_hits": 0, "first_total": 0, "hits": 0}
        step_started = time.perf_counter()
        for _ in range(cfg.sequences_per_step):
            index = rng.choice(order)
            record = train[index]
            token_ids = record["prompt_ids"] + record["response_ids"]
            anchors = sample_anchors(len(record["prompt_ids"]), len(token_ids), cfg.anchors_per_sequence, rng)
            if not anchors:
                continue
            packed = pack_blocks(token_ids, anchors, drafter.block_size, drafter.config.mask_token_id, cfg.gamma)
            truncate = cfg.accept_until_fail if state.step >= cfg.accept_until_fail_after else 0.0
            feats, teacher = features.fetch(index, token_ids)
            loss, stats = drafter_loss(drafter, head, embed, feats, packed, truncate, teacher=teacher, distill=cfg.distill)
            (loss / cfg.sequences_per_step).backward()
            totals["loss"] += loss.item() / cfg.sequences_per_step
            for key in ("predicted", "first_hits", "first_total", "hits"):
                totals[key] += stats[key]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        state.step += 1
        totals["tokens_per_s"] = totals["predicted"] / (time.perf_counter() - step_started)
        window.append(totals)
        window = window[-20:]
        bar.update(1)
        bar.set_postfix(loss=f"{sum(w['loss'] for w in window) / len(window):.3f}",
                        acc1=f"{sum(w['first_hits'] for w in window) / max(1, sum(w['first_total'] for w in window)):.2f}",
                        tok_s=f"{sum(w['tokens_per_s'] for w in window) / len(window):.0f}")
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            state.seconds = time.perf_counter() - started
            entry = {"step": state.step, "seconds": round(state.seconds, 1), "lr": lr_at(state.step - 1, cfg),
                     "train_loss": sum(w["loss"] for w in window) / len(window),
                     "train_first_acc": sum(w["first_hits"] for w in window) / max(1, sum(w["first_total"] for w in window)),
                     **evaluate_holdout(drafter, target, head, holdout, features, cfg, offset=len(train))}
            state.history.append(entry)
            log.info("eval %s", json.dumps(entry))
            drafter.train()
        if state.step % cfg.save_every == 0 or state.step == cfg.steps:
            state.seconds = time.perf_counter() - started
            drafter.eval()
            save()
            drafter.train()
    bar.close()
    drafter.eval()
    return {"steps": state.step, "seconds": state.seconds, "history": state.history,
            "train_records": len(train), "holdout_records": len(holdout)}


@torch.no_grad()
def evaluate_holdout(drafter: DFlashDrafter, target: TargetModel, head: DraftHead, holdout: list[dict],
                     features: FeatureCache, cfg: TrainConfig, offset: int) -> dict:
    """Held-out loss/first-position accuracy (random anchors) and replayed greedy τ."""
    drafter.eval()
    rng = random.Random(1234)
    greedy = [r for r in holdout if r["mode"] == "greedy"][: cfg.eval_sequences]
    losses, first_hits, first_total, taus = [], 0, 0, []
    for i, record in enumerate(greedy):
        token_ids = record["prompt_ids"] + record["response_ids"]
        feats = features.get(offset + i, token_ids)
        anchors = sample_anchors(len(record["prompt_ids"]), len(token_ids), cfg.anchors_per_sequence, rng)
        if not anchors:
            continue
        packed = pack_blocks(token_ids, anchors, drafter.block_size, drafter.config.mask_token_id, cfg.gamma)
        loss, stats = drafter_loss(drafter, head, target.embed_tokens, feats, packed)
        losses.append(loss.item())
        first_hits += stats["first_hits"]
        first_total += stats["first_total"]
        taus.extend(replay_tau(drafter, target, head, feats, token_ids, len(record["prompt_ids"]), drafter.block_size))
    return {"holdout_loss": sum(losses) / max(1, len(losses)), "holdout_first_acc": first_hits / max(1, first_total),
            "holdout_replay_tau": sum(taus) / max(1, len(taus))}
