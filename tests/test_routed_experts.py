"""Routed experts from generation (Engine.generate(return_routed_experts=True)), whatever the cache did.

Oracle: transformers' own routers on the same weights: the top-k of its router logits over the finished
sequence (prompt + output[:-1], the positions that ran through the model), layer by layer. The engine's
answer must equal it through chunked prefill, paged decode, prefix-cache hits (pages of 1 and 4), n > 1
siblings sharing a prompt, retractions, and a cached prefix detached by a weight update mid-request; and
runs with the cache on and off must agree.
"""

from __future__ import annotations

import threading

import pytest
import torch

from runtime.engine import Engine
from sync.routed_experts_codec import decode_routed_experts, encode_routed_experts
from tests.test_routing_replay import FAMILIES, _hf, _hf_routing

GREEDY = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}


def _engine(path: str, **kw) -> Engine:
    args = dict(skip_tokenizer_init=True, max_total_tokens=2048, chunked_prefill_size=8, device="cpu",
                dtype="float32", progress=False)
    return Engine(path, **{**args, **kw})


def _routed(out: dict) -> torch.Tensor:
    meta = out["meta_info"]
    return decode_routed_experts(meta["routed_experts"], meta["routed_experts_shape"])


def _check_against_hf(hf: torch.nn.Module, prompt: list[int], out: dict, start: int = 0) -> torch.Tensor:
    seq = prompt + out["output_ids"]
    got = _routed(out)
    want = _hf_routing(hf, seq[:-1])[start:]
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got, want), f"routing differs on {int((got != want).any(-1).any(-1).sum())} tokens"
    assert out["meta_info"]["routed_experts_start_len"] == start
    return got


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]


def test_codec_round_trip():
    ids = torch.randint(0, 300, (7, 3, 2))
    data, shape = encode_routed_experts(ids)
    assert shape == [7, 3, 2] and torch.equal(decode_routed_experts(data, shape), ids)
    with pytest.raises(ValueError, match=r"holds 84 bytes; shape \[7, 3, 3\] needs 126"):
        decode_routed_experts(data, [7, 3, 3])


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_generate_returns_transformers_routing(variant, tiny_model_dir):
    family, overrides = FAMILIES[variant]
    path = tiny_model_dir(family, **overrides)
    hf = _hf(path)
    prompts = _prompts(0, (5, 19, 33))  # one chunk, three chunks, five chunks of 8
    with _engine(path) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_routed_experts=True)
        plain = engine.generate(input_ids=prompts[0], sampling_params=GREEDY)
        assert "routed_experts" not in plain["meta_info"]
        late = engine.generate(input_ids=prompts[2], sampling_params=GREEDY, return_routed_experts=True,
                               routed_experts_start_len=20)
    for prompt, out in zip(prompts, outs):
        routing = _check_against_hf(hf, prompt, out)
        assert routing.shape[1:] == (len(engine.runner.model.routing_layers), 2)
    _check_against_hf(hf, prompts[2], late, start=20)


@pytest.mark.parametrize("page_size", [1, 4])
def test_prefix_hits_and_siblings_complete_the_routing(page_size, tiny_model_dir):
    path = tiny_model_dir("qwen3_moe", norm_topk_prob=True)
    hf = _hf(path)
    base = _prompts(1, (41,))[0]
    prompts = [base + tail for tail in _prompts(2, (3, 9, 1))]
    sampled = {"temperature": 1.0, "max_new_tokens": 5, "ignore_eos": True, "sampling_seed": 4, "n": 2}
    results = {}
    for cache in (True, False):
        with _engine(path, page_size=page_size, disable_radix_cache=not cache) as engine:
            first = engine.generate(input_ids=base, sampling_params=GREEDY, return_routed_experts=True)
            outs = engine.generate(input_ids=prompts, sampling_params=sampled, return_routed_experts=True,
                                   routed_experts_start_len=2)
        cached = [o["meta_info"]["cached_tokens"] for o in outs]
        assert (min(cached) >= 40 - 40 % page_size) if cache else max(cached) == 0, cached
        _check_against_hf(hf, base, first)
        for i, out in enumerate(outs):  # prompt-major: p0s0, p0s1, p1s0, ...
            _check_against_hf(hf, prompts[i // 2], out, start=2)
        results[cache] = [(o["output_ids"], _routed(o)) for o in outs]
    for (ids_c, r_c), (ids_n, r_n) in zip(results[True], results[False]):
        if ids_c == ids_n:  # sampling matched (it does unless a logit ties at fp32 noise): so must routing
            assert torch.equal(r_c, r_n)


def test_retracted_requests_return_complete_routing(tiny_model_dir):
    path = tiny_model_dir("mixtral")
    hf = _hf(path)
    prompts = _prompts(5, (12, 14, 16, 18, 20, 22))
    long = {"temperature": 0.0, "max_new_tokens": 30, "ignore_eos": True}
    with _engine(path, max_total_tokens=128, max_running_requests=6, chunked_prefill_size=64) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=long, return_routed_experts=True)
        assert engine.scheduler.num_retractions > 0
    for prompt, out in zip(prompts, outs):
        _check_against_hf(hf, prompt, out)


def test_routing_survives_a_weight_update_mid_request(tiny_model_dir):
    """An update detaches a running request from the cache: its cached prefix's KV (and routing) is copied
    into slots of its own. The update writes the same values, so the routing must still be transformers'."""
    path = tiny_model_dir("qwen2_moe")
    hf = _hf(path)
    prompt = _prompts(6, (30,))[0]
    name = "model.layers.0.mlp.gate.weight"
    same = dict(hf.named_parameters())[name].detach().clone()
    with _engine(path) as engine:
        engine.generate(input_ids=prompt, sampling_params=GREEDY)  # puts the prompt in the cache
        stream = engine.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 60}, stream=True,
                                 return_routed_experts=True)
        first = next(stream)
        assert first["meta_info"]["cached_tokens"] > 0 and not first["meta_info"]["finish_reason"]
        assert engine.update_weights_from_tensor([(name, same)])[0]
        # Another request takes slots the dropped cache freed, so a missed copy would read its routing.
        other = threading.Thread(target=engine.generate, kwargs=dict(input_ids=_prompts(7, (40,))[0],
                                                                      sampling_params=GREEDY))
        other.start()
        *_, last = stream
        other.join()
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    _check_against_hf(hf, prompt, last)


def test_bad_fields_are_refused(tiny_model_dir):
    with _engine(tiny_model_dir("qwen3_moe")) as engine:
        with pytest.raises(ValueError, match=r"routed_experts_start_len must be in \[0, 3\].*got 4"):
            engine.generate(input_ids=[5, 6, 7], return_routed_experts=True, routed_experts_start_len=4)
        with pytest.raises(ValueError, match="routed_experts_start_len must be a non-negative integer"):
            engine.generate(input_ids=[5, 6, 7], return_routed_experts=True, routed_experts_start_len=-1)
        assert engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)["output_ids"]
    with _engine(tiny_model_dir("qwen3")) as dense:
        with pytest.raises(ValueError, match="return_routed_experts=True needs a mixture-of-experts model"):
            dense.generate(input_ids=[5, 6, 7], return_routed_experts=True)
        with pytest.raises(ValueError, match="needs a mixture-of-experts model; this one is dense"):
            dense.start_expert_distribution_record()
        assert dense.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)["output_ids"]
