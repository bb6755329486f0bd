"""Seeded cases for tests/test_triton_invariant.py: each runs a batch-invariant Triton kernel
(kernels/triton/invariant_*.py) in several batch layouts and its torch reference, and returns every result
on the CPU for the test to compare. Run in the interpreting child process (tests/triton_interpret.py), or on
CUDA by the `gpu` tests; nothing here imports triton at module level.
"""

from __future__ import annotations

import torch

from triton_cases import NUM_SLOTS, scattered_page_table


def paged_cache(gen: torch.Generator, table: torch.Tensor, seq_lens: list[int], kv_heads: int, head_dim: int,
                dtype: torch.dtype) -> torch.Tensor:
    """[NUM_SLOTS + 1, Hkv, D]: random rows in the slots the table names, NaN in every other (a read of a
    wrong slot shows), zeros in the pad slot (as in KVPool)."""
    cache = torch.full((NUM_SLOTS + 1, kv_heads, head_dim), float("nan"))
    for b, n in enumerate(seq_lens):
        cache[table[b, :n]] = torch.randn(n, kv_heads, head_dim, generator=gen)
    cache[NUM_SLOTS] = 0
    return cache.to(dtype)


def matmul_case(dtype: torch.dtype, m: int, k: int, n: int, bias: bool,
                device: str = "cpu") -> dict[str, torch.Tensor]:
    """x [m, k] @ W^T: the whole call, each probed row alone (M = 1), the rows at another offset inside a
    smaller call, and the fp32 reference."""
    from kernels.triton.invariant_matmul import invariant_matmul

    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    w = torch.randn(n, k, generator=gen).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    probes = [0, 1, m // 2, m - 1]
    full = invariant_matmul(x, w, b)
    alone = torch.cat([invariant_matmul(x[i:i + 1], w, b) for i in probes])
    shifted = invariant_matmul(x[1:m - 2], w, b)   # every row moves up one place in its tile
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    return {"full": full.cpu(), "alone": alone.cpu(), "probes": torch.tensor(probes), "shifted": shifted.cpu(),
            "ref": ref.cpu()}


def rmsnorm_case(dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    """kernels/triton/rmsnorm.py (the mode keeps it: one program per row, its block set by the row width):
    37 rows with a residual in one call, and rows 0, 5, 36 alone."""
    from kernels.triton.rmsnorm import rms_norm_triton

    gen = torch.Generator().manual_seed(5)
    x, r = (torch.randn(37, 96, generator=gen).to(dtype).to(device) for _ in range(2))
    w = torch.randn(96, generator=gen).to(dtype).to(device)
    full = rms_norm_triton(x, r, w, 1e-6)[0]
    alone = torch.cat([rms_norm_triton(x[i:i + 1], r[i:i + 1], w, 1e-6)[0] for i in (0, 5, 36)])
    return {"full": full.cpu(), "alone": alone.cpu(), "probes": torch.tensor([0, 5, 36])}


def _attend(q, k_cache, v_cache, table, layout, scale, window, device):
    """One invariant_attention call over `layout`: [(request, prefix_len, extend_len)], tokens of request b at
    q[b][prefix:prefix + extend]. Returns the output rows per entry."""
    from kernels.triton.invariant_attention import invariant_attention

    rows = torch.cat([q[b][p:p + e] for b, p, e in layout])
    pre = torch.tensor([p for _, p, _ in layout])
    ext = torch.tensor([e for _, _, e in layout])
    starts = torch.cumsum(ext, 0) - ext
    tab = table[[b for b, _, _ in layout]]
    out = torch.full_like(rows, float("nan"), device=device)
    invariant_attention(rows.to(device), k_cache.to(device), v_cache.to(device), tab.to(device), pre.to(device),
                        ext.to(device), starts.to(device), int(ext.max()), scale, window, out=out)
    return list(out.cpu().split(ext.tolist()))


def attention_case(dtype: torch.dtype, page_size: int, window: int | None, group: int, head_dim: int = 16,
                   device: str = "cpu") -> dict[str, torch.Tensor]:
    """Request 0 (70 tokens; its keys already in a paged cache, as after the step stores them) attended
    prefilled whole beside other requests, prefilled alone in chunks of 23, and decoded token by token,
    in a batch of decodes and a chunk and alone, and the fp32 reference of the whole prefill."""
    from kernels.triton.invariant_attention import extend_attention_torch

    gen = torch.Generator().manual_seed(11 + group)
    kv_heads, seq_lens = 2, [70, 5, 40, 33, 1]
    table = scattered_page_table(gen, seq_lens, page_size)
    k_cache, v_cache = (paged_cache(gen, table, seq_lens, kv_heads, head_dim, dtype) for _ in range(2))
    q = [torch.randn(n, kv_heads * group, head_dim, generator=gen).to(dtype) for n in seq_lens]
    run = lambda layout: _attend(q, k_cache, v_cache, table, layout, 0.3, window, device)   # noqa: E731
    n = seq_lens[0]
    batched = run([(1, 0, 5), (0, 0, n), (2, 10, 30), (4, 0, 1)])[1]
    chunked = torch.cat([run([(0, p, min(23, n - p))])[0] for p in range(0, n, 23)])
    probes = [0, 31, 32, 33, 69]   # around the key-block edges of every dtype
    decoded_batch = torch.cat([run([(2, 39, 1), (0, i, 1), (3, 32, 1), (1, 0, 5)])[1] for i in probes])
    decoded_alone = torch.cat([run([(0, i, 1)])[0] for i in probes])
    ref = extend_attention_torch(q[0].float(), k_cache.float(), v_cache.float(), table[:1], torch.tensor([0]),
                                 torch.tensor([n]), 0.3, window)
    return {"batched": batched, "chunked": chunked, "decoded_batch": decoded_batch,
            "decoded_alone": decoded_alone, "probes": torch.tensor(probes), "ref": ref}


def engine_case(model_path: str, prompts: list[list[int]], max_new_tokens: int,
                chunk_sizes: tuple[int, ...], device: str = "cpu") -> dict:
    """Deterministic mode on the Triton backend, per chunked-prefill size: prompts[0] greedy alone, then all
    prompts together with prompts[0] second (so its prompt is chunked elsewhere), then prompts[0] + its
    completion prefilled (its prompt logprobs)."""
    from runtime.engine import Engine

    greedy = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": max_new_tokens}
    result: dict = {}
    for chunk in chunk_sizes:
        eng = Engine(model_path, skip_tokenizer_init=True, progress=False, device=device, dtype="float32",
                     attention_backend="triton", enable_deterministic_inference=True, max_total_tokens=2048,
                     chunked_prefill_size=chunk, disable_cuda_graph=True)
        try:
            alone = eng.generate(input_ids=[prompts[0]], sampling_params=greedy, return_logprob=True)[0]
            batch = eng.generate(input_ids=[prompts[1], prompts[0], *prompts[2:]], sampling_params=greedy,
                                 return_logprob=True)
            whole = prompts[0] + alone["output_ids"]
            scored = eng.generate(input_ids=[whole], sampling_params={**greedy, "max_new_tokens": 1},
                                  return_logprob=True, logprob_start_len=0)[0]
            linears = {type(m).__name__ for m in eng.runner.model.modules() if "Linear" in type(m).__name__}
            result[chunk] = {"alone": alone, "batch": batch, "scored": scored, "linears": sorted(linears),
                             "backend": type(eng.runner.backend).__name__}
        finally:
            eng.shutdown()
    return result


