"""A gate in the CUDA stream that a host thread opens: work queued behind it runs once the host's work is done,
without the queueing thread waiting for it.

Structured outputs use it for their token masks: the engine queues the mask's copy, its application and the
sampling behind the gate, then goes on to schedule and queue the next forward pass while a worker thread fills
the masks; the worker opens the gate when they are filled. The GPU then stays busy as long as the fill is shorter
than the forward pass, instead of the fill, and everything the engine does after it, adding to every step.

The gate is a counter in pinned, device-mapped host memory and the driver's stream wait
(`cuStreamWaitValue32`, CUDA 12+): `reserve()` gives the next value n, `wait(n)` queues "wait until the counter
reaches n", the worker calls `open(n)`, before or after. A value waited for must be opened, or the stream never
moves on: the worker opens it in a `finally`.
`HostGate.create()` returns None where the driver lacks the call; callers then wait on the host as before.
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger(__name__)
WAIT_VALUE_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*addr - value) >= 0, so the counter may wrap


class HostGate:
    def __init__(self, wait, device_ptr: int, counter: torch.Tensor) -> None:
        self._wait = wait
        self._device_ptr = device_ptr
        self._counter = counter  # int32 [1], pinned; written by the host, read by the GPU
        self._view = counter.numpy()
        self._reserved = 0

    @classmethod
    def create(cls, device: torch.device) -> HostGate | None:
        if device.type != "cuda":
            return None
        try:
            driver = ctypes.CDLL("libcuda.so.1")
            wait = getattr(driver, "cuStreamWaitValue32_v2", None) or driver.cuStreamWaitValue32
            wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            wait.restype = ctypes.c_int
            get_pointer = driver.cuMemHostGetDevicePointer_v2
            get_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
            get_pointer.restype = ctypes.c_int
        except (OSError, AttributeError) as exc:
            log.info("masks wait on the host: the CUDA driver has no stream wait (%s)", exc)
            return None
        torch.cuda.init()
        counter = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        pointer = ctypes.c_uint64()
        if (err := get_pointer(ctypes.byref(pointer), counter.data_ptr(), 0)) != 0:
            log.info("masks wait on the host: pinned memory is not mapped for the device (CUresult %d)", err)
            return None
        gate = cls(wait, pointer.value, counter)
        try:
            n = gate.reserve()
            gate.wait(n, device)  # once, to see that the driver takes it
            gate.open(n)
            torch.cuda.synchronize(device)
        except RuntimeError as exc:
            log.info("masks wait on the host: %s", exc)
            return None
        return gate

    def reserve(self) -> int:
        """The value that the next `wait` waits for and its `open` writes."""
        self._reserved = (self._reserved + 1) & 0x7FFFFFFF
        return self._reserved

    def wait(self, n: int, device: torch.device) -> None:
        """Queue on the current stream: wait for `open(n)` (which may have happened already)."""
        stream = torch.cuda.current_stream(device).cuda_stream
        if (err := self._wait(ctypes.c_void_p(stream), self._device_ptr, n, WAIT_VALUE_GEQ)) != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed (CUresult {err})")

    def open(self, n: int) -> None:
        self._view[0] = n
