"""A verifier process with corpus n-grams (verifier config lookup_corpus): GetServerInfo names the
table, greedy output over gRPC equals plain decoding with the corpus's drafts accepted, and a table
counted over another target's responses stops the verifier at start with one clear line."""

from __future__ import annotations

import grpc
import pytest

from blockpilot.backends.onnx_export import weights_digest
from blockpilot.decoding.corpus import CorpusNgrams
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.models.target import TargetModel
from blockpilot.v1 import verifier_pb2 as pb
from blockpilot.v1 import verifier_pb2_grpc
from service_stack import Service

pytestmark = pytest.mark.timeout(300)

PROMPT = [5, 6, 7, 8, 9, 10]


def greedy(target, prompt, length):
    return SpeculativeDecoder(target).generate(prompt, SamplingParams(max_new_tokens=length), 1).token_ids


def test_a_verifier_serves_its_corpus_and_refuses_another_targets(tiny_llama_dir, tmp_path):
    target = TargetModel.from_pretrained(tiny_llama_dir)
    replies = [list(p[-2:]) + greedy(target, p, 40) for p in ([1, 2, 3], [40, 41], [7, 7, 9])]
    own = CorpusNgrams.count(replies, min_count=1, info={"target": {"weights_digest": weights_digest(target)}})
    own.save(tmp_path / "own-ngrams", target.config.vocab_size)
    verifier = Service("verifier", tmp_path, target=tiny_llama_dir, drafter_address="", policy_address="",
                       redis_url="memory", lookup_corpus=tmp_path / "own-ngrams").start()
    try:
        verifier.wait_serving(timeout=180)
        with grpc.insecure_channel(verifier.address) as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
            assert (info.lookup_corpus, info.lookup_corpus_trigrams, info.lookup_corpus_bigrams) == \
                ("own-ngrams", len(own.trigram), len(own.bigram))
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingOptions(max_new_tokens=40))
            final = [m for m in stub.Generate(request, timeout=60) if m.HasField("final")][-1].final
            assert list(final.token_ids) == greedy(target, PROMPT, 40)
            assert final.accepted_by_source["lookup"] > 0
    finally:
        verifier.stop()

    CorpusNgrams.count(replies, info={"target": {"weights_digest": "another"}}).save(tmp_path / "foreign", target.config.vocab_size)
    refused = Service("verifier", tmp_path, target=tiny_llama_dir, drafter_address="", policy_address="",
                      redis_url="memory", lookup_corpus=tmp_path / "foreign").start()
    try:
        assert refused.process.wait(timeout=120) != 0
        log = refused.log_path.read_text()
        assert "another target's responses" in log and "Traceback" not in log, log
    finally:
        refused.stop()
