"""A step's structured-output masks, from the grammars to the logits.

`start` fills the constrained rows' bitmasks in a worker thread (structured.Grammars.start_fill) while the
engine applies the previous step's outputs; `apply` puts them on the logits. On CUDA the host does not wait
for the fill: the bitmask's copy and application, and the sampling after them, queue behind a HostGate that the
worker opens once the masks are filled, so the engine goes straight on to the next forward pass. Elsewhere
(or with `device_waits` off) `apply` waits for the fill. Either way the sampled tokens' `wait()` raises the
fill's error, if it had one.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from llmctl.runtime.host_gate import HostGate
from llmctl.runtime.layers.sampler import to_device
from llmctl.runtime.sequence import Sequence
from llmctl.runtime.structured import apply_bitmask


@dataclass
class StartedMasks:
    rows: list[int]  # the constrained rows of the step's sampled sequences
    fill: Future | None  # None when no row needs a mask
    gate: int | None  # the HostGate value the worker opens, when the device waits for it


class TokenMasks:
    def __init__(self, device: torch.device, max_rows: int) -> None:
        self.device = device
        self.max_rows = max_rows
        self.grammars = None  # the engine's structured.Grammars
        self._bitmask: torch.Tensor | None = None  # host buffer, int32 [rows, words], pinned on CUDA
        self._copied: torch.cuda.Event | None = None  # after the last copy of _bitmask to the device
        self._gate: HostGate | None = None
        self._gate_tried = False
        # The device waits for the fills (where a HostGate can be made: CUDA): measured on an H200, a batch of 64
        # constrained rows made 9,010 tok/s so against 8,316 with the host waiting (BENCHMARKS.md).
        self.device_waits = True

    def start(self, sampled: list[Sequence]) -> StartedMasks:
        """Start filling the bitmasks of the constrained rows. A sequence whose grammar is complete keeps its row
        unmasked: it stops, and its token is dropped."""
        rows = [i for i, seq in enumerate(sampled)
                if seq.grammar is not None and not seq.is_finished and not seq.grammar.done]
        if not rows:
            return StartedMasks(rows, None, None)
        if self._bitmask is None or self._bitmask.shape[0] < len(rows):
            self._bitmask = torch.empty((max(len(rows), self.max_rows), self.grammars.words), dtype=torch.int32,
                                        pin_memory=self.device.type == "cuda")
        if self._copied is not None:
            self._copied.synchronize()  # the last copy has left the buffer (it always has by now: its step is done)
        gate = self._gate_for_device()
        value = gate.reserve() if gate is not None else None
        opener = (lambda: gate.open(value)) if gate is not None else None
        matchers = [sampled[i].grammar for i in rows]
        return StartedMasks(rows, self.grammars.start_fill(matchers, self._bitmask[: len(rows)], opener), value)

    def apply(self, logits: torch.Tensor, masks: StartedMasks) -> Future | None:
        """Each constrained row's logits outside its grammar's allowed tokens go to -inf (queued behind the gate
        on CUDA). Returns the fill, for the sampled tokens' wait."""
        if masks.fill is None:
            return None
        if masks.gate is None:
            masks.fill.result()
        else:
            self._gate.wait(masks.gate, self.device)
        bitmask = self._bitmask[: len(masks.rows)]
        # Both copies asynchronous: a pageable one would wait for the queued work, the gate included.
        apply_bitmask(logits, to_device(torch.tensor(masks.rows), self.device),
                      bitmask.to(self.device, non_blocking=True))
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return masks.fill

    def _gate_for_device(self) -> HostGate | None:
        if not self.device_waits:
            return None
        if not self._gate_tried:
            self._gate_tried, self._gate = True, HostGate.create(self.device)
        return self._gate
