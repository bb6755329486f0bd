"""Sampler: distributions, greedy and logprob numbers, seeds, penalties (runtime/sampler.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from runtime.sampler import Sampler, logprob_entries, processed_logprobs, seeded_uniform
from runtime.sampling_params import SamplingParams

EOS = 2


@dataclass
class Row:
    sampling_params: SamplingParams
    input_ids: list[int] = field(default_factory=lambda: [5, 6, 7])
    output_ids: list[int] = field(default_factory=list)
    seed: int = 0


def _sample(sampler: Sampler, logits: torch.Tensor, rows: list[Row], **kw):
    n = len(rows)
    return sampler.sample(
        logits,
        rows,
        kw.get("return_logprob", [False] * n),
        kw.get("top_logprobs_num", [0] * n),
        kw.get("token_ids_logprob", [None] * n),
    )


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 6000) -> np.ndarray:
    """Token counts of n rows with the same logits and seeds 0..n-1, drawn in one batch."""
    vocab = logits.shape[0]
    rows = [Row(params, seed=s) for s in range(n)]
    out = _sample(Sampler(vocab, {EOS}), logits.expand(n, vocab).contiguous(), rows)
    return np.bincount(np.array(out.next_token_ids), minlength=vocab)


def _analytic(
    logits: torch.Tensor, t: float, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0
) -> np.ndarray:
    """The truncated distribution, written out plainly in float64."""
    probs = torch.softmax(logits.double() / t, dim=-1).numpy()
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    keep = np.zeros(len(probs), dtype=bool)
    cumulative = 0.0
    for rank, tok in enumerate(order):
        if top_k > 0 and rank >= top_k:
            break
        if cumulative >= top_p:
            break
        keep[tok] = True
        cumulative += probs[tok]
    keep &= probs >= min_p * probs.max()
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


def _assert_matches(counts: np.ndarray, expected: np.ndarray) -> None:
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew truncated tokens: {np.nonzero(counts * ~support)[0]}"
    n = counts.sum()
    if support.sum() == 1:
        return  # one possible token: drawing only it is the whole check
    result = chisquare(counts[support], expected[support] * n)
    assert result.pvalue > 1e-3, (counts, expected * n, result)


LOGITS = torch.tensor([1.2, -0.3, 0.8, 2.1, 0.0, -1.5, 1.7, 0.4, -0.8, 1.0, 0.2, -2.0, 0.6, 1.4])


# ----------------------------------------------------------------------------------------------
# Distributions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature: float) -> None:
    counts = _draws(LOGITS, SamplingParams(temperature=temperature))
    _assert_matches(counts, _analytic(LOGITS, temperature))


@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": 4},
        {"top_k": 1},
        {"top_p": 0.6},
        {"top_p": 0.9},
        {"min_p": 0.2},
        {"temperature": 0.8, "top_k": 7, "top_p": 0.85, "min_p": 0.1},
        {"temperature": 1.5, "top_k": 9, "top_p": 0.95},
        # top-p counts the untruncated probs (5 tokens kept), not the top-k-renormalised ones (3).
        {"top_k": 5, "top_p": 0.7},
    ],
)
def test_truncation_distribution(kw: dict) -> None:
    params = SamplingParams(**kw)
    counts = _draws(LOGITS, params)
    expected = _analytic(LOGITS, params.temperature, params.top_k, params.top_p, params.min_p)
    _assert_matches(counts, expected)


def test_top_p_escalates_beyond_first_candidates() -> None:
    # A nearly flat 2000-token distribution: the top-p cut lies past the first candidate batch.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2000, generator=g) * 0.05
    counts = _draws(logits, SamplingParams(top_p=0.5), n=3000)
    expected = _analytic(logits, 1.0, top_p=0.5)
    assert counts[expected == 0].sum() == 0
    assert (expected > 0).sum() > 700


def test_ties_at_top_k_cut_keep_lowest_ids() -> None:
    logits = torch.zeros(10)
    counts = _draws(logits, SamplingParams(top_k=3), n=3000)
    assert counts[3:].sum() == 0
    _assert_matches(counts, np.array([1 / 3] * 3 + [0.0] * 7))
    # Ties straddling a top-p cut too: 0.25 each, top_p 0.5 keeps exactly two.
    logits = torch.zeros(4)
    counts = _draws(logits, SamplingParams(top_p=0.5), n=2000)
    assert counts[2:].sum() == 0 and counts[:2].min() > 800


def test_vocabulary_not_multiple_of_block_and_padding_never_drawn() -> None:
    g = torch.Generator().manual_seed(4)
    vocab, padded, n = 700, 768, 400
    logits = torch.randn(n, padded, generator=g)
    logits[:, vocab:] = 50.0  # padding columns of the LM head must be ignored
    rows = [Row(SamplingParams(), seed=s) for s in range(n)]
    out = _sample(Sampler(vocab, {EOS}), logits, rows, return_logprob=[True] * n)
    assert max(out.next_token_ids) < vocab
    ref = torch.log_softmax(logits[:, :vocab], dim=-1)
    got = torch.tensor(out.logprobs)
    want = ref[torch.arange(n), torch.tensor(out.next_token_ids)]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Tokens in the last, partial block are reachable.
    assert any(t >= 512 for t in out.next_token_ids)


# ----------------------------------------------------------------------------------------------
# Greedy and logprobs
# ----------------------------------------------------------------------------------------------


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g)
    logits[3, 7] = logits[3, 30] = 9.0
    rows = [Row(SamplingParams(temperature=0.0), seed=s) for s in range(16)]
    out = _sample(Sampler(50, {EOS}), logits, rows)
    assert out.next_token_ids == logits.argmax(dim=-1).tolist()
    assert out.next_token_ids[3] == 7


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.9])
def test_logprobs_are_log_softmax_of_scaled_logits(temperature: float) -> None:
    g = torch.Generator().manual_seed(1)
    n, vocab = 8, 300
    logits = torch.randn(n, vocab, generator=g) * 3
    params = SamplingParams(temperature=temperature, top_k=5, top_p=0.5)  # truncation must not leak
    rows = [Row(params, seed=s) for s in range(n)]
    asked = [[4, 0, 299, 4], [17]] + [None] * (n - 2)
    out = _sample(
        Sampler(vocab, {EOS}),
        logits,
        rows,
        return_logprob=[True] * (n - 1) + [False],
        top_logprobs_num=[3, 0, 1, 5, 300, 0, 2, 0],
        token_ids_logprob=asked,
    )
    t = 1.0 if temperature < 1e-6 else temperature
    ref = torch.log_softmax(logits / t, dim=-1)
    for i in range(n - 1):
        assert out.logprobs[i] == pytest.approx(ref[i, out.next_token_ids[i]].item(), abs=1e-6)
    assert out.logprobs[n - 1] is None
    for i, k in enumerate([3, 0, 1, 5, 300, 0, 2, 0]):
        if k == 0:
            assert out.top_logprobs[i] is None
            continue
        vals, ids = torch.topk(ref[i], k)
        assert [tok for _, tok in out.top_logprobs[i]] == ids.tolist()
        np.testing.assert_allclose([lp for lp, _ in out.top_logprobs[i]], vals.numpy(), atol=1e-6)
        got = [lp for lp, _ in out.top_logprobs[i]]
        assert got == sorted(got, reverse=True)
    assert [tok for _, tok in out.token_ids_logprobs[0]] == [4, 0, 299, 4]
    np.testing.assert_allclose(
        [lp for lp, _ in out.token_ids_logprobs[0]], ref[0, [4, 0, 299, 4]].numpy(), atol=1e-6
    )
    assert out.token_ids_logprobs[1] == [(pytest.approx(ref[1, 17].item(), abs=1e-6), 17)]
    assert out.token_ids_logprobs[2] is None
    if temperature < 1e-6:
        assert out.next_token_ids == logits.argmax(dim=-1).tolist()
        # API.md invariant: at temperature 0 the first top logprob is the chosen token's.
        assert out.top_logprobs[0][0] == (out.logprobs[0], out.next_token_ids[0])


def test_greedy_logprobs_without_penalties_are_exactly_log_softmax() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1000, generator=g)
    rows = [Row(SamplingParams(temperature=0.0)) for _ in range(4)]
    out = _sample(Sampler(1000, {EOS}), logits, rows, token_ids_logprob=[list(range(1000))] * 4)
    got = torch.tensor([[lp for lp, _ in entries] for entries in out.token_ids_logprobs])
    assert torch.equal(got, torch.log_softmax(logits, dim=-1))


def test_mixed_greedy_and_sampled_rows_and_bf16_input() -> None:
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(6, 64, generator=g) * 4).to(torch.bfloat16)
    temps = [0.0, 1.0, 0.0, 0.3, 2.0, 0.0]
    rows = [Row(SamplingParams(temperature=t), seed=i) for i, t in enumerate(temps)]
    before = logits.clone()
    out = _sample(Sampler(64, {EOS}), logits, rows, return_logprob=[True] * 6)
    assert torch.equal(logits, before)  # the caller's logits are untouched
    for i, t in enumerate(temps):
        scaled = logits[i].float() / (t if t > 0 else 1.0)
        if t == 0.0:
            assert out.next_token_ids[i] == int(logits[i].float().argmax())
        ref = torch.log_softmax(scaled, dim=-1)[out.next_token_ids[i]].item()
        assert out.logprobs[i] == pytest.approx(ref, abs=1e-6)


def test_logprob_entries_and_processed_logprobs() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 40, generator=g)
    lp = processed_logprobs(logits, 0.0)
    assert torch.equal(lp, torch.log_softmax(logits, dim=-1))
    lp2 = processed_logprobs(logits.to(torch.bfloat16), 0.5)
    assert lp2.dtype == torch.float32
    torch.testing.assert_close(lp2, torch.log_softmax(logits.to(torch.bfloat16).float() / 0.5, dim=-1))

    targets = torch.tensor([1, 0, 39, 5, 5])
    chosen, top, by_id = logprob_entries(lp, targets, 2, [3, 1])
    assert chosen == lp[torch.arange(5), targets].tolist()
    vals, ids = torch.topk(lp, 2)
    assert top == [list(zip(v, i)) for v, i in zip(vals.tolist(), ids.tolist())]
    assert by_id == [[(lp[r, 3].item(), 3), (lp[r, 1].item(), 1)] for r in range(5)]
    chosen, top, by_id = logprob_entries(lp, targets, 0, None)
    assert top is None and by_id is None and len(chosen) == 5


# ----------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------


def _splitmix_reference(seed: int, step: int) -> float:
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = mix((seed + 0x9E3779B97F4A7C15) & mask)
    bits = mix((key + (step + 1) * 0x9E3779B97F4A7C15) & mask)
    return ((bits >> 12) + 0.5) * 2.0**-52


def test_seeded_uniform_is_unsigned_splitmix64() -> None:
    seeds = [0, 1, 42, -1, -(2**63), 2**63 - 1, 123456789012345]
    steps = [0, 1, 7, 1000, 3, 2**31, 5]
    got = seeded_uniform(torch.tensor(seeds), torch.tensor(steps)).tolist()
    want = [_splitmix_reference(s & ((1 << 64) - 1), t) for s, t in zip(seeds, steps)]
    assert got == want
    u = seeded_uniform(torch.arange(100_000), torch.zeros(100_000, dtype=torch.int64))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_same_seed_same_token_whatever_the_batch() -> None:
    g = torch.Generator().manual_seed(7)
    vocab = 5000
    target = torch.randn(vocab, generator=g)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(top_k=50, min_p=0.01),
        SamplingParams(temperature=1.3, repetition_penalty=1.2, frequency_penalty=0.5),
    ]
    sampler = Sampler(vocab, {EOS})
    for p in params:
        row = Row(p, output_ids=[11, 12, 11], seed=987654321)
        alone = _sample(sampler, target[None], [row], return_logprob=[True])
        for pos in (0, 31, 64):
            others = [
                Row(
                    SamplingParams(
                        temperature=[0.0, 0.5, 1.0, 2.0][k % 4],
                        top_k=[-1, 10][k % 2],
                        top_p=[1.0, 0.8, 0.95][k % 3],
                    ),
                    output_ids=list(range(k % 5)),
                    seed=k,
                )
                for k in range(64)
            ]
            batch_rows = others[:pos] + [row] + others[pos:]
            logits = torch.randn(65, vocab, generator=g)
            logits[pos] = target
            asks = [k == pos or k % 2 == 0 for k in range(65)]
            out = _sample(sampler, logits, batch_rows, return_logprob=asks)
            assert out.next_token_ids[pos] == alone.next_token_ids[0]
            # Every op works row by row, so on the CPU even the logprob is bitwise the same.
            assert out.logprobs[pos] == alone.logprobs[0]
        # Repeating the call repeats the draw: nothing is consumed between calls.
        assert _sample(sampler, target[None], [row]).next_token_ids == alone.next_token_ids


def test_truncated_draw_does_not_depend_on_neighbours_candidate_count() -> None:
    # A neighbour with a large top_k makes the batch fetch many more top-k candidates; the draw
    # of a top-p / top-k row must not change with that.
    g = torch.Generator().manual_seed(11)
    vocab, n = 4000, 150
    logits = torch.randn(vocab, generator=g) * 2
    sampler = Sampler(vocab, {EOS})
    for params in (SamplingParams(top_p=0.8), SamplingParams(top_k=40, min_p=0.02)):
        rows = [Row(params, seed=s) for s in range(n)]
        alone = _sample(sampler, logits.expand(n, vocab).contiguous(), rows).next_token_ids
        wide = Row(SamplingParams(top_k=3500), seed=1)
        mixed = _sample(sampler, logits.expand(n + 1, vocab).contiguous(), rows + [wide]).next_token_ids
        assert mixed[:n] == alone


def test_different_seeds_and_steps_give_different_draws() -> None:
    vocab = 1000
    logits = torch.zeros(1, vocab)
    sampler = Sampler(vocab, {EOS})
    by_seed = {_sample(sampler, logits, [Row(SamplingParams(), seed=s)]).next_token_ids[0] for s in range(50)}
    by_step = {
        _sample(sampler, logits, [Row(SamplingParams(), output_ids=[0] * k, seed=1)]).next_token_ids[0]
        for k in range(50)
    }
    assert len(by_seed) > 40 and len(by_step) > 40


def test_no_global_rng_use() -> None:
    state = torch.random.get_rng_state()
    _draws(LOGITS, SamplingParams(top_p=0.9), n=10)
    assert torch.equal(state, torch.random.get_rng_state())


# ----------------------------------------------------------------------------------------------
# Penalties and masks
# ----------------------------------------------------------------------------------------------


def _reference_processed(logits: np.ndarray, row: Row, eos: set[int]) -> np.ndarray:
    """The processing order of API.md, one token at a time, in float32."""
    sp = row.sampling_params
    x = logits.astype(np.float32).copy()
    for tok, bias in sp.logit_bias.items():
        x[tok] = x[tok] + np.float32(bias)
    if len(row.output_ids) < sp.min_new_tokens:
        for tok in list(eos) + sp.stop_token_ids:
            x[tok] = -np.inf
    p = np.float32(sp.repetition_penalty)
    for tok in set(row.input_ids + row.output_ids):
        x[tok] = x[tok] * p if x[tok] < 0 else x[tok] / p
    for tok, count in Counter(row.output_ids).items():
        x[tok] = x[tok] - np.float32(sp.frequency_penalty) * np.float32(count)
        x[tok] = x[tok] - np.float32(sp.presence_penalty)
    return x


PENALTY_CASES = [
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, repetition_penalty=0.7),
    SamplingParams(temperature=0.0, frequency_penalty=0.6),
    SamplingParams(temperature=0.0, presence_penalty=-0.9),
    SamplingParams(temperature=0.8, repetition_penalty=1.5, frequency_penalty=1.1, presence_penalty=0.4),
    SamplingParams(temperature=0.0, logit_bias={3: 5.0, 9: -2.5}),
    SamplingParams(temperature=1.0, logit_bias={EOS: 3.0}, ignore_eos=True, repetition_penalty=1.1),
    SamplingParams(temperature=0.0, min_new_tokens=8, stop_token_ids=[8, 9], max_new_tokens=10),
    SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[8], max_new_tokens=10),
    SamplingParams(temperature=0.0),
]


def test_penalties_match_reference_in_a_mixed_batch() -> None:
    g = torch.Generator().manual_seed(8)
    vocab = 30
    eos = {EOS, 29}
    logits = torch.randn(len(PENALTY_CASES), vocab, generator=g) * 2
    rows = [
        Row(p, input_ids=[1, 4, 4, 20], output_ids=[4, 7, 7, 7, 12, 9], seed=i)
        for i, p in enumerate(PENALTY_CASES)
    ]
    out = _sample(
        Sampler(vocab, eos), logits, rows, return_logprob=[True] * len(rows),
        token_ids_logprob=[list(range(vocab))] * len(rows),
    )
    for i, row in enumerate(rows):
        ref = torch.from_numpy(_reference_processed(logits[i].numpy(), row, eos))
        t = 1.0 if row.sampling_params.is_greedy else row.sampling_params.temperature
        want = torch.log_softmax(ref / t, dim=-1)
        got = torch.tensor([lp for lp, _ in out.token_ids_logprobs[i]])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"case {i}")
        if row.sampling_params.is_greedy:
            assert out.next_token_ids[i] == int(ref.argmax())
    # min_new_tokens 8 > 6 outputs (case 7) masks; ignore_eos (case 6) and min_new_tokens 3 <= 6
    # outputs (case 8) do not.
    assert all(lp > float("-inf") for lp, _ in out.token_ids_logprobs[6])
    for tok in (EOS, 29, 8, 9):
        assert out.token_ids_logprobs[7][tok][0] == float("-inf")
    assert all(lp > float("-inf") for lp, _ in out.token_ids_logprobs[8])


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    vocab = 12
    logits = torch.zeros(1, vocab)
    logits[0, EOS] = 20.0
    logits[0, 8] = 19.0
    logits[0, 5] = 18.0
    sampler = Sampler(vocab, {EOS})
    params = SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[8], max_new_tokens=10)
    picks = []
    for produced in range(5):
        out = _sample(
            sampler, logits, [Row(params, output_ids=[1] * produced)], token_ids_logprob=[[EOS, 8]]
        )
        picks.append(out.next_token_ids[0])
        masked = [lp == float("-inf") for lp, _ in out.token_ids_logprobs[0]]
        assert masked == [produced < 3, produced < 3]
    assert picks == [5, 5, 5, EOS, EOS]
    # Sampled rows never draw a masked id either.
    sampled = SamplingParams(temperature=1.0, min_new_tokens=2, stop_token_ids=[8], max_new_tokens=10)
    rows = [Row(sampled, output_ids=[1], seed=s) for s in range(500)]
    out = _sample(sampler, logits.expand(500, vocab).contiguous(), rows)
    assert EOS not in out.next_token_ids and 8 not in out.next_token_ids


def test_ignore_eos_leaves_the_distribution_alone() -> None:
    """ignore_eos is the scheduler's business (do not stop); the sampled distribution and its
    logprobs stay the model's, which is what a trainer recomputes."""
    vocab = 12
    logits = torch.zeros(1, vocab)
    logits[0, EOS] = 20.0
    logits[0, 11] = 19.0
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    row = Row(params, output_ids=[1] * 50)
    out = _sample(Sampler(vocab, {EOS, 11}), logits, [row], return_logprob=[True])
    assert out.next_token_ids[0] == EOS
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[EOS]), abs=1e-6)


def test_logit_bias_can_force_a_token() -> None:
    vocab = 100
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(200, vocab, generator=g)
    rows = [Row(SamplingParams(logit_bias={42: 100.0}), seed=s) for s in range(200)]
    out = _sample(Sampler(vocab, {EOS}), logits, rows)
    assert set(out.next_token_ids) == {42}


def test_penalties_skip_rows_without_them() -> None:
    # Rows without penalties keep exactly the plain logprobs when a neighbour uses penalties.
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 50, generator=g)
    rows = [
        Row(SamplingParams(temperature=0.0), output_ids=[1, 1, 3]),
        Row(SamplingParams(temperature=0.0, frequency_penalty=2.0), output_ids=[1, 1, 3]),
        Row(SamplingParams(temperature=0.0), output_ids=[1, 1, 3]),
    ]
    out = _sample(Sampler(50, {EOS}), logits, rows, token_ids_logprob=[list(range(50))] * 3)
    plain = torch.log_softmax(logits, dim=-1)
    for i in (0, 2):
        assert torch.equal(torch.tensor([lp for lp, _ in out.token_ids_logprobs[i]]), plain[i])
