"""Top-k / top-p / min-p sampling by inverse CDF at a given u, Triton. The reference is
kernels/sampling_reference.py (`draw_tokens_torch`); for the same probabilities and u this kernel picks the same
token, because it repeats the reference's arithmetic rather than its algorithm:

- the truncation is found without sorting: radix searches over the fp32 bit patterns (monotone for
  probabilities >= 0; RADIX_BITS bits per pass over the row) find the k-th largest probability and the
  probability at which the sorted cumulative sum reaches top_p; ties straddling the cut keep their
  lowest ids, as the reference does;
- rows the reference draws with its exact path (a truncation not cut through ties) use a float64
  inverse CDF in id order; the others (no truncation, or ties at the cut) use the reference's two-level
  scan, whose 256-token block sums are fp32 and rounded in torch's CPU summation order, reproduced
  below (CPU_SUM_LANES); float64 sums may differ from the reference's sequential ones in the last bit,
  which moves a draw only if u falls within ~1e-16 of a boundary.

One program per row. Rows without truncation and rows with it are separate launches (TRUNCATE), so
plain sampling never pays for the searches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sampling_reference import CDF_BLOCK

# torch sums a contiguous fp32 row on the CPU with Vectorized<float> lanes (8 on x86 whatever the
# capability: measured with AVX512, AVX2 and DEFAULT), ILP vectors interleaved, then the lanes in order.
# tests/test_triton_kernels.py checks the kernel's block sums against torch's.
CPU_SUM_LANES = 8
_ILP = 4
# The searches fix RADIX_BITS bits of the threshold's fp32 bit pattern per pass over the row, from
# the top: RADIX_BITS * SEARCH_STEPS = 32.
_RADIX_BITS = 4
_SEARCH_STEPS = 8
_SEARCH_BLOCK = 256
_MAX_BLOCK = 2048


@triton.jit
def _sample_kernel(Probs, U, TopK, TopP, MinP, Rows, BlockSums, BlockCdfs, Work, Out, stride_p, stride_bs,
                   stride_work, vocab, TRUNCATE: tl.constexpr, BLOCK: tl.constexpr, CDF_BLOCK: tl.constexpr,
                   LANES: tl.constexpr, ILP: tl.constexpr, RADIX_BITS: tl.constexpr,
                   SEARCH_STEPS: tl.constexpr, SEARCH_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(Rows + pid).to(tl.int64)
    probs = Probs + row * stride_p
    block_sums = BlockSums + pid.to(tl.int64) * stride_bs
    block_cdfs = BlockCdfs + pid.to(tl.int64) * stride_bs
    u = tl.load(U + row).to(tl.float64)
    offs = tl.arange(0, BLOCK)

    # The max (for min_p's floor) and the total mass (whether top_p is reached at all).
    top = tl.zeros([BLOCK], tl.float32)
    mass = tl.zeros([BLOCK], tl.float64)
    for start in range(0, vocab, BLOCK):
        p = tl.load(probs + start + offs, mask=start + offs < vocab, other=0.0)
        top = tl.maximum(top, p)
        mass += p.to(tl.float64)
    floor = tl.load(MinP + row) * tl.max(top, axis=0)

    # The kept set: p > t, or p == t among the first `need` of those ties in id order; and p >= floor.
    t = -1.0
    need = 0
    exact = False
    if TRUNCATE:
        k = tl.load(TopK + row).to(tl.int32)
        top_p = tl.load(TopP + row).to(tl.float64)
        # t_k: the largest x with count(p >= x) >= k, the k-th largest p. w: the largest x with
        # sum(p >= x) >= top_p, the p at which the cumulative sum in sorted order reaches top_p.
        # Both predicates fall as x rises, so each pass keeps the largest passing candidate.
        digit = tl.arange(0, 1 << RADIX_BITS).to(tl.int64)
        base_k = tl.zeros([], tl.int64)
        base_p = tl.zeros([], tl.int64)
        s_offs = tl.arange(0, SEARCH_BLOCK)
        for step in tl.static_range(SEARCH_STEPS):
            # Candidates past +inf's pattern become a NaN, which every comparison fails.
            x_k = tl.minimum(base_k + (digit << (RADIX_BITS * (SEARCH_STEPS - 1 - step))), 0x7F800001)
            x_k = x_k.to(tl.int32).to(tl.float32, bitcast=True)
            x_p = tl.minimum(base_p + (digit << (RADIX_BITS * (SEARCH_STEPS - 1 - step))), 0x7F800001)
            x_p = x_p.to(tl.int32).to(tl.float32, bitcast=True)
            count = tl.zeros([1 << RADIX_BITS], tl.int32)
            above = tl.zeros([1 << RADIX_BITS], tl.float64)
            for start in range(0, vocab, SEARCH_BLOCK):
                p = tl.load(probs + start + s_offs, mask=start + s_offs < vocab, other=-1.0)
                count += tl.sum((p[None, :] >= x_k[:, None]).to(tl.int32), axis=1)
                above += tl.sum(tl.where(p[None, :] >= x_p[:, None], p.to(tl.float64)[None, :], 0.0), axis=1)
            passed_k = tl.sum((count >= k).to(tl.int64), axis=0) - 1
            passed_p = tl.maximum(tl.sum((above >= top_p).to(tl.int64), axis=0) - 1, 0)
            base_k += passed_k << (RADIX_BITS * (SEARCH_STEPS - 1 - step))
            base_p += passed_p << (RADIX_BITS * (SEARCH_STEPS - 1 - step))
        base_k = base_k.to(tl.int32)
        base_p = base_p.to(tl.int32)
        t_k = base_k.to(tl.float32, bitcast=True)
        w = base_p.to(tl.float32, bitcast=True)

        gt_k = tl.zeros([BLOCK], tl.int32)
        eq_k = tl.zeros([BLOCK], tl.int32)
        gt_w = tl.zeros([BLOCK], tl.int32)
        eq_w = tl.zeros([BLOCK], tl.int32)
        sum_gt_w = tl.zeros([BLOCK], tl.float64)
        for start in range(0, vocab, BLOCK):
            p = tl.load(probs + start + offs, mask=start + offs < vocab, other=-1.0)
            gt_k += (p > t_k).to(tl.int32)
            eq_k += (p == t_k).to(tl.int32)
            gt_w += (p > w).to(tl.int32)
            eq_w += (p == w).to(tl.int32)
            sum_gt_w += tl.where(p > w, p.to(tl.float64), 0.0)
        n_eq_w = tl.sum(eq_w, axis=0)
        s = tl.sum(sum_gt_w, axis=0)
        # Among w's ties the reference keeps the j-th while s + (j - 1) * w < top_p.
        wd = w.to(tl.float64)
        c = tl.ceil((top_p - s) / tl.where(wd > 0.0, wd, 1.0))
        c = tl.minimum(tl.maximum(c, 1.0), n_eq_w.to(tl.float64))
        c = tl.where((c > 1.0) & (s + (c - 1.0) * wd >= top_p), c - 1.0, c)
        c = tl.where((c < n_eq_w.to(tl.float64)) & (s + c * wd < top_p), c + 1.0, c)
        cut_by_p = (top_p < 1.0) & (tl.sum(mass, axis=0) >= top_p)
        n_p = tl.where(cut_by_p, tl.sum(gt_w, axis=0) + c.to(tl.int32), vocab)
        by_k = k <= n_p
        n = tl.where(by_k, k, n_p)
        t = tl.where(by_k, t_k, w)
        n_gt = tl.where(by_k, tl.sum(gt_k, axis=0), tl.sum(gt_w, axis=0))
        need = n - n_gt
        exact = n_gt + tl.where(by_k, tl.sum(eq_k, axis=0), n_eq_w) <= n  # no tie straddles the cut

    if exact:
        # The reference's exact path: a float64 running sum over the kept tokens in id order; the
        # token is the first whose running sum exceeds u * total.
        running = tl.zeros([], tl.float64)
        for start in range(0, vocab, BLOCK):
            p = tl.load(probs + start + offs, mask=start + offs < vocab, other=-1.0)
            cdf = tl.cumsum(tl.where((p >= t) & (p >= floor), p.to(tl.float64), 0.0), axis=0) + running
            running = tl.max(cdf, axis=0)
        target = tl.minimum(u * running, (running.to(tl.int64, bitcast=True) - 1).to(tl.float64, bitcast=True))
        below = tl.zeros([BLOCK], tl.int32)
        running = tl.zeros([], tl.float64)
        for start in range(0, vocab, BLOCK):
            p = tl.load(probs + start + offs, mask=start + offs < vocab, other=-1.0)
            cdf = tl.cumsum(tl.where((p >= t) & (p >= floor), p.to(tl.float64), 0.0), axis=0) + running
            running = tl.max(cdf, axis=0)
            below += ((cdf <= target) & (start + offs < vocab)).to(tl.int32)
        token = tl.minimum(tl.sum(below, axis=0), vocab - 1)
    else:
        # The reference's two-level scan. First the fp32 sum of each CDF_BLOCK tokens' weights in
        # torch's CPU order: ILP accumulators of LANES-wide vectors take the vectors of whole groups
        # of ILP in turn; the vectors left over go into the first; the accumulators are added in
        # order; then the scalars past the last whole vector, then the lanes, are added one by one
        # to zero. Fewer than LANES tokens: the same with ILP scalar accumulators. (Adding +0.0
        # changes no sum, so masked-off terms are harmless.)
        tl.static_assert((CDF_BLOCK == 256) & (ILP == 4) & (LANES == 8))  # the splits below
        weights = Work + pid.to(tl.int64) * stride_work
        accs = weights + CDF_BLOCK
        lanes = accs + ILP * LANES
        cb = tl.arange(0, CDF_BLOCK)
        vec = tl.arange(0, ILP * LANES)
        lane = tl.arange(0, LANES)
        ties = tl.zeros([], tl.int32)
        cdf = tl.zeros([], tl.float64)
        for start in range(0, vocab, CDF_BLOCK):
            inside = start + cb < vocab
            p = tl.load(probs + start + cb, mask=inside, other=0.0)
            if TRUNCATE:
                tie = (p == t) & inside
                rank = tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32) + ties
                ties += tl.sum(tie.to(tl.int32), axis=0)
                wt = tl.where(((p > t) | (tie & (rank < need))) & (p >= floor) & inside, p, 0.0)
            else:
                wt = tl.where((p >= floor) & inside, p, 0.0)
            length = tl.minimum(vocab - start, CDF_BLOCK)
            total = tl.zeros([], tl.float32)
            if length == CDF_BLOCK:
                # A whole block, in registers: split the 8 groups of 4 x 8 apart (x_i: group i).
                g = tl.reshape(tl.trans(tl.reshape(wt, (8, 32))), (32, 2, 2, 2))
                g0, g1 = tl.split(g)
                g00, g01 = tl.split(g0)
                g10, g11 = tl.split(g1)
                x0, x4 = tl.split(g00)
                x2, x6 = tl.split(g01)
                x1, x5 = tl.split(g10)
                x3, x7 = tl.split(g11)
                acc = ((((((x0 + x1) + x2) + x3) + x4) + x5) + x6) + x7
                a = tl.reshape(tl.trans(tl.reshape(acc, (4, 8))), (8, 2, 2))
                a0, a1 = tl.split(a)
                k0, k2 = tl.split(a0)
                k1, k3 = tl.split(a1)
                part = tl.reshape(((k0 + k1) + k2) + k3, (2, 2, 2))
                l0, l1 = tl.split(part)
                l00, l01 = tl.split(l0)
                l10, l11 = tl.split(l1)
                p0, p4 = tl.split(l00)
                p2, p6 = tl.split(l01)
                p1, p5 = tl.split(l10)
                p3, p7 = tl.split(l11)
                total = (((((((total + p0) + p1) + p2) + p3) + p4) + p5) + p6) + p7
            else:
                # The last, partial block, through this program's scratch row.
                n_vec = length // LANES
                groups = n_vec // ILP
                tl.store(weights + cb, wt)
                tl.debug_barrier()
                if length >= LANES:
                    acc = tl.zeros([ILP * LANES], tl.float32)
                    for i in tl.static_range(CDF_BLOCK // (ILP * LANES)):
                        acc += tl.load(weights + i * ILP * LANES + vec,
                                       mask=i * ILP * LANES + vec < groups * ILP * LANES, other=0.0)
                    tl.store(accs + vec, acc)
                    tl.debug_barrier()
                    part = tl.load(accs + lane)
                    for j in tl.static_range(ILP - 1):
                        first = (groups * ILP + j) * LANES
                        part += tl.load(weights + first + lane, mask=first + lane < n_vec * LANES, other=0.0)
                    for j in tl.static_range(1, ILP):
                        part += tl.load(accs + j * LANES + lane)
                    tl.store(lanes + lane, part)
                    tl.debug_barrier()
                    for j in tl.static_range(LANES - 1):
                        total += tl.load(weights + n_vec * LANES + j, mask=n_vec * LANES + j < length, other=0.0)
                    for j in tl.static_range(LANES):
                        total += tl.load(lanes + j)
                else:
                    head = (length // ILP) * ILP
                    total += tl.load(weights, mask=head > 0, other=0.0)
                    for j in tl.static_range(LANES - 1):
                        total += tl.load(weights + j, mask=(head <= j) & (j < length), other=0.0)
                    for j in tl.static_range(1, ILP):
                        total += tl.load(weights + j, mask=j < head, other=0.0)
            tl.store(block_sums + start // CDF_BLOCK, total)
            cdf += total.to(tl.float64)
            tl.store(block_cdfs + start // CDF_BLOCK, cdf)
        target = tl.minimum(u * cdf, (cdf.to(tl.int64, bitcast=True) - 1).to(tl.float64, bitcast=True))
        tl.debug_barrier()  # the block sums stored above are read below by other threads

        # The first block whose running sum exceeds the target (the last one if none does).
        n_blocks = tl.cdiv(vocab, CDF_BLOCK)
        passed = tl.zeros([BLOCK], tl.int32)
        for start in range(0, n_blocks, BLOCK):
            passed += ((tl.load(block_cdfs + start + offs, mask=start + offs < n_blocks, other=target + 1.0)
                        <= target)).to(tl.int32)
        chosen = tl.minimum(tl.sum(passed, axis=0), n_blocks - 1)
        chosen_mass = tl.load(block_sums + chosen).to(tl.float64)
        chosen_cdf = tl.load(block_cdfs + chosen)
        local_u = tl.minimum(tl.maximum((target - (chosen_cdf - chosen_mass)) / chosen_mass, 0.0), 1.0)

        # Within that block, a float64 scan of its weights.
        begin = chosen * CDF_BLOCK
        inside = begin + cb < vocab
        p = tl.load(probs + begin + cb, mask=inside, other=0.0)
        if TRUNCATE:
            ties_before = tl.zeros([BLOCK], tl.int32)
            for start in range(0, vocab, BLOCK):
                before = start + offs < begin
                q = tl.load(probs + start + offs, mask=before, other=-1.0)
                ties_before += ((q == t) & before).to(tl.int32)
            tie = (p == t) & inside
            rank = tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32) + tl.sum(ties_before, axis=0)
            wt = tl.where(((p > t) | (tie & (rank < need))) & (p >= floor) & inside, p, 0.0)
        else:
            wt = tl.where((p >= floor) & inside, p, 0.0)
        local = tl.cumsum(wt.to(tl.float64), axis=0)
        local_total = tl.max(local, axis=0)
        local_target = tl.minimum(local_u * local_total,
                                  (local_total.to(tl.int64, bitcast=True) - 1).to(tl.float64, bitcast=True))
        j = tl.minimum(tl.sum((local <= local_target).to(tl.int32), axis=0), CDF_BLOCK - 1)
        token = tl.minimum(chosen * CDF_BLOCK + j, vocab - 1)
    tl.store(Out + row, token.to(tl.int64))


def launch_sampling(probs: torch.Tensor, u: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor, rows: torch.Tensor, truncate: bool, out: torch.Tensor) -> torch.Tensor:
    """Draw out[rows] (one program per listed row); returns the fp32 CDF block sums each program
    computed ([len(rows), blocks]; rows drawn by the exact path leave theirs unset).

    probs [n, V] fp32 with a contiguous last dim; u [n] float64; top_k [n] int64 (V: off); top_p [n]
    float64 (1.0: off); min_p [n] fp32; truncate: whether any listed row has top_k or top_p on."""
    vocab = probs.shape[1]
    n = rows.shape[0]
    block_sums = torch.empty((n, triton.cdiv(vocab, CDF_BLOCK)), dtype=torch.float32, device=probs.device)
    block_cdfs = torch.empty(block_sums.shape, dtype=torch.float64, device=probs.device)
    work = torch.empty((n, CDF_BLOCK + (_ILP + 1) * CPU_SUM_LANES), dtype=torch.float32, device=probs.device)
    if n:
        # No FMA contraction: the reference rounds every product and sum on its own.
        _sample_kernel[(n,)](
            probs, u, top_k, top_p, min_p, rows, block_sums, block_cdfs, work, out, probs.stride(0), block_sums.stride(0),
            work.stride(0), vocab, TRUNCATE=truncate, BLOCK=min(triton.next_power_of_2(vocab), _MAX_BLOCK),
            CDF_BLOCK=CDF_BLOCK, LANES=CPU_SUM_LANES, ILP=_ILP, RADIX_BITS=_RADIX_BITS,
            SEARCH_STEPS=_SEARCH_STEPS, SEARCH_BLOCK=_SEARCH_BLOCK, num_warps=8, enable_fp_fusion=False)
    return block_sums


def draw_tokens_triton(probs: torch.Tensor, u: torch.Tensor, top_k: list[int], top_p: list[float],
                       min_p: list[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """draw_tokens_torch's contract and tokens (see the module docstring); out: [n] int64 if given."""
    n, vocab = probs.shape
    device = probs.device
    probs = probs.float()
    probs = probs if probs.stride(-1) == 1 else probs.contiguous()
    truncates = [top_k[i] < vocab or top_p[i] < 1.0 for i in range(n)]
    k = torch.tensor(top_k, dtype=torch.int64, device=device)
    p = torch.tensor(top_p, dtype=torch.float64, device=device)
    m = torch.tensor(min_p, dtype=torch.float32, device=device)
    u = u.to(device=device, dtype=torch.float64)
    out = torch.empty(n, dtype=torch.int64, device=device) if out is None else out
    for truncate in (False, True):
        rows = [i for i in range(n) if truncates[i] == truncate]
        if rows:
            launch_sampling(probs, u, k, p, m, torch.tensor(rows, dtype=torch.int64, device=device), truncate, out)
    return out
