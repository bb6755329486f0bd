"""Hot weight updates through the in-process Engine (the same scheduler code the HTTP routes use).

Tensors and disk checkpoints on a tiny random Llama: get_weights_by_name, greedy parity with
transformers on the new weights, versions everywhere, failures that keep the old weights serving, pause
modes around an update (per-token versions, no stale prefix reuse), memory release and resume.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from runtime.engine import Engine, WeightsUnusableError
from tests.weight_trainer import hf_greedy, perturbed

pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0.0, "ignore_eos": True}
PROMPT = [5, 17, 99, 42, 7, 200, 31, 64, 128, 3, 11, 12]


@pytest.fixture(scope="module")
def eng(checkpoints):
    e = Engine(checkpoints["a"], skip_tokenizer_init=True, max_total_tokens=4096, progress=False,
               device="cpu", dtype="float32")
    yield e
    e.shutdown()


def greedy(eng: Engine, n: int = 8, prompt: list[int] = PROMPT, **kw) -> dict:
    return eng.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": n}, return_logprob=True, **kw)


def test_tensor_update_parity_versions_and_reads(eng, checkpoints):
    named = perturbed(checkpoints["a"], 0.1, seed=3)
    ok, msg = eng.update_weights_from_tensor(named, weight_version="t1")
    assert ok, msg
    assert eng.weight_version == "t1"
    want = dict(named)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight",
                 "model.norm.weight", "lm_head.weight"):
        got = torch.tensor(eng.get_weights_by_name(name, truncate_size=3))
        assert torch.equal(got, want[name][:3]), name
    out = greedy(eng)
    assert out["output_ids"] == hf_greedy(checkpoints["a"], PROMPT, 8, named)
    assert out["meta_info"]["weight_version"] == "t1"
    assert out["meta_info"]["output_token_weight_versions"] == ["t1"] * 8
    # Back to the checkpoint (version "a"), exactly.
    ok, msg = eng.update_weights_from_disk(checkpoints["a"], weight_version="a")
    assert ok and msg == "Succeeded to update model weights."
    assert greedy(eng)["output_ids"] == hf_greedy(checkpoints["a"], PROMPT, 8)


def test_disk_switch_and_back_and_failures(eng, checkpoints):
    ok, _ = eng.update_weights_from_disk(checkpoints["a"], weight_version="a")
    assert ok
    old = greedy(eng)["output_ids"]
    ok, msg = eng.update_weights_from_disk(checkpoints["b"], weight_version="b")
    assert ok, msg
    new = greedy(eng)
    assert new["output_ids"] != old and new["output_ids"] == hf_greedy(checkpoints["b"], PROMPT, 8)
    assert new["meta_info"]["weight_version"] == "b"
    ok, _ = eng.update_weights_from_disk(checkpoints["a"], weight_version="a2")
    assert ok and greedy(eng)["output_ids"] == old

    ok, msg = eng.update_weights_from_disk("/no/such/checkpoint", weight_version="x")
    assert not ok and msg == "Failed to get weights iterator: /no/such/checkpoint (repository not found)."
    ok, msg = eng.update_weights_from_disk(checkpoints["wide"], weight_version="x")
    assert not ok
    assert msg.startswith("Failed to update weights: Shape mismatch for model.layers.0.mlp.down_proj.weight: "
                          "model expects (64, 128) torch.float32, got (64, 96) torch.float32.\nRolling back")
    assert msg.endswith(".\nRolling back to original weights.") and "..\n" not in msg
    ok, msg = eng.update_weights_from_tensor([("model.layers.9.mlp.up_proj.weight", torch.zeros(3))])
    assert not ok and "Unknown weight model.layers.9.mlp.up_proj.weight" in msg
    ok, msg = eng.update_weights_from_tensor([("model.norm.weight", torch.zeros(64, dtype=torch.int32))])
    assert not ok and "Dtype mismatch for model.norm.weight" in msg
    with pytest.raises(ValueError, match="Unknown weight nope"):
        eng.get_weights_by_name("nope")
    # The old weights still serve, under the old version.
    out = greedy(eng)
    assert out["output_ids"] == old and out["meta_info"]["weight_version"] == "a2"


def _start_long_request(eng: Engine, results: list, n: int = 40) -> threading.Thread:
    t = threading.Thread(target=lambda: results.append(greedy(eng, n=n, rid="long")))
    t.start()
    deadline = time.monotonic() + 30
    while not eng.scheduler.running or not eng.scheduler.running[0].output_ids:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return t


@pytest.mark.parametrize("mode", ["in_place", "retract", "abort"])
def test_pause_modes_around_an_update(eng, checkpoints, mode):
    eng.update_weights_from_disk(checkpoints["a"], weight_version="v0")
    greedy(eng, n=2)  # put the prompt in the prefix cache
    results: list = []
    t = _start_long_request(eng, results)
    ok, _ = eng.pause_generation(mode)
    assert ok
    ok, msg = eng.update_weights_from_disk(checkpoints["b"], weight_version="v1")
    assert ok, msg
    assert eng.scheduler.cache_manager.cached_tokens() == 0  # paused: nothing computed under v1 yet
    eng.continue_generation()
    t.join(30)
    out = results[0]
    versions = out["meta_info"]["output_token_weight_versions"]
    fr = out["meta_info"]["finish_reason"]
    if mode == "abort":
        assert fr["type"] == "abort" and set(versions) == {"v0"} and out["meta_info"]["weight_version"] == "v0"
    else:
        assert fr == {"type": "length", "length": 40}
        k = versions.index("v1")
        assert 0 < k and versions == ["v0"] * k + ["v1"] * (40 - k)
        assert out["meta_info"]["weight_version"] == "v1"
    # No KV from v0 is reused: the same prompt matches transformers on b. Only a retracted request
    # recomputed its KV under v1 and cached it; one kept in place holds v0 KV and must not cache it.
    after = greedy(eng)
    assert (after["meta_info"]["cached_tokens"] > 0) == (mode == "retract")
    assert after["output_ids"] == hf_greedy(checkpoints["b"], PROMPT, 8)
    assert eng.scheduler.is_idle_clean()


def test_update_while_a_request_locks_a_cached_prefix_it_does_not_read(eng, checkpoints):
    # A cached one-token prompt: the request locks the cached token but computes it anyway (the last
    # prompt token must run for logits), so it holds a lock with no prefix in use. The update must still
    # drop the whole cache; it once failed with "a running request still holds a cached prefix".
    eng.update_weights_from_disk(checkpoints["a"], weight_version="p0")
    greedy(eng, n=1, prompt=[9])
    it = eng.generate(input_ids=[9], sampling_params={**GREEDY, "max_new_tokens": 30}, stream=True)
    next(it)
    assert eng.pause_generation("in_place")[0]  # keeps it running, holding its lock
    ok, msg = eng.update_weights_from_disk(checkpoints["b"], weight_version="p1")
    assert ok, msg
    assert eng.scheduler.cache_manager.cached_tokens() == 0
    eng.continue_generation()
    assert list(it)[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 30}
    assert greedy(eng, prompt=[9])["output_ids"] == hf_greedy(checkpoints["b"], [9], 8)
    assert eng.scheduler.is_idle_clean()


def test_generate_waits_while_paused(eng):
    eng.pause_generation("retract")
    results: list = []
    t = threading.Thread(target=lambda: results.append(greedy(eng, n=3)))
    t.start()
    time.sleep(0.3)
    assert not results and len(eng.scheduler.waiting) == 1
    eng.continue_generation()
    t.join(30)
    assert results[0]["meta_info"]["finish_reason"]["type"] == "length"


def test_release_and_resume_memory(eng, checkpoints):
    eng.update_weights_from_disk(checkpoints["a"], weight_version="m0")
    ref = greedy(eng)["output_ids"]
    ok, msg = eng.release_memory_occupation(["nope"])
    assert not ok and "Unknown memory tags ['nope']" in msg
    ok, _ = eng.release_memory_occupation(["kv_cache", "weights"])
    assert ok
    assert eng.runner.kv_pool.k_buffers[0].untyped_storage().nbytes() == 0
    assert eng.runner.model.lm_head.weight.untyped_storage().nbytes() == 0
    ok, msg = eng.update_weights_from_disk(checkpoints["a"])
    assert not ok and "released" in msg
    ok, msg = eng.resume_memory_occupation(["weights"])
    assert ok and "dropped" in msg  # on the CPU the values are gone: refuse until an update
    with pytest.raises(WeightsUnusableError, match="update the weights"):
        greedy(eng)
    ok, _ = eng.update_weights_from_disk(checkpoints["a"], weight_version="m1")
    assert ok
    eng.resume_memory_occupation(["kv_cache"])
    out = greedy(eng)
    assert out["output_ids"] == ref and out["meta_info"]["weight_version"] == "m1"
