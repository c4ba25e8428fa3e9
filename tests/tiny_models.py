"""Tiny random models built inside the tests (no files, no hub), shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_VOCAB = 97


def tiny_hf_config(model_type: str = "llama", **overrides):
    """A transformers config for a tiny random Llama or Qwen3."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if model_type == "qwen3":
        common.setdefault("head_dim", 24)
        return Qwen3Config(**common)
    return LlamaConfig(**common)


def build_tiny_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A transformers model with random weights, fp32, eval mode.

    Weights are drawn with a larger std than the default init so that logits are far from uniform
    (distinct argmaxes, confident predictions): a random model that is uniform everywhere would make
    greedy comparisons and acceptance tests meaningless.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_hf_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model.eval()


def save_tiny_hf_model(model, out_dir: Path) -> Path:
    """Write a transformers model as a Hugging Face directory (config.json + model.safetensors)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(out_dir / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"))
    return out_dir


def llama_cpp_permute(weight, heads: int):
    """llama.cpp's converter's row order for a q/k projection (the rotary halves interleaved per
    head), which GGUF files of the Llama family hold and loaders undo."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def quantized_tiny_model(model_type: str, out_dir: Path, seed: int = 0, **overrides) -> tuple[Path, Path]:
    """A tiny random model whose linear layers are exactly their GGUF Q4_1 codes (and its output
    projection its Q8_0 codes): returns (Hugging Face directory of the de-quantized fp32 weights,
    GGUF file holding the codes), as a converted GGUF model has them."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    model = build_tiny_hf_model(model_type, seed=seed, **overrides)
    cfg = model.config
    q4, q8 = GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
    gguf_path = out_dir / "model.gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(gguf_path), model_type)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            for module_name, gguf_name in names.items():
                module = getattr(layer.self_attn, module_name, None) or getattr(layer.mlp, module_name)
                weight = module.weight.numpy()
                codes = quants.quantize(weight, q4)
                module.weight.copy_(torch.from_numpy(quants.dequantize(codes, q4)))
                heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(module_name)
                if heads and model_type == "llama":
                    codes = quants.quantize(llama_cpp_permute(module.weight.numpy(), heads), q4)
                writer.add_tensor(f"blk.{index}.{gguf_name}.weight", codes, raw_dtype=q4)
        head = model.lm_head.weight
        codes = quants.quantize(head.numpy(), q8)
        head.copy_(torch.from_numpy(quants.dequantize(codes, q8)))
        writer.add_tensor("token_embd.weight" if cfg.tie_word_embeddings else "output.weight", codes,
                          raw_dtype=q8)
        if not cfg.tie_word_embeddings:
            writer.add_tensor("token_embd.weight", np.ascontiguousarray(model.model.embed_tokens.weight.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return save_tiny_hf_model(model, out_dir / "hf"), gguf_path


def add_char_chat_tokenizer(model_dir: Path) -> list[str]:
    """A tokenizer with one character per id over the whole tiny vocabulary (every id the random
    model can generate decodes to text) and a ChatML template; ids 0-4 are the special tokens
    (end of turn: <|im_end|> = 4). Returns the vocabulary, id order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,?!:;'\"-_()[]{}<>/|@#$%^&*+=~"
    vocab = specials + list(chars[:TINY_VOCAB - len(specials)])
    assert len(vocab) == TINY_VOCAB
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters joined as they are (WordLevel's default puts spaces between)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n"
                          # A template variable, as Qwen3's enable_thinking (tests of chat_template_kwargs).
                          "{% if enable_thinking is defined and not enable_thinking %}nothink\n{% endif %}{% endif %}")
    fast.save_pretrained(model_dir)
    return vocab
