"""Compile a Triton kernel for a GPU that is not here and report what the GPU would run: registers, spills,
shared memory and each loop's instruction mix, from the SASS (Triton's bundled ptxas and nvdisasm).

Kernel work on a machine without a GPU otherwise stops at "the interpreter says it is correct". This
answers the next questions before any device time is spent: does a change add or remove instructions per
weight in the hot loop, spill, vectorize its loads (LDG.E.128) or pipeline them (LDGSTS / UTMALDG)?

It runs the real launch code: `capture(...)` swaps every JIT kernel's launch for an ahead-of-time compile
for the target, specialized from the arguments as the runtime would, so a wrapper such as `gemv_h2(x, w)`
called on CPU tensors yields the kernels it would launch on an sm_90 (`force` sets constexprs the wrapper
picks from the device, such as USE_ASM).

    python scripts/sass_report.py w4a16 --path gemv_h2 --m 1 --k 4096 --n 4096 [--cfg 1,64,128,4,4,1]
    python scripts/sass_report.py fp8 --m 1 --k 4096 --n 4096 [--cfg 16,512,4,4,1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass
class Report:
    name: str
    regs: int
    spill_bytes: int
    shared: int
    loops: list[tuple[int, Counter]] = field(default_factory=list)  # (instructions, opcode counts) per loop
    sass: str = ""
    ttgir: str = ""

    def text(self, top: int = 12) -> str:
        lines = [f"{self.name}: {self.regs} registers, {self.spill_bytes} B spilled, {self.shared} B shared"]
        for i, (n, ops) in enumerate(self.loops):
            mix = ", ".join(f"{op} {c}" for op, c in ops.most_common(top))
            lines.append(f"  loop {i}: {n} instructions: {mix}")
        return "\n".join(lines)


def _loops(sass: str) -> list[tuple[int, Counter]]:
    """Each backward branch's body (innermost first by size), as (instruction count, opcode counts)."""
    addr = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
    labels, instrs = {}, []
    for line in sass.splitlines():
        label = re.match(r"^(\.L\w+):", line.strip())
        if label:
            labels[label.group(1)] = len(instrs)
            continue
        m = addr.search(line)
        if m:
            instrs.append((m.group(2), line))
    loops = []
    for i, (op, line) in enumerate(instrs):
        target = re.search(r"BRA\s+`?\(?(\.L\w+)", line) if op.startswith("BRA") else None
        if target and labels.get(target.group(1), i + 1) <= i:
            body = instrs[labels[target.group(1)]: i + 1]
            loops.append((len(body), Counter(o.split(".")[0] if not o.startswith(("LDG", "STG", "LDS", "STS"))
                                             else o for o, _ in body)))
    return sorted(loops, key=lambda x: x[0])


def _report(kernel) -> Report:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([BIN / "nvdisasm", "-c", cubin], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([BIN / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
    usage = dict(re.findall(r"(\w+):(\d+)", res.split("Function", 1)[-1]))
    return Report(kernel.name if hasattr(kernel, "name") else "kernel", int(usage.get("REG", 0)),
                  int(usage.get("STACK", 0)) + int(usage.get("LOCAL", 0)), int(usage.get("SHARED", 0)) + kernel.metadata.shared,
                  _loops(sass), sass)


@contextlib.contextmanager
def launches(arch: int = 90, force: dict | None = None):
    """Within the block, launching any JIT kernel runs nothing: its (source, options), specialized from the
    arguments as the runtime would for sm_<arch>, is appended to the yielded list instead. `force`:
    constexprs to set whatever the caller passed (those a wrapper picks from the device, such as USE_ASM)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    found: list[tuple[ASTSource, dict]] = []
    original = JITFunction.__getitem__

    def launch(self, grid):
        def run(*args, **kwargs):
            for name, value in (force or {}).items():
                if name in self.arg_names:
                    kwargs[name] = value
            binder = create_function_from_signature(self.signature, self.params, backend)
            bound, spec, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, options)
            found.append((ASTSource(self, signature, constexprs, attrs), options.__dict__))
        return run

    JITFunction.__getitem__ = launch
    try:
        yield found
    finally:
        JITFunction.__getitem__ = original


@contextlib.contextmanager
def capture(arch: int = 90, force: dict | None = None):
    """Within the block, launching any JIT kernel compiles it for sm_<arch> instead (nothing runs); the
    yielded list holds a Report per launch once the block ends."""
    reports: list[Report] = []
    with launches(arch, force) as found:
        yield reports
    for src, options in found:
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        report = _report(kernel)
        report.name = src.fn.__name__
        report.ttgir = kernel.asm["ttgir"]
        reports.append(report)


def distinct(found: list) -> list:
    """The distinct (source, options) pairs of `launches`' list: what a cold Triton cache compiles."""
    return list({src.hash() + str(sorted(options.items())): (src, options) for src, options in found}.values())


def compile_seconds(jobs: list, threads: int, arch: int = 90) -> float:
    """Seconds to compile these (source, options) pairs for sm_<arch> on a fresh cache, on `threads` threads."""
    from concurrent.futures import ThreadPoolExecutor

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # cold: nothing from an earlier round
    target = GPUTarget("cuda", arch, 32)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda job: triton.compile(job[0], target=target, options=job[1]), jobs))
    return time.perf_counter() - start


def random_w4(k: int, n: int, group: int):
    """A random GPTQ int4 weight [N, K], packed as the runtime packs it (PackedW4)."""
    import torch

    from llmctl.checkpoint.formats.gptq import gptq_tensors
    from llmctl.checkpoint.formats.weights import QuantizedWeight
    from llmctl.runtime.kernels.w4a16.pack import from_gptq

    groups = k // group
    qw = QuantizedWeight(torch.randint(0, 16, (n, k), dtype=torch.int32), torch.rand(n, groups) * 0.01,
                         torch.randint(1, 16, (n, groups), dtype=torch.int32),
                         torch.arange(k, dtype=torch.int32) // group, 4, group)
    return from_gptq(**gptq_tensors(qw))


def _w4a16(args) -> list[Report]:
    import torch

    from llmctl.runtime.kernels.w4a16 import PATHS, Config

    w = random_w4(args.k, args.n, args.group)
    x = torch.randn(args.m, args.k, dtype=getattr(torch, args.dtype))
    fields = [int(v) for v in args.cfg.split(",")] if args.cfg else []
    cfg = Config(args.path, *fields) if fields else None
    with capture(args.arch, force={"USE_ASM": True}) as reports:
        PATHS[args.path](x, w, None, cfg)
    return reports


def _fp8(args) -> list[Report]:
    import torch

    from llmctl.runtime.kernels import fp8_gemv

    w = torch.randn(args.n, args.k).to(fp8_gemv.FP8)
    x = torch.randn(args.m, args.k, dtype=getattr(torch, args.dtype))
    fields = [int(v) for v in args.cfg.split(",")] if args.cfg else []
    cfg = fp8_gemv.GemvConfig(*fields) if fields else fp8_gemv.default_config(args.m, args.n, args.k, x.device)
    with capture(args.arch, force={"USE_ASM": True}) as reports:
        fp8_gemv.gemv(x, w, torch.ones(args.n, 1), None, cfg)
    return reports


def _dense(args) -> list[Report]:
    import torch

    from llmctl.runtime.kernels import dense_gemv, fp8_gemv

    w = torch.randn(args.n, args.k, dtype=getattr(torch, args.dtype))
    x = torch.randn(args.m, args.k, dtype=w.dtype)
    cfg = fp8_gemv.GemvConfig(*[int(v) for v in args.cfg.split(",")]) if args.cfg else None
    with capture(args.arch) as reports:
        dense_gemv.gemv(x, w, None, cfg)
    return reports


def _attention(args) -> list[Report]:
    """A step of paged attention: args.m sequences of args.k tokens, the last args.q_len of them new (1: decode)."""
    import torch

    from llmctl.runtime.kernels import paged_attention as pa

    heads, kv_heads, dim, page = args.heads, args.kv_heads, args.head_dim, 16
    pages = -(-args.k // page)
    cache = torch.zeros(args.m * pages, page, kv_heads, dim, dtype=getattr(torch, args.cache))
    q = torch.randn(args.m * args.q_len, heads, dim, dtype=torch.float16)
    tables = torch.arange(args.m * pages, dtype=torch.int32).view(args.m, pages)
    starts = torch.arange(args.m + 1, dtype=torch.int32) * args.q_len
    os.environ["TRITON_INTERPRET"] = "1"  # only lets CPU tensors past the launcher's device check: the kernels
    with capture(args.arch, force={"USE_ASM": True}) as reports:  # were JIT-compiled when imported without it
        pa.paged_attention(q, cache, cache.clone(), torch.empty_like(q), starts,
                           torch.full((args.m,), args.k, dtype=torch.int32), tables, dim ** -0.5, args.q_len, args.k)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fp8", help="the FP8 weight-only GEMV for one shape")
    d = sub.add_parser("dense", help="the 16-bit weight GEMV (dense_gemv) for one shape")
    d.add_argument("--cfg", default="", help="block_n,block_k,split_k,num_warps,num_stages")
    a = sub.add_parser("attention", help="a step of paged attention (m sequences of k tokens, q-len of them new)")
    a.add_argument("--heads", type=int, default=32)
    a.add_argument("--kv-heads", type=int, default=32)
    a.add_argument("--head-dim", type=int, default=128)
    a.add_argument("--cache", default="float16", help="float16 or float8_e4m3fn")
    a.add_argument("--q-len", type=int, default=1, help="new tokens a sequence (1: a decode step)")
    p = sub.add_parser("w4a16", help="a W4A16 path for one shape")
    p.add_argument("--path", default="gemv_h2")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--cfg", default="", help="block_m,block_n,block_k,split_k,num_warps,num_stages")
    f.add_argument("--cfg", default="", help="block_n,block_k,split_k,num_warps,num_stages (default: the shape's)")
    for q in (p, f, a, d):
        q.add_argument("--m", type=int, default=1)
        q.add_argument("--k", type=int, default=4096)
        q.add_argument("--n", type=int, default=4096)
        q.add_argument("--dtype", default="float16")
        q.add_argument("--arch", type=int, default=90)
        q.add_argument("--sass", type=Path, help="also write the SASS (and the TTGIR beside it) here")
        q.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = parser.parse_args()
    reports = {"w4a16": _w4a16, "fp8": _fp8, "attention": _attention, "dense": _dense}[args.what](args)
    if args.json:
        print(json.dumps([{"name": r.name, "regs": r.regs, "spill_bytes": r.spill_bytes, "shared": r.shared,
                           "loops": [{"instructions": n, "ops": dict(ops)} for n, ops in r.loops]} for r in reports]))
    else:
        for r in reports:
            print(r.text())
    if args.sass:
        args.sass.write_text("\n\n".join(r.sass for r in reports))
        args.sass.with_suffix(".ttgir").write_text("\n\n".join(r.ttgir for r in reports))


if __name__ == "__main__":
    main()
