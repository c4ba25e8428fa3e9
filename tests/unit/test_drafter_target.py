"""The drafter service's target: its embedding and lm_head read alone from the safetensors files
(TargetEmbedHead), drafting exactly as beside the whole TargetModel."""

from __future__ import annotations

import pytest
import torch

from blockpilot.config import DrafterServiceConfig
from blockpilot.decoding.drafting import DraftRequest, LocalDrafter
from blockpilot.errors import ModelFormatError
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.placement import Placement
from blockpilot.models.target import TargetEmbedHead, TargetModel
from blockpilot.serving.models import load_drafter_target, load_served_drafter, load_served_target
from hub_models import hub_home, offline_hub  # noqa: F401 (fixtures)
from tiny_models import build_tiny_hf_model, save_tiny_hf_model


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    return save_tiny_hf_model(build_tiny_hf_model("llama", seed=4, tie_word_embeddings=True), tmp_path_factory.mktemp("tied"))


def requests(feature_width: int, seed: int = 0) -> list[DraftRequest]:
    """A session's steps: a prompt's context, then a few committed tokens at a time."""
    generator = torch.Generator().manual_seed(seed)
    out, committed = [], 0
    for new, num_draft in ((9, 7), (3, 3), (1, 5), (4, 7)):
        context = torch.randn(new, feature_width, generator=generator)
        anchor = int(torch.randint(97, (), generator=generator))
        out.append(DraftRequest(anchor=anchor, start=committed + new, num_draft=num_draft, context=context,
                                context_start=committed))
        committed += new
    return out


def drafts(drafter: LocalDrafter, steps: list[DraftRequest]) -> list[list[int]]:
    session = drafter.open_session(64)
    return [session.propose(step).tokens.tolist() for step in steps]


def test_only_the_embedding_and_lm_head_are_held(tiny_llama_dir, tied_llama_dir):
    full = TargetModel.from_pretrained(tiny_llama_dir)
    slim = TargetEmbedHead.from_pretrained(tiny_llama_dir)
    assert torch.equal(slim.embed_tokens.weight, full.embed_tokens.weight)
    assert torch.equal(slim.lm_head.weight, full.lm_head.weight)
    vocab, hidden = full.config.vocab_size, full.config.hidden_size
    assert sum(p.numel() for p in slim.parameters()) == 2 * vocab * hidden
    tied = TargetEmbedHead.from_pretrained(tied_llama_dir)
    assert tied.lm_head.weight is tied.embed_tokens.weight  # one matrix serves both
    assert sum(p.numel() for p in tied.parameters()) == vocab * hidden


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_slim_target_drafts_what_the_whole_target_drafts(offline_hub, family, dtype):
    """Through the services' loaders, for a sharded checkpoint too (tiny-qwen3), at the run precision
    the drafter service picks (float32: the machine's draft precision; bfloat16: as loaded)."""
    placement = Placement(dtype, "cpu")
    repo_id = f"tiny-org/tiny-{family}"
    slim = load_drafter_target(repo_id, placement=placement)
    full = load_served_target(repo_id, placement=placement)
    assert isinstance(slim.model, TargetEmbedHead) and isinstance(full.model, TargetModel)
    assert slim.model.dtype == full.model.dtype == getattr(torch, dtype)
    for drafter in (f"{repo_id}-dflash", "random"):
        from_slim, _ = load_served_drafter(slim, drafter)
        from_full, _ = load_served_drafter(full, drafter)
        assert from_slim.precision == from_full.precision
        width = len(from_slim.target_layer_ids) * slim.model.config.hidden_size
        steps = requests(width, seed=len(drafter))
        assert drafts(from_slim, steps) == drafts(from_full, steps), (family, dtype, drafter)


def test_the_drafter_service_loads_the_slim_target(offline_hub):
    from services.drafter.server import DrafterServicer

    config = DrafterServiceConfig(target="tiny-org/tiny-qwen3", drafter="tiny-org/tiny-qwen3-dflash", dtype="bfloat16")
    servicer = DrafterServicer(config, runner=None)
    servicer.load()
    assert isinstance(servicer.drafter.target, TargetEmbedHead)
    assert servicer.drafter.dtype == torch.bfloat16 and servicer.name == "tiny-org/tiny-qwen3-dflash"
    assert servicer.feature_size == 2 * servicer.drafter.target.config.hidden_size
    servicer.pool.shutdown()
    full = load_served_target("tiny-org/tiny-qwen3", placement=Placement("bfloat16"))
    reference, _ = load_served_drafter(full, "tiny-org/tiny-qwen3-dflash")
    steps = requests(servicer.feature_size, seed=7)
    assert drafts(servicer.drafter, steps) == drafts(reference, steps)


def test_weights_without_the_lm_head_are_refused(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    (tmp_path / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="lack 'lm_head.weight' and the config does not tie embeddings"):
        TargetEmbedHead.from_pretrained(tmp_path)


def test_a_loaded_drafter_checkpoint_drafts_the_same_beside_either(tiny_llama_dir, tmp_path):
    full = TargetModel.from_pretrained(tiny_llama_dir)
    path = DFlashDrafter.random(full.config, num_hidden_layers=2, block_size=8, seed=2).save_pretrained(tmp_path / "d")
    slim = TargetEmbedHead.from_pretrained(tiny_llama_dir)
    for precision in ("fp32", "bf16", None):
        a = LocalDrafter(DFlashDrafter.from_pretrained(path), full, precision=precision)
        b = LocalDrafter(DFlashDrafter.from_pretrained(path), slim, precision=precision)
        steps = requests(len(a.target_layer_ids) * full.config.hidden_size, seed=3)
        assert drafts(a, steps) == drafts(b, steps), precision
