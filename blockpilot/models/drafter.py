"""The DFlash block-diffusion drafter (published DFlash architecture and checkpoint format).

One forward pass drafts a whole block. Terms:
- context features: the target's hidden states at `target_layer_ids` (outputs of those decoder
  layers), concatenated per token: [B, C_new, len(target_layer_ids) * target_hidden].
- projected context: hidden_norm(fc(context features)): [B, C_new, hidden].
- block: [anchor, mask x (B - 1)], embedded with the *target's* embedding; the anchor is the last
  committed token, whose context features are not known yet.
- each draft layer: queries from the block only; keys/values = [projected context ; block] through
  the same k_proj/v_proj (+ per-head k_norm, RoPE at absolute positions); non-causal attention.
- draft logits: the *target's* lm_head over norm(block output) at block positions 1..B-1.

The projected context's keys/values are cached per layer in a KVCache. Every call appends the new
context entries and never stores the block's entries, so after each call the draft cache holds
exactly the committed context: "cropped to the committed length" with no copy.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from blockpilot.errors import InvalidArgumentError, ModelFormatError, NotFoundError
from blockpilot.models.config import RopeConfig, TargetConfig
from blockpilot.models.kv_cache import KVCache
from blockpilot.models.target import SkipInit, hf_tensor_index, read_hf_tensor
from blockpilot.models.tokenizer import check_template_kwargs
from torch.nn import functional as F

from blockpilot.models.layers import RMSNorm, Rotary, apply_rotary, attend


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """DFlash's choice: one draft layer -> the middle target layer; otherwise evenly spaced from
    layer 1 to layer n - 3 (36 target layers, 5 draft layers -> [1, 9, 17, 25, 33])."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [round(start + i * (end - start) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


@dataclass(frozen=True)
class DrafterConfig:
    """Architecture and drafting parameters of a DFlash drafter.

    hidden_size must equal the target's (the drafter uses the target's embedding and lm_head).
    target_hidden_size: width of each target layer's hidden state (= hidden_size for DFlash).
    block_size: the block size the drafter was trained at (the default at inference).
    num_target_layers: number of decoder layers of the target it was trained for.
    target_layer_ids: target layers whose outputs form the context features.
    mask_token_id: token whose (target) embedding fills the B - 1 masked block positions.
    draft_vocab_size: when set, the drafter only ever proposes tokens of its draft vocabulary (the
        `draft_vocab` tensor of the checkpoint: target token ids, the most frequent ones in its
        training responses); draft logits are computed over those rows of the target's lm_head
        only, which makes training and drafting several times cheaper. None = full vocabulary
        (published DFlash checkpoints).
    chat_template_kwargs: the chat-template arguments the drafter was trained with, e.g.
        {"enable_thinking": False} for a Qwen3 drafter trained on replies without thinking. The
        verifier renders chat prompts with them unless its config or the request names others (a
        prompt rendered otherwise is off the drafter's training distribution: fewer drafts accepted).
        config.json: the top-level object `chat_template_kwargs`, also read from
        `dflash_config.chat_template_kwargs` (the top-level keys win); {} = none named.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention_bias: bool = False
    draft_vocab_size: int | None = None
    # Not hashed (a dict); compared like every other field.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ModelFormatError(f"drafter block_size must be >= 2, got {self.block_size}")
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ModelFormatError(f"draft_vocab_size {self.draft_vocab_size} not within (0, {self.vocab_size}]")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ModelFormatError(f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad or not self.target_layer_ids:
            raise ModelFormatError(f"target_layer_ids {list(self.target_layer_ids)} not within [0, {self.num_target_layers})")

    @classmethod
    def for_target(
        cls,
        target: TargetConfig,
        *,
        num_hidden_layers: int = 1,
        block_size: int = 8,
        target_layer_ids: Sequence[int] | None = None,
        mask_token_id: int = 0,
        intermediate_size: int | None = None,
    ) -> "DrafterConfig":
        """A drafter shaped like the target's own layers (DFlash's convention)."""
        return cls(
            hidden_size=target.hidden_size,
            intermediate_size=intermediate_size or target.intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=target.num_attention_heads,
            num_key_value_heads=target.num_key_value_heads,
            head_dim=target.head_dim,
            vocab_size=target.vocab_size,
            block_size=block_size,
            num_target_layers=target.num_hidden_layers,
            target_layer_ids=tuple(
                target_layer_ids
                if target_layer_ids is not None
                else default_target_layer_ids(target.num_hidden_layers, num_hidden_layers)
            ),
            mask_token_id=mask_token_id,
            rms_norm_eps=target.rms_norm_eps,
            max_position_embeddings=target.max_position_embeddings,
            rope=target.rope,
        )

    def check_target(self, target: TargetConfig) -> None:
        """Refuse a drafter that was not made for this target (shapes would fail later, less clearly)."""
        problems = []
        if target.hidden_size != self.hidden_size:
            problems.append(f"hidden_size {self.hidden_size} != target's {target.hidden_size}")
        if target.vocab_size != self.vocab_size:
            problems.append(f"vocab_size {self.vocab_size} != target's {target.vocab_size}")
        if target.num_hidden_layers != self.num_target_layers:
            problems.append(f"num_target_layers {self.num_target_layers} != target's {target.num_hidden_layers} layers")
        if problems:
            raise ModelFormatError("drafter does not fit the target: " + "; ".join(problems))

    # ---- the published DFlash config.json -------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["DFlashDraftModel"],
            "model_type": "qwen3",
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": self.rope.to_hf(),
            "tie_word_embeddings": False,
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {
                "target_layer_ids": list(self.target_layer_ids),
                "mask_token_id": self.mask_token_id,
                **({"draft_vocab_size": self.draft_vocab_size} if self.draft_vocab_size else {}),
            },
            **({"chat_template_kwargs": dict(self.chat_template_kwargs)} if self.chat_template_kwargs else {}),
            "dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "DrafterConfig":
        arch = (raw.get("architectures") or ["DFlashDraftModel"])[0]
        if arch != "DFlashDraftModel":
            raise ModelFormatError(f"unsupported drafter architecture {arch!r} (supported: DFlashDraftModel)")
        if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or []):
            raise ModelFormatError("sliding-window drafters are not supported")
        dflash = raw.get("dflash_config") or {}
        try:
            heads = int(raw["num_attention_heads"])
            return cls(
                hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
                vocab_size=int(raw["vocab_size"]),
                block_size=int(dflash.get("block_size", raw.get("block_size", 16))),
                num_target_layers=int(raw["num_target_layers"]),
                target_layer_ids=tuple(int(i) for i in dflash["target_layer_ids"]),
                mask_token_id=int(dflash["mask_token_id"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
                rope=RopeConfig.from_hf(raw),
                attention_bias=bool(raw.get("attention_bias", False)),
                draft_vocab_size=int(dflash["draft_vocab_size"]) if dflash.get("draft_vocab_size") else None,
                chat_template_kwargs={**_template_kwargs(dflash, "dflash_config.chat_template_kwargs"),
                                      **_template_kwargs(raw, "chat_template_kwargs")},
            )
        except KeyError as missing:
            raise ModelFormatError(f"drafter config.json lacks the field {missing.args[0]!r}") from None


def _template_kwargs(section: dict[str, Any], key: str) -> dict[str, Any]:
    """The chat-template arguments a drafter config.json names under `section` (at `key`, its full name)."""
    value = section.get("chat_template_kwargs")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelFormatError(f"drafter config.json: {key} must be a JSON object of chat-template arguments, got {value!r}")
    try:
        check_template_kwargs(value)
    except InvalidArgumentError as err:
        raise ModelFormatError(f"drafter config.json: {key}: {err}") from None
    return dict(value)


class DraftAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def _kv(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, N, C] -> keys (k_norm + RoPE), values: [B, K, N, D]
        k, v = self._kv_unrotated(x)
        return apply_rotary(k, cos, sin), v

    def _kv_unrotated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, N, C] -> keys (k_norm, no RoPE yet), values: [B, K, N, D]
        batch, steps, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(batch, steps, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k.transpose(1, 2), v

    def _queries(self, block: torch.Tensor) -> torch.Tensor:
        # block [B, T, C] -> queries (q_norm, no RoPE yet) [B, H, T, D]
        batch, steps, _ = block.shape
        return self.q_norm(self.q_proj(block).view(batch, steps, self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, block, context, block_rope, context_rope, cache: KVCache, layer: int, start: int, mask) -> torch.Tensor:
        # block [B, T, C] (normed), context [B, N, C] (projected; the N new entries go to slot `start`)
        batch, steps, _ = block.shape
        ctx_k, ctx_v = self._kv(context, *context_rope)
        if cache is not None:
            ctx_k, ctx_v = cache.write(layer, start, ctx_k, ctx_v)
        block_k, block_v = self._kv(block, *block_rope)
        q = apply_rotary(self._queries(block), *block_rope)
        keys = torch.cat([ctx_k, block_k], dim=2)
        values = torch.cat([ctx_v, block_v], dim=2)
        return self.o_proj(attend(q, keys, values, mask, self.num_heads // self.num_kv_heads))

    def forward_packed(self, block, context, segments: Sequence["PackedSegment"], layer: int) -> torch.Tensor:
        """The same attention for many sessions at once: every projection runs once over all
        sessions' rows (one read of the weights), RoPE, the cache write and attention per session.

        block [1, R, C] (normed): the blocks of every segment, one after another; context [1, M, C]
        (projected): their new context rows likewise. Returns [1, R, C]."""
        ctx_k_all, ctx_v_all = self._kv_unrotated(context)  # [1, K, M, D]
        block_k_all, block_v_all = self._kv_unrotated(block)  # [1, K, R, D]
        q_all = self._queries(block)  # [1, H, R, D]
        outputs = []
        for seg in segments:
            ctx_k = apply_rotary(ctx_k_all[:, :, seg.context_rows], *seg.context_rope)
            ctx_k, ctx_v = seg.cache.write(layer, seg.start, ctx_k, ctx_v_all[:, :, seg.context_rows])
            keys = torch.cat([ctx_k, apply_rotary(block_k_all[:, :, seg.block_rows], *seg.block_rope)], dim=2)
            values = torch.cat([ctx_v, block_v_all[:, :, seg.block_rows]], dim=2)
            q = apply_rotary(q_all[:, :, seg.block_rows], *seg.block_rope)
            outputs.append(attend(q, keys, values, None, self.num_heads // self.num_kv_heads))
        return self.o_proj(torch.cat(outputs, dim=1))


class DraftMLP(nn.Module):
    """SwiGLU with the published (unfused) weight names."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DraftMLP(cfg)

    def forward(self, x, context, block_rope, context_rope, cache, layer, start, mask):
        x = x + self.self_attn(self.input_layernorm(x), context, block_rope, context_rope, cache, layer, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_packed(self, x, context, segments: Sequence["PackedSegment"], layer: int):
        x = x + self.self_attn.forward_packed(self.input_layernorm(x), context, segments, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass(frozen=True)
class PackedSession:
    """One session of a packed drafter pass: its draft cache (the new context rows are appended)
    and the absolute positions of its block [1, T] and of its new context rows [1, N] (int64)."""

    cache: KVCache
    block_positions: torch.Tensor
    context_positions: torch.Tensor


@dataclass(frozen=True)
class PackedSegment:
    """Where one session's rows sit in a packed pass (rows of the block and of the new context),
    its RoPE tables and the cache slot its new context rows go to."""

    block_rows: slice
    context_rows: slice
    block_rope: tuple[torch.Tensor, torch.Tensor]
    context_rope: tuple[torch.Tensor, torch.Tensor]
    cache: KVCache
    start: int


class DFlashDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, target_hidden_size: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        feature_width = len(cfg.target_layer_ids) * (target_hidden_size or cfg.hidden_size)
        self.fc = nn.Linear(feature_width, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.rope, cfg.head_dim)
        if cfg.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.arange(cfg.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_vocab = None

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return self.config.target_layer_ids

    def new_cache(self, capacity: int, batch_size: int = 1) -> KVCache:
        p = next(self.parameters())
        cfg = self.config
        return KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity,
                       batch_size=batch_size, dtype=p.dtype, device=p.device)

    def forward(
        self,
        block_embeds: torch.Tensor,
        context_features: torch.Tensor,
        cache: KVCache | None,
        block_positions: torch.Tensor,
        context_positions: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draft one block.

        block_embeds [B, T, C]: target embeddings of [anchor, mask x (T - 1)].
        context_features [B, N, F]: target features of the N tokens committed since the last call
            (N may be 0); their projected K/V are appended to `cache`. With cache=None (training)
            the context is used as given and nothing is stored.
        block_positions [B, T] / context_positions [B, N]: absolute positions (int64).
        mask: optional bool [B, 1, T, S] over (cached context + block) keys; None = all visible,
            which is inference. Training passes a mask to pack many blocks into one sequence.
        Returns the final-normed block hidden states [B, T, C]; apply the target's lm_head to
        positions 1..T-1 for the draft logits.
        """
        context = self.hidden_norm(self.fc(context_features))
        start = cache.reserve(context.shape[1]) if cache is not None else 0
        block_rope = self.rotary(block_positions)
        context_rope = self.rotary(context_positions)
        x = block_embeds
        for index, layer in enumerate(self.layers):
            x = layer(x, context, block_rope, context_rope, cache, index, start, mask)
        if cache is not None:
            cache.length = start + context.shape[1]
        return self.norm(x)

    def forward_packed(self, block_embeds: torch.Tensor, context_features: torch.Tensor,
                       sessions: Sequence["PackedSession"]) -> torch.Tensor:
        """Draft one block for each of many sessions in one pass (inference; the drafter service
        batches every session that asks at once). The linear layers run once over all sessions'
        rows, so their weights are read once, which is what a drafter pass is bound by; RoPE, the
        cache write and attention run per session. Same result per session as `forward` with
        B = 1 up to the kernels' row-count dependence (a float GEMM may sum in another order at
        another row count; int8 layers quantize their input per call, so over all rows).

        block_embeds [1, R, C]: every session's [anchor, mask x (T_i - 1)] embeddings, in order.
        context_features [1, M, F]: every session's new context features (N_i rows each), in order.
        sessions: per session, its cache and positions (PackedSession). Returns [1, R, C] final-
        normed hidden states; each session's rows are where its block was in block_embeds."""
        context = self.hidden_norm(self.fc(context_features))
        segments, block_row, context_row = [], 0, 0
        for session in sessions:
            steps, new = session.block_positions.shape[1], session.context_positions.shape[1]
            segments.append(PackedSegment(
                block_rows=slice(block_row, block_row + steps), context_rows=slice(context_row, context_row + new),
                block_rope=self.rotary(session.block_positions), context_rope=self.rotary(session.context_positions),
                cache=session.cache, start=session.cache.reserve(new)))
            block_row, context_row = block_row + steps, context_row + new
        if block_row != block_embeds.shape[1] or context_row != context.shape[1]:
            raise ValueError(f"the sessions' positions cover {block_row} block and {context_row} context rows; "
                             f"got {block_embeds.shape[1]} and {context.shape[1]}")
        x = block_embeds
        for index, layer in enumerate(self.layers):
            x = layer.forward_packed(x, context, segments, index)
        for seg in segments:
            seg.cache.length = seg.start + (seg.context_rows.stop - seg.context_rows.start)
        return self.norm(x)

    # ---- checkpoints (published DFlash format) -------------------------------------------

    def save_pretrained(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return out_dir

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "DFlashDrafter":
        """A DFlash checkpoint directory, its weights cast to `dtype` on `device` (its draft caches follow).

        Built as TargetModel.from_pretrained builds the target, without an fp32 detour: the modules
        are made on the meta device and each tensor is read alone from the file and cast into its
        place on the device, so a load peaks at the drafter plus one tensor being read. A cast is per
        element, so the numbers are those of casting the fp32 model (the RoPE table too: it takes
        the dtype as Module.to gave it)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise NotFoundError(f"no drafter at '{path}': expected a directory with config.json and model.safetensors")
        try:
            raw = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ModelFormatError(f"'{path / 'config.json'}' is not valid JSON: {err}") from None
        cfg = DrafterConfig.from_hf_dict(raw)
        index = hf_tensor_index(path)
        fc = index.get("fc.weight")
        if fc is None:
            raise ModelFormatError(f"drafter weights in '{path}' lack 'fc.weight'")
        with torch.device("meta"), SkipInit():
            model = cls(cfg, target_hidden_size=fc.shape[1] // len(cfg.target_layer_ids))
        wanted = model.state_dict()  # meta tensors: each name's shape and dtype, no memory
        missing, unexpected = sorted(wanted.keys() - index.keys()), sorted(index.keys() - wanted.keys())
        if missing or unexpected:
            raise ModelFormatError(f"drafter weights do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        wrong = [f"{name} {list(index[name].shape)} (config: {list(meta.shape)})" for name, meta in wanted.items()
                 if index[name].shape != tuple(meta.shape)]
        if wrong:
            raise ModelFormatError(f"drafter weights in '{path}' do not match its config: {', '.join(wrong[:3])}")
        # Integer tensors (draft_vocab: token ids) keep their type; only the float weights take dtype.
        state = {name: read_hf_tensor(path, [index[name]], dtype if meta.is_floating_point() else meta.dtype, device)
                 for name, meta in wanted.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary.to(device=device, dtype=dtype)
        if model.draft_vocab is not None and (model.draft_vocab.min() < 0 or model.draft_vocab.max() >= cfg.vocab_size):
            raise ModelFormatError(f"drafter '{path}' has draft_vocab ids outside [0, {cfg.vocab_size})")
        return model.eval().requires_grad_(False)

    @classmethod
    def random(cls, target: TargetConfig, *, seed: int = 0, draft_vocab: torch.Tensor | None = None,
               **config_overrides: Any) -> "DFlashDrafter":
        """A randomly initialised drafter for `target` (for tests, training and `--drafter random`)."""
        cfg = DrafterConfig.for_target(target, **config_overrides)
        if draft_vocab is not None:
            cfg = replace(cfg, draft_vocab_size=len(draft_vocab))
        generator = torch.Generator().manual_seed(seed)
        model = cls(cfg, target_hidden_size=target.hidden_size)
        if draft_vocab is not None:
            model.draft_vocab.copy_(draft_vocab)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        return model.eval().requires_grad_(False)


class DraftHead(nn.Module):
    """The target's (frozen, shared) output projection, restricted to the drafter's vocabulary.

    logits(hidden [..., C]) -> [..., K] over the draft vocabulary (K = V without one);
    token_ids(indices) maps draft-vocabulary indices back to target token ids;
    expand(probs [..., K]) -> [..., V] puts a draft distribution on the target's vocabulary
    (zero outside the draft vocabulary: a valid proposal for speculative sampling).
    """

    def __init__(self, lm_head_weight: torch.Tensor, draft_vocab: torch.Tensor | None, *, int8: bool = False) -> None:
        super().__init__()
        self.vocab_size = lm_head_weight.shape[0]
        self.vocab = draft_vocab
        self.weight = lm_head_weight if draft_vocab is None else lm_head_weight[draft_vocab].contiguous()
        # target id -> draft index, -1 outside the draft vocabulary (labels during training)
        self.index_of = torch.arange(self.vocab_size) if draft_vocab is None else torch.full((self.vocab_size,), -1, dtype=torch.long).index_copy_(0, draft_vocab, torch.arange(len(draft_vocab)))
        # Inference only: the projection with int8 weights (see quantize_linear_int8); float logits.
        self._int8 = None
        if int8:
            projection = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=False)
            projection.weight.data = self.weight.detach().float()
            # quantize_dynamic swaps a module's children, never the module it is given: the
            # projection goes in as a child so that it is the one replaced.
            self._int8 = quantize_linear_int8(nn.Sequential(projection))[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._int8 is not None:
            return self._int8(hidden.float())
        return F.linear(hidden, self.weight)

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        return indices if self.vocab is None else self.vocab[indices]

    def expand(self, probs: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            return probs
        full = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        return full.index_copy_(-1, self.vocab, probs)


def int8_linear_supported() -> bool:
    """Whether this torch build runs dynamic int8 linear layers on this CPU (the x86 / fbgemm
    quantized engines), read at run time."""
    engines = torch.backends.quantized.supported_engines
    return hasattr(torch.ao.quantization, "quantize_dynamic") and any(e in engines for e in ("x86", "fbgemm"))


def quantize_linear_int8(module: nn.Module) -> nn.Module:
    """A copy of `module` for inference whose nn.Linear layers hold int8 weights (one scale per
    output channel) and quantize their input per call (dynamic quantization, torch's x86 / fbgemm
    kernels). A drafter pass reads its weights once per call at one to eight rows, so it is bound
    by the bytes it reads: int8 weights are a quarter of fp32's.

    torch marks this eager-mode API deprecated in favour of torchao, but it is the one that ships
    with the pinned torch and runs fbgemm's int8 kernels; `int8_linear_supported` checks that it is
    there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*(torch\.ao\.quantization|quantized tensor creation).*deprecated")
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                                                      dtype=torch.qint8, inplace=False)
