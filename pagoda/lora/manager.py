"""``LoRAManager``: the engine's adapters — an LRU of adapters in host memory (``max_cpu_loras``, pinned ones never
evicted), ``max_loras`` slots on the device filled from it as steps need them (the least recently used slot not
needed by the step is overwritten), and each step's token → slot mapping.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from pagoda.lora.config import LoRAConfig
from pagoda.lora.layers import LoRAStep, attach_lora, experts_lora, lora_slots_nbytes
from pagoda.lora.peft_loader import LoRAModel, load_peft_adapter
from pagoda.lora.request import LoRARequest
from pagoda.logger import init_logger

logger = init_logger(__name__)


class LoRAManager:
    def __init__(self, config: LoRAConfig, model: Any, op: Any, dtype: torch.dtype, device: torch.device) -> None:
        self.config = config
        self.model = model
        self.step = LoRAStep(op, config.max_loras, device)
        self.layers = attach_lora(model, self.step, config.max_loras, config.max_lora_rank, dtype, device)
        self._layer_shapes = {name: (lora.input_size, lora.output_sizes) for name, lora in self.layers.items()}
        self.experts = experts_lora(model)  # routed-experts blocks: module path -> (slots, shape)
        self.dtype = dtype
        self._host: OrderedDict[int, LoRAModel] = OrderedDict()  # LRU: least recently used first
        self._requests: dict[int, LoRARequest] = {}
        self._pinned: set[int] = set()
        self.slot_ids: list[int | None] = [None] * config.max_loras  # adapter id held by each slot
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id → slot, least recently used first

    # ------------------------------------------------------------------ host memory
    def add(self, request: LoRARequest) -> bool:
        """Load ``request``'s adapter into host memory (checked against the model); True if it was not there."""
        if request.lora_int_id in self._host:
            self._host.move_to_end(request.lora_int_id)
            return False
        adapter = load_peft_adapter(request, self._layer_shapes, self.model.stacked_params, self.config.max_lora_rank,
                                    self.dtype, {name: shape for name, (_, shape) in self.experts.items()},
                                    self.model.module_path)
        self._host[request.lora_int_id] = adapter
        self._requests[request.lora_int_id] = request
        self._evict_host(keep=request.lora_int_id)
        return True

    def _evict_host(self, keep: int) -> None:
        """Least recently used first; never a pinned adapter nor ``keep`` (just added): when only those are left,
        host memory holds more than ``max_cpu_loras`` until one is removed or unpinned."""
        while len(self._host) > self.config.max_cpu_loras:
            victim = next((i for i in self._host if i not in self._pinned and i != keep), None)
            if victim is None:
                return
            del self._host[victim]

    def remove(self, lora_int_id: int) -> bool:
        found = self._host.pop(lora_int_id, None) is not None
        self._requests.pop(lora_int_id, None)
        self._pinned.discard(lora_int_id)
        slot = self._slot_of.pop(lora_int_id, None)
        if slot is not None:
            self.slot_ids[slot] = None
        return found or slot is not None

    def pin(self, lora_int_id: int) -> bool:
        if lora_int_id not in self._host:
            raise ValueError(f"lora_int_id: adapter {lora_int_id} is not loaded; add it first (add_lora)")
        self._pinned.add(lora_int_id)
        return True

    def list(self) -> set[int]:
        return set(self._host)

    @property
    def num_free_slots(self) -> int:
        return sum(1 for i in self.slot_ids if i is None)

    # ------------------------------------------------------------------ slots
    def _slot_for(self, request: LoRARequest, needed: set[int]) -> int:
        lora_id = request.lora_int_id
        slot = self._slot_of.get(lora_id)
        if slot is not None:
            self._slot_of.move_to_end(lora_id)
            return slot
        if lora_id not in self._host:  # evicted from host memory (or removed) since it was added: read it again
            self.add(request)
        adapter = self._host[lora_id]
        self._host.move_to_end(lora_id)
        if None in self.slot_ids:
            slot = self.slot_ids.index(None)
        else:  # the least recently used slot this step doesn't need
            victim = next(i for i in self._slot_of if i not in needed)
            slot = self._slot_of.pop(victim)
        for name, lora in self.layers.items():
            lora.set_slot(slot, adapter.weights.get(name))
        for name, (lora, _) in self.experts.items():
            lora.set_slot(slot, adapter.experts.get(name))
        self.step.scales[slot] = adapter.scaling
        self.slot_ids[slot] = lora_id
        self._slot_of[lora_id] = slot
        return slot

    def prepare_step(self, requests: list[LoRARequest | None], counts: np.ndarray) -> None:
        """Map this step's rows (one per request, ``counts`` tokens each) to slots, loading adapters as needed.
        The scheduler guarantees a step needs at most ``max_loras`` distinct adapters."""
        distinct = {r.lora_int_id: r for r in requests if r is not None}
        if not distinct:
            self.step.plan = None
            return
        if len(distinct) > len(self.slot_ids):
            raise RuntimeError(f"a step needs {len(distinct)} adapters but there are {len(self.slot_ids)} slots")
        ids = np.fromiter((0 if r is None else r.lora_int_id for r in requests), dtype=np.int64,
                          count=len(requests))
        row_slots = np.full(len(requests), -1, dtype=np.int64)
        needed = set(distinct)
        for lora_id, request in distinct.items():  # at most max_loras adapters
            row_slots[ids == lora_id] = self._slot_for(request, needed)
        token_slots = torch.from_numpy(np.repeat(row_slots, counts)).to(self.step.scales.device)
        self.step.plan = self.step.op.plan(token_slots, len(self.slot_ids))
        self.step.token_slots = token_slots
        used = set(row_slots.tolist()) - {-1}
        self.step.experts_active = any(lora.adapted[slot] for lora, _ in self.experts.values() for slot in used)

    def run_step(self, forward: Any, requests: list[LoRARequest | None], counts: np.ndarray) -> torch.Tensor:
        """``forward()`` for a step whose rows (``requests``, ``counts`` tokens each) may have adapters, with their
        slots mapped for the step (the layers and a platform's fused decode step read ``self.step``)."""
        self.prepare_step(requests, counts)
        try:
            return forward()
        finally:
            self.step.plan = self.step.token_slots = None
            self.step.experts_active = False


def lora_device_bytes(config: Any, model: Any, ops: Any) -> int:
    """Device memory the adapter slots will take beside the weights (0 when the engine serves no adapters)."""
    if config.lora is None:
        return 0
    return lora_slots_nbytes(model, ops.lora_shrink_expand, config.lora.max_loras, config.lora.max_lora_rank,
                             config.model.dtype)


def make_lora_manager(config: Any, model: Any, ops: Any, device: torch.device) -> LoRAManager | None:
    """The runner's adapter manager when the engine serves LoRA adapters (``config.lora``), else None."""
    if config.lora is None:
        return None
    return LoRAManager(config.lora, model, ops.lora_shrink_expand, config.model.dtype, device)
