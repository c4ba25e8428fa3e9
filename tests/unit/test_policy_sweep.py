"""Policy sweeps on tiny random models: the replayed loop equals real decoding, resumption, layout."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from blockpilot.decoding.drafting import LocalDrafter
from blockpilot.decoding.lookup import LookupConfig
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError
from blockpilot.models.drafter import DFlashDrafter, DraftHead
from blockpilot.models.target import TargetModel
from blockpilot.policy.features import model_fingerprint
from blockpilot.policy.sweep import (
    RECORDS_FILE, CostModel, SweepConfig, SweepModels, default_candidates, feature_file, load_sweep,
    prefill_like_the_loop, read_cost_model, replay_greedy, run_sweep,
)
from blockpilot.training.train import FeatureCache, drafter_loss, pack_blocks, sample_anchors
from fake_drafters import OracleDrafter

STOP = 2


class TinyTokenizer:
    """Chat 'template' for the tiny models: BOS, one id per character, then an end-of-prompt id."""

    stop_token_ids = (STOP,)

    def encode_chat(self, messages):
        return [1] + [5 + (ord(c) % 80) for c in messages[0]["content"]][:12] + [3]


def prompts_for(names, per_name=3):
    return [{"id": f"{name}/{i}", "dataset": name, "text": f"{name} {i} {'x' * (i % 4)}"} for name in names for i in range(per_name)]


def train_tiny_drafter(target: TargetModel, prompts, *, block_size=5, steps=60, seed=0, max_new_tokens=24) -> DFlashDrafter:
    """A tiny DFlash drafter fitted to the target's greedy continuations of `prompts`, so that it
    accepts drafts there (a random one accepts almost nothing and would make replay checks trivial)."""
    torch.manual_seed(seed)
    drafter = DFlashDrafter.random(target.config, num_hidden_layers=1, block_size=block_size, target_layer_ids=[1, 3],
                                   mask_token_id=4, seed=seed).train().requires_grad_(True)
    decoder = SpeculativeDecoder(target)
    sequences = []
    for prompt in prompts:
        ids = TinyTokenizer().encode_chat([{"role": "user", "content": prompt["text"]}])
        out = decoder.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(STOP,)), 1)
        sequences.append((len(ids), ids + out.token_ids))
    cache = FeatureCache(target, drafter.target_layer_ids)
    head = DraftHead(target.lm_head.weight.detach(), None)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    rng = random.Random(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        for index, (prompt_len, tokens) in enumerate(sequences):
            anchors = sample_anchors(prompt_len, len(tokens), 16, rng)
            if anchors:
                packed = pack_blocks(tokens, anchors, block_size, 4, gamma=4.0)
                loss, _ = drafter_loss(drafter, head, target.embed_tokens, cache.get(index, tokens), packed)
                loss.backward()
        optimizer.step()
    return drafter.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return TargetModel.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def trained_drafter(target):
    return train_tiny_drafter(target, prompts_for(["alpha", "beta"]))


@pytest.fixture(scope="module")
def models(target, trained_drafter):
    return SweepModels(target, LocalDrafter(trained_drafter, target), TinyTokenizer(), model_fingerprint("tiny", target),
                       model_fingerprint("tiny-drafter", trained_drafter))


FIXED_COST = CostModel(context_tokens=20, verify_s={k: 0.01 + 0.002 * k for k in range(1, 9)},
                       draft_s={k: 0.004 + 0.001 * k for k in range(2, 9)}, threads=1)


def _context(target, sequence, prompt_len, layers):
    with torch.inference_mode():
        _, cache, prompt_context = prefill_like_the_loop(target, sequence[:prompt_len], layers, len(sequence))
        rest = target(torch.tensor([sequence[prompt_len:-1]]), cache, num_logits=0, hidden_layer_ids=layers)
        return torch.cat([prompt_context, rest.hidden[0]])


@pytest.mark.parametrize("stop_ids", [(), None], ids=["length", "stop"])
def test_replay_gives_the_real_loops_steps_with_an_oracle_drafter(target, stop_ids):
    """Per-step acceptance lengths, including full-block acceptance and the request's last steps
    (max_new_tokens reached, or a stop token inside an accepted block)."""
    prompt = [5, 6, 7, 8]
    reference = SpeculativeDecoder(target).generate(prompt, SamplingParams(max_new_tokens=40), 1).token_ids
    if stop_ids is None:
        stop_ids = (reference[20],)  # ends the reply after 21 tokens at the latest
    params = SamplingParams(max_new_tokens=40, stop_token_ids=stop_ids)
    greedy = SpeculativeDecoder(target).generate(prompt, params, 1)
    sequence = prompt + greedy.token_ids
    context = _context(target, sequence, len(prompt), (0,))
    # The same request replayed over the continuation recorded without stop tokens: the replay
    # must stop at the stop token as the loop does, not at the end of what was recorded.
    unstopped = prompt + reference
    unstopped_context = _context(target, unstopped, len(prompt), (0,))
    full_blocks = 0
    for block_size in (2, 3, 5, 8):
        for accuracy in (0.5, 0.9, 1.0):
            real = SpeculativeDecoder(target, OracleDrafter(sequence, 97, accuracy, block_size=block_size, seed=3))
            decoded = real.generate(prompt, params, block_size)
            assert decoded.token_ids == greedy.token_ids
            for recorded, features in ((sequence, context), (unstopped, unstopped_context)):
                replayed = replay_greedy(OracleDrafter(recorded, 97, accuracy, block_size=block_size, seed=3), recorded,
                                         len(prompt), features, block_size, params.max_new_tokens, stop_ids)
                assert list(replayed.acceptance_lengths) == decoded.acceptance_lengths, (block_size, accuracy, len(recorded))
            full_blocks += sum(n == block_size for n in decoded.acceptance_lengths)
    assert full_blocks > 10  # the comparison covered fully accepted blocks


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_replay_with_lookup_gives_the_real_loops_steps(target, block_size):
    """Lookup steps (no drafter call) interleaved with DFlash steps: the same steps, sizes and
    sources as the real loop."""
    prompt = [9, 8, 7, 6, 9, 8, 7, 6, 9]
    params = SamplingParams(max_new_tokens=48)
    greedy = SpeculativeDecoder(target).generate(prompt, params, 1)
    sequence = prompt + greedy.token_ids
    context = _context(target, sequence, len(prompt), (0,))
    lookup = LookupConfig(min_ngram=1, max_ngram=3, max_tokens=6, max_tokens_by_ngram=(2, 4, 6))
    decoded = SpeculativeDecoder(target, OracleDrafter(sequence, 97, 0.6, block_size=8, seed=1)).generate(
        prompt, params, block_size, lookup=lookup)
    assert decoded.token_ids == greedy.token_ids
    replayed = replay_greedy(OracleDrafter(sequence, 97, 0.6, block_size=8, seed=1), sequence, len(prompt), context,
                             block_size, params.max_new_tokens, (), lookup)
    assert list(replayed.acceptance_lengths) == decoded.acceptance_lengths
    assert list(replayed.verify_sizes) == decoded.verify_sizes
    assert list(replayed.sources) == decoded.step_sources
    assert "lookup" in replayed.sources


def test_replay_of_an_immediate_stop_has_no_step(target):
    prompt = [5, 6, 7]
    first = SpeculativeDecoder(target).generate(prompt, SamplingParams(max_new_tokens=5), 1).token_ids[0]
    result = replay_greedy(None, prompt + [first], 3, None, 1, 5, (first,))
    assert result.acceptance_lengths == () and result.verify_sizes == ()
    with pytest.raises(ValueError, match="needs a drafter"):
        replay_greedy(None, prompt + [first, 9], 3, None, 4, 5, ())


def test_replay_sweep_equals_decode_sweep(models, tmp_path):
    """Replay mode (batched generation, teacher-forced features, replayed drafter calls) gives the
    same steps, τ and features as decoding at every size, with a drafter that accepts drafts."""
    cfg = dict(candidates=(2, 3, 4, 5, 6, 7), max_new_tokens=24, batch_size=3)
    prompts = prompts_for(["alpha", "beta"])
    run_sweep(models, prompts, tmp_path / "replay", SweepConfig(mode="replay", **cfg), cost_model=FIXED_COST, progress=False)
    run_sweep(models, prompts, tmp_path / "decode", SweepConfig(mode="decode", **cfg), progress=False)
    replay, decode = load_sweep(tmp_path / "replay"), load_sweep(tmp_path / "decode")
    # Replay mode generates prompts of similar length together: the same prompts, maybe another order.
    decoded = {p["id"]: p for p in decode.prompts}
    assert sorted(decoded) == sorted(p["id"] for p in replay.prompts) == sorted(p["id"] for p in prompts)
    best_tau = 0.0
    for rp in replay.prompts:
        dp = decoded[rp["id"]]
        for size in (1, 2, 3, 4, 5, 6, 7):
            r, d = rp["by_size"][size], dp["by_size"][size]
            assert (r["mode"], d["mode"]) == ("replay", "decode")
            for key in ("acceptance_lengths", "verify_sizes", "steps", "tokens", "tau", "new_tokens", "finish_reason"):
                assert r[key] == d[key], (rp["id"], size, key)
            assert r["greedy_mismatches"] == d["greedy_mismatches"] == 0
            best_tau = max(best_tau, r["tau"])
        # Replay tokens/s come from the cost model: steps x (verify + draft) of each step's size.
        record = rp["by_size"][5]
        assert record["decode_s"] == pytest.approx(sum(FIXED_COST.step_s(k) for k in record["verify_sizes"]))
        for kind in ("last_logits", "final_hidden"):  # the same prefill call
            assert np.array_equal(replay.features(kind)[rp["feature_row"]], decode.features(kind)[dp["feature_row"]])
    assert best_tau > 1.5  # the drafter accepts: the comparison is not between all-ones


def test_features_are_the_prefill_hooks(models, tmp_path):
    prompts = prompts_for(["alpha"], per_name=2)
    run_sweep(models, prompts, tmp_path / "s", SweepConfig(candidates=(3, 4), max_new_tokens=8), cost_model=FIXED_COST, progress=False)
    sweep = load_sweep(tmp_path / "s")
    decoder = SpeculativeDecoder(models.target, models.drafter)
    for prompt in sweep.prompts:
        seen = {}

        def hook(info):
            seen["info"] = info
            return 1

        ids = TinyTokenizer().encode_chat([{"role": "user", "content": next(p["text"] for p in prompts if p["id"] == prompt["id"])}])
        decoder.generate(ids, SamplingParams(max_new_tokens=2), hook)
        row = prompt["feature_row"]
        assert np.array_equal(sweep.features("last_logits")[row], seen["info"].last_logits.numpy())
        assert np.array_equal(sweep.features("final_hidden")[row], seen["info"].final_hidden.numpy())
    assert sweep.manifest["feature_dims"] == {"last_logits": 97, "final_hidden": 64}
    assert feature_file(sweep.directory, "last_logits").stat().st_size == len(sweep.prompts) * 97 * 4


def test_an_interrupted_sweep_resumes_to_the_same_records(models, tmp_path):
    cfg = SweepConfig(candidates=(2, 3, 4), max_new_tokens=16, batch_size=2)
    prompts = prompts_for(["alpha", "beta", "gamma"], per_name=2)
    whole = tmp_path / "whole"
    run_sweep(models, prompts, whole, cfg, cost_model=FIXED_COST, progress=False)

    def interrupt(count):
        if count == 3:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(models, prompts, part, cfg, cost_model=FIXED_COST, progress=False, on_prompt_done=interrupt)
    assert len(load_sweep(part).prompts) == 3
    # What a kill in the middle of a write leaves: feature rows and half the records of a 4th prompt.
    lines = (whole / RECORDS_FILE).read_text().splitlines(keepends=True)
    with (part / RECORDS_FILE).open("a") as handle:
        handle.write(lines[3 * 4] + lines[3 * 4 + 1][:25])
    for kind, dim in (("last_logits", 97), ("final_hidden", 64)):
        with feature_file(part, kind).open("ab") as handle:
            handle.write(np.ones(dim + 3, dtype="<f4").tobytes())
    assert len(load_sweep(part).prompts) == 3  # readers ignore the tail
    summary = run_sweep(models, prompts, part, cfg, progress=False)
    assert summary["done_before"] == 3 and summary["swept"] == 3
    assert (part / RECORDS_FILE).read_text() == (whole / RECORDS_FILE).read_text()
    for kind in ("last_logits", "final_hidden"):
        assert feature_file(part, kind).read_bytes() == feature_file(whole, kind).read_bytes()
    again = run_sweep(models, prompts, part, cfg, progress=False)
    assert again["swept"] == 0 and again["total_prompts_in_sweep"] == 6


def test_a_folder_holds_one_sweep(models, tmp_path):
    run_sweep(models, prompts_for(["alpha"], 1), tmp_path, SweepConfig(candidates=(2, 3), max_new_tokens=6),
              cost_model=FIXED_COST, progress=False)
    with pytest.raises(FailedPreconditionError, match="candidates"):
        run_sweep(models, prompts_for(["alpha"], 1), tmp_path, SweepConfig(candidates=(2, 4), max_new_tokens=6), progress=False)
    # A corrupted line in the middle is an error, not silently dropped data.
    path = tmp_path / RECORDS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(["{bad\n"] + lines))
    with pytest.raises(InvalidArgumentError, match="line 1"):
        load_sweep(tmp_path)


def test_measured_cost_model_covers_every_size_and_round_trips(models, tmp_path):
    cfg = SweepConfig(candidates=(2, 3), max_new_tokens=6, cost_repeats=2)
    run_sweep(models, prompts_for(["alpha"], 1), tmp_path / "s", cfg, progress=False)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["cost_model_source"] == "measured"
    cost = read_cost_model(tmp_path / "s")
    assert cost.covers(3) and not cost.covers(4)
    assert all(v > 0 for v in [*cost.verify_s.values(), *cost.draft_s.values()])
    assert CostModel.from_json(json.loads(json.dumps(cost.to_json()))) == cost
    with pytest.raises(InvalidArgumentError, match="does not cover"):
        run_sweep(models, prompts_for(["alpha"], 1), tmp_path / "t", SweepConfig(candidates=(2, 3, 5), max_new_tokens=6),
                  cost_model=cost, progress=False)


def test_sweep_config_validation_and_default_candidates():
    assert default_candidates(8) == (5, 6, 7, 8, 9, 10, 11)
    assert default_candidates(4) == (2, 3, 4, 5, 6, 7)
    assert SweepConfig(candidates=(1, 3)).block_sizes == (1, 3)
    assert SweepConfig(candidates=(4, 5)).block_sizes == (1, 4, 5)
    for bad in [dict(candidates=()), dict(candidates=(5, 4)), dict(candidates=(0, 2)), dict(candidates=(2,), mode="guess"),
                dict(candidates=(2,), max_new_tokens=0)]:
        with pytest.raises(InvalidArgumentError):
            SweepConfig(**bad)
    with pytest.raises(InvalidArgumentError, match="'guess'"):
        SweepConfig(candidates=(2,), mode="guess")


def test_prompt_selection_excludes_ids_and_grows_by_superset(tmp_path):
    from blockpilot.errors import NotFoundError
    from blockpilot.policy.sweep import read_ids, select_prompts

    for name, count in (("a", 30), ("b", 5)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": f"{name}/{i}", "dataset": name, "turns": [f"q{i}"]}) + "\n" for i in range(count)))
    (tmp_path / "drafter_data.jsonl").write_text("".join(json.dumps({"id": f"a/{i}", "mode": "greedy"}) + "\n" for i in range(10)))
    excluded = read_ids([tmp_path / "drafter_data.jsonl"])
    # drafter_data.jsonl lies in the folder too: name the prompt files.
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    small = select_prompts(files, 8, seed=1, exclude_ids=excluded)
    large = select_prompts(files, 12, seed=1, exclude_ids=excluded)
    assert [p["dataset"] for p in small[:4]] == ["a", "b", "a", "b"]  # interleaved
    assert len([p for p in small if p["dataset"] == "a"]) == 8 and len([p for p in small if p["dataset"] == "b"]) == 5
    assert not {p["id"] for p in large} & excluded
    assert {p["id"] for p in small} <= {p["id"] for p in large}
    assert select_prompts(files, 8, seed=1, exclude_ids=excluded) == small
    assert {p["id"] for p in select_prompts(files, 8, seed=2)} != {p["id"] for p in small}
    with pytest.raises(NotFoundError, match="nowhere"):
        select_prompts([tmp_path / "nowhere"], 3)
    (tmp_path / "bad.jsonl").write_text('{"no_id": 1}\n')
    with pytest.raises(InvalidArgumentError, match="line 1"):
        read_ids([tmp_path / "bad.jsonl"])
