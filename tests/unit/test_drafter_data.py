"""The refilling-batch generator and the binary shard store of drafter data (tiny random models)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from blockpilot.decoding import acceptance
from blockpilot.errors import InvalidArgumentError, NotFoundError
from blockpilot.models.target import TargetModel
from blockpilot.training.data import (
    DataConfig, Job, RefillingBatch, generate_batch, generate_dataset, import_jsonl, read_dataset, resolve_precision,
    sample_mode_chosen,
)
from blockpilot.training.shards import ResponseRecord, ResponseStore

STOP = (5, 6, 7)  # frequent enough in a random model that rows finish at different steps


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return TargetModel.from_pretrained(tiny_llama_dir)


def _jobs(count: int, mode: str = "greedy", seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    return [Job(f"p{i}", "t", mode, tuple(rng.randrange(8, 60) for _ in range(rng.randrange(1, 12))), seed=1000 + i)
            for i in range(count)]


def _run(target, jobs, batch_size, refill_min, max_new=15) -> tuple[dict, object]:
    out: dict = {}
    stats = RefillingBatch(target, STOP, max_new, batch_size, refill_min).run(jobs, lambda j, r, why: out.__setitem__(j.id, (r, why)))
    return out, stats


@pytest.mark.parametrize("batch_size,refill_min", [(5, 2), (3, 1), (8, 8)])
def test_refilling_batch_greedy_equals_decoding_each_prompt_alone(target, batch_size, refill_min):
    jobs = _jobs(23)
    out, stats = _run(target, jobs, batch_size, refill_min)
    assert set(out) == {j.id for j in jobs}
    for job in jobs:
        alone = generate_batch(target, [list(job.prompt_ids)], 15, set(STOP), 0.0, torch.Generator())[0]
        assert out[job.id] == alone, job.id
    assert stats.refills >= 2 and stats.generated_tokens == sum(len(r) for r, _ in out.values())
    assert 0 < stats.row_utilization <= 1


def test_refilling_batch_rows_finish_for_the_right_reason(target):
    out, _ = _run(target, _jobs(12), 4, 1, max_new=9)
    for response, reason in out.values():
        assert 1 <= len(response) <= 9
        assert (reason == "stop") == (response[-1] in STOP) and (reason == "length") == (len(response) == 9 and response[-1] not in STOP)
        assert not any(t in STOP for t in response[:-1])


def _sample_alone(target, job: Job, max_new: int) -> list[int]:
    """Reference: one prompt, one uniform per step from the job's own generator, inverse-CDF draw."""
    generator = torch.Generator().manual_seed(job.seed)
    cache = target.new_cache(len(job.prompt_ids) + max_new)
    with torch.inference_mode():
        logits = target(torch.tensor([job.prompt_ids]), cache, num_logits=1).logits[:, -1]
        response = []
        while True:
            token = int(acceptance.sample_categorical(acceptance.probs_from_logits(logits, 1.0),
                                                      acceptance.draw_uniforms(generator, 1).float())[0])
            response.append(token)
            if token in STOP or len(response) == max_new:
                return response
            logits = target(torch.tensor([[token]]), cache, num_logits=1).logits[:, -1]


def test_sample_rows_draw_from_their_own_generator_whatever_the_batch(target):
    jobs = _jobs(14, mode="sample", seed=3) + _jobs(6, mode="greedy", seed=4)
    jobs = [Job(j.id + j.mode, j.dataset, j.mode, j.prompt_ids, j.seed) for j in jobs]
    random.Random(0).shuffle(jobs)
    first, _ = _run(target, jobs, 4, 2)
    second, _ = _run(target, list(reversed(jobs)), 6, 1)
    for job in jobs:
        assert first[job.id] == second[job.id]
        if job.mode == "sample":
            assert first[job.id][0] == _sample_alone(target, job, 15)


def test_sample_mode_choice_is_a_stable_share_of_prompts():
    ids = [f"x/{i}" for i in range(4000)]
    chosen = [sample_mode_chosen(i, 0.3, seed=0) for i in ids]
    assert 0.27 < sum(chosen) / len(ids) < 0.33
    assert chosen == [sample_mode_chosen(i, 0.3, seed=0) for i in ids]
    assert not any(sample_mode_chosen(i, 0.0, 0) for i in ids) and all(sample_mode_chosen(i, 1.0, 0) for i in ids)


def test_precision_auto_follows_the_cpu_and_bad_names_are_refused(monkeypatch):
    import blockpilot.training.data as data

    monkeypatch.setattr(data, "native_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(data, "native_bf16", lambda: False)
    assert resolve_precision("auto") == "fp32" and resolve_precision("bf16") == "bf16"
    with pytest.raises(InvalidArgumentError, match="'fp8'"):
        resolve_precision("fp8")


# ---- the shard store ---------------------------------------------------------------------------

INFO = {"name": "tiny", "weights_digest": "abc", "vocab_size": 100}


def _record(i: int, mode: str = "greedy") -> ResponseRecord:
    return ResponseRecord(f"r/{i}", "d", mode, [1, 2, i], [i + 3] * (i % 4 + 1), "stop")


def test_store_round_trip_dedupe_and_order(tmp_path):
    store = ResponseStore(tmp_path / "s")
    store.bind_target(INFO)
    assert store.write_shard([_record(i) for i in range(5)], {"precision": "fp32"})["records"] == 5
    entry = store.write_shard([_record(3), _record(3, "sample"), _record(7)], {})
    assert entry["records"] == 2 and store.write_shard([_record(7)], {}) is None
    reopened = ResponseStore.open_existing(tmp_path / "s")
    records = list(reopened.records())
    assert [r.id for r in records] == ["r/0", "r/1", "r/2", "r/3", "r/4", "r/3", "r/7"]
    assert records[5] == _record(3, "sample") and records[0] == _record(0)
    assert reopened.summary()["records"] == 7
    assert reopened.summary()["response_tokens"] == sum(len(r.response_ids) for r in records)
    with np.load(tmp_path / "s" / "shard-00000.npz") as arrays:
        assert arrays["tokens"].dtype == np.uint16
    # A prefix by response tokens (the learning curve's data sizes).
    assert [r.id for r in reopened.records(limit_tokens=3)] == ["r/0", "r/1"]
    assert read_dataset(tmp_path / "s", limit_tokens=1) == [_record(0).as_dict()]


def test_store_refuses_another_target_and_bad_ids(tmp_path):
    store = ResponseStore(tmp_path / "s")
    store.bind_target(INFO)
    with pytest.raises(InvalidArgumentError, match="another target"):
        ResponseStore(tmp_path / "s").bind_target({**INFO, "weights_digest": "zzz"})
    with pytest.raises(InvalidArgumentError, match="uint16"):
        store.write_shard([ResponseRecord("x", "d", "greedy", [1], [70000], "stop")], {})
    with pytest.raises(InvalidArgumentError, match="mode"):
        store.write_shard([ResponseRecord("x", "d", "beam", [1], [2], "stop")], {})
    with pytest.raises(NotFoundError, match="no drafter data folder"):
        ResponseStore.open_existing(tmp_path / "missing")
    big = ResponseStore(tmp_path / "big")
    big.bind_target({**INFO, "vocab_size": 151936})
    big.write_shard([ResponseRecord("x", "d", "greedy", [1], [150000], "stop")], {})
    assert next(big.records()).response_ids == [150000]


def test_store_adopts_a_shard_written_before_an_interrupted_manifest_update(tmp_path):
    store = ResponseStore(tmp_path / "s")
    store.bind_target(INFO)
    store.write_shard([_record(1)], {})
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    store.write_shard([_record(2)], {})
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))  # as if the writer died between the renames
    again = ResponseStore(tmp_path / "s")
    assert [r.id for r in again.records()] == ["r/1", "r/2"] and again.shards[-1]["generator"] == {"adopted": True}


def test_import_of_the_earlier_jsonl_format(tmp_path):
    lines = [json.dumps(_record(i).as_dict()) for i in range(3)]
    path = tmp_path / "old.jsonl"
    path.write_text("\n".join(lines) + "\n" + lines[0][:10])  # a cut last line is skipped
    assert import_jsonl(path, tmp_path / "s", INFO, {"imported_from": "old.jsonl"})["records"] == 3
    assert read_dataset(tmp_path / "s") == read_dataset(path)


class _Tokenizer:
    stop_token_ids = STOP

    def encode_chat(self, messages):
        return [1] + [8 + (ord(c) % 50) for c in messages[0]["content"]][:10]


def test_generation_stops_resumes_and_keeps_every_finished_response(target, tmp_path):
    prompts = tmp_path / "train.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"t/{i}", "dataset": "t", "turns": [f"prompt {i} " * (i % 3 + 1)]}) + "\n"
                               for i in range(10)))
    info = {"name": "tiny", "weights_digest": "d", "vocab_size": target.config.vocab_size}
    cfg = DataConfig(sample_fraction=0.5, max_new_tokens=10, batch_size=3, refill_min=1, shard_records=4)
    part = generate_dataset(target, _Tokenizer(), [prompts], tmp_path / "d", cfg, target_info=info, progress=False, max_jobs=5)
    assert part["written"]["records"] == 5  # the last partial shard is written too
    rest = generate_dataset(target, _Tokenizer(), [prompts], tmp_path / "d", cfg, target_info=info, progress=False)
    records = read_dataset(tmp_path / "d")
    keys = [(r["id"], r["mode"]) for r in records]
    assert len(keys) == len(set(keys)) == 5 + rest["written"]["records"]
    expected = {(f"t/{i}", "greedy") for i in range(10)} | {(f"t/{i}", "sample") for i in range(10) if sample_mode_chosen(f"t/{i}", 0.5, 0)}
    assert set(keys) == expected
    # Greedy responses equal decoding the prompt alone, whatever batch they ran in.
    for record in records:
        if record["mode"] == "greedy":
            alone = generate_batch(target, [record["prompt_ids"]], 10, set(STOP), 0.0, torch.Generator())[0][0]
            assert record["response_ids"] == alone
    with pytest.raises(InvalidArgumentError, match="sample_fraction"):
        generate_dataset(target, _Tokenizer(), [prompts], tmp_path / "d", DataConfig(sample_fraction=2.0), target_info=info, progress=False)


def test_policy_sweeps_exclude_the_prompt_ids_of_a_data_folder(tmp_path):
    from blockpilot.policy.sweep import read_ids

    store = ResponseStore(tmp_path / "s")
    store.bind_target(INFO)
    store.write_shard([_record(1), _record(1, "sample"), _record(2)], {})
    other = tmp_path / "p.jsonl"
    other.write_text(json.dumps({"id": "q/9"}) + "\n")
    assert read_ids([tmp_path / "s", other]) == {"r/1", "r/2", "q/9"}
