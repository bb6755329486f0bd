"""No tensor of the hot path is built off its device: scheduler steps (batch building, cache manager,
page allocator, request-to-token table, KV pool, model runner, sampler) run with torch's default device
set to meta.

A tensor built without device= then lands on meta, and any op mixing it with the engine's tensors, or
reading it on the host, raises: on CPU the same check a CUDA engine makes on its first step (where a
CPU-built tensor meets CUDA ones). Host-side staging tensors name device="cpu" on purpose.
"""

from __future__ import annotations

import pytest
import torch

from runtime.messages import GenerateRequest
from runtime.model_runner import ModelRunner
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler
from runtime.server_args import ServerArgs


def _requests(retracting: bool) -> list[GenerateRequest]:
    new = 30 if retracting else None
    params = [SamplingParams(temperature=0.0, max_new_tokens=new or 5),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, max_new_tokens=new or 6,
                             repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1,
                             logit_bias={"5": 1.0}, min_new_tokens=3, stop_token_ids=[7], ignore_eos=True),
              SamplingParams(temperature=1.0, max_new_tokens=new or 12, ignore_eos=True)]
    # Overlapping prompts read the first one's prefix from the cache; distinct ones fill a small pool.
    prompts = [[10 + i] * (14 + 3 * i) for i in range(3)] if retracting else \
        [list(range(3, 30 + 5 * i)) for i in range(3)]
    return [GenerateRequest(rid=f"r{i}", input_ids=ids, sampling_params=sp, return_logprob=True, logprob_start_len=0,
                            top_logprobs_num=2, token_ids_logprob=[3, 4])
            for i, (ids, sp) in enumerate(zip(prompts, params))]


@pytest.mark.parametrize("page_size, retracting", [(4, False), (1, True)], ids=["paged", "retracting"])
def test_scheduler_steps_build_no_tensor_off_device(tiny_model_dir, page_size, retracting):
    # A pool of 80 tokens cannot hold three requests of up to 50: one is retracted and redone.
    args = ServerArgs(model_path=tiny_model_dir("llama"), max_total_tokens=80 if retracting else 512,
                      context_length=64, chunked_prefill_size=16, device="cpu", dtype="float32",
                      page_size=page_size, attention_backend="torch")
    sched = Scheduler(ModelRunner(args, progress=False), eos_token_ids={2})
    for msg in _requests(retracting):
        sched.add_request(msg)
    finished = []
    with torch.device("meta"):
        for _ in range(200):
            if not sched.has_work():
                break
            finished += [o.rid for o in sched.step() if o.finished]
    assert sorted(finished) == ["r0", "r1", "r2"]
    assert sched.is_idle_clean()
    if retracting:
        assert sched.num_retractions > 0
