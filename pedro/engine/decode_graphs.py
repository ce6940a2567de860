"""Decode steps replayed from CUDA graphs, one per batch and width bucket.

A small model's decode step on a GPU is bound by launching kernels, not by running them: each of a step's
many small kernels is queued by Python (on an H200, SmolLM2's bare step at batch 32 took 18 ms eagerly and
3.7 ms replayed; benchmarks/gpu_check.py). A CUDA graph records a step's kernels once and replays them with
one call. A graph is fixed in its shapes and in the memory it reads, so a step is padded to a
*bucket*: the batch to the next of a few sizes (1, 2, 4, 8, then multiples of 8 up to the engine's
``max_batch``) and the attended key width to the next multiple of WIDTH_BLOCK. Padding rows run a harmless
token at position 0 whose key and value go to the cache's scratch slot (kv_cache.py), never to a slot a
sequence owns; their logits are dropped. Each row's attention, norms and linear layers read only its own row,
so padding changes no real row's numbers beyond what a different GEMM row count does in the GPU's kernels.

What a step computes also depends on which adapter points and LoRA modules are live (rows.py computes only
those): a graph is captured per (batch bucket, width bucket, live points, live LoRA modules), lazily, the first
time a step needs it, and recaptured when a table it reads was reallocated (a LoRA stack widened for a larger
rank). The graphs share one memory pool: they are replayed one at a time and each one's logits are copied out
before the next replay.

``capture=False`` runs the same padded step eagerly: the CPU check that padding and the scratch slot change no
token (tests/test_decode_graphs.py), and the engine's fallback if a capture fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pedro.engine.device import upload

if TYPE_CHECKING:
    from pedro.engine.runner import ModelRunner

log = logging.getLogger(__name__)

WIDTH_BLOCK = 256  # attended key widths are padded to a multiple of this (at most the cache's max_seq_len)


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, then multiples of 8, and ``max_batch`` itself."""
    sizes = {b for b in (1, 2, 4) if b < max_batch} | set(range(8, max_batch, 8)) | {max_batch}
    return sorted(sizes)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # (3, batch bucket): tokens, positions, cache slots
    logits: torch.Tensor  # (batch bucket, vocab), written by each replay
    tables: tuple[int, ...]  # addresses of the adapter tables the graph reads


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, capture: bool) -> None:
        scratch = runner.cache.scratch_slot
        if scratch is None:
            raise ValueError("padded decode steps need a KV cache with a scratch slot (KVCache(scratch=True))")
        self.runner, self.capture, self.scratch = runner, capture, scratch
        self.buckets = batch_buckets(runner.cache.slots)
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0

    def bucket(self, batch: int, width: int) -> tuple[int, int]:
        """The (batch, key width) a step of ``batch`` rows attending ``width`` keys is padded to."""
        padded_batch = next(b for b in self.buckets if b >= batch)
        blocks = -(-width // WIDTH_BLOCK)
        return padded_batch, min(blocks * WIDTH_BLOCK, self.runner.cache.max_seq_len)

    def _inputs(self, tokens: torch.Tensor, padded: int) -> torch.Tensor:
        """(3, padded) on the device: tokens, positions (the rows' lengths) and cache slots; padding rows read
        token 0 at position 0 and write to the scratch slot."""
        batch = tokens.shape[0]
        host = torch.zeros(2, padded, dtype=torch.long)
        host[0, :batch] = self.runner.cache.lengths[:batch]
        host[1, :batch] = torch.arange(batch)
        host[1, batch:] = self.scratch
        inputs = torch.zeros(3, padded, dtype=torch.long, device=tokens.device)
        inputs[0, :batch] = tokens
        inputs[1:] = upload(host, tokens.device)
        return inputs

    def _tables(self, points: frozenset, lora: frozenset) -> tuple[int, ...]:
        rows = self.runner.rows
        tables = [rows.scales[p] for p in sorted(points)]
        tables += [t for m in sorted(lora) for t in (rows.lora_a[m], rows.lora_b[m])]
        return tuple(t.data_ptr() for t in tables)

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of rows 0..B-1 (``tokens`` (B,)) -> logits (B, vocab); the host lengths are the
        caller's to advance."""
        batch = tokens.shape[0]
        width = int(self.runner.cache.lengths[:batch].max()) + 1
        padded, padded_width = self.bucket(batch, width)
        inputs = self._inputs(tokens, padded)
        if not self.capture:
            return self.runner.decode_forward(inputs[0], inputs[1], inputs[2], padded_width)[:batch]
        rows = self.runner.rows
        points, lora = frozenset(rows.live_points()), frozenset(rows.live_lora())
        key, tables = (padded, padded_width, points, lora), self._tables(points, lora)
        graph = self.graphs.get(key)
        if graph is None or graph.tables != tables:
            try:
                graph = self._capture(inputs, padded_width, tables)
            except RuntimeError as err:  # a kernel that cannot be captured: keep serving, eagerly
                log.warning("CUDA graph capture failed (%s); decoding without graphs from now on", err)
                self.capture = False
                return self.runner.decode_forward(inputs[0], inputs[1], inputs[2], padded_width)[:batch]
            self.graphs[key] = graph
        graph.inputs.copy_(inputs)
        graph.graph.replay()
        return graph.logits[:batch].clone()

    def _capture(self, inputs: torch.Tensor, width: int, tables: tuple[int, ...]) -> _Graph:
        """Warm up on a side stream (first-use allocations and kernel choices happen outside the graph), then
        capture. Both run this step's real inputs: the keys and values they write are the ones the replay that
        follows writes again."""
        static = inputs.clone()
        stream = torch.cuda.Stream(device=inputs.device)
        stream.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(stream):
            self.runner.decode_forward(static[0], static[1], static[2], width)
        torch.cuda.current_stream(inputs.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's adapter loader may copy weights to the device on its own thread meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self.runner.decode_forward(static[0], static[1], static[2], width)
        self.captures += 1
        return _Graph(graph, static, logits, tables)
