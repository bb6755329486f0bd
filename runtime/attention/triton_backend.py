"""Attention with the Triton kernels of kernels/triton: the default on CUDA.

prepare() slices the batch once per step into its extend part (prefill chunks, one ragged launch of
extend attention) and its decode part (split-KV decode attention, whose split buffers are allocated
once for all layers). A decode-only step needs no device synchronisation here.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported):
slow, but the same kernel code, which is how the engine is tested on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.triton.decode_attention import MAX_SPLITS, choose_num_splits, decode_attention, decode_workspace
from kernels.triton.device import check_launchable
from kernels.triton.extend_attention import extend_attention
from kernels.triton.kv_store import store_kv
from runtime.attention.base import AttentionBackend
from runtime.forward_batch import ForwardBatch
from runtime.kv_pool import KVPool


@dataclass
class _ExtendPart:
    num_tokens: int
    page_table: torch.Tensor     # [Be, W]
    prefix_lens: torch.Tensor    # [Be]
    extend_lens: torch.Tensor    # [Be]
    q_starts: torch.Tensor       # [Be] first row of each request on the token axis
    max_extend_len: int


@dataclass
class _DecodePart:
    token_start: int             # first decode row on the token axis
    page_table: torch.Tensor     # [Bd, W]
    seq_lens: torch.Tensor       # [Bd]
    num_splits: int
    # Split buffers shared by all layers, made by the step's first layer (the pool does not know how
    # many query heads there are).
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class TritonAttentionMetadata:
    extend: _ExtendPart | None
    decode: _DecodePart | None


class TritonAttentionBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self, kv_pool: KVPool):
        super().__init__(kv_pool)
        check_launchable(kv_pool.device)
        # Splits of decode attention; None: chosen per step (choose_num_splits). Tests set it.
        self.decode_splits: int | None = None
        # Decode steps replayed from CUDA graphs: split buffers for the largest batch, and the page
        # tables' fixed width (reserve_graph_decode).
        self._graph_workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graph_width = 0

    def reserve_graph_decode(self, max_batch_size: int, num_heads: int, head_dim: int, max_width: int) -> None:
        self._graph_width = max_width
        self._graph_workspace = decode_workspace(max_batch_size, num_heads, head_dim, MAX_SPLITS,
                                                 self.kv_pool.device)

    def prepare_graph_decode(self, batch: ForwardBatch) -> None:
        if self._graph_workspace is None:
            raise RuntimeError("reserve_graph_decode must run before prepare_graph_decode.")
        b = batch.batch_size
        # Splits fixed per batch size (sized for the longest context): the kernel reads each request's
        # length on the device, so splits past a short sequence's end merely find no keys.
        splits = self.decode_splits or choose_num_splits(b, self.kv_pool.num_kv_heads, self._graph_width,
                                                         on_gpu=self.kv_pool.device.type == "cuda")
        mid_o, mid_lse = self._graph_workspace
        workspace = (mid_o[:b, :, :splits], mid_lse[:b, :, :splits]) if splits > 1 else None
        batch.attn_metadata = TritonAttentionMetadata(None, _DecodePart(0, batch.page_table, batch.seq_lens,
                                                                        splits, workspace))

    def prepare(self, batch: ForwardBatch) -> None:
        ne, b = batch.num_extend, batch.batch_size
        extend = decode = None
        num_extend_tokens = 0
        if ne > 0:
            ext = batch.extend_lens[:ne]
            lens = ext.tolist()   # one device sync for both sizes
            num_extend_tokens = sum(lens)
            extend = _ExtendPart(num_extend_tokens, batch.page_table[:ne], batch.prefix_lens[:ne], ext,
                                 torch.cumsum(ext, 0) - ext, max(lens))
        if ne < b:
            width = batch.page_table.shape[1]   # the longest sequence of the batch
            splits = self.decode_splits or choose_num_splits(b - ne, self.kv_pool.num_kv_heads, width,
                                                             on_gpu=batch.seq_lens.device.type == "cuda")
            decode = _DecodePart(num_extend_tokens, batch.page_table[ne:], batch.seq_lens[ne:], splits)
        batch.attn_metadata = TritonAttentionMetadata(extend, decode)

    def forward(self, q, k, v, layer_id, batch, scale, sliding_window=None):
        k_cache = self.kv_pool.k_buffers[layer_id]
        v_cache = self.kv_pool.v_buffers[layer_id]
        store_kv(k_cache, v_cache, batch.out_slots, k, v)
        out = torch.empty_like(q)
        meta: TritonAttentionMetadata = batch.attn_metadata
        if meta.extend is not None:
            e, n = meta.extend, meta.extend.num_tokens
            extend_attention(q[:n], k[:n], v[:n], k_cache, v_cache, e.page_table, e.prefix_lens, e.extend_lens,
                             e.q_starts, e.max_extend_len, scale, sliding_window, out=out[:n])
        if meta.decode is not None:
            d, s = meta.decode, meta.decode.token_start
            if d.workspace is None and d.num_splits > 1:
                d.workspace = decode_workspace(q.shape[0] - s, q.shape[1], q.shape[2], d.num_splits, q.device)
            decode_attention(q[s:], k_cache, v_cache, d.page_table, d.seq_lens, scale, sliding_window,
                             d.num_splits, out=out[s:], workspace=d.workspace)
        return out
