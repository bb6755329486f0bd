"""Parity with Hugging Face transformers on the same weights (DESIGN.md, "Correctness oracles").

Three levels, each against transformers' own forward pass in fp32 on the CPU:
- ModelRunner prefill: logits of every token of a batch of mixed-length prompts.
- ModelRunner paged decode: KV in scattered, non-contiguous slots; decode steps one token at a time,
  and a mixed step (a fresh prefill, a chunk on top of a cached prefix, and decodes in one ForwardBatch).
- Engine: greedy tokens identical to transformers' greedy generate, and prompt/output logprobs equal to
  transformers' log_softmax over the same full sequence (logprob_start_len 0 and > 0, top-k at temperature 0).

Tiny random models cover every family (Llama GQA untied / tied, with biases, linear and llama3 rope
scaling; Qwen2 qkv bias; Qwen3 q/k norm; Mistral sliding window; the MoE families Qwen3-MoE, Qwen2-MoE
and Mixtral); the real SmolLM2 runs as @slow.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from runtime.engine import Engine
from runtime.forward_batch import ForwardBatch
from runtime.model_runner import ModelRunner
from runtime.server_args import ServerArgs

ATOL = 1e-4
KV_SLOTS = 512

# name: (family, config overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mqa-tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                       "rope_theta": 10000.0}}),
    # original_max_position_embeddings 32 with head_dim 16 puts some rotary frequencies in each llama3
    # band (kept, smoothed, divided by factor), so every branch of the scaling is exercised.
    "llama-rope-llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 4.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 32,
                                                       "rope_theta": 10000.0}}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    # A window shorter than the prompts below, so the sliding mask matters in prefill and decode.
    "mistral-sliding": ("mistral", {"sliding_window": 16}),
    # Mixture of experts: 8 experts, top-2. Qwen3-MoE without and with top-k renormalization (the latter
    # with a dense first layer, mlp_only_layers); Qwen2-MoE with its gated shared expert and a dense layer
    # off the decoder_sparse_step grid; Mixtral.
    "qwen3-moe": ("qwen3_moe", {}),
    "qwen3-moe-norm-dense": ("qwen3_moe", {"norm_topk_prob": True, "mlp_only_layers": [0]}),
    "qwen2-moe": ("qwen2_moe", {"decoder_sparse_step": 2, "num_hidden_layers": 3}),
    "mixtral": ("mixtral", {}),
}


def _hf_model(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32 logits of transformers' full forward pass over one unpadded sequence."""
    return model(torch.tensor([ids])).logits[0].float()


def _random_ids(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


# ------------------------------------------------------------------------------------------------
# ModelRunner level: hand-built ForwardBatches
# ------------------------------------------------------------------------------------------------

class _Seq:
    """One request's full token sequence and the (scattered) KV slot of each of its positions."""

    def __init__(self, ids: list[int], slots: torch.Tensor):
        assert len(ids) <= slots.shape[0]
        self.ids = ids
        self.slots = slots


def _make_batch(runner: ModelRunner, work: list[tuple[_Seq, int, int]], num_extend: int) -> ForwardBatch:
    """work: (sequence, tokens already in KV, tokens added this step); prefill chunks first, decodes last.

    Logits are asked for every new token, so each row can be checked.
    """
    assert all(n == 1 for _, _, n in work[num_extend:]), "decodes add exactly one token"
    ids, positions, out_slots = [], [], []
    for seq, start, n in work:
        ids += seq.ids[start:start + n]
        positions.append(torch.arange(start, start + n))
        out_slots.append(seq.slots[start:start + n])
    prefix_lens = torch.tensor([start for _, start, _ in work])
    extend_lens = torch.tensor([n for _, _, n in work])
    seq_lens = prefix_lens + extend_lens
    width = int(seq_lens.max())
    page_table = torch.full((len(work), width), runner.kv_pool.pad_slot, dtype=torch.int64)
    for row, (seq, start, n) in enumerate(work):
        page_table[row, :start + n] = seq.slots[:start + n]
    return ForwardBatch(
        input_ids=torch.tensor(ids), positions=torch.cat(positions), out_slots=torch.cat(out_slots),
        prefix_lens=prefix_lens, extend_lens=extend_lens, seq_lens=seq_lens, page_table=page_table,
        num_extend=num_extend, logits_indices=torch.arange(len(ids)))


def _check_step(runner: ModelRunner, work: list[tuple[_Seq, int, int]], num_extend: int,
                reference: dict[int, torch.Tensor], what: str) -> None:
    """Run one step and compare each new token's logits with transformers' at the same position."""
    logits = runner.forward(_make_batch(runner, work, num_extend))
    row = 0
    for seq, start, n in work:
        expected = reference[id(seq)][start:start + n]
        torch.testing.assert_close(logits[row:row + n], expected, atol=ATOL, rtol=0,
                                   msg=lambda m: f"{what}, sequence of {len(seq.ids)} tokens, "
                                                 f"positions {start}..{start + n - 1}: {m}")
        row += n
    assert row == logits.shape[0]


@pytest.fixture(scope="module", params=list(VARIANTS))
def runner_case(request, tiny_model_dir):
    family, overrides = VARIANTS[request.param]
    path = tiny_model_dir(family, **overrides)
    runner = ModelRunner(ServerArgs(model_path=path, max_total_tokens=KV_SLOTS, device="cpu"), progress=False)
    return runner, _hf_model(path)


def test_prefill_logits_match_transformers(runner_case) -> None:
    runner, hf = runner_case
    gen = torch.Generator().manual_seed(1)
    vocab = runner.vocab_size
    lengths = [1, 5, 17, 33, 2]  # a 1-token prefill among longer ones; 17, 33 pass the sliding window
    slots = torch.randperm(KV_SLOTS, generator=gen)
    seqs, offset = [], 0
    for n in lengths:
        seqs.append(_Seq(_random_ids(gen, n, vocab), slots[offset:offset + n]))
        offset += n
    reference = {id(s): _hf_logits(hf, s.ids) for s in seqs}
    _check_step(runner, [(s, 0, len(s.ids)) for s in seqs], len(seqs), reference, "prefill")


def test_paged_decode_logits_match_transformers(runner_case) -> None:
    runner, hf = runner_case
    gen = torch.Generator().manual_seed(2)
    vocab = runner.vocab_size
    decode_steps = 6
    # Every sequence's final length: prompt + tokens decoded later. Slots come from one random
    # permutation, so each sequence's KV is scattered and interleaved with the others'.
    prompt_lens = {"a": 7, "b": 12, "c": 20, "fresh": 9, "chunked": 11}
    slots = torch.randperm(KV_SLOTS, generator=gen)
    seqs, offset = {}, 0
    for name, p in prompt_lens.items():
        total = p + decode_steps + 2
        seqs[name] = _Seq(_random_ids(gen, total, vocab), slots[offset:offset + total])
        offset += total
    reference = {id(s): _hf_logits(hf, s.ids) for s in seqs.values()}
    kv = {name: 0 for name in seqs}  # tokens of each sequence already in KV

    def step(plan: list[tuple[str, int]], num_extend: int, what: str) -> None:
        work = [(seqs[name], kv[name], n) for name, n in plan]
        _check_step(runner, work, num_extend, reference, what)
        for name, n in plan:
            kv[name] += n

    # Prefill a, b, c, and the first 5 tokens of the chunked prompt.
    step([("a", 7), ("b", 12), ("c", 20), ("chunked", 5)], 4, "prefill")
    # Plain decode steps, one token each.
    for i in range(3):
        step([("a", 1), ("b", 1), ("c", 1)], 0, f"decode step {i}")
    # Mixed: the rest of the chunked prompt on top of its cached prefix, a fresh prompt, and decodes.
    step([("chunked", 6), ("fresh", 9), ("a", 1), ("b", 1), ("c", 1)], 2, "mixed step")
    # Everyone decodes, with different sequence lengths (fresh and chunked join the decode group).
    for i in range(3):
        step([("a", 1), ("b", 1), ("c", 1), ("fresh", 1), ("chunked", 1)], 0, f"decode after mixed {i}")
    # A single decode on its own.
    step([("c", 1)], 0, "lone decode")
    assert kv["c"] == 20 + 8 == len(seqs["c"].ids) and kv["chunked"] == 11 + 3


# ------------------------------------------------------------------------------------------------
# Engine level: greedy tokens and logprobs
# ------------------------------------------------------------------------------------------------

NEW_TOKENS = 32


@pytest.fixture(scope="module", params=list(VARIANTS))
def engine_case(request, tiny_model_dir):
    family, overrides = VARIANTS[request.param]
    path = tiny_model_dir(family, **overrides)
    # A small prefill budget splits the longer prompts into chunks that share steps with decodes.
    engine = Engine(path, skip_tokenizer_init=True, max_total_tokens=2048, chunked_prefill_size=24,
                    device="cpu", progress=False)
    try:
        yield engine, _hf_model(path)
    finally:
        engine.shutdown()


def _hf_greedy(model: torch.nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt, never stopping at eos."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _check_generation_parity(engine: Engine, hf: torch.nn.Module, prompts: list[list[int]],
                             new_tokens: int = NEW_TOKENS, hf_generate: int | None = None,
                             ignore_eos: bool = False) -> None:
    """Greedy tokens equal transformers' (up to an eos, where ours stops), logprobs equal its log_softmax.

    transformers' generate runs for the first `hf_generate` prompts (all by default); every prompt's
    tokens are also checked to be the argmax of transformers' logits over the full sequence.
    """
    eos = engine.scheduler.eos_token_ids
    params = {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": ignore_eos}
    outs = engine.generate(input_ids=prompts, sampling_params=params,
                           return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    assert isinstance(outs, list) and len(outs) == len(prompts)
    for k, (prompt, out) in enumerate(zip(prompts, outs)):
        tokens = out["output_ids"]
        meta = out["meta_info"]
        where = f"prompt of {len(prompt)} tokens"
        if hf_generate is None or k < hf_generate:
            expected = _hf_greedy(hf, prompt, new_tokens)
            assert tokens == expected[:len(tokens)], where
        if len(tokens) < new_tokens and not ignore_eos:  # stopped early: at an eos transformers also produced
            assert tokens and tokens[-1] in eos and meta["finish_reason"] == {"type": "stop", "matched": tokens[-1]}
        else:
            assert len(tokens) == new_tokens and meta["finish_reason"] == {"type": "length", "length": new_tokens}
        assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == len(tokens)

        # Logprobs: transformers' log_softmax over the full sequence, row p predicts token p + 1.
        full = prompt + tokens
        lp = torch.log_softmax(_hf_logits(hf, full), dim=-1)
        inp = meta["input_token_logprobs"]
        assert len(inp) == len(prompt)
        assert inp[0][0] is None and inp[0][1] == prompt[0]
        assert [e[1] for e in inp] == prompt
        got_in = torch.tensor([e[0] for e in inp[1:]], dtype=torch.float32)
        want_in = lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:], dtype=torch.long)]
        torch.testing.assert_close(got_in, want_in, atol=ATOL, rtol=0, msg=lambda m: f"input logprobs, {where}: {m}")

        outp = meta["output_token_logprobs"]
        assert [e[1] for e in outp] == tokens
        got_out = torch.tensor([e[0] for e in outp], dtype=torch.float32)
        rows = torch.arange(len(prompt) - 1, len(full) - 1)
        want_out = lp[rows, torch.tensor(tokens, dtype=torch.long)]
        torch.testing.assert_close(got_out, want_out, atol=ATOL, rtol=0, msg=lambda m: f"output logprobs, {where}: {m}")
        # Greedy, as a trainer's forward pass sees it: each token is transformers' argmax (up to float noise).
        assert bool((want_out >= lp[rows].max(dim=-1).values - ATOL).all()), where

        # Top-k at temperature 0: the first entry is the greedy token itself, the k values are HF's top-k.
        top = meta["output_top_logprobs"]
        assert len(top) == len(tokens)
        for i, entries in enumerate(top):
            assert len(entries) == 3
            assert entries[0] == outp[i], f"{where}, output position {i}"
        got_top = torch.tensor([[e[0] for e in entries] for entries in top], dtype=torch.float32)
        torch.testing.assert_close(got_top, lp[rows].topk(3, dim=-1).values, atol=ATOL, rtol=0)
        in_top = meta["input_top_logprobs"]
        assert len(in_top) == len(prompt) and in_top[0] is None
        if len(prompt) > 1:
            got_in_top = torch.tensor([[e[0] for e in entries] for entries in in_top[1:]], dtype=torch.float32)
            torch.testing.assert_close(got_in_top, lp[:len(prompt) - 1].topk(3, dim=-1).values, atol=ATOL, rtol=0)


def _check_logprob_start(engine: Engine, hf: torch.nn.Module, prompt: list[int], start: int) -> dict:
    out = engine.generate(input_ids=prompt, sampling_params={"temperature": 0.0, "max_new_tokens": 2},
                          return_logprob=True, logprob_start_len=start)
    meta = out["meta_info"]
    inp = meta["input_token_logprobs"]
    assert len(inp) + start == meta["prompt_tokens"] == len(prompt)
    assert inp[0][0] is None and [e[1] for e in inp] == prompt[start:]
    lp = torch.log_softmax(_hf_logits(hf, prompt), dim=-1)
    want = lp[torch.arange(start, len(prompt) - 1), torch.tensor(prompt[start + 1:], dtype=torch.long)]
    torch.testing.assert_close(torch.tensor([e[0] for e in inp[1:]], dtype=torch.float32), want, atol=ATOL, rtol=0)
    return meta


def test_engine_greedy_and_logprobs_match_transformers(engine_case) -> None:
    engine, hf = engine_case
    gen = torch.Generator().manual_seed(3)
    # 1 token (no context for any input logprob), short, and two longer than the prefill budget.
    prompts = [_random_ids(gen, n, engine.runner.vocab_size) for n in (1, 6, 29, 50)]
    _check_generation_parity(engine, hf, prompts)


def test_engine_logprob_start_len(engine_case) -> None:
    engine, hf = engine_case
    gen = torch.Generator().manual_seed(4)
    prompt = _random_ids(gen, 20, engine.runner.vocab_size)
    _check_logprob_start(engine, hf, prompt, 0)
    # The same prompt again: now most of it is in the prefix cache, which must not swallow the
    # positions whose logprobs are asked for.
    for start in (5, 19):
        assert _check_logprob_start(engine, hf, prompt, start)["cached_tokens"] > 0
    assert engine.scheduler.is_idle_clean()


def test_eos_stops_and_ignore_eos_keeps_parity(tiny_model_dir) -> None:
    """With eos made a token greedy decoding reaches early: a request stops there, and with ignore_eos it
    goes on exactly as transformers does, the eos position's logprob included (nothing is masked)."""
    gen = torch.Generator().manual_seed(5)
    prompts = [_random_ids(gen, n, 256) for n in (3, 12)]
    greedy = _hf_greedy(_hf_model(tiny_model_dir("llama")), prompts[0], NEW_TOKENS)
    eos = greedy[3]
    # Same seed and shapes, so the same weights; only the config's eos differs.
    path = tiny_model_dir("llama", eos_token_id=eos)
    hf = _hf_model(path)
    with Engine(path, skip_tokenizer_init=True, max_total_tokens=512, device="cpu", progress=False) as engine:
        assert eos in engine.scheduler.eos_token_ids
        stopped = engine.generate(input_ids=prompts[0], sampling_params={"temperature": 0.0, "max_new_tokens": 8})
        first = greedy.index(eos)
        assert stopped["output_ids"] == greedy[:first + 1]
        assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
        _check_generation_parity(engine, hf, prompts, ignore_eos=True)


# ------------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    from runtime.default_model import default_model_path

    path = default_model_path()
    engine = Engine(path, max_total_tokens=4096, device="cpu", progress=False)
    try:
        yield engine, _hf_model(path)
    finally:
        engine.shutdown()


SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woman who",
]


@pytest.mark.slow
def test_smollm2_greedy_and_logprobs_match_transformers(smollm2) -> None:
    engine, hf = smollm2
    prompts = [engine.tokenizer(p)["input_ids"] for p in SMOLLM2_PROMPTS]
    # transformers' generate costs ~2 s a prompt here; once is enough next to the argmax check of all.
    _check_generation_parity(engine, hf, prompts, hf_generate=1)
    _check_logprob_start(engine, hf, prompts[2], 7)


@pytest.mark.slow
def test_smollm2_capital_of_france_is_paris(smollm2) -> None:
    engine, _ = smollm2
    out = engine.generate("The capital of France is", sampling_params={"temperature": 0.0, "max_new_tokens": 4})
    assert out["text"].startswith(" Paris"), out["text"]
