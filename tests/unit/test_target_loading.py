"""TargetModel.from_pretrained without an fp32 detour: built on the meta device, each weight read
alone from its shard and cast, with the very numbers of the fp32 model cast afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockpilot.errors import ModelFormatError
from blockpilot.models.target import TargetModel
from tiny_models import build_tiny_hf_model, save_tiny_hf_model

LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Untied Llama, tied Llama with attention biases, Qwen3 (q/k norms)."""
    root = tmp_path_factory.mktemp("loading")
    return {
        "llama": save_tiny_hf_model(build_tiny_hf_model("llama", seed=3), root / "llama"),
        "llama-tied-bias": save_tiny_hf_model(build_tiny_hf_model("llama", seed=4, tie_word_embeddings=True,
                                                                  attention_bias=True), root / "tied"),
        "qwen3": save_tiny_hf_model(build_tiny_hf_model("qwen3", seed=5), root / "qwen3"),
    }


def tensors_of(model: TargetModel) -> dict[str, torch.Tensor]:
    return {**model.state_dict(), "rotary.inv_freq": model.rotary.inv_freq}


@pytest.mark.parametrize("name", ["llama", "llama-tied-bias", "qwen3"])
@pytest.mark.parametrize("dtype", LOW)
def test_a_load_at_a_dtype_holds_the_fp32_model_cast(model_dirs, name, dtype):
    loaded = TargetModel.from_pretrained(model_dirs[name], dtype=dtype)
    cast = TargetModel.from_pretrained(model_dirs[name]).to(dtype=dtype)
    got, want = tensors_of(loaded), tensors_of(cast)
    assert got.keys() == want.keys()
    for key, tensor in got.items():
        assert tensor.dtype == dtype and tensor.device.type == "cpu", key
        assert torch.equal(tensor, want[key]), key
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.training


def test_the_loaded_model_computes_what_the_cast_one_does(model_dirs):
    loaded = TargetModel.from_pretrained(model_dirs["qwen3"], dtype=torch.bfloat16)
    cast = TargetModel.from_pretrained(model_dirs["qwen3"]).to(dtype=torch.bfloat16)
    cast.prepare_for_inference()  # its transposed copies were made in fp32
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.inference_mode():
        a = loaded(tokens, loaded.new_cache(8), hidden_layer_ids=(1, 2))
        b = cast(tokens, cast.new_cache(8), hidden_layer_ids=(1, 2))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)


def test_a_tied_embedding_stays_one_parameter(model_dirs):
    model = TargetModel.from_pretrained(model_dirs["llama-tied-bias"], dtype=torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert len(list(model.parameters())) == len(model.state_dict()) - 1


def test_weights_spread_over_shards_are_fused_across_them(model_dirs, tmp_path):
    """q in one shard, k and v in the other (a real checkpoint's index may split a layer so)."""
    source = model_dirs["llama"]
    state = load_file(str(source / "model.safetensors"))
    first = {k: v for k, v in state.items() if "k_proj" not in k and "v_proj" not in k and "up_proj" not in k}
    second = {k: v for k, v in state.items() if k not in first}
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    save_file(first, str(folder / "model-00001-of-00002.safetensors"))
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first} | {k: "model-00002-of-00002.safetensors" for k in second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = tensors_of(TargetModel.from_pretrained(folder, dtype=torch.bfloat16))
    whole = tensors_of(TargetModel.from_pretrained(source, dtype=torch.bfloat16))
    assert all(torch.equal(sharded[k], whole[k]) for k in whole)


def test_missing_and_foreign_tensors_are_refused_by_name(model_dirs, tmp_path):
    state = load_file(str(model_dirs["llama"] / "model.safetensors"))
    for case, tensors, fragment in (
        ("missing", {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.weight"},
         "weights lack the tensor 'layers.1.self_attn.k_proj.weight'"),
        ("no-head", {k: v for k, v in state.items() if k != "lm_head.weight"}, "lack 'lm_head.weight'"),
        ("foreign", {**state, "model.layers.0.extra.weight": torch.zeros(2)}, "unexpected tensors in the weights: "
                                                                            "['layers.0.extra.weight']"),
    ):
        folder = tmp_path / case
        folder.mkdir()
        (folder / "config.json").write_text((model_dirs["llama"] / "config.json").read_text())
        save_file(tensors, str(folder / "model.safetensors"))
        with pytest.raises(ModelFormatError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            TargetModel.from_pretrained(folder, dtype=torch.bfloat16)


PEAK_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from blockpilot.models.target import TargetModel

    def status(field):  # kB; VmHWM is this process's own peak (ru_maxrss would carry the parent's over fork and exec)
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":")) * 1024

    floor = status("VmRSS")
    model = TargetModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    copies = sum(m.weight_t.numel() * m.weight_t.element_size() for m in model.modules() if getattr(m, "weight_t", None) is not None)
    print(json.dumps({"above_floor": status("VmHWM") - floor, "held": held + copies}))
""")


def test_a_bf16_load_never_holds_an_fp32_copy(tmp_path):
    """An 80 MB fp32 checkpoint loaded in bf16 peaks at what the model holds (the bf16 weights and
    their transposed inference copies, 62 MB) plus one fp32 tensor being read (the embedding,
    31 MB). The old way held the file's tensors and an fp32 model at once: twice the file."""
    folder = save_tiny_hf_model(build_tiny_hf_model("llama", vocab_size=32000, hidden_size=256, intermediate_size=1024,
                                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
                                tmp_path / "mid")
    largest = 32000 * 256 * 4
    done = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(folder)], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["above_floor"] < row["held"] + largest + 16 * 2**20, row
    assert row["above_floor"] < 2 * (folder / "model.safetensors").stat().st_size, row
