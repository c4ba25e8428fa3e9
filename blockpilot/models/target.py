"""The target model: our own PyTorch Llama/Qwen3 implementation with an explicit KV cache.

Why our own and not `transformers`: the speculative loop needs (a) a forward over any number of new
tokens at explicit positions against a cache that can be rolled back by setting its length, (b) the
hidden states of a few chosen layers for the drafter, (c) logits only where they are needed (the
49,152 x 576 output projection is the single largest matmul), and (d) as few Python ops per layer as
possible, since on a 135M model the interpreter is a visible share of each step. q/k/v and
gate/up are fused into one matmul each at load time.

It is numerically the same model as `transformers` (tests/reference compare them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from blockpilot.errors import ModelFormatError
from blockpilot.models.config import TargetConfig
from blockpilot.models.kv_cache import BatchKVCache, KVCache
from blockpilot.models.layers import FastLinear, MatmulLayouts, RMSNorm, Rotary, SwiGLU, apply_rotary, attend


@dataclass
class ForwardOutput:
    """logits [B, N, V] for the last N positions asked for (None when N == 0);
    hidden [B, T, len(layer_ids) * C]: outputs of the requested decoder layers, concatenated in the
    order asked (None when no layer was asked for);
    final_state [B, T, C]: the residual stream after the last layer that ran (pre final norm;
    the last decoder layer's output whenever logits were asked for)."""

    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    final_state: torch.Tensor | None = None


@dataclass(frozen=True)
class RaggedStep:
    """Where the N packed tokens of a ragged step go: token i belongs to row rows[i], is that
    row's cols[i]-th new token and is written at cache slot slots[i]; width = the widest row's
    token count; end = one past the furthest slot written."""

    batch: int
    width: int
    rows: torch.Tensor
    cols: torch.Tensor
    slots: torch.Tensor
    end: int


class Attention(nn.Module):
    def __init__(self, cfg: TargetConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        self.qkv = FastLinear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o = FastLinear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, cache: KVCache, layer: int, start: int, mask) -> torch.Tensor:
        batch, steps, _ = x.shape
        q, k, v = self.qkv(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(batch, steps, self.num_heads, self.head_dim)
        k = k.view(batch, steps, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        v = v.view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        if isinstance(start, RaggedStep):
            return self.o(self._attend_ragged(q, k, v, cache, layer, start, mask, groups))
        keys, values = cache.write(layer, start, k, v)
        return self.o(attend(q, keys, values, mask, groups))

    @staticmethod
    def _attend_ragged(q, k, v, cache: BatchKVCache, layer: int, step: "RaggedStep", mask, groups: int) -> torch.Tensor:
        # q [1, H, N, D], k/v [1, K, N, D]: the packed tokens of all rows. Each token's K/V goes to
        # its row's slot; attention runs on queries padded to [B, H, T, D] (the matmuls are per row
        # anyway) and the real ones are picked back out: [1, N, H * D].
        keys, values = cache.write_rows(layer, step.rows, step.slots, k[0].transpose(0, 1), v[0].transpose(0, 1), step.end)
        heads, dim = q.shape[1], q.shape[3]
        padded = q.new_zeros(step.batch, step.width, heads, dim)
        padded[step.rows, step.cols] = q[0].transpose(0, 1)
        out = attend(padded.transpose(1, 2), keys, values, mask, groups)  # [B, T, H * D]
        return out[step.rows, step.cols][None]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TargetConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache, layer, start, mask):
        x = x + self.attn(self.input_norm(x), cos, sin, cache, layer, start, mask)
        return x + self.mlp(self.post_attn_norm(x))


class TargetModel(nn.Module):
    # forward() takes a BatchKVCache with row_widths: many sequences' blocks in one pass.
    supports_ragged_batch = True

    def __init__(self, cfg: TargetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = FastLinear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg.rope, cfg.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_batch_cache(self, capacity: int, max_rows: int) -> BatchKVCache:
        """A pool of `max_rows` sequences of up to `capacity` tokens each, with per-row lengths."""
        cfg = self.config
        return BatchKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity, batch_size=max_rows,
                            dtype=self.dtype, device=self.device)

    def new_cache(self, capacity: int, batch_size: int = 1) -> KVCache:
        cfg = self.config
        return KVCache(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            capacity,
            batch_size=batch_size,
            dtype=self.dtype,
            device=self.device,
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + output projection: hidden [..., C] (pre-norm residual stream) -> [..., V]."""
        return self.lm_head(self.norm(hidden))

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        *,
        num_logits: int | None = None,
        hidden_layer_ids: Sequence[int] = (),
        key_valid: torch.Tensor | None = None,
        row_widths: Sequence[int] | None = None,
    ) -> ForwardOutput:
        """Run T new tokens through the model, appending their K/V at the cache's end.

        tokens [B, T] int64. positions [B, T] or [T] (default: cache.length + arange(T)).
        num_logits: logits for the last N positions only (None = all T, 0 = none: then only the
            layers up to the last requested hidden layer run, and the cache is valid for those only).
        hidden_layer_ids: decoder layers whose outputs to return (0-based; `hidden_states[id + 1]`
            in transformers' numbering).
        key_valid [B, capacity] bool: False marks cache slots a row must not attend to (left padding
            in batched generation). Without it every slot before the query's own is visible.
        A BatchKVCache makes the batch ragged: row b (of rows 0..B-1 = the cache's rows in use) has
        row_widths[b] real tokens (tokens[b, :row_widths[b]]; default: all T), written at the row's
        own length, seeing only its own slots; the row's length advances by its width. The real
        tokens run packed ([1, N, C], N = sum of the widths: padding costs nothing in the matmuls),
        so logits, hidden and final_state are [1, N, ...] in row order; every layer runs.
        """
        batch, steps = tokens.shape
        ragged = isinstance(cache, BatchKVCache)
        if ragged:
            start, positions, mask, tokens = self._ragged_inputs(tokens, cache, positions, row_widths)
        else:
            start = cache.reserve(steps)
            if positions is None:
                positions = torch.arange(start, start + steps, device=tokens.device)
            if positions.dim() == 1:
                positions = positions.expand(batch, steps)
            mask = self._mask(start, steps, key_valid, tokens.device)
        cos, sin = self.rotary(positions)

        wanted = set(hidden_layer_ids)
        captured: dict[int, torch.Tensor] = {}
        x = self.embed_tokens(tokens)
        # Without logits, layers past the last requested one cannot change the result (feature
        # extraction for drafter training stops there; the cache then holds only those layers).
        last_layer = max(hidden_layer_ids) if num_logits == 0 and hidden_layer_ids and not ragged else len(self.layers) - 1
        for index, layer in enumerate(self.layers[: last_layer + 1]):
            x = layer(x, cos, sin, cache, index, start, mask)
            if index in wanted:
                captured[index] = x
        if ragged:
            cache.lengths.index_add_(0, start.rows, torch.ones_like(start.rows))
        else:
            cache.length = start + steps

        if num_logits is None:
            logits = self.logits(x)
        elif num_logits > 0:
            logits = self.logits(x[:, -num_logits:])
        else:
            logits = None
        hidden = torch.cat([captured[i] for i in hidden_layer_ids], dim=-1) if captured else None
        return ForwardOutput(logits=logits, hidden=hidden, final_state=x)

    @staticmethod
    def _ragged_inputs(tokens, cache: BatchKVCache, positions, row_widths):
        """(RaggedStep, positions [1, N], mask [B, 1, T, S], packed tokens [1, N]) of a ragged step:
        row b's t-th token sits at slot lengths[b] + t and sees its row's slots up to that one."""
        batch, steps = tokens.shape
        if batch != cache.rows_in_use:
            raise ValueError(f"a ragged forward takes one row per cache row in use ({cache.rows_in_use}), got {batch}")
        widths = torch.tensor(list(row_widths) if row_widths is not None else [steps] * batch, dtype=torch.long)
        if widths.shape[0] != batch or int(widths.min()) < 1 or int(widths.max()) > steps:
            raise ValueError(f"row_widths must give 1..{steps} tokens for each of the {batch} rows, got {widths.tolist()}")
        starts = cache.reserve_rows(widths)  # [B]
        rows = torch.repeat_interleave(torch.arange(batch), widths)  # [N]
        cols = torch.arange(rows.shape[0]) - torch.repeat_interleave(torch.cumsum(widths, 0) - widths, widths)
        slots = starts[rows] + cols
        query_slot = starts[:, None] + torch.arange(steps)  # [B, T] (padded queries are discarded)
        end = int((starts + widths).max())
        mask = (torch.arange(end)[None, None, :] <= query_slot[:, :, None])[:, None].to(tokens.device)
        packed_positions = slots[None] if positions is None else positions[rows, cols][None]
        step = RaggedStep(batch, steps, rows, cols, slots, end)
        return step, packed_positions.to(tokens.device), mask, tokens[rows, cols][None]

    @staticmethod
    def _mask(start: int, steps: int, key_valid: torch.Tensor | None, device) -> torch.Tensor | None:
        # A single new token sees every cached slot: no mask at all (the fast path of each decode step).
        if steps == 1 and key_valid is None:
            return None
        end = start + steps
        query_slot = torch.arange(start, end, device=device)[:, None]
        key_slot = torch.arange(end, device=device)[None, :]
        causal = key_slot <= query_slot  # [T, S]
        if key_valid is None:
            return causal
        # A padded query row would see no key at all (NaN softmax): let it see itself.
        visible = causal[None] & key_valid[:, None, :end] | (key_slot == query_slot)[None]
        return visible[:, None]  # [B, 1, T, S]

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "TargetModel":
        """The model of a Hugging Face directory, its weights cast to `dtype` on `device` (its KV
        caches follow them: see new_cache).

        Built without an fp32 detour: the modules are made on the meta device (no memory), and
        each weight is read alone from its shard and cast into its place on the device
        (read_fused_weights), so a load peaks at what the model holds plus one tensor being read,
        not at an fp32 model beside the file's tensors (a bf16 4B model: 8 GB, not 16 + 8). The
        numbers are those of casting the fp32 model: a cast is per element, so cast-then-fuse
        equals fuse-then-cast (benchmarks/target_load_memory.py compares the logits)."""
        model_dir = Path(model_dir)
        cfg = TargetConfig.from_dir(model_dir)
        with torch.device("meta"), SkipInit():
            model = cls(cfg)
        model.load_state_dict(read_fused_weights(model_dir, cfg, dtype, device), strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight  # assign=True made two Parameters of the one tensor
        # The RoPE table is computed on the CPU even on the meta device (rope_inv_freq); it takes
        # the dtype as Module.to gave it, so the numbers stay what they were.
        model.rotary.to(device=device, dtype=dtype)
        model.eval().requires_grad_(False)
        model.prepare_for_inference()
        return model

    def prepare_for_inference(self) -> None:
        """Keep a transposed copy of every linear's weight and let one MatmulLayouts pick each
        product's layout by measurement on this machine (see FastLinear); `matmul_layouts.choices`
        says what it picked."""
        self.matmul_layouts = MatmulLayouts()
        for module in self.modules():
            if isinstance(module, FastLinear):
                module.prepare_for_inference(self.matmul_layouts)


class SkipInit(TorchFunctionMode):
    """Module construction without torch.nn.init's fills, for modules built on the meta device
    whose every parameter is assigned from a checkpoint next: a random fill on the meta device
    runs through torch's Python decompositions, whose import alone holds ~65 MB for the life of
    the process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs.get("tensor", args[0] if args else None)
        return func(*args, **kwargs)


def hf_weight_files(model_dir: Path) -> list[str]:
    """The safetensors shards of a Hugging Face model directory (those its index names, if it has one)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"no *.safetensors weights in '{model_dir}'")
    return files


@dataclass(frozen=True)
class HfTensor:
    """Where one tensor of a Hugging Face checkpoint is: its shard file, its key there, its shape."""

    file: str
    key: str
    shape: tuple[int, ...]


def hf_tensor_index(model_dir: Path) -> dict[str, HfTensor]:
    """Every tensor of a Hugging Face model directory by its name without the 'model.' prefix,
    from the shards' headers (no weights are read)."""
    from safetensors import safe_open

    index: dict[str, HfTensor] = {}
    for file in hf_weight_files(model_dir):
        with safe_open(str(model_dir / file), framework="pt") as shard:
            for key in shard.keys():
                index.setdefault(key.removeprefix("model."), HfTensor(file, key, tuple(shard.get_slice(key).get_shape())))
    return index


def read_hf_tensor(model_dir: Path, parts: Sequence[HfTensor], dtype: torch.dtype,
                   device: torch.device | str) -> torch.Tensor:
    """The tensors `parts` concatenated along dim 0 (one part: that tensor), cast to `dtype`, as
    one new tensor on `device`.

    Each part is copied from the shard straight into its rows of the result: no intermediate
    copies (whose freed holes would stay in the process's heap). safetensors maps a shard whole
    while it is open, and every page read counts in this process's RSS until it is closed;
    opening it per part keeps a load's peak at what it has loaded (the pages stay in the page
    cache for the next read)."""
    from safetensors import safe_open

    tail = parts[0].shape[1:]
    if any(part.shape[1:] != tail for part in parts):
        raise ModelFormatError(f"tensors {[part.key for part in parts]} in '{model_dir}' cannot be fused: shapes "
                               f"{[list(part.shape) for part in parts]}")
    out = torch.empty((sum(part.shape[0] for part in parts), *tail), dtype=dtype, device=device)
    row = 0
    for part in parts:
        with safe_open(str(model_dir / part.file), framework="pt") as shard:
            out[row : row + part.shape[0]].copy_(shard.get_tensor(part.key))
        row += part.shape[0]
    return out


def load_hf_tensors(model_dir: Path, names: Sequence[str], dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Only the named tensors (Hugging Face names without the 'model.' prefix) of a model
    directory, each read alone (read_hf_tensor), so nothing else of the checkpoint is read into
    memory. Names the checkpoint lacks are left out of the result."""
    index = hf_tensor_index(model_dir)
    return {name: read_hf_tensor(model_dir, [index[name]], dtype, device) for name in names if name in index}


class TargetEmbedHead(nn.Module):
    """The target's token embedding and output projection (lm_head), loaded without the rest of it:
    all a DFlash drafter uses of its target (LocalDrafter reads `config`, `device`, `embed` and
    `lm_head.weight`). The drafter service holds this instead of the whole TargetModel.

    A tied checkpoint (tie_word_embeddings) holds one matrix that serves as both."""

    def __init__(self, cfg: TargetConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding.from_pretrained(embed_weight, freeze=True)
        self.lm_head = nn.Module()
        self.lm_head.weight = self.embed_tokens.weight if lm_head_weight is embed_weight else nn.Parameter(lm_head_weight, requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "TargetEmbedHead":
        """Read the two matrices of a Hugging Face directory (the same tensors TargetModel.from_pretrained
        loads for them, cast and moved the same way)."""
        model_dir = Path(model_dir)
        cfg = TargetConfig.from_dir(model_dir)
        names = ["embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
        tensors = load_hf_tensors(model_dir, names, dtype, device)
        if "embed_tokens.weight" not in tensors:
            raise ModelFormatError(f"weights in '{model_dir}' lack the tensor 'embed_tokens.weight'")
        if not cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
            raise ModelFormatError(f"weights in '{model_dir}' lack 'lm_head.weight' and the config does not tie embeddings")
        embed = tensors["embed_tokens.weight"]
        head = embed if cfg.tie_word_embeddings else tensors["lm_head.weight"]
        return cls(cfg, embed, head).eval()


def hf_weight_plan(cfg: TargetConfig) -> dict[str, tuple[str, ...]]:
    """Each of our parameters and the transformers tensors (names without 'model.') it is made of,
    concatenated along dim 0 in this order: q/k/v and gate/up are fused. A tied lm_head is the
    embedding (not listed)."""
    plan: dict[str, tuple[str, ...]] = {"embed_tokens.weight": ("embed_tokens.weight",), "norm.weight": ("norm.weight",)}
    if not cfg.tie_word_embeddings:
        plan["lm_head.weight"] = ("lm_head.weight",)
    for i in range(cfg.num_hidden_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        plan[dst + "attn.qkv.weight"] = tuple(attn + f"{p}_proj.weight" for p in "qkv")
        if cfg.attention_bias:
            plan[dst + "attn.qkv.bias"] = tuple(attn + f"{p}_proj.bias" for p in "qkv")
            plan[dst + "attn.o.bias"] = (attn + "o_proj.bias",)
        plan[dst + "attn.o.weight"] = (attn + "o_proj.weight",)
        if cfg.qk_norm:
            plan[dst + "attn.q_norm.weight"] = (attn + "q_norm.weight",)
            plan[dst + "attn.k_norm.weight"] = (attn + "k_norm.weight",)
        plan[dst + "mlp.gate_up.weight"] = (src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight")
        plan[dst + "mlp.down.weight"] = (src + "mlp.down_proj.weight",)
        plan[dst + "input_norm.weight"] = (src + "input_layernorm.weight",)
        plan[dst + "post_attn_norm.weight"] = (src + "post_attention_layernorm.weight",)
    return plan


def read_fused_weights(model_dir: Path, cfg: TargetConfig, dtype: torch.dtype,
                       device: torch.device | str) -> dict[str, torch.Tensor]:
    """Our state dict from a Hugging Face directory (hf_weight_plan), each tensor read alone, cast
    to `dtype` on `device` into its place in the fused tensor."""
    index = hf_tensor_index(model_dir)
    plan = hf_weight_plan(cfg)
    sources = {name for names in plan.values() for name in names}
    missing = sorted(sources - index.keys())
    if "lm_head.weight" in missing:
        raise ModelFormatError("weights lack 'lm_head.weight' and the config does not tie embeddings")
    if missing:
        raise ModelFormatError(f"weights lack the tensor {missing[0]!r}")
    # A tied checkpoint may still carry lm_head.weight, and old exports the rotary table: unused.
    unused = {"rotary_emb.inv_freq"} | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    unexpected = sorted(index.keys() - sources - unused)
    if unexpected:
        raise ModelFormatError(f"unexpected tensors in the weights: {unexpected[:5]}")
    state = {ours: read_hf_tensor(model_dir, [index[name] for name in names], dtype, device) for ours, names in plan.items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state
