"""The target's forward written as one side-effect-free graph, for ONNX export (and so TensorRT).

Why a second forward next to TargetModel.forward: the engine's forward writes K/V into its cache in
place and picks matmul layouts by row count at run time (FastLinear), both of which an exporter would
either refuse or freeze into one shape. This module reads the very same parameters (it holds the
TargetModel, no copy) and computes the same math with plain tensor ops and no branches on sizes, so
the exported graph is valid for every sequence length and cache length.

Graph contract (batch 1; S = P + T):
    inputs   input_ids      int64   [1, T]          new tokens (T >= 1)
             position_ids   int64   [1, T]          their absolute positions (RoPE)
             logit_index    int64   [N]             which of the T positions get logits (0 <= i < T)
             past_keys      dtype   [P, L, 1, K, D] K of the committed tokens, sequence-major
             past_values    dtype   [P, L, 1, K, D] V, same layout
    outputs  logits         dtype   [1, N, V]
             hidden         dtype   [1, T, len(layers) * C]   outputs of the drafter's target layers
                                                          (only when layers were given)
             final_state    dtype   [1, T, C]       residual stream after the last layer (pre norm)
             new_keys       dtype   [T, L, 1, K, D] K of the T new tokens
             new_values     dtype   [T, L, 1, K, D]
dtype: the target's (float32, or float16 / bfloat16 for GPU runtimes); a 16-bit graph computes
its norms in float32 and everything else in its dtype, as the engine does at that dtype.

The cache is sequence-major ([slot, layer, batch, head, dim]) so that both "the first P slots" and
"the T slots after them" are contiguous ranges of one preallocated buffer: a runtime binds the graph's
past inputs and new outputs straight onto that buffer and nothing is copied between steps
(blockpilot.backends.cache.SeqMajorKVCache). Query slot t (cache slot P + t) attends to key slots
0 .. P + t, exactly as the engine's causal mask does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from blockpilot.models.target import TargetModel

INPUT_NAMES = ("input_ids", "position_ids", "logit_index", "past_keys", "past_values")


def output_names(has_hidden: bool) -> tuple[str, ...]:
    """Graph outputs in order (`hidden` is absent when the export has no feature layers)."""
    return ("logits",) + (("hidden",) if has_hidden else ()) + ("final_state", "new_keys", "new_values")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Spelled out (not F.rms_norm): opset-18 ops that both ONNX Runtime and TensorRT's parser know.
    if x.dtype == torch.float32:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight
    # A 16-bit graph normalises in float32 and scales in its own dtype, as the engine's RMSNorm
    # does (a float16 square of a large activation would overflow).
    wide = x.float()
    return weight * (wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class TargetGraph(nn.Module):
    """Functional forward of a TargetModel (batch 1, in the target's dtype) with the KV cache as
    graph inputs/outputs."""

    def __init__(self, target: TargetModel, hidden_layer_ids: Sequence[int] = ()) -> None:
        super().__init__()
        cfg = target.config
        bad = [i for i in hidden_layer_ids if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"hidden layer ids {bad} are outside [0, {cfg.num_hidden_layers})")
        self.target = target
        self.hidden_layer_ids = tuple(int(i) for i in hidden_layer_ids)

    def forward(self, input_ids, position_ids, logit_index, past_keys, past_values):
        target = self.target
        cfg = target.config
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        groups = heads // kv_heads
        steps = input_ids.shape[1]
        past = past_keys.shape[0]

        freqs = position_ids.to(torch.float32)[..., None] * target.rotary.inv_freq  # [1, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [1, 1, T, D]
        if target.dtype != torch.float32:  # computed in float32, used in the activations' dtype (apply_rotary)
            cos, sin = cos.to(target.dtype), sin.to(target.dtype)
        query_slot = torch.arange(steps, device=input_ids.device)[:, None] + past
        key_slot = torch.arange(past + steps, device=input_ids.device)[None, :]
        visible = key_slot <= query_slot  # [T, S]

        x = F.embedding(input_ids, target.embed_tokens.weight)
        captured: dict[int, torch.Tensor] = {}
        new_keys, new_values = [], []
        for index, layer in enumerate(target.layers):
            attn = layer.attn
            h = _rms_norm(x, layer.input_norm.weight, layer.input_norm.eps)
            qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)
            q, k, v = qkv.split((attn.q_size, attn.kv_size, attn.kv_size), dim=-1)
            q = q.reshape(1, steps, heads, dim)
            k = k.reshape(1, steps, kv_heads, dim)
            if attn.q_norm is not None:
                q = _rms_norm(q, attn.q_norm.weight, attn.q_norm.eps)
                k = _rms_norm(k, attn.k_norm.weight, attn.k_norm.eps)
            q = _rotate(q.transpose(1, 2), cos, sin)  # [1, H, T, D]
            k = _rotate(k.transpose(1, 2), cos, sin)  # [1, K, T, D]
            v = v.reshape(1, steps, kv_heads, dim).transpose(1, 2)
            new_keys.append(k)
            new_values.append(v)
            keys = torch.cat((past_keys[:, index].permute(1, 2, 0, 3), k), dim=2)  # [1, K, S, D]
            values = torch.cat((past_values[:, index].permute(1, 2, 0, 3), v), dim=2)
            grouped = q.reshape(1, kv_heads, groups * steps, dim)
            scores = torch.matmul(grouped, keys.transpose(-1, -2)) * (dim**-0.5)
            scores = scores.reshape(1, kv_heads, groups, steps, past + steps)
            scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores.reshape(1, kv_heads, groups * steps, past + steps), dim=-1)
            out = torch.matmul(probs, values).reshape(1, heads, steps, dim).transpose(1, 2).reshape(1, steps, heads * dim)
            x = x + F.linear(out, attn.o.weight, attn.o.bias)
            mlp = layer.mlp
            gate, up = F.linear(_rms_norm(x, layer.post_attn_norm.weight, layer.post_attn_norm.eps),
                                mlp.gate_up.weight).split(mlp.intermediate_size, dim=-1)
            x = x + F.linear(F.silu(gate) * up, mlp.down.weight)
            if index in self.hidden_layer_ids:
                captured[index] = x

        picked = x.index_select(1, logit_index)
        logits = F.linear(_rms_norm(picked, target.norm.weight, target.norm.eps), target.lm_head.weight, target.lm_head.bias)
        # [L, 1, K, T, D] -> [T, L, 1, K, D]: sequence-major, like the cache.
        keys_out = torch.stack(new_keys).permute(3, 0, 1, 2, 4)
        values_out = torch.stack(new_values).permute(3, 0, 1, 2, 4)
        outputs = [logits]
        if self.hidden_layer_ids:
            outputs.append(torch.cat([captured[i] for i in self.hidden_layer_ids], dim=-1))
        return (*outputs, x, keys_out, values_out)
