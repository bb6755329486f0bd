"""Parts of the device check (benchmarks/gpu_check.py) that generate: parity against transformers and the
GRPO-shaped workloads against transformers' `generate`, with and without CUDA graphs.

Parity, on the same weights:
- fp32 (TF32 off everywhere): greedy continuations of the Engine equal transformers' `generate`, token for
  token, and the Engine's logprobs of those tokens are within a tolerance of transformers' log-softmax;
- bf16: teacher-forced on the fp32 continuations, the Engine's top-1 token at every position agrees with
  transformers' bf16 model (a fraction: bf16 rounding moves near-ties).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from benchmarks.gpu_check_models import prompts
from runtime.engine import Engine


def engine(path: str, device: str, dtype: str, **kwargs: Any) -> Engine:
    return Engine(path, skip_tokenizer_init=True, progress=False, device=device, dtype=dtype, **kwargs)


def free(*objs: Any) -> None:
    for o in objs:
        if isinstance(o, Engine):
            o.shutdown()
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _hf(path: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@torch.inference_mode()
def _hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def _hf_logprobs(model: torch.nn.Module, sequence: list[int]) -> torch.Tensor:
    """[len - 1, vocab] fp32 log-softmax of the logits predicting tokens 1.. of `sequence`."""
    logits = model(torch.tensor([sequence], device=model.device)).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def parity(path: str, device: str, num_prompts: int, prompt_len: int, new_tokens: int,
           engine_args: dict[str, Any]) -> dict[str, Any]:
    """fp32 greedy parity and bf16 top-1 agreement of the Engine against transformers on `path`."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf32 = _hf(path, device, torch.float32)
    vocab = hf32.config.vocab_size
    ps = prompts(num_prompts, prompt_len, vocab, seed=11)
    want = [_hf_greedy(hf32, p, new_tokens) for p in ps]
    ref_lp = [_hf_logprobs(hf32, p + w) for p, w in zip(ps, want)]
    free(hf32)

    eng = engine(path, device, "float32", **engine_args)
    greedy = {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}
    outs = eng.generate(input_ids=ps, sampling_params=greedy, return_logprob=True)
    got = [o["output_ids"] for o in outs]
    lp_diff = 0.0
    for p, o, lp in zip(ps, outs, ref_lp):
        for k, (value, token, _) in enumerate(o["meta_info"]["output_token_logprobs"]):
            lp_diff = max(lp_diff, abs(value - float(lp[len(p) - 1 + k, token])))
    free(eng)
    result: dict[str, Any] = {
        "fp32_greedy_identical": sum(g == w for g, w in zip(got, want)), "fp32_sequences": len(ps),
        "fp32_first_divergence": min((next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), new_tokens)
                                      for g, w in zip(got, want)), default=new_tokens),
        "fp32_max_logprob_diff": lp_diff}

    # bf16: teacher-forced on the fp32 continuations; top-1 at every position of the continuation.
    seqs = [p + w for p, w in zip(ps, want)]
    hf16 = _hf(path, device, torch.bfloat16)
    hf_top = [_hf_logprobs(hf16, s).argmax(-1)[len(p) - 1:].tolist() for s, p in zip(seqs, ps)]
    free(hf16)
    eng = engine(path, device, "bfloat16", **engine_args)
    outs = eng.generate(input_ids=seqs, sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                        return_logprob=True, logprob_start_len=0, top_logprobs_num=1)
    agree = total = 0
    for o, p, top in zip(outs, ps, hf_top):
        # input_top_logprobs[i] is the distribution over token i (entry 0 is None): entries len(p).. cover
        # the continuation, as hf_top does.
        ours = [entry[0][1] for entry in o["meta_info"]["input_top_logprobs"][len(p):]]
        agree += sum(a == b for a, b in zip(ours, top))
        total += len(top)
    free(eng)
    result.update({"bf16_top1_agreement": agree / max(total, 1), "bf16_positions": total})
    return result


def _timed_ours(eng: Engine, ps: list[list[int]], n: int, new_tokens: int) -> float:
    eng.flush_cache()
    params = {"max_new_tokens": new_tokens, "temperature": 1.0, "n": n, "ignore_eos": True}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = eng.generate(input_ids=ps, sampling_params=params)
    seconds = time.perf_counter() - start
    produced = sum(len(o["output_ids"]) for o in out)
    assert produced == len(ps) * n * new_tokens, produced
    return seconds


@torch.inference_mode()
def _timed_hf(model: torch.nn.Module, ps: list[list[int]], n: int, new_tokens: int) -> float:
    width = max(len(p) for p in ps)
    ids = torch.zeros((len(ps), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(ps):   # left-padded, as generate wants
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         num_return_sequences=n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert (out.shape[1] - width) * out.shape[0] == len(ps) * n * new_tokens
    return seconds


def workloads(path: str, device: str, dtype: str, shapes: list[tuple[int, int, int, int]],
              engine_args: dict[str, Any], transformers_max_tokens: int) -> list[dict[str, Any]]:
    """Each (prompts, prompt_len, n, new_tokens) by the Engine with CUDA graphs, without, and by transformers'
    generate (skipped above transformers_max_tokens new tokens in all); tokens/s and ratios."""
    rows: list[dict[str, Any]] = []
    vocab = None
    for graphs in (True, False):
        eng = engine(path, device, dtype, disable_cuda_graph=not graphs, **engine_args)
        vocab = eng.runner.vocab_size
        warm = prompts(4, 16, vocab, seed=2)
        eng.generate(input_ids=warm, sampling_params={"max_new_tokens": 8, "ignore_eos": True})
        for i, (count, length, n, new) in enumerate(shapes):
            ps = prompts(count, length, vocab, seed=20 + i)
            seconds = _timed_ours(eng, ps, n, new)
            graph = eng.runner.graph_runner
            rows.append({"workload": f"{count} prompts x n {n}, {new} new", "system": "ours, CUDA graphs" if graphs
                         else "ours, no graphs", "tokens": count * n * new, "seconds": seconds,
                         "graph_replays": graph.num_replays if graph else 0})
        free(eng)
    model = _hf(path, device, getattr(torch, dtype))
    for i, (count, length, n, new) in enumerate(shapes):
        name = f"{count} prompts x n {n}, {new} new"
        if count * n * new > transformers_max_tokens:
            rows.append({"workload": name, "system": "transformers generate", "tokens": count * n * new,
                         "seconds": None, "note": f"skipped: over {transformers_max_tokens} tokens"})
            continue
        ps = prompts(count, length, vocab, seed=20 + i)
        _timed_hf(model, ps[:2], 1, 4)   # warm-up
        rows.append({"workload": name, "system": "transformers generate", "tokens": count * n * new,
                     "seconds": _timed_hf(model, ps, n, new)})
    free(model)
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"] if r.get("seconds") else None
    return rows
