"""The torch attention paths over paged KV against a naive per-request reference."""

import math

import pytest
import torch

from kernels.paged_attention import attention_with_lse, attention_with_lse_reference, merge_attention
from runtime.attention.torch_backend import TorchAttentionBackend
from runtime.forward_batch import ForwardBatch
from runtime.kv_pool import KVPool


def naive_attention(q, keys, values, scale):
    """q: [H, D]; keys/values: [L, Hkv, D] -> [H, D], plain softmax over all keys."""
    h, hkv = q.shape[0], keys.shape[1]
    k = keys.repeat_interleave(h // hkv, dim=1)
    v = values.repeat_interleave(h // hkv, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.double(), k.double()) * scale
    return torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), v.double()).float()


def test_merge_attention_is_exact():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 8)
    k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    full, _ = attention_with_lse(q, k, v, None, 0.3)
    o1, l1 = attention_with_lse(q, k[:, :, :4], v[:, :, :4], None, 0.3)
    o2, l2 = attention_with_lse(q, k[:, :, 4:], v[:, :, 4:], None, 0.3)
    torch.testing.assert_close(merge_attention(o1, l1, o2, l2), full, atol=1e-6, rtol=1e-5)


def test_fused_attention_with_lse_matches_reference_on_strided_masked_keys():
    """The CPU flash kernel reads keys gathered as [N, L, Hkv, D] and viewed [N, Hkv, L, D], with a
    different padding mask per row; output and log-sum-exp equal the unfused definition."""
    torch.manual_seed(0)
    n, hkv, r, d, length = 5, 3, 4, 16, 37
    q = torch.randn(n, hkv, r, d)
    k = torch.randn(n, length, hkv, d).transpose(1, 2)
    v = torch.randn(n, length, hkv, d).transpose(1, 2)
    key_mask = torch.arange(length)[None, :] < torch.tensor([1, 5, 16, 30, 37])[:, None]
    for mask in (key_mask, None):
        out, lse = attention_with_lse(q, k, v, mask, 0.25)
        ref_out, ref_lse = attention_with_lse_reference(q, k, v, mask, 0.25)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout, num_groups, every_row", [
    ([(4, 40), (3, 25), (2, 17), (1, 30), (1, 9)], 3, False),   # groups of siblings and two loners
    ([(4, 40), (4, 25), (4, 17)], 3, True),                      # a GRPO batch: every row in a group of n
])
def test_decode_with_shared_prefixes_matches_naive(layout, num_groups, every_row):
    """Groups of requests share prompt pages (as n > 1 samples do); others share nothing."""
    torch.manual_seed(0)
    hkv, h, d, num_slots = 2, 6, 16, 4000
    pool = KVPool(1, num_slots, hkv, d, torch.float32, "cpu")
    pool.k_buffers[0].normal_()
    pool.v_buffers[0].normal_()
    free = torch.randperm(num_slots).tolist()
    rows, seq_lens = [], []
    # (siblings, shared prompt slots) per group; each sibling has its own suffix
    for group_size, prompt in layout:
        shared = [free.pop() for _ in range(prompt)]
        for _ in range(group_size):
            own = [free.pop() for _ in range(int(torch.randint(1, 12, ())))]
            rows.append(shared + own)
            seq_lens.append(len(rows[-1]))
    b, width = len(rows), max(seq_lens)
    table = torch.full((b, width), pool.pad_slot)
    for i, r in enumerate(rows):
        table[i, :len(r)] = torch.tensor(r)
    seq = torch.tensor(seq_lens)
    q = torch.randn(b, h, d)
    new_k, new_v = pool.k_buffers[0][table[torch.arange(b), seq - 1]], pool.v_buffers[0][table[torch.arange(b), seq - 1]]
    batch = ForwardBatch(input_ids=torch.zeros(b, dtype=torch.long), positions=seq - 1, out_slots=table[torch.arange(b), seq - 1],
                         prefix_lens=seq - 1, extend_lens=torch.ones(b, dtype=torch.long), seq_lens=seq, page_table=table,
                         num_extend=0, logits_indices=torch.arange(b))
    backend = TorchAttentionBackend(pool)
    backend.prepare(batch)
    cascade = batch.attn_metadata[0].cascade
    assert cascade["member_index"].shape[0] == num_groups  # loners run without a group
    assert (cascade["member_rows"] is None) == every_row
    scale = 1 / math.sqrt(d)
    out = backend.forward(q, new_k, new_v, 0, batch, scale)
    for i, r in enumerate(rows):
        ref = naive_attention(q[i], pool.k_buffers[0][r], pool.v_buffers[0][r], scale)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)
    # the sliding-window fallback (plain padded attention) agrees too
    out_window = backend.forward(q, new_k, new_v, 0, batch, scale, sliding_window=8)
    for i, r in enumerate(rows):
        ref = naive_attention(q[i], pool.k_buffers[0][r[-8:]], pool.v_buffers[0][r[-8:]], scale)
        torch.testing.assert_close(out_window[i], ref, atol=1e-5, rtol=1e-5)
