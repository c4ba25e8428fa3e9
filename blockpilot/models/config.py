"""Target model configuration: the subset of a Hugging Face `config.json` that the engine needs.

Supported families: Llama (`model_type` "llama", e.g. SmolLM2, Llama-3.x) and Qwen3 ("qwen3": per-head
RMSNorm on queries and keys before RoPE). Anything else is refused with a clear error rather than
run with silently wrong math.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockpilot.errors import ModelFormatError

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters.

    rope_type: "default" or "llama3" (Llama-3.1 frequency scaling); others are refused.
    theta: base of the inverse frequencies.
    The llama3 fields are only read when rope_type == "llama3".
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "RopeConfig":
        # transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` + `rope_scaling`.
        params = dict(raw.get("rope_parameters") or {})
        scaling = raw.get("rope_scaling") or {}
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        merged = {**scaling, **params}
        rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
        if rope_type not in ("default", "llama3"):
            raise ModelFormatError(f"unsupported rope_type {rope_type!r} (supported: 'default', 'llama3')")
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(merged.get("factor", 1.0)),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_theta": self.theta, "rope_type": self.rope_type}
        if self.rope_type == "llama3":
            out.update(
                factor=self.factor,
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


@dataclass(frozen=True)
class TargetConfig:
    """Architecture of a target causal LM.

    head_dim defaults to hidden_size // num_attention_heads (Qwen3 sets it explicitly).
    qk_norm is True for Qwen3 (RMSNorm over each head's query and key before RoPE).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFormatError(
                f"unsupported model_type {self.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "TargetConfig":
        model_type = raw.get("model_type", "")
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                qk_norm=model_type == "qwen3",
                rope=RopeConfig.from_hf(raw),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except KeyError as missing:
            raise ModelFormatError(f"config.json lacks the field {missing.args[0]!r}") from None

    @classmethod
    def from_dir(cls, model_dir: Path) -> "TargetConfig":
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFormatError(f"no config.json in '{model_dir}'") from None
        except json.JSONDecodeError as err:
            raise ModelFormatError(f"'{path}' is not valid JSON: {err}") from None
        return cls.from_hf_dict(raw)

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads
