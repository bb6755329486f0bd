"""Seeded cases for tests/test_triton_attention.py: each builds its inputs on `device`, runs a Triton
kernel (or backend, or engine) and its torch reference, and returns both results on the CPU.

Triton picks its interpreter or its compiler once per process, when it is imported. On CPU tensors the
kernels only run in the interpreter, so the tests run these cases in the `triton_interpreter` fixture's
child process (tests/triton_interpret.py); the pytest process (every other test, the GPU tests, the
compile checks) keeps ordinary Triton. Nothing here imports triton at module level.

Every case scatters pages at random over the pool (a random permutation of pages), fills the cache
rows no request owns with NaN (a read of a wrong slot shows), and pre-fills outputs with NaN (a row the
kernel forgets to write shows).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

NUM_SLOTS = 512


def scattered_page_table(gen: torch.Generator, seq_lens: list[int], page_size: int,
                         num_slots: int = NUM_SLOTS) -> torch.Tensor:
    """[B, max(seq_lens)] slots: each request's pages drawn from a random permutation of the pool's
    pages, positions past a request's length padded with the pad slot `num_slots`."""
    pages = torch.randperm(num_slots // page_size, generator=gen)
    table = torch.full((len(seq_lens), max(seq_lens)), num_slots, dtype=torch.int64)
    taken = 0
    for b, n in enumerate(seq_lens):
        count = -(-n // page_size)
        mine = pages[taken:taken + count]
        taken += count
        table[b, :n] = (mine[:, None] * page_size + torch.arange(page_size)).flatten()[:n]
    assert taken <= pages.numel(), "pool too small for the case"
    return table


def _cache(gen: torch.Generator, table: torch.Tensor, seq_lens: list[int], kv_heads: int, head_dim: int,
           dtype: torch.dtype) -> torch.Tensor:
    """[NUM_SLOTS + 1, Hkv, D]: random rows where the table names a slot, NaN elsewhere, zeros in the pad
    slot (as in KVPool)."""
    cache = torch.full((NUM_SLOTS + 1, kv_heads, head_dim), float("nan"))
    for b, n in enumerate(seq_lens):
        cache[table[b, :n]] = torch.randn(n, kv_heads, head_dim, generator=gen)
    cache[NUM_SLOTS] = 0
    return cache.to(dtype)


def _strided(gen: torch.Generator, t: int, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[t, heads, head_dim] as a view into wider rows, as the q/k/v split of a fused projection is."""
    wide = torch.randn(t, heads * head_dim + 8, generator=gen).to(dtype)
    return wide[:, 3:3 + heads * head_dim].view(t, heads, head_dim)


def store_case(dtype: torch.dtype, page_size: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.triton.kv_store import store_kv, store_kv_torch

    gen = torch.Generator().manual_seed(1)
    table = scattered_page_table(gen, [37, 5, 21], page_size)
    slots = torch.cat([table[0, :37], table[1, :5], table[2, :21]])
    k, v = (_strided(gen, slots.numel(), 3, 24, dtype) for _ in range(2))
    caches = [torch.randn(NUM_SLOTS + 1, 3, 24, generator=gen).to(dtype) for _ in range(2)]
    ours = [c.clone().to(device) for c in caches]
    store_kv(ours[0], ours[1], slots.to(device), k.to(device), v.to(device))
    store_kv_torch(caches[0], caches[1], slots, k, v)
    return torch.stack(ours).cpu(), torch.stack(caches)


def decode_case(dtype: torch.dtype, page_size: int, num_splits: int, sliding_window: int | None,
                group: int, head_dim: int = 16, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.triton.decode_attention import decode_attention, decode_attention_torch, decode_workspace

    gen = torch.Generator().manual_seed(2)
    kv_heads, seq_lens = 2, [1, 16, 17, 70, 130]
    table = scattered_page_table(gen, seq_lens, page_size)
    k_cache, v_cache = (_cache(gen, table, seq_lens, kv_heads, head_dim, dtype) for _ in range(2))
    q = _strided(gen, len(seq_lens), kv_heads * group, head_dim, dtype)
    lens = torch.tensor(seq_lens)
    out = torch.full_like(q, float("nan"), device=device)
    workspace = tuple(t.fill_(float("nan")) for t in decode_workspace(len(seq_lens), q.shape[1], head_dim,
                                                                         num_splits, torch.device(device)))
    decode_attention(q.to(device), k_cache.to(device), v_cache.to(device), table.to(device), lens.to(device),
                     0.3, sliding_window, num_splits, out=out, workspace=workspace)
    ref = decode_attention_torch(q.float(), k_cache.float(), v_cache.float(), table, lens, 0.3, sliding_window)
    return out.cpu(), ref


def extend_case(dtype: torch.dtype, page_size: int, sliding_window: int | None, group: int,
                head_dim: int = 16, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A ragged batch: fresh prompts, chunks on cached prefixes (one longer than a block of rows) and
    single tokens (decodes) side by side."""
    from kernels.paged_attention import store_kv_torch
    from kernels.triton.extend_attention import extend_attention, extend_attention_torch

    gen = torch.Generator().manual_seed(3)
    kv_heads = 2
    prefix_lens, extend_lens = [0, 16, 5, 40, 33, 0], [20, 1, 70, 3, 1, 1]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    table = scattered_page_table(gen, seq_lens, page_size)
    k_cache, v_cache = (_cache(gen, table, prefix_lens, kv_heads, head_dim, dtype) for _ in range(2))
    t = sum(extend_lens)
    q = _strided(gen, t, kv_heads * group, head_dim, dtype)
    k, v = (_strided(gen, t, kv_heads, head_dim, dtype) for _ in range(2))
    slots = torch.cat([table[b, p:s] for b, (p, s) in enumerate(zip(prefix_lens, seq_lens))])
    store_kv_torch(k_cache, v_cache, slots, k, v)   # as the backends do before attending
    pre, ext = torch.tensor(prefix_lens), torch.tensor(extend_lens)
    starts = torch.cumsum(ext, 0) - ext
    out = torch.full_like(q, float("nan"), device=device)
    extend_attention(*(x.to(device) for x in (q, k, v, k_cache, v_cache, table, pre, ext, starts)),
                     max(extend_lens), 0.3, sliding_window, out=out)
    ref = extend_attention_torch(q.float(), k_cache.float(), v_cache.float(), table, pre, ext, 0.3, sliding_window)
    return out.cpu(), ref


def mixed_batch(page_size: int, device: str = "cpu"):
    """A ForwardBatch of two prefill chunks and four decodes, three of which share a 20-token prefix
    (the torch backend's cascade path), with its page table scattered over a pool of NUM_SLOTS."""
    from runtime.forward_batch import ForwardBatch

    gen = torch.Generator().manual_seed(4)
    prefix_lens, extend_lens = [0, 9, 24, 24, 24, 40], [13, 30, 1, 1, 1, 1]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    table = scattered_page_table(gen, seq_lens, page_size)
    table[3, :20] = table[2, :20]   # decodes 2..4 share their first 20 slots
    table[4, :20] = table[2, :20]
    slots = torch.cat([table[b, p:s] for b, (p, s) in enumerate(zip(prefix_lens, seq_lens))])
    t = slots.numel()
    return ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.int64, device=device), positions=torch.zeros(t, dtype=torch.int64,
                                                                                          device=device),
        out_slots=slots.to(device), prefix_lens=torch.tensor(prefix_lens, device=device),
        extend_lens=torch.tensor(extend_lens, device=device), seq_lens=torch.tensor(seq_lens, device=device),
        page_table=table.to(device), num_extend=2, logits_indices=torch.arange(t, device=device))


def backend_case(dtype: torch.dtype, page_size: int, sliding_window: int | None, decode_splits: int | None,
                 device: str = "cpu", other: str = "triton") -> dict[str, torch.Tensor]:
    """One mixed step through the torch backend and `other`, each on its own pool with the same cached
    prefixes: both backends' outputs and pools after the step."""
    from runtime.attention.registry import create_attention_backend
    from runtime.kv_pool import KVPool

    gen = torch.Generator().manual_seed(5)
    batch = mixed_batch(page_size)
    kv_heads, heads, head_dim, layers = 2, 6, 16, 2
    t = batch.num_tokens
    q = _strided(gen, t, heads, head_dim, dtype)
    k, v = (_strided(gen, t, kv_heads, head_dim, dtype) for _ in range(2))
    prefix = torch.randn(2, layers, NUM_SLOTS, kv_heads, head_dim, generator=gen).to(dtype)
    result: dict[str, torch.Tensor] = {}
    for name in ("torch", other):
        pool = KVPool(layers, NUM_SLOTS, kv_heads, head_dim, dtype, device)
        for layer in range(layers):
            pool.k_buffers[layer][:NUM_SLOTS] = prefix[0, layer]
            pool.v_buffers[layer][:NUM_SLOTS] = prefix[1, layer]
        backend = create_attention_backend(name, pool)
        if name == "triton":
            backend.decode_splits = decode_splits
        dev_batch = mixed_batch(page_size, device)
        q_dev, k_dev, v_dev = q.to(device), k.to(device), v.to(device)
        # Our backends build every tensor on the batch's device: with meta as the default device, one
        # built without device= would be on meta and fail when mixed with the batch's tensors.
        # (Not FlashInfer: its host-side planning uses the default device on purpose.)
        with torch.device("meta") if name != "flashinfer" else contextlib.nullcontext():
            backend.prepare(dev_batch)
            outs = [backend.forward(q_dev, k_dev, v_dev, layer, dev_batch, 0.3, sliding_window)
                    for layer in range(layers)]
        result[name] = torch.stack(outs).cpu()
        result[name + "_pool"] = torch.stack(pool.k_buffers + pool.v_buffers).cpu()
    return result


def run_engine(model_path: str, engine_args: dict[str, Any], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Engine.generate once per entry of `calls` (its keyword arguments), in order; the outputs, the
    scheduler's retraction count, whether it ended idle and clean, and the attention backend's class."""
    from runtime.engine import Engine

    eng = Engine(model_path, skip_tokenizer_init=True, progress=False, **engine_args)
    try:
        outputs = [eng.generate(**call) for call in calls]
        return {"outputs": outputs, "num_retractions": eng.scheduler.num_retractions,
                "idle_clean": eng.scheduler.is_idle_clean(), "backend": type(eng.runner.backend).__name__}
    finally:
        eng.shutdown()
