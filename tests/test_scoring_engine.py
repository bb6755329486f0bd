"""Scoring in-process (Engine.encode / score / rerank) on tiny random models, against transformers on the
same weights: reward heads (Llama, Qwen2), decoder embeddings, BERT sentence embeddings, cross-encoders,
/v1/score's label probabilities; batching (hundreds of texts in a few forward passes), chunking, the
prefix cache, bad inputs, and weight updates from disk reaching scoring models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel

from tests.helpers import make_tiny_model_dir
from tests.scoring_models import make_reward_model_dir, make_tiny_cross_encoder_dir
from runtime.engine import Engine

SEQS = [list(range(5, 45)), [30, 31, 32], list(range(5, 45)) + [50, 51], [7] * 70]
PAD = 2  # the tiny models' eos, which make_reward_model_dir makes the pad token too


def engine(path: str, **kw) -> Engine:
    kw.setdefault("device", "cpu")
    return Engine(path, progress=False, max_total_tokens=4096, **kw)


def seeded(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if name.endswith(("norm.weight", "LayerNorm.weight")) else noise)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-lm"), context_length=512)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reward_head_matches_transformers(tiny_model_dir, tmp_path, family):
    from transformers import AutoModelForSequenceClassification
    base = tiny_model_dir(family)
    path = make_reward_model_dir(tmp_path / "rm", base, num_labels=2, family=family, head_std=0.3)
    ref = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    # Chunks of 16 tokens: long sequences take several steps; SEQS[2] reuses SEQS[0]'s cached prefix.
    with engine(path, is_embedding=True, skip_tokenizer_init=True, chunked_prefill_size=16) as eng:
        outs = eng.encode(input_ids=SEQS)
        single = eng.encode(input_ids=SEQS[1])
        # transformers pools the last token that is not the pad token (a trailing end-of-turn = pad).
        padded = eng.encode(input_ids=[SEQS[1] + [PAD, PAD], [PAD, PAD]])
    assert padded[0]["embedding"] == pytest.approx(outs[1]["embedding"], abs=1e-5)
    for seq, out in zip([SEQS[1] + [PAD, PAD], [PAD, PAD]], padded):
        torch.testing.assert_close(torch.tensor(out["embedding"]), ref(torch.tensor([seq])).logits[0], atol=1e-4,
                                   rtol=0)
    assert isinstance(single, dict) and single["embedding"] == pytest.approx(outs[1]["embedding"], abs=1e-5)
    for seq, out in zip(SEQS, outs):
        want = ref(torch.tensor([seq])).logits[0]
        assert len(out["embedding"]) == 2
        torch.testing.assert_close(torch.tensor(out["embedding"]), want, atol=1e-4, rtol=0)
        assert out["meta_info"]["prompt_tokens"] == len(seq)
    assert outs[2]["meta_info"]["cached_tokens"] >= 32  # waited for SEQS[0] to cache their common prefix


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen2Model"])
def test_decoder_embedding_last_token_normalised(tiny_model_dir, tmp_path, arch):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"), dtype=torch.float32).eval()
    if arch == "Qwen2Model":  # a bare backbone checkpoint: tensor names without "model."
        lm.model.save_pretrained(str(tmp_path / "emb"))
    else:
        lm.save_pretrained(str(tmp_path / "emb"))
    with engine(str(tmp_path / "emb"), is_embedding=True, skip_tokenizer_init=True) as eng:
        outs = eng.encode(input_ids=SEQS)
    for seq, out in zip(SEQS, outs):
        hidden = lm.model(torch.tensor([seq])).last_hidden_state[0, -1]
        got = torch.tensor(out["embedding"])
        torch.testing.assert_close(got, F.normalize(hidden, dim=-1), atol=1e-5, rtol=0)
        assert got.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_bert_mean_pooled_embeddings(tmp_path):
    config = BertConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=80)
    torch.manual_seed(0)
    ref = seeded(BertModel(config), std=0.1)
    ref.save_pretrained(str(tmp_path / "bert"))
    seqs = [s[:79] for s in SEQS]
    with engine(str(tmp_path / "bert"), is_embedding=True, skip_tokenizer_init=True,
                chunked_prefill_size=64) as eng:
        outs = eng.encode(input_ids=seqs)
        with pytest.raises(ValueError, match="longer than the model's context"):
            eng.encode(input_ids=[1] * 81)
    for seq, out in zip(seqs, outs):
        want = F.normalize(ref(torch.tensor([seq])).last_hidden_state.mean(dim=1)[0], dim=-1)
        assert F.cosine_similarity(torch.tensor(out["embedding"]), want, dim=0).item() >= 0.99999
        torch.testing.assert_close(torch.tensor(out["embedding"]), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta"])
def test_cross_encoder_rerank_matches_transformers(tmp_path, kind):
    from transformers import AutoModelForSequenceClassification
    path = make_tiny_cross_encoder_dir(tmp_path / kind, kind=kind)
    ref = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    query = "what is the capital of france"
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is in Germany.",
            "France's capital city is Paris, on the Seine.", "The weather is nice today."]
    enc = tok([query] * len(docs), docs, padding=True, return_tensors="pt")
    if kind == "xlm-roberta":  # one token type: XLM-R takes no segment ids
        del enc["token_type_ids"]
    want = ref(**enc).logits[:, 0].tolist()
    want_order = sorted(range(len(docs)), key=lambda i: -want[i])
    with engine(path, is_embedding=True) as eng:
        got = eng.rerank(query, docs)
        top = eng.rerank(query, docs, top_n=2, return_documents=False)
        with pytest.raises(ValueError, match="top_n must be an integer >= 1, got 0"):
            eng.rerank(query, docs, top_n=0)
        with pytest.raises(ValueError, match="needs a generation model"):
            eng.score(query, docs, [1])
    assert [r["index"] for r in got] == want_order
    for r in got:
        assert r["document"] == docs[r["index"]]
        assert r["score"] == pytest.approx(want[r["index"]], abs=1e-4)
    assert top == [{"score": got[0]["score"], "index": got[0]["index"]},
                   {"score": got[1]["score"], "index": got[1]["index"]}]


def test_score_matches_transformers_label_softmax(tiny_lm):
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    labels = [tok.encode(" yes")[0], tok.encode(" no")[0], 17]
    query = "Is the following statement true? " * 8  # long: the items share its KV through the cache
    items = [" The sky is blue.", " Fish can fly.", " Two plus two is four."]
    with engine(tiny_lm) as eng:
        raw = eng.score(query, items, labels)
        soft = eng.score(query, items, labels, apply_softmax=True)
        first = eng.score(query, items, labels, apply_softmax=True, item_first=True)
        ids = eng.score(tok.encode(query), [tok.encode(i) for i in items], labels, apply_softmax=True)
        with pytest.raises(ValueError, match="label_token_ids contains token id 49152, outside the vocabulary"):
            eng.score(query, items, [49152])
        with pytest.raises(ValueError, match="items cannot be empty"):
            eng.score(query, [], labels)
        with pytest.raises(ValueError, match="needs a scoring model"):
            eng.encode("hello")
    for i, item in enumerate(items):
        for text, got_soft in ((query + item, soft[i]), (item + query, first[i])):
            logits = lm(torch.tensor([tok(text)["input_ids"]])).logits[0, -1]
            want = torch.softmax(logits[labels], dim=-1)
            assert got_soft == pytest.approx(want.tolist(), abs=1e-5)
        full = torch.softmax(lm(torch.tensor([tok(query + item)["input_ids"]])).logits[0, -1], dim=-1)
        assert raw[i] == pytest.approx(full[labels].tolist(), rel=1e-4, abs=1e-7)
        assert sum(soft[i]) == pytest.approx(1.0)
        ids_logits = lm(torch.tensor([tok.encode(query) + tok.encode(item)])).logits[0, -1]
        assert ids[i] == pytest.approx(torch.softmax(ids_logits[labels], -1).tolist(), abs=1e-5)


def test_hundreds_of_texts_take_a_few_forward_passes(tiny_model_dir, tmp_path):
    path = make_reward_model_dir(tmp_path / "rm", make_tiny_model_dir(tmp_path / "lm"))
    texts = [f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\nAnswer {i * 7}.<|im_end|>"
             for i in range(300)]
    with engine(path, is_embedding=True, max_running_requests=512, chunked_prefill_size=8192) as eng:
        before = eng.scheduler.forward_steps
        outs = eng.encode(texts)
        steps = eng.scheduler.forward_steps - before
        one = eng.encode(texts[123])
    assert len(outs) == 300 and steps <= 3, steps
    assert one["embedding"] == pytest.approx(outs[123]["embedding"], abs=1e-5)
    assert len({round(o["embedding"][0], 6) for o in outs}) > 250  # each text gets its own score


def test_weight_update_from_disk_changes_reward_scores(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification
    old = make_reward_model_dir(tmp_path / "old", tiny_model_dir("llama"), seed=0)
    new = make_reward_model_dir(tmp_path / "new", tiny_model_dir("llama", seed=1), seed=1)
    want_new = AutoModelForSequenceClassification.from_pretrained(new, dtype=torch.float32).eval()
    with engine(old, is_embedding=True, skip_tokenizer_init=True) as eng:
        before = [o["embedding"][0] for o in eng.encode(input_ids=SEQS)]
        # The controller's update: it drops the cached prefixes, which hold KV of the old weights.
        assert eng.update_weights_from_disk(new, weight_version="new") == (True, "Succeeded to update model weights.")
        outs = eng.encode(input_ids=SEQS)
        assert {o["meta_info"]["weight_version"] for o in outs} == {"new"}
        after = [o["embedding"][0] for o in outs]
    for seq, b, a in zip(SEQS, before, after):
        want = want_new(torch.tensor([seq])).logits[0, 0].item()
        assert a == pytest.approx(want, abs=1e-4) and not math.isclose(a, b, abs_tol=1e-3)


def test_weight_update_from_disk_reaches_encoders(tmp_path):
    old = make_tiny_cross_encoder_dir(tmp_path / "old", seed=0)
    new = make_tiny_cross_encoder_dir(tmp_path / "new", seed=1)
    with engine(old, is_embedding=True) as eng:
        before = eng.rerank("query", ["a document", "another one"])
        assert eng.update_weights_from_disk(new, weight_version="new")[0]  # an encoder's scheduler, same controller
        after = eng.rerank("query", ["a document", "another one"])
        assert eng.encode("a document")["meta_info"]["weight_version"] == "new"
    with engine(new, is_embedding=True) as eng:
        fresh = eng.rerank("query", ["a document", "another one"])
    assert [r["score"] for r in after] == pytest.approx([r["score"] for r in fresh], abs=1e-6)
    assert before[0]["score"] != pytest.approx(after[0]["score"], abs=1e-3)


def test_encoder_scheduler_answers_exact_abort_state_and_server_messages(tmp_path):
    from runtime.encoder_runner import EncoderRunner
    from runtime.encoder_scheduler import EncoderScheduler
    from runtime.messages import (AbortRequestsExact, EmbedRequest, GenerateRequest, HealthCheckRequest,
                                  HealthCheckResult, ServerStateRequest)
    from runtime.sampling_params import SamplingParams
    from runtime.server_args import ServerArgs

    path = make_tiny_cross_encoder_dir(tmp_path / "enc", seed=0)
    sched = EncoderScheduler(EncoderRunner(ServerArgs(model_path=path, is_embedding=True, device="cpu"),
                                           progress=False))
    for rid in ("a", "ab", "b"):
        assert sched.handle(EmbedRequest(rid=rid, input_ids=[5, 6, 7])) == []
    (gen,) = sched.handle(GenerateRequest(rid="g", input_ids=[5], sampling_params=SamplingParams()))
    assert gen.finished and gen.finish_reason == {"type": "abort",
                                                  "message": "Request 'g': an encoder model cannot generate."}
    assert sched.handle(HealthCheckRequest(id=3)) == [HealthCheckResult(id=3)]
    (result,) = sched.handle(ServerStateRequest(id=4))
    assert result.state["num_waiting_reqs"] == 3 and result.state["idle_clean"] is False
    outs = sched.abort(rids=["a", "a", "missing"], message="gone")
    assert [(o.rid, o.finish_reason["message"]) for o in outs] == [("a", "gone")]
    assert [o.rid for o in sched.handle(AbortRequestsExact(rids=["b"]))] == ["b"]
    outs = sched.step()
    assert [o.rid for o in outs] == ["ab"] and len(outs[0].embedding) == 1
    state = sched.state()
    assert state["idle_clean"] is True and state["num_engine_reqs"] == 0 and state["forward_steps"] == 1
