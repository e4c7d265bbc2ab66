"""Compiling a forward pass's kernels ahead of its first run (`compiling.ahead`): every Triton launch of the
runtime goes through `compiling.start`, so a forward run while warming compiles and launches nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import llmctl.runtime.kernels as kernels_pkg
from llmctl.runtime.kernels import compiling, fused, kv_store


class Kernel:
    """Stands for a @triton.jit kernel: records what `start` asks of it."""

    def __init__(self):
        self.calls = []

    def warmup(self, *args, grid, **kwargs):
        self.calls.append(("compile", grid))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("launch", grid))


def test_every_kernel_launch_goes_through_start():
    """A direct `kernel[grid](...)` would compile one after the other during a warming forward (and run)."""
    root = Path(kernels_pkg.__file__).parent
    direct = [f"{p.relative_to(root)}:{n}" for p in sorted(root.rglob("*.py")) if p.name != "compiling.py"
              for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\b_\w*kernel\[", line)]
    assert direct == [], f"launch these through compiling.start: {direct}"


def test_a_forward_run_while_warming_compiles_its_kernels_and_runs_none(monkeypatch):
    norm, act, rope = Kernel(), Kernel(), Kernel()
    monkeypatch.setattr(fused, "_add_rms_norm_kernel", norm)
    monkeypatch.setattr(fused, "_act_mul_kernel", act)
    monkeypatch.setattr(kv_store, "_rope_store_kernel", rope)
    x = torch.randn(3, 64)

    def forward():
        fused.rms_norm(x, torch.ones(64), 1e-6, residual=x.clone())
        fused._act_and_mul(torch.randn(3, 64), gelu=False)
        q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
        cache = torch.zeros(4, 16, 2, 16)
        kv_store.rope_store_kv(torch.arange(3), q, k, k.clone(), torch.ones(8, 16), torch.zeros(8, 16), cache,
                               cache.clone(), torch.arange(3))

    with compiling.warming():
        forward()
    assert [c[0] for k in (norm, act, rope) for c in k.calls] == ["compile"] * 3
    forward()
    assert [c[0] for k in (norm, act, rope) for c in k.calls[1:]] == ["launch"] * 3


def test_ahead_can_be_turned_off(monkeypatch):
    ran = []
    monkeypatch.setattr(compiling, "in_parallel", lambda forwards: ran.extend(f() for f in forwards) or True)
    assert compiling.ahead([lambda: 1])
    monkeypatch.setenv("LLMCTL_COMPILE_AHEAD", "0")
    assert not compiling.ahead([lambda: 2])
    assert ran == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode graphs need CUDA")
def test_graph_capture_compiles_every_size_ahead(monkeypatch):
    from llmctl.runtime import cuda_graphs

    sizes_seen = []
    monkeypatch.setattr(compiling, "ahead", lambda forwards: sizes_seen.extend(f() for f in forwards) or True)
    x = torch.zeros(8, device="cuda")
    cuda_graphs.capture_graphs([1, 2, 4], lambda size: x[:size] + 1)
    assert sizes_seen and [t.shape[0] for t in sizes_seen] == [4, 2, 1]
