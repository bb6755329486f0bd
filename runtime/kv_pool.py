"""The paged KV cache storage: one key and one value tensor per layer, indexed by token slot.

Row `num_slots` is a padding slot: page tables are padded with it, so gathers never go out of range.
Which slots are free is the PageAllocator's business, not this class's.
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.pad_slot = num_slots
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # A MoE model's per-slot routing (runtime/routed_experts_pool.py): copied with the KV it belongs to.
        self.routed_experts = None

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_buffers + self.v_buffers)

    @torch.no_grad()
    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's keys and values of slots `src` into slots `dst`."""
        for k, v in zip(self.k_buffers, self.v_buffers):
            k[dst] = k[src]
            v[dst] = v[src]
        if self.routed_experts is not None:
            self.routed_experts.copy_slots(src, dst)

    def release(self) -> None:
        """Free the buffers' memory; the tensor objects stay (the attention backend holds them)."""
        for t in self.k_buffers + self.v_buffers:
            t.untyped_storage().resize_(0)

    def resume(self) -> None:
        for t in self.k_buffers + self.v_buffers:
            t.untyped_storage().resize_(t.numel() * t.element_size())
            t.zero_()
