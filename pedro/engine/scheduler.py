"""Continuous batching: which waiting sequences join the running batch this step, and who leaves.

Fair across tenants: each tenant (Request.tenant) has its own FIFO queue and admission goes round-robin over
the tenants, one sequence per tenant per round, the least recently served first -- so a tenant that floods the
queue delays only its own requests. Within a tenant a sequence that cannot be admitted yet (its adapter is still
loading, or every resident adapter slot is pinned) does not block the ones behind it. A sequence is admitted
when a slot is free, its prompt fits the step's prefill-token budget (the first one of a step is always
admitted, so a long prompt cannot starve), and its adapter is resident or loaded and ready to install.
Admission pins the adapter; retirement unpins it and compacts the batch so running rows stay in slots 0..B-1
(see kv_cache.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from pedro.engine.adapters import AdapterStore, Registered
from pedro.engine.detokenizer import IncrementalDetokenizer
from pedro.engine.request import Request, TokenLogprob


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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, set at prefill when asked for
    prompt_text: str | None = None  # the prompt's ids decoded, set at prefill when asked for
    text: str = ""
    detokenizer: IncrementalDetokenizer = field(default_factory=IncrementalDetokenizer)  # text while running
    emitted_tokens: int = 0
    emitted_chars: int = 0
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None
    queued_at_step: int = 0
    admitted_at_step: int | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, error: str | None = None, code: str | None = None) -> None:
        self.finish_reason, self.error, self.error_code = reason, error, code
        self.finished_at = time.perf_counter()


class Scheduler:
    def __init__(self, max_batch: int, max_prefill_tokens: int, store: AdapterStore) -> None:
        self.max_batch, self.max_prefill_tokens, self.store = max_batch, max_prefill_tokens, store
        self.queues: OrderedDict[str | None, deque[Sequence]] = OrderedDict()  # tenant -> FIFO; order: whose turn
        self.running: list[Sequence] = []  # running[i].slot == i
        self.steps = 0  # schedule() calls so far: how long a sequence waited, in engine steps

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def waiting(self) -> Iterator[Sequence]:
        for queue in self.queues.values():
            yield from queue

    def add(self, seq: Sequence) -> None:
        seq.queued_at_step = self.steps
        self.queues.setdefault(seq.request.tenant, deque()).append(seq)

    def remove_waiting(self, seq: Sequence) -> None:
        tenant = seq.request.tenant
        self.queues[tenant].remove(seq)
        if not self.queues[tenant]:
            del self.queues[tenant]

    def _admissible(self, seq: Sequence, budget: int, first: bool) -> bool:
        name = seq.request.adapter
        return (first or len(seq.prompt_ids) <= budget) and (name is None or self.store.can_acquire(name))

    def schedule(self) -> list[Sequence]:
        """-> the sequences admitted this step, with slots and pinned adapters."""
        self.steps += 1
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        progress = True
        while progress and len(self.running) < self.max_batch:
            progress = False
            for tenant in list(self.queues):  # one round: at most one sequence per tenant
                if len(self.running) >= self.max_batch:
                    break
                seq = next((s for s in self.queues[tenant] if self._admissible(s, budget, not admitted)), None)
                if seq is None:
                    continue
                self.remove_waiting(seq)
                if tenant in self.queues:
                    self.queues.move_to_end(tenant)  # served: the other tenants go first next time
                if seq.request.adapter is not None:
                    seq.entry = self.store.acquire(seq.request.adapter)
                seq.slot = len(self.running)
                seq.admitted_at_step = self.steps
                self.running.append(seq)
                admitted.append(seq)
                budget -= len(seq.prompt_ids)
                progress = True
        return admitted

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
