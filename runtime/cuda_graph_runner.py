"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured at start-up.

A decode step of a small model is mostly kernel-launch overhead (a few hundred launches of microseconds
of work each); replaying a captured graph launches them all at once. A graph replays fixed addresses and
shapes, so every input of a step lives in static buffers sized for the largest bucket: the step's tensors
are copied in, rows past the batch are padding (token 0 at position 0, one key: the KV pool's pad slot,
whose value nobody reads), and the page table is always `max_width` wide (the context length), of which
the attention kernel reads each request's first seq_lens[b] entries. The attention backend prepares its
metadata for this fixed layout (`prepare_graph_decode`: split counts fixed per bucket, split buffers
reserved once), with no host synchronisation.

Graphs hold the addresses of the weights and the KV pool. Weight updates copy into the parameters in
place, so graphs stay valid across them; releasing memory (release_memory_occupation) frees the KV pool
or the weights, and the graphs with them: they are dropped then and captured again on resume.

`capture=False` runs the same static-buffer steps eagerly: how the padding and fixed-width path is
tested on CPU (under Triton's interpreter), where there are no CUDA graphs.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from runtime.attention.base import AttentionBackend
from runtime.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The buckets: 1, 2, 4, 8, then every multiple of 16, up to and including max_batch_size."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, pad_slot: int, max_batch_size: int,
                 max_width: int, num_heads: int, head_dim: int, device: torch.device, capture: bool = True):
        if not backend.supports_cuda_graph:
            raise ValueError(f"{type(backend).__name__} does not support CUDA graphs.")
        self.model = model
        self.backend = backend
        self.pad_slot = pad_slot
        self.max_batch_size = max_batch_size
        self.max_width = max_width
        self.device = device
        self.sizes = graph_batch_sizes(max_batch_size)
        self.use_graphs = capture
        backend.reserve_graph_decode(max_batch_size, num_heads, head_dim, max_width)
        n = max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.out_slots = torch.full((n,), pad_slot, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.page_table = torch.full((n, max_width), pad_slot, dtype=torch.int64, device=device)
        self.ones = torch.ones(n, dtype=torch.int64, device=device)
        self.rows = torch.arange(n, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.num_replays = 0   # decode steps served here (benchmarks and tests check graphs were used)
        if capture:
            self.capture()

    # --- which steps ----------------------------------------------------------------------------

    def can_run(self, batch: ForwardBatch) -> bool:
        """A decode-only step (one row of logits per request) that fits the largest bucket."""
        return (batch.num_extend == 0 and batch.routing is None and 0 < batch.batch_size <= self.max_batch_size
                and batch.page_table.shape[1] <= self.max_width
                and batch.logits_indices.shape[0] == batch.batch_size)

    def bucket(self, batch_size: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, batch_size)]

    # --- capture and replay ---------------------------------------------------------------------

    def _static_batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size], out_slots=self.out_slots[:size],
            prefix_lens=self.positions[:size],
            extend_lens=self.ones[:size], seq_lens=self.seq_lens[:size], page_table=self.page_table[:size],
            num_extend=0, logits_indices=self.rows[:size])

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        self.backend.prepare_graph_decode(batch)
        hidden = self.model(batch, self.backend)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, all in one memory pool (a smaller graph reuses the larger
        ones' activation memory, as only one replays at a time)."""
        start = time.perf_counter()
        with torch.cuda.device(self.device):
            self._capture_all()
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        logger.info("Captured CUDA graphs for decode batch sizes %s in %.2f s.", self.sizes, self.capture_seconds)

    def _capture_all(self) -> None:
        self._pad_from(0)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        for size in reversed(self.sizes):
            batch = self._static_batch(size)
            stream.wait_stream(current)
            with torch.cuda.stream(stream):   # warm-up: Triton compiles, the allocator settles
                for _ in range(2):
                    self._forward(batch)
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (a process group's watchdog) do not break the capture.
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                self.outputs[size] = self._forward(batch)
            self.graphs[size] = graph

    def _pad_from(self, b: int) -> None:
        """Rows b.. are padding: one key, the pad slot's, written and read by nobody else."""
        self.input_ids[b:].zero_()
        self.positions[b:].zero_()
        self.out_slots[b:].fill_(self.pad_slot)
        self.seq_lens[b:].fill_(1)
        self.page_table[b:, 0].fill_(self.pad_slot)

    @torch.inference_mode()
    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] of the decode step (a view of the graph's output: valid until the next step)."""
        b = batch.batch_size
        size = self.bucket(b)
        width = batch.page_table.shape[1]
        self.input_ids[:b].copy_(batch.input_ids)
        self.positions[:b].copy_(batch.positions)
        self.out_slots[:b].copy_(batch.out_slots)
        self.seq_lens[:b].copy_(batch.seq_lens)
        self.page_table[:b, :width].copy_(batch.page_table)
        if b < size:
            self._pad_from(b)
        self.num_replays += 1
        if self.use_graphs:
            with torch.cuda.device(self.device):   # the graph replays on the current device's stream
                self.graphs[size].replay()
            return self.outputs[size][:b]
        return self._forward(self._static_batch(size))[:b]
