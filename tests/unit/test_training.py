"""Drafter data and training code on tiny random models."""

from __future__ import annotations

import json
import random

import pytest
import torch

from blockpilot.decoding.drafting import DraftRequest, LocalDrafter
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.models.drafter import DFlashDrafter, DraftHead
from blockpilot.errors import InvalidArgumentError
from blockpilot.models.target import TargetModel
from blockpilot.training.data import generate_batch, generate_dataset, read_dataset, DataConfig
from blockpilot.training.train import (
    IGNORE, FeatureCache, TrainConfig, drafter_loss, pack_blocks, replay_tau, sample_anchors, split_records, train_drafter,
)


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return TargetModel.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def drafter(target):
    return DFlashDrafter.random(target.config, num_hidden_layers=1, block_size=5, target_layer_ids=[1, 3], mask_token_id=4, seed=2)


def test_batched_generation_equals_single_sequence_greedy(target):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]
    results = generate_batch(target, prompts, 12, stop_ids=set(), temperature=0.0, generator=torch.Generator())
    for prompt, (response, reason) in zip(prompts, results):
        alone = SpeculativeDecoder(target).generate(prompt, SamplingParams(max_new_tokens=12), 1).token_ids
        assert response == alone and reason == "length"


def test_pack_blocks_layout():
    packed = pack_blocks(list(range(100, 110)), [3, 8], block_size=4, mask_token_id=1, gamma=2.0)
    assert packed.tokens.tolist() == [103, 1, 1, 1, 108, 1, 1, 1]
    assert packed.positions.tolist() == [3, 4, 5, 6, 8, 9, 10, 11]
    assert packed.labels.tolist() == [IGNORE, 104, 105, 106, IGNORE, 109, IGNORE, IGNORE]
    assert packed.weights[1].item() == pytest.approx(1.0) and packed.weights[2].item() == pytest.approx(2.718281 ** -0.5, rel=1e-4)
    # Anchor 3's block sees context 0..2 and its own block only.
    row = packed.mask[1]
    assert row[:10].tolist() == [True] * 3 + [False] * 7
    assert row[10:].tolist() == [True] * 4 + [False] * 4


def test_anchors_lie_inside_the_response():
    rng = random.Random(0)
    for _ in range(50):
        anchors = sample_anchors(prompt_len=7, seq_len=30, count=10, rng=rng)
        assert all(7 <= a <= 28 for a in anchors) and len(set(anchors)) == len(anchors)
    assert sample_anchors(7, 8, 4, rng) == []


def test_training_blocks_see_exactly_what_the_decoding_loop_feeds(target, drafter):
    """The packed training forward gives, for each anchor, the same draft logits as the in-process
    draft session after the loop has fed it the context before that anchor."""
    token_ids = [5, 6, 7, 8, 9] + SpeculativeDecoder(target).generate([5, 6, 7, 8, 9], SamplingParams(max_new_tokens=20), 1).token_ids
    features = FeatureCache(target, drafter.target_layer_ids).get(0, token_ids)
    anchors = [5, 9, 16]
    packed = pack_blocks(token_ids, anchors, drafter.block_size, drafter.config.mask_token_id, gamma=4.0)
    with torch.no_grad():
        hidden = drafter(target.embed(packed.tokens)[None], features[None], None, packed.positions[None],
                         torch.arange(len(token_ids))[None], mask=packed.mask[None, None])[0]
    packed_logits = target.lm_head(hidden).view(len(anchors), drafter.block_size, -1)[:, 1:]  # full vocabulary
    for i, anchor in enumerate(anchors):
        session = LocalDrafter(drafter, target).open_session(64)
        # The loop feeds the prompt, then each step's anchor + accepted tokens: split the context
        # in two pieces to exercise the cache as well.
        half = anchor // 2
        session.propose(DraftRequest(token_ids[half], half, drafter.block_size - 1, features[:half], 0))
        draft = session.propose(DraftRequest(token_ids[anchor], anchor, drafter.block_size - 1, features[half:anchor], half))
        expected = packed_logits[i].argmax(-1)
        assert torch.equal(draft.tokens, expected), anchor


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(target):
    drafter = DFlashDrafter.random(target.config, num_hidden_layers=1, block_size=4, mask_token_id=4, seed=0).train().requires_grad_(True)
    token_ids = [5, 6, 7] + SpeculativeDecoder(target).generate([5, 6, 7], SamplingParams(max_new_tokens=30), 1).token_ids
    features = FeatureCache(target, drafter.target_layer_ids).get(0, token_ids)
    packed = pack_blocks(token_ids, sample_anchors(3, len(token_ids), 12, random.Random(0)), 4, 4, gamma=4.0)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss, _ = drafter_loss(drafter, DraftHead(target.lm_head.weight, None), target.embed_tokens, features, packed)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # The frozen target got no gradient.
    assert all(p.grad is None for p in target.parameters())


class _TinyTokenizer:
    stop_token_ids = (2,)

    def encode_chat(self, messages, template_kwargs=None):
        return [1] + [3 + (ord(c) % 90) for c in messages[0]["content"]][:10]


def test_data_generation_resumes_and_training_runs_end_to_end(target, tmp_path):
    prompts = tmp_path / "train.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"t/{i}", "dataset": "t", "turns": [f"prompt number {i}"]}) + "\n" for i in range(6)))
    out = tmp_path / "data"
    cfg = DataConfig(prompts_per_file=6, sample_fraction=0.5, max_new_tokens=16, batch_size=4, refill_min=1, shard_records=3)
    info = {"name": "tiny", "weights_digest": "d1", "vocab_size": target.config.vocab_size}
    first = generate_dataset(target, _TinyTokenizer(), [prompts], out, cfg, target_info=info, progress=False)
    again = generate_dataset(target, _TinyTokenizer(), [prompts], out, cfg, target_info=info, progress=False)
    assert first["written"]["records"] > 6 and first["written"]["shards"] >= 3 and again["written"]["records"] == 0
    records = read_dataset(out)
    assert len(records) == first["written"]["records"] and {r["mode"] for r in records} == {"greedy", "sample"}

    train_cfg = TrainConfig(num_draft_layers=1, block_size=4, mask_token_id=4, draft_vocab_size=40, anchors_per_sequence=6, sequences_per_step=2,
                            steps=6, eval_every=3, save_every=3, eval_sequences=2, holdout_fraction=0.2)
    summary = train_drafter(target, records, tmp_path / "run", train_cfg, progress=False)
    assert summary["steps"] == 6 and len(summary["history"]) == 2
    assert 1.0 <= summary["history"][-1]["holdout_replay_tau"] <= 4.0
    saved = DFlashDrafter.from_pretrained(tmp_path / "run" / "drafter")
    # Resuming a finished run is a no-op that keeps the checkpoint.
    more = train_drafter(target, records, tmp_path / "run", TrainConfig(**{**train_cfg.__dict__, "steps": 8}), progress=False)
    assert more["steps"] == 8 and len(more["history"]) == 3
    assert saved.config.block_size == 4 and saved.config.draft_vocab_size == 40
    # The draft vocabulary holds the most frequent response tokens and every draft stays inside it.
    assert len(set(saved.draft_vocab.tolist())) == 40
    session = LocalDrafter(saved, target).open_session(64)
    draft = session.propose(DraftRequest(5, 3, 3, FeatureCache(target, saved.target_layer_ids).get(0, [5, 6, 7, 8])[:3], 0))
    assert set(draft.tokens.tolist()) <= set(saved.draft_vocab.tolist())

    # A run continuing from this drafter on a grown file holds out exactly the first run's ids.
    held = json.loads((tmp_path / "run" / "holdout_ids.json").read_text())
    assert held and set(held) == {r["id"] for r in records if r["id"] in held}
    grown = records + [{**records[0], "id": "t/new", "mode": "greedy"}]
    train, holdout = split_records(grown, 0.5, 1, holdout_ids=held)
    assert {r["id"] for r in holdout} == set(held) and "t/new" in {r["id"] for r in train}
    continued = train_drafter(target, grown, tmp_path / "run2", TrainConfig(**{**train_cfg.__dict__, "steps": 2, "eval_every": 2}),
                              init_from=tmp_path / "run" / "drafter", holdout_ids=held, progress=False)
    assert continued["holdout_records"] == len(holdout)
    assert json.loads((tmp_path / "run2" / "holdout_ids.json").read_text()) == sorted(held)


def test_holdout_id_list_errors_are_one_line(tmp_path):
    from blockpilot.cli import read_id_list

    bad = tmp_path / "ids.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(InvalidArgumentError, match="non-empty JSON list"):
        read_id_list(bad)
    with pytest.raises(InvalidArgumentError, match="cannot read the id list"):
        read_id_list(tmp_path / "missing.json")


def test_replay_tau_walks_the_whole_response(target, drafter):
    token_ids = [5, 6, 7] + SpeculativeDecoder(target).generate([5, 6, 7], SamplingParams(max_new_tokens=21), 1).token_ids
    features = FeatureCache(target, drafter.target_layer_ids).get(0, token_ids)
    lengths = replay_tau(drafter, target, DraftHead(target.lm_head.weight, None), features, token_ids, 3, drafter.block_size)
    assert all(1 <= n <= drafter.block_size for n in lengths)
    # Every recorded token after the first response token is committed exactly once (no bonus past the end).
    assert 3 + 1 + sum(lengths) == len(token_ids)


def test_eval_report_replay_tau_matches_real_decoding(target, tmp_path):
    from blockpilot.training.evaluate import EvalConfig, evaluate_drafter, format_table

    for name in ("alpha", "beta"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": f"{name}/{i}", "dataset": name, "turns": [f"{name} question {i}"]}) + "\n" for i in range(2)))
    drafter = DFlashDrafter.random(target.config, num_hidden_layers=1, block_size=4, mask_token_id=4, seed=5)
    cfg = EvalConfig(datasets=("alpha", "beta"), prompts_per_dataset=2, max_new_tokens=24, sweep_radius=2)
    report = evaluate_drafter(target, _TinyTokenizer(), drafter, tmp_path, cfg, progress=False)
    assert report["sweep"] == [2, 3, 4, 5, 6]
    assert set(report["datasets"]) == {"alpha", "beta"} and report["overall"]["prompts"] == 4
    assert list(report["overall"]["decodes"]) == ["dflash", "dflash+lookup", "lookup"]
    for row in report["prompts"]:
        assert all(decode["equals_ar"] for decode in row["decodes"].values())
        # At T=0 the replay over the recorded greedy continuation is the real loop's τ.
        assert row["replay_tau"][4] == pytest.approx(row["decodes"]["dflash"]["tau"])
        assert row["decodes"]["lookup"]["block_size"] == 1
        assert row["best_block_size"] in report["sweep"]
    assert report["overall"]["decodes"]["dflash+lookup"]["lossless_prompts"] == 4
    assert "t1_tau_min_p_q" in report["overall"]
    table = format_table(report)
    assert table.splitlines()[0].startswith("dataset | n | B=2") and "dflash+lookup B=4 speed-up" in table and "ALL" in table

    # Shards over disjoint datasets (one process per core), merged after a JSON round trip, are
    # the report of one run over all of them.
    from blockpilot.training.evaluate import merge_reports

    shards = [json.loads(json.dumps({**evaluate_drafter(target, _TinyTokenizer(), drafter, tmp_path,
                                                          EvalConfig(**{**cfg.__dict__, "datasets": (name,)}), progress=False),
                                       "drafter": "d", "backend": "torch"})) for name in ("alpha", "beta")]
    merged = merge_reports(shards)
    assert merged["overall"]["replay_tau"] == pytest.approx(report["overall"]["replay_tau"])
    assert merged["overall"]["prompts"] == 4 and set(merged["datasets"]) == {"alpha", "beta"}
    with pytest.raises(InvalidArgumentError, match="share prompts"):
        merge_reports([shards[0], shards[0]])
    with pytest.raises(InvalidArgumentError, match="differ in backend"):
        merge_reports([shards[0], {**shards[1], "backend": "onnxruntime"}])


def test_read_dataset_ignores_only_a_cut_last_line(tmp_path):
    from blockpilot.errors import InvalidArgumentError
    from blockpilot.training.data import read_dataset

    good = json.dumps({"id": "a", "mode": "greedy", "prompt_ids": [1], "response_ids": [2]})
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n" + good[:10])
    assert len(read_dataset(path)) == 1
    path.write_text(good[:10] + "\n" + good + "\n")
    with pytest.raises(InvalidArgumentError, match="line 1"):
        read_dataset(path)


def test_accept_until_fail_keeps_the_accepted_prefix_and_the_first_miss():
    from blockpilot.training.train import accept_until_fail_mask

    hits = torch.tensor([[False, True, True, False, True],
                         [False, False, True, True, True],
                         [False, True, True, True, True]])
    labelled = torch.tensor([[False, True, True, True, True],
                             [False, True, True, True, True],
                             [False, True, True, True, False]])  # the sequence ends after position 3
    assert accept_until_fail_mask(hits, labelled).tolist() == [
        [False, True, True, True, False],
        [False, True, False, False, False],
        [False, True, True, True, False]]


def test_accept_until_fail_loss_equals_a_slow_per_block_reference(target, drafter):
    from torch.nn import functional as F

    from blockpilot.training.train import drafter_loss

    token_ids = [random.Random(5).randrange(5, 60) for _ in range(40)]
    features = FeatureCache(target, drafter.target_layer_ids).get(0, token_ids)
    packed = pack_blocks(token_ids, [6, 12, 20, 30, 36], drafter.block_size, 4, gamma=2.0)
    head = DraftHead(target.lm_head.weight.detach(), drafter.draft_vocab)
    decayed, _ = drafter_loss(drafter, head, target.embed_tokens, features, packed)
    truncated, _ = drafter_loss(drafter, head, target.embed_tokens, features, packed, accept_until_fail=1.0)
    mixed, _ = drafter_loss(drafter, head, target.embed_tokens, features, packed, accept_until_fail=0.25)
    # Slow reference: walk each block, stop after the first wrong argmax.
    hidden = drafter(target.embed(packed.tokens)[None], features[None], None, packed.positions[None],
                     torch.arange(len(token_ids))[None], mask=packed.mask[None, None])[0]
    total, weight_sum = 0.0, 0.0
    block = drafter.block_size
    for a in range(len(packed.anchors)):
        for k in range(1, block):
            i = a * block + k
            if packed.weights[i] <= 0:
                break
            logits = head.logits(hidden[i : i + 1])
            label = int(head.index_of[packed.labels[i]])
            total += float(packed.weights[i] * F.cross_entropy(logits, torch.tensor([label])))
            weight_sum += float(packed.weights[i])
            if int(logits.argmax()) != label:
                break
    assert truncated.item() == pytest.approx(total / weight_sum, rel=1e-5)
    assert mixed.item() == pytest.approx(0.75 * decayed.item() + 0.25 * truncated.item(), rel=1e-5)
    assert weight_sum < float(packed.weights.sum())  # an untrained drafter misses early: positions were dropped


def test_feature_store_on_disk_and_bf16_features(target, drafter, tiny_llama_dir, tmp_path):
    """A feature directory is read back (float16 on disk, not held in memory) and a bf16 compute
    target writes a store of its own, close to the fp32 features."""
    token_ids = [5, 6, 7, 8, 9, 10, 11]
    layers = drafter.target_layer_ids
    exact = FeatureCache(target, layers).get(0, token_ids)
    store = FeatureCache(target, layers, tmp_path)
    first = store.get(0, token_ids)
    assert not store._store and len(list(store.directory.glob("*.pt"))) == 1
    torch.testing.assert_close(store.get(0, token_ids), first)
    torch.testing.assert_close(first, exact, rtol=2e-3, atol=2e-3)  # float16 storage
    bf16 = FeatureCache(target, layers, tmp_path, compute_target=TargetModel.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16))
    assert bf16.directory != store.directory and bf16.directory.name.endswith("-bf16")
    rounded = bf16.get(0, token_ids)
    assert rounded.dtype == torch.float32
    assert (rounded - exact).abs().max() <= 0.05 * exact.abs().max()


def test_distill_targets_renormalise_over_the_draft_vocabulary():
    from blockpilot.training.train import distill_targets

    index_of = torch.tensor([-1, 0, 1, -1, 2])  # draft vocabulary: target ids 1, 2, 4
    ids = torch.tensor([[3, 1, 4], [0, 3, 0]])  # row 1: nothing inside the draft vocabulary
    logits = torch.tensor([[5.0, 1.0, 1.0], [2.0, 1.0, 0.0]])
    index, probs = distill_targets(ids, logits, index_of)
    assert index.tolist() == [[0, 0, 2], [0, 0, 0]]
    assert probs.tolist() == [[0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]


def test_distilled_loss_equals_a_slow_per_position_reference(target, drafter):
    """Labels become the target's argmax at the position before each label; the loss mixes CE on
    it with CE against the target's top-k distribution (renormalised over the draft vocabulary)."""
    from torch.nn import functional as F

    from blockpilot.training.train import drafter_loss

    token_ids = [random.Random(7).randrange(5, 60) for _ in range(40)]  # not the target's greedy text
    features, teacher = FeatureCache(target, drafter.target_layer_ids, teacher_top_k=6).fetch(0, token_ids)
    with torch.no_grad():
        full = target(torch.tensor([token_ids]), target.new_cache(len(token_ids))).logits[0]
    assert torch.equal(teacher.ids[:, 0], full.argmax(-1))
    # A draft vocabulary without the second choices of some rows (renormalised away).
    left_out = set(full.topk(2).indices[::3, 1].tolist())
    draft_vocab = torch.tensor([t for t in range(target.config.vocab_size) if t not in left_out])
    head = DraftHead(target.lm_head.weight.detach(), draft_vocab)
    packed = pack_blocks(token_ids, [6, 12, 20, 30, 36], drafter.block_size, 4, gamma=2.0)
    mixed, _ = drafter_loss(drafter, head, target.embed_tokens, features, packed, teacher=teacher, distill=0.3)
    hidden = drafter(target.embed(packed.tokens)[None], features[None], None, packed.positions[None],
                     torch.arange(len(token_ids))[None], mask=packed.mask[None, None])[0]
    total, weight_sum, differ = 0.0, 0.0, 0
    for i in range(len(packed.tokens)):
        if packed.weights[i] <= 0:
            continue
        row = int(packed.positions[i]) - 1
        label = int(full[row].argmax())
        differ += label != int(packed.labels[i])
        if int(head.index_of[label]) < 0:
            continue
        log_q = F.log_softmax(head.logits(hidden[i]), -1)
        top = full[row].topk(6)
        keep = [(int(t), float(v)) for t, v in zip(top.indices, top.values) if int(head.index_of[t]) >= 0]
        p = torch.softmax(torch.tensor([v for _, v in keep]), -1)
        soft = -sum(float(p[j]) * float(log_q[head.index_of[t]]) for j, (t, _) in enumerate(keep))
        hard = -float(log_q[head.index_of[label]])
        total += float(packed.weights[i]) * (0.7 * hard + 0.3 * soft)
        weight_sum += float(packed.weights[i])
    assert differ > 0  # the argmax labels replaced recorded ones
    assert mixed.item() == pytest.approx(total / weight_sum, rel=1e-4)


def test_teacher_labels_equal_the_recorded_tokens_of_a_greedy_response(target, drafter):
    token_ids = [5, 6, 7] + SpeculativeDecoder(target).generate([5, 6, 7], SamplingParams(max_new_tokens=30), 1).token_ids
    features, teacher = FeatureCache(target, drafter.target_layer_ids, teacher_top_k=4).fetch(0, token_ids)
    packed = pack_blocks(token_ids, [3, 10, 20], drafter.block_size, 4, gamma=4.0)
    head = DraftHead(target.lm_head.weight.detach(), drafter.draft_vocab)
    recorded, _ = drafter_loss(drafter, head, target.embed_tokens, features, packed)
    argmax, _ = drafter_loss(drafter, head, target.embed_tokens, features, packed, teacher=teacher, distill=0.0)
    assert argmax.item() == pytest.approx(recorded.item(), rel=1e-6)


def test_distillation_moves_the_draft_distribution_towards_the_target(target):
    drafter = DFlashDrafter.random(target.config, num_hidden_layers=1, block_size=4, mask_token_id=4, seed=0).train().requires_grad_(True)
    token_ids = [random.Random(3).randrange(5, 60) for _ in range(30)]
    features, teacher = FeatureCache(target, drafter.target_layer_ids, teacher_top_k=target.config.vocab_size).fetch(0, token_ids)
    packed = pack_blocks(token_ids, [2, 9, 15, 22], 4, 4, gamma=4.0)
    head = DraftHead(target.lm_head.weight.detach(), None)

    def kl() -> float:  # KL(target || drafter) over the labelled block positions, full vocabulary
        with torch.no_grad():
            hidden = drafter(target.embed(packed.tokens)[None], features[None], None, packed.positions[None],
                             torch.arange(len(token_ids))[None], mask=packed.mask[None, None])[0]
        keep = packed.weights > 0
        rows = packed.positions[keep] - 1
        p = torch.zeros(len(rows), target.config.vocab_size).scatter_(1, teacher.ids[rows], torch.softmax(teacher.logits[rows], -1))
        return float(torch.nn.functional.kl_div(torch.log_softmax(head.logits(hidden[keep]), -1), p, reduction="batchmean"))

    optimizer = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    before = kl()
    for _ in range(20):
        optimizer.zero_grad()
        loss, _ = drafter_loss(drafter, head, target.embed_tokens, features, packed, teacher=teacher, distill=1.0)
        loss.backward()
        optimizer.step()
    assert kl() < 0.5 * before


def test_teacher_store_completes_a_store_made_without_it(target, drafter, tmp_path):
    token_ids = [5, 6, 7, 8, 9, 10, 11]
    layers = drafter.target_layer_ids
    plain = FeatureCache(target, layers, tmp_path)
    first = plain.get(0, token_ids)
    (feature_file,) = plain.directory.glob("*.pt")
    written = feature_file.stat().st_mtime_ns
    with_teacher = FeatureCache(target, layers, tmp_path, teacher_top_k=5)
    features, teacher = with_teacher.fetch(0, token_ids)
    assert feature_file.stat().st_mtime_ns == written and torch.equal(features, first)
    assert sorted(p.name for p in with_teacher.directory.iterdir()) == sorted([feature_file.name, feature_file.stem + ".top5.pt"])
    assert teacher.ids.shape == (len(token_ids), 5) and teacher.ids.dtype == torch.long
    again = FeatureCache(target, layers, tmp_path, teacher_top_k=5).fetch(0, token_ids)[1]
    assert torch.equal(again.ids, teacher.ids) and torch.equal(again.logits, teacher.logits)
    with torch.no_grad():
        logits = target(torch.tensor([token_ids]), target.new_cache(len(token_ids))).logits[0]
    torch.testing.assert_close(teacher.logits, logits.topk(5).values, rtol=2e-3, atol=2e-3)  # float16 storage
