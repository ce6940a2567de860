"""Per-row adapter state of the running batch, indexed by slot (= batch row, see kv_cache.py).

Two mechanisms cover every adapter kind:

* **Per-row vectors** (PEDRO and (IA)3): for each scaled point -- a module's output ("out") or input ("in") --
  a tensor ``(layers, slots, width)`` holding each row's z, the scale being 1 + z (0 where a row has nothing
  there). A decoding step applies it as one fused ``x + x * z`` (pedro.layer.apply_scale) by
  ``scales[layer, :B]`` per point per layer: the row's slot *is* its index, so the gather is a free slice.
  Storing z rather than 1 + z keeps a small z exact in bf16 (1 + z in bf16 moves in steps of 2^-7). PEDRO's
  rows get their vectors at prefill from their own adapter's generators; (IA)3 rows get their learned vectors
  l as z = l - 1 (computed in fp32, exact for l in [0.5, 2]) at admission.
* **BGMV LoRA**: A and B of every resident LoRA adapter stacked per module, ``(layers, capacity+1, r, d_in)``
  and ``(layers, capacity+1, d_out, r)`` (index 0 is all zeros: rows without LoRA), and one index per row.
  A step gathers each row's A/B by that index and runs two batched matmuls per adapted module.

A point (or LoRA module) is only computed while at least one running row uses it, so a batch of bare
requests runs the plain backbone.

Every table lives on the model's device. ``lora_host`` mirrors ``lora_index`` on the host, so a prefill
groups its tokens by adapter once per step from host data instead of asking the device (``unique()``) in
every adapted module of every layer.
"""

from __future__ import annotations

from collections import Counter

import torch

from pedro.engine.adapters import LoraWeights, ModelSpec, PedroWeights, Registered, VectorWeights

Point = tuple[str, str]  # (side "in" | "out", module)


class RowAdapters:
    def __init__(
        self, spec: ModelSpec, slots: int, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        self.spec, self.slots, self.capacity, self.dtype = spec, slots, capacity, dtype
        self.device = torch.device(device)
        self.scales: dict[Point, torch.Tensor] = {}
        self.point_users: Counter[Point] = Counter()
        self.lora_a: dict[str, torch.Tensor] = {}
        self.lora_b: dict[str, torch.Tensor] = {}
        self.lora_index = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.lora_host = [0] * slots  # lora_index, read on the host
        self.lora_users: Counter[str] = Counter()
        self.row_entry: list[Registered | None] = [None] * slots

    # ------------------------------------------------------------------ which points are live

    def live_points(self) -> set[Point]:
        return {p for p, n in self.point_users.items() if n > 0}

    def live_lora(self) -> set[str]:
        return {m for m, n in self.lora_users.items() if n > 0}

    @staticmethod
    def _points(entry: Registered | None) -> set[Point]:
        if entry is None or entry.weights is None:
            return set()
        if isinstance(entry.weights, PedroWeights):
            return {("out", m) for slices in entry.weights.slices.values() for m, _, _ in slices}
        if isinstance(entry.weights, VectorWeights):
            return {(side, m) for _, side, m in entry.weights.vectors}
        return set()

    @staticmethod
    def _lora_modules(entry: Registered | None) -> set[str]:
        if entry is None or not isinstance(entry.weights, LoraWeights):
            return set()
        return {m for _, m in entry.weights.weights}

    def _scale(self, point: Point) -> torch.Tensor:
        if point not in self.scales:
            d_in, d_out = self.spec.shapes[point[1]]
            width = d_out if point[0] == "out" else d_in
            self.scales[point] = torch.zeros(
                self.spec.n_layers, self.slots, width, dtype=self.dtype, device=self.device
            )
        return self.scales[point]

    # ------------------------------------------------------------------ rows joining / leaving / moving

    def assign(self, slot: int, entry: Registered | None) -> None:
        """Row ``slot`` now runs ``entry`` (None: bare backbone). PEDRO vectors are written later, at prefill."""
        self.row_entry[slot] = entry
        for point in self._points(entry):
            self._scale(point)
            self.point_users[point] += 1
        weights = entry.weights if entry is not None else None
        if isinstance(weights, VectorWeights):
            for (layer, side, module), vector in weights.vectors.items():
                self.scales[(side, module)][layer, slot] = vector
        lora = self._lora_modules(entry)
        for module in lora:
            self.lora_users[module] += 1
        # 0 is "no LoRA"; a resident adapter's index is 1..capacity
        self._set_lora(slot, (entry.resident_index or 0) if entry is not None and lora else 0)

    def _set_lora(self, slot: int, index: int) -> None:
        self.lora_index[slot] = index
        self.lora_host[slot] = index

    def write_pedro(self, layer: int, slots: torch.Tensor, z: torch.Tensor, slices: list[tuple[str, int, int]]) -> None:
        """Store the prefill's generator outputs z (R, D) of rows ``slots`` (R,) (their scales are 1 + z)."""
        for module, start, end in slices:
            self.scales[("out", module)][layer, slots] = z[:, start:end].to(self.dtype)

    def release(self, slot: int) -> None:
        entry = self.row_entry[slot]
        for point in self._points(entry):
            self.scales[point][:, slot] = 0.0
            self.point_users[point] -= 1
        for module in self._lora_modules(entry):
            self.lora_users[module] -= 1
        self._set_lora(slot, 0)
        self.row_entry[slot] = None

    def move(self, src: int, dst: int) -> None:
        """Row ``src`` moves to the (released) slot ``dst``."""
        entry = self.row_entry[src]
        for point in self._points(entry):
            self.scales[point][:, dst] = self.scales[point][:, src]
            self.scales[point][:, src] = 0.0
        self._set_lora(dst, self.lora_host[src])
        self._set_lora(src, 0)
        self.row_entry[dst], self.row_entry[src] = entry, None

    def copy_vectors(self, src: int, dst: int) -> None:
        """Row ``dst`` (same adapter, same prompt) takes row ``src``'s per-row vectors, computed at its prefill."""
        for point in self._points(self.row_entry[src]):
            self.scales[point][:, dst] = self.scales[point][:, src]

    # ------------------------------------------------------------------ LoRA stacks

    def load_lora(self, entry: Registered) -> None:
        """Copy a LoRA adapter that just became resident into the stacks at its resident index."""
        weights = entry.weights
        if not isinstance(weights, LoraWeights):
            return
        for module in {m for _, m in weights.weights}:
            self._ensure_lora(module, weights.rank)
        for module in self.lora_a:  # every stack: the index's previous occupant may have adapted other modules
            self.lora_a[module][:, entry.resident_index] = 0
            self.lora_b[module][:, entry.resident_index] = 0
        for (layer, module), (a, b) in weights.weights.items():
            self.lora_a[module][layer, entry.resident_index, : a.shape[0]] = a
            self.lora_b[module][layer, entry.resident_index, :, : b.shape[1]] = b

    def _ensure_lora(self, module: str, rank: int) -> None:
        """Create the stacks for ``module``, or widen them when an adapter of a larger rank arrives
        (other adapters' extra rank columns are zero, which adds nothing)."""
        d_in, d_out = self.spec.shapes[module]
        current = self.lora_a[module].shape[2] if module in self.lora_a else 0
        if rank <= current:
            return
        n = self.spec.n_layers, self.capacity + 1
        a = torch.zeros(*n, rank, d_in, dtype=self.dtype, device=self.device)
        b = torch.zeros(*n, d_out, rank, dtype=self.dtype, device=self.device)
        if current:
            a[:, :, :current] = self.lora_a[module]
            b[:, :, :, :current] = self.lora_b[module]
        self.lora_a[module], self.lora_b[module] = a, b

    def lora_delta(self, layer: int, module: str, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """BGMV: x (N, d_in), rows (N,) resident-adapter index per token -> (N, d_out)."""
        a = self.lora_a[module][layer].index_select(0, rows)  # (N, r, d_in)
        b = self.lora_b[module][layer].index_select(0, rows)  # (N, d_out, r)
        return torch.bmm(b, torch.bmm(a, x.unsqueeze(-1))).squeeze(-1)

    def lora_gather_bytes(self) -> int:
        """Bytes one token's BGMV gathers for the largest live LoRA module (its A and B at the stacks' rank)."""
        return max(
            (self.lora_a[m][0, 0].numel() + self.lora_b[m][0, 0].numel()) * self.lora_a[m].element_size()
            for m in self.live_lora()
        )

    def lora_groups(self, token_slots: list[int]) -> list[tuple[int, list[int]]]:
        """The prefill's tokens (their slots, on the host) grouped by resident LoRA adapter ->
        [(adapter index, token positions)], rows without LoRA left out."""
        groups: dict[int, list[int]] = {}
        for position, slot in enumerate(token_slots):
            index = self.lora_host[slot]
            if index:
                groups.setdefault(index, []).append(position)
        return list(groups.items())

    def lora_delta_grouped(
        self, layer: int, module: str, x: torch.Tensor, groups: list[tuple[int, torch.Tensor]]
    ) -> torch.Tensor:
        """Prefill form (many tokens, few adapters): one pair of GEMMs per distinct adapter among the tokens;
        ``groups`` (lora_groups, positions on the device) is computed once per step."""
        out = torch.zeros(x.shape[0], self.spec.shapes[module][1], dtype=x.dtype, device=x.device)
        for index, where in groups:
            a, b = self.lora_a[module][layer, index], self.lora_b[module][layer, index]
            out[where] = (x[where] @ a.T) @ b.T
        return out
