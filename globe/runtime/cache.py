"""Per-layer LRU cache of precomposed mixed atoms tilde_B_e (one slot tensor per factored family).

    cache = MixedCache(capacity=8, shapes={"gate": (r, d), "up": (r, d)}, dtype=torch.bfloat16)
    mixed = cache.fetch([1, 5, 9], compose)   # {"gate": [3, r, d], ...}; compose(LongTensor) runs for misses only
    cache.warm_up(counts)                      # preload the most-routed experts of a calibration run

Bookkeeping is one OrderedDict (expert -> slot) touched once per routed expert per batch, never per token; slot
contents live in non-persistent buffers so `.to(device)` moves them with the model. Hit/miss counters are only
updated when `collect_stats` is on.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

Compose = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class MixedCache(nn.Module):
    """LRU of up to `capacity` experts' mixed atoms; `fetch` returns them in the order asked for."""

    def __init__(self, capacity: int, shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self.families = tuple(shapes)
        for family, (r, d) in shapes.items():
            self.register_buffer(f"slots_{family}", torch.zeros(self.capacity, r, d, dtype=dtype, device=device),
                                 persistent=False)                                   # [C, r, d]
        self.order: OrderedDict[int, int] = OrderedDict()                            # expert -> slot, LRU first
        self.collect_stats = False
        self.hits = 0
        self.misses = 0

    def slots(self, family: str) -> torch.Tensor:
        return getattr(self, f"slots_{family}")

    def fetch(self, experts: list[int], compose: Compose) -> dict[str, torch.Tensor]:
        """Mixed atoms of distinct `experts` ({family: [len(experts), r, d]}), composing only the misses.

        A batch is one access: experts resident at its start are hits and are refreshed in the given order, then
        the misses are inserted in the given order, each evicting the least recently used expert when full (so
        with more misses than `capacity`, later misses evict earlier ones).
        """
        hit_pos, hit_slots, miss_pos = [], [], []
        for pos, expert in enumerate(experts):
            slot = self.order.get(expert)
            if slot is None:
                miss_pos.append(pos)
            else:
                self.order.move_to_end(expert)
                hit_pos.append(pos)
                hit_slots.append(slot)
        if self.collect_stats:
            self.hits += len(hit_pos)
            self.misses += len(miss_pos)
        missing = [experts[pos] for pos in miss_pos]
        composed = compose(torch.tensor(missing, dtype=torch.long)) if missing else {}
        if len(experts) <= self.capacity:
            # Hits were refreshed, so inserting the misses evicts none of this batch: gather everything from slots.
            self._insert(missing, composed)
            index = torch.tensor([self.order[e] for e in experts], device=self.slots(self.families[0]).device)
            return {f: self.slots(f).index_select(0, index) for f in self.families}
        out = self._assemble(len(experts), hit_pos, hit_slots, miss_pos, composed)
        self._insert(missing, composed)
        return out

    def _assemble(self, n: int, hit_pos: list[int], hit_slots: list[int], miss_pos: list[int],
                  composed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not hit_pos:
            return composed
        out = {}
        for f in self.families:
            slots = self.slots(f)
            block = slots.new_empty(n, *slots.shape[1:])
            block[torch.tensor(hit_pos, device=slots.device)] = slots[torch.tensor(hit_slots, device=slots.device)]
            block[torch.tensor(miss_pos, device=slots.device)] = composed[f].to(slots.dtype)
            out[f] = block
        return out

    def _insert(self, missing: list[int], composed: dict[str, torch.Tensor]) -> None:
        """Put freshly composed experts into slots, evicting least recently used ones when full."""
        if self.capacity <= 0 or not missing:
            return
        final: dict[int, int] = {}                                                  # slot -> row of `composed`
        for row, expert in enumerate(missing):
            if len(self.order) < self.capacity:
                slot = len(self.order)
            else:
                _, slot = self.order.popitem(last=False)
            self.order[expert] = slot
            final[slot] = row
        device = self.slots(self.families[0]).device
        slot_index = torch.tensor(list(final), device=device)
        every_row = len(final) == len(missing)                                       # rows 0..n-1 in order
        row_index = None if every_row else torch.tensor(list(final.values()), device=device)
        for f in self.families:
            rows = composed[f] if every_row else composed[f].index_select(0, row_index)
            self.slots(f).index_copy_(0, slot_index, rows.detach().to(self.slots(f).dtype))

    def count(self, experts: list[int]) -> None:
        """Count one access of distinct `experts` (hits: resident ones) without touching the LRU order: a batch
        the runtime served without the cache (projected) still shows in the hit rate."""
        if self.collect_stats:
            hits = sum(e in self.order for e in experts)
            self.hits += hits
            self.misses += len(experts) - hits

    def warm_up(self, counts: torch.Tensor, compose: Compose) -> list[int]:
        """Preload the (up to `capacity`) experts routed most often in `counts` [E]; resets the counters.

        The most frequent expert ends up most recently used. Returns the experts loaded, least frequent first.
        """
        self.clear()
        counts = counts.detach().cpu()
        ranked = [int(e) for e in torch.argsort(counts, descending=True, stable=True) if counts[e] > 0]
        chosen = ranked[:max(self.capacity, 0)][::-1]
        if chosen:
            self._insert(chosen, compose(torch.tensor(chosen, dtype=torch.long)))
        return chosen

    def clear(self) -> None:
        """Empty the cache and reset the counters."""
        self.order.clear()
        self.reset_stats()

    def reset_stats(self) -> None:
        self.hits = 0
        self.misses = 0

    def stats(self) -> dict[str, float | int]:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "capacity": self.capacity, "resident": len(self.order)}

    def resident(self) -> list[int]:
        """Cached experts, least recently used first."""
        return list(self.order)

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, families={self.families}"
