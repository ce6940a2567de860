"""Continuous batching: which waiting sequences join the running batch this step, and who leaves.

First come, first served. A waiting sequence is admitted when a slot is free, its prompt fits the step's
prefill-token budget (the first one of a step is always admitted, so a long prompt cannot starve), and its
adapter is resident or can be made resident by evicting an unused one. Admission pins the adapter;
retirement unpins it and compacts the batch so running rows stay in slots 0..B-1 (see kv_cache.py).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from pedro.engine.adapters import AdapterError, AdapterStore, Registered
from pedro.engine.request import Request


@dataclass
class Sequence:
    """A request inside the engine."""

    request: Request
    prompt_ids: list[int]
    generator: torch.Generator
    track_text: bool = False
    entry: Registered | None = None
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted_tokens: int = 0
    emitted_chars: int = 0
    finish_reason: str | None = None
    error: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self.finished_at = time.perf_counter()


class Scheduler:
    def __init__(self, max_batch: int, max_prefill_tokens: int, store: AdapterStore) -> None:
        self.max_batch, self.max_prefill_tokens, self.store = max_batch, max_prefill_tokens, store
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].slot == i

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """-> (admitted, with slots and pinned adapters; failed, finished with an error)."""
        admitted: list[Sequence] = []
        failed: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if admitted and len(seq.prompt_ids) > budget:
                break
            name = seq.request.adapter
            if name is not None and not self.store.can_acquire(name):
                break  # every resident adapter is busy: wait for a running request to finish
            self.waiting.popleft()
            if name is not None:
                try:
                    seq.entry = self.store.acquire(name)
                except AdapterError as err:
                    seq.finish("error", str(err))
                    failed.append(seq)
                    continue
            seq.slot = len(self.running)
            self.running.append(seq)
            admitted.append(seq)
            budget -= len(seq.prompt_ids)
        return admitted, failed

    def remove_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)

    def retire(self, seq: Sequence) -> int | None:
        """Take ``seq`` out of the batch, unpin its adapter; -> the slot whose row moved into ``seq.slot``
        (the last one), or None when ``seq`` was last."""
        slot, last = seq.slot, len(self.running) - 1
        if seq.entry is not None:
            self.store.release(seq.entry)
        moved = None
        if slot != last:
            self.running[slot] = self.running[last]
            self.running[slot].slot = slot
            moved = last
        self.running.pop()
        seq.slot = None
        return moved
