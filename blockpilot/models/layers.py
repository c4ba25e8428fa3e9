"""Building blocks shared by the target engine and the DFlash drafter.

Shapes use: B batch, T new tokens, S attended key slots, H query heads, K key/value heads,
D head dim, C hidden size.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from blockpilot.models.config import RopeConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as transformers does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # One fused op instead of five: the engine's per-layer Python overhead is visible.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2] for RoPE, with Llama-3.1 scaling when rope_type == 'llama3'.

    Computed on the CPU whatever the default device: a model built on the meta device to be
    loaded (TargetModel.from_pretrained) keeps a real table, moved with the model."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    if rope.rope_type != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between smoothed.
    low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary(nn.Module):
    """cos/sin tables for explicit positions (any order, any batch row)."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] int64 -> cos, sin [B, 1, T, D] (broadcast over heads)
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, T, D]; rotate-half convention of transformers' Llama/Qwen3. cos/sin are computed
    # in fp32 and used in the activations' dtype (as transformers does): a bf16 model stays bf16.
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class MatmulLayouts:
    """Picks, per weight shape and row count, the fastest of three equal products, by measuring.

    Decoding is bound by streaming the weights, and how fast they stream depends on the layout and
    on the CPU and BLAS underneath: x @ W^T with W^T stored contiguous ("x_wt"), W @ x^T with W as
    stored ("w_xt"), or F.linear. Measured 2-3x apart, and the winner changes with the row count
    (1 for a decode step, 2-16 for a verify block, more for a batch) and with the machine: on an
    AVX2 EPYC "w_xt" won for every multi-row product, on an AVX-512/AMX Xeon it was 3x slower
    than the others at 2-8 rows. So nothing is assumed: the first product of each (in, out,
    dtype, row bucket) times each layout on the real input (best of `reps`) and keeps the
    fastest for the life of the process, so the same rows always meet the same rounding. Row
    buckets: 1, 2, 3-4, 5-8, ... (powers of two). On a GPU, F.linear always.
    """

    LAYOUTS = ("x_wt", "w_xt", "linear")

    def __init__(self, reps: int = 3) -> None:
        self.reps = reps
        self.choices: dict[tuple, str] = {}
        self.timings_ms: dict[tuple, dict[str, float]] = {}

    @staticmethod
    def bucket(rows: int) -> int:
        return 1 if rows <= 1 else 1 << (rows - 1).bit_length()

    @staticmethod
    def apply(layout: str, module: "FastLinear", flat: torch.Tensor) -> torch.Tensor:
        if layout == "x_wt":
            return flat @ module.weight_t
        if layout == "w_xt":
            return (module.weight @ flat.t()).t()
        return F.linear(flat, module.weight)

    def product(self, module: "FastLinear", flat: torch.Tensor) -> torch.Tensor:
        """flat [rows, in] @ W^T -> [rows, out] in the layout chosen for this shape and bucket."""
        if flat.is_cuda or module.weight_t is None:
            return F.linear(flat, module.weight)
        key = (module.in_features, module.out_features, str(flat.dtype), self.bucket(flat.shape[0]))
        layout = self.choices.get(key)
        if layout is None:
            layout = self._measure(key, module, flat)
        return self.apply(layout, module, flat)

    def _measure(self, key: tuple, module: "FastLinear", flat: torch.Tensor) -> str:
        timings = {}
        for layout in self.LAYOUTS:
            self.apply(layout, module, flat)  # warm-up
            best = math.inf
            for _ in range(self.reps):
                began = time.perf_counter()
                self.apply(layout, module, flat)
                best = min(best, time.perf_counter() - began)
            timings[layout] = round(best * 1e3, 4)
        layout = min(timings, key=timings.get)
        self.timings_ms[key] = timings
        self.choices[key] = layout
        return layout


class FastLinear(nn.Linear):
    """nn.Linear whose inference product takes the layout a MatmulLayouts measured fastest.

    An inference copy (`prepare_for_inference`) keeps W^T beside W (memory for bandwidth) and
    shares one MatmulLayouts with the model's other linears; training, and a module never
    prepared, use F.linear.
    """

    weight_t: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.weight_t = None
        self.layouts: MatmulLayouts | None = None

    def prepare_for_inference(self, layouts: MatmulLayouts) -> None:
        # Off the CPU every product is F.linear (MatmulLayouts.product): a transposed copy there
        # would only double the weights' GPU memory.
        self.weight_t = self.weight.detach().t().contiguous() if self.weight.device.type == "cpu" else None
        self.layouts = layouts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        # Always as a 2-D product: for a [B, 1, C] input (one token of each of B rows) F.linear
        # takes a batched-matmul path that copies the weight per row (measured: 5.9 ms instead of
        # ~0.6 ms for the down projection at B = 32).
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1])
        out = self.layouts.product(self, flat) if self.layouts is not None else F.linear(flat, self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up = FastLinear(hidden_size, 2 * intermediate_size)
        self.down = FastLinear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate_size, dim=-1)
        return self.down(F.silu(gate) * up)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, num_groups: int
) -> torch.Tensor:
    """Attention with grouped KV heads, written out as two matmuls.

    q [B, H, T, D], k/v [B, K, S, D] with H = K * num_groups (query head h reads kv head
    h // num_groups); mask bool [T, S] or [B, 1, T, S], True = visible. Returns [B, T, H * D].
    Why not F.scaled_dot_product_attention: on CPU its flash kernel costs ~5 ms per call for a
    single query against a strided cache view, more than all the layer's matmuls together.
    """
    batch, heads, steps, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    # Fold each kv head's query heads into the row dimension: one matmul per kv head, no repeat.
    grouped = q.reshape(batch, kv_heads, num_groups * steps, dim)
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * (dim**-0.5)  # [B, K, G*T, S]
    if mask is not None:
        scores = scores.view(batch, kv_heads, num_groups, steps, slots)
        visible = mask.view(-1, 1, 1, steps, slots) if mask.dim() == 4 else mask
        scores = scores.masked_fill(~visible, float("-inf")).view(batch, kv_heads, num_groups * steps, slots)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, K, G*T, D]
    return out.view(batch, heads, steps, dim).transpose(1, 2).reshape(batch, steps, heads * dim)
