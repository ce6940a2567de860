"""The engine's KV cache: one pre-allocated, contiguous slot per running sequence.

Layout ``(layers, slots, kv_heads, max_seq_len, head_dim)``, allocated once (the OS commits pages only when
they are written). The running batch always occupies slots ``0..B-1``: when a sequence finishes, the last
row is moved into its slot (one copy of that row's filled prefix, once per retirement), so a decoding step
reads ``k[layer, :B, :, :W]`` as a strided *view* -- no gather, no concatenation, no per-step allocation --
and attends over it in place with a per-row length mask. Each row keeps its own
length, so rows of different lengths share one step without padding their prompts.

Why not paged blocks: paging wins when memory is the bottleneck (long, unpredictable lengths on a GPU with
a fused paged-attention kernel). On CPU there is no such kernel; a block table would mean gathering blocks
into a contiguous tensor at every step, which is exactly the per-step copy this layout avoids. The price is
reserving ``max_seq_len`` per slot, which the engine bounds with ``max_batch`` and ``max_seq_len``.

With ``scratch=True`` the cache holds one slot more than ``slots``, slot ``scratch_slot``, which no sequence ever
owns: a decode step padded to a fixed batch size (decode_graphs.py) writes its padding rows' keys and values
there, so they can never land in a slot that a sequence (running, or being prefilled) owns.

Keys and values live on the model's device; ``lengths`` is host bookkeeping (the scheduler's view of each
slot), so a step reads the widths it needs without waiting for the device, and the runner uploads the
running rows' lengths once per step.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values plus per-slot lengths; slot ``s`` of a running batch is batch row ``s``."""

    def __init__(
        self,
        n_layers: int,
        slots: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        scratch: bool = False,
    ) -> None:
        shape = (n_layers, slots + int(scratch), n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long)  # host: filled positions per slot
        self.max_seq_len = max_seq_len
        self.scratch_slot: int | None = slots if scratch else None

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def bytes_per_token(self) -> int:
        """Cache bytes one token of one sequence takes (keys and values, all layers)."""
        n_layers, _, heads, _, head_dim = self.k.shape
        return 2 * n_layers * heads * head_dim * self.k.element_size()

    def write_prompt(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """k, v: (kv_heads, n, head_dim) for positions start..start+n-1 of ``slot``."""
        end = start + k.shape[1]
        self.k[layer, slot, :, start:end] = k
        self.v[layer, slot, :, start:end] = v

    def write_step(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """k, v: (B, kv_heads, head_dim), one new token for each of rows 0..B-1 at its own length; ``rows``
        (arange(B)) and ``positions`` (the rows' lengths) are on the cache's device, made once per step."""
        self.k[layer, rows, :, positions] = k
        self.v[layer, rows, :, positions] = v

    def view(self, layer: int, batch: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, kv_heads, width, head_dim) views of rows 0..B-1, positions 0..width-1."""
        return self.k[layer, :batch, :, :width], self.v[layer, :batch, :, :width]

    def clear(self, slot: int, n: int) -> None:
        """Zero positions 0..n-1 of ``slot``: a failed row may have left inf/NaN there, and a masked-out
        position still enters attention as 0 * value, which is NaN for a non-finite value."""
        self.k[:, slot, :, :n] = 0
        self.v[:, slot, :, :n] = 0

    def copy(self, src: int, dst: int) -> None:
        """Slot ``dst`` gets a copy of slot ``src``'s filled prefix (a second sample of the same prompt)."""
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def move(self, src: int, dst: int) -> None:
        """Move slot ``src``'s filled prefix to ``dst`` (compaction after ``dst`` retired)."""
        self.copy(src, dst)
        self.lengths[src] = 0
