"""Continuous batching: which waiting sequences join the running batch this step, and who leaves.

Fair across tenants: each tenant (Request.tenant) has its own FIFO queue and admission goes round-robin over
the tenants, one sequence per tenant per round, the least recently served first -- so a tenant that floods the
queue delays only its own requests. Within a tenant a sequence that cannot be admitted yet (its adapter is still
loading, or every resident adapter slot is pinned) does not block the ones behind it. A sequence is admitted
when a slot is free, the step's prefill budget is not spent, and its adapter is resident or loaded and ready to
install. Admission pins the adapter; retirement unpins it and compacts the batch so decoding rows stay in slots
0..B-1 (see kv_cache.py).

Bounded prefill per step. A step prefills at most ``max_prefill_tokens`` tokens' worth of work, counted in
token-layers (a token through one decoder layer), so that decoding rows keep producing tokens while a long
prompt is admitted. A prompt that does not fit what is left is split across steps, by position (chunked
prefill: tokens [a, b) through every layer, the KV cache filled chunk by chunk) or, for a prompt whose every
layer needs the whole prompt (a PEDRO row: each layer's generator pools that layer's states over the whole
prompt; a row scoring its prompt), layer by layer (a run of token-layers: layer after layer, a layer's
positions in order once its generators have read the whole prompt entering it; the hidden states kept for the
next step). At most one sequence is part-way through its prefill (``partial``); it gets the budget first,
and no other sequence is admitted until it finishes. It sits in a slot after the decoding rows, which never
decode it; when it finishes it moves to the first slot after them (a copy only when a decoding row retired
meanwhile). The first piece of a step always makes progress (at least one token through one layer), so a long
prompt cannot starve. The budget bounds how long decoding rows wait; a step with no row
decoding has nobody to make wait, so it prefills whatever it admits whole (a burst of prompts reaching an idle
engine starts in one step).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from pedro.engine.adapters import AdapterStore, Registered
from pedro.engine.detokenizer import IncrementalDetokenizer
from pedro.engine.request import Request, TokenLogprob

# the prefill budget of a step with no decoding row (a sys.maxsize of token-layers: never reached)
UNBOUNDED = sys.maxsize


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
    whole_prompt: bool = False  # its prefill goes layer by layer, never by position alone (module docstring)
    prefilled: int = 0  # prompt tokens (by position) or token-layers (whole prompt, layer-major) prefilled so far
    layered: Any = None  # the runner's LayeredPrefill while its prefill is split layer by layer
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

    @property
    def admitted_slot(self) -> int:
        """``slot`` of a sequence in the batch, where the engine indexes its cache and adapter rows; ``slot`` is
        None only while the sequence waits and once it has retired."""
        assert self.slot is not None, f"request {self.request.request_id!r} is not in the batch"
        return self.slot

    def finish(self, reason: str, error: str | None = None, code: str | None = None) -> None:
        self.finish_reason, self.error, self.error_code = reason, error, code
        self.finished_at = time.perf_counter()


@dataclass(frozen=True)
class Piece:
    """What a step prefills of ``seq``: prompt tokens [start, end) through every layer, or (``by_layers``)
    token-layers [start, end) of the prompt, layer-major (runner.LayeredPrefill). ``last``: the sequence's
    prefill ends with this piece."""

    seq: Sequence
    start: int
    end: int
    by_layers: bool
    last: bool
    cost: int  # token-layers


class Scheduler:
    def __init__(self, max_batch: int, max_prefill_tokens: int, store: AdapterStore, n_layers: int) -> None:
        self.max_batch, self.max_prefill_tokens, self.store, self.n_layers = (
            max_batch,
            max_prefill_tokens,
            store,
            n_layers,
        )
        self.queues: OrderedDict[str | None, deque[Sequence]] = OrderedDict()  # tenant -> FIFO; order: whose turn
        self.running: list[Sequence] = []  # decoding rows (and this step's finished prefills): running[i].slot == i
        self.partial: Sequence | None = None  # the sequence part-way through its prefill, in a slot after them
        self.moves: list[tuple[int, int]] = []  # (from slot, to slot) the engine must carry out before prefilling
        self.steps = 0  # schedule() calls so far: how long a sequence waited, in engine steps

    @property
    def num_admitted(self) -> int:
        return len(self.running) + (self.partial is not None)

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

    def _admissible(self, seq: Sequence) -> bool:
        name = seq.request.adapter
        return name is None or self.store.can_acquire(name)

    def _piece(self, seq: Sequence, budget: int, first: bool) -> Piece | None:
        """The next piece of ``seq``'s prefill that ``budget`` token-layers allow (None: none; the first piece of
        a step always gets one token or one layer)."""
        n, layers = len(seq.prompt_ids), self.n_layers
        if seq.whole_prompt:  # in token-layers, layer by layer (runner.LayeredPrefill)
            done, total = seq.prefilled, n * layers
            end = min(total, done + budget)
            if end == done:
                if not first:
                    return None
                end = done + 1
            if done == 0 and end == total:  # all of it at once: an ordinary prefill by position
                return Piece(seq, 0, n, False, True, total)
            return Piece(seq, done, end, True, end == total, end - done)
        done = seq.prefilled
        end = n if (n - done) * layers <= budget else done + budget // layers
        if end == done:
            if not first:
                return None
            end = done + 1
        return Piece(seq, done, end, False, end == n, (end - done) * layers)

    def schedule(self) -> list[Piece]:
        """-> what this step prefills: the partial sequence's next piece, then newly admitted sequences (with
        slots and pinned adapters), within the step's budget. A sequence whose last piece is here joins
        ``running``; slot moves to carry out first are in ``moves``."""
        self.steps += 1
        pieces: list[Piece] = []
        # no row decoding: nobody waits for this step, so nothing needs splitting
        budget = self.max_prefill_tokens * self.n_layers if self.running else UNBOUNDED
        if self.partial is not None:
            partial = self.partial
            piece = self._piece(partial, budget, first=True)
            assert piece is not None  # a step's first piece always makes progress
            pieces.append(piece)
            budget -= piece.cost
            if not piece.last:
                return pieces
            self.partial = None
            if partial.admitted_slot != len(self.running):  # decoding rows retired meanwhile: first slot after them
                self.moves.append((partial.admitted_slot, len(self.running)))
                partial.slot = len(self.running)
            self.running.append(partial)
        progress = True
        while progress and self.partial is None and self.num_admitted < self.max_batch:
            progress = False
            for tenant in list(self.queues):  # one round: at most one sequence per tenant
                if self.partial is not None or self.num_admitted >= self.max_batch:
                    break
                seq = next((s for s in self.queues[tenant] if self._admissible(s)), None)
                if seq is None:
                    continue
                piece = self._piece(seq, budget, first=not pieces)
                if piece is None:  # the budget is spent
                    return pieces
                self.remove_waiting(seq)
                if tenant in self.queues:
                    self.queues.move_to_end(tenant)  # served: the other tenants go first next time
                if seq.request.adapter is not None:
                    seq.entry = self.store.acquire(seq.request.adapter)
                seq.slot = len(self.running)
                seq.admitted_at_step = self.steps
                if piece.last:
                    self.running.append(seq)
                else:
                    self.partial = seq
                pieces.append(piece)
                budget -= piece.cost
                progress = True
        return pieces

    def retire(self, seq: Sequence) -> int | None:
        """Take ``seq`` out of the batch, unpin its adapter; -> the slot whose row moved into ``seq.slot``
        (the last decoding row), or None when ``seq`` was last or the partial sequence."""
        slot, last = seq.admitted_slot, len(self.running) - 1
        if seq.entry is not None:
            self.store.release(seq.entry)
        if seq is self.partial:
            self.partial, seq.slot = None, None
            return None
        moved = None
        if slot != last:
            self.running[slot] = self.running[last]
            self.running[slot].slot = slot
            moved = last
        self.running.pop()
        seq.slot = None
        return moved
