"""Time the fused-MoE Triton kernels against their torch twin at decode batch sizes (needs CUDA).

    python -m llmctl.bench.fused_moe_kernels [--shapes qwen3-30b-a3b mixtral-8x7b] [--batches 1 2 4 ... 64]

For each batch: random router choices (top-k of a random softmax), the expert weights of one layer in
fp16, the runtime's tuned configuration (tuned on the first call, outside the timing). Our time is the
CUDA graph of the whole MoE step (align, both kernels, the top-k sum) replayed under
`triton.testing.do_bench` (median, L2 cleared before each replay, so every weight is read cold); the twin
cannot be captured (it asks the host which experts were picked) and is timed eagerly. Bandwidth counts the
bytes of the experts that the batch's tokens picked (each read once); the GPU's copy bandwidth is a 1 GiB
device-to-device copy (read + write) timed the same way.

`--int4` adds the same layer with int4 experts (random codes, group 128, as a GPTQ / AWQ checkpoint's
load into `Int4Experts`): its time beside fp16's, and its bandwidth over the bytes it reads (codes,
fp32 scales, uint8 zeros).
"""

from __future__ import annotations

import argparse

import torch
import triton

from llmctl.runtime.kernels import fused_moe, fused_moe_tune
from llmctl.runtime.kernels.timing import graph_ms

# name -> (experts, top_k, hidden, moe intermediate)
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}


def copy_bandwidth() -> float:
    """Bytes a second of a 1 GiB device-to-device copy, counting what it reads and what it writes."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def int4_like(e: int, n: int, k: int, group: int = 128) -> fused_moe.Int4Experts:
    """Random int4 experts [E, N, K] on the GPU."""
    codes = torch.randint(0, 16, (e, n, k), device="cuda", dtype=torch.uint8)
    scales = torch.rand(e, n, k // group, device="cuda") * 0.002 + 0.001
    zeros = torch.randint(0, 16, (e, n, k // group), device="cuda")
    return fused_moe.Int4Experts.pack(codes, scales, zeros, group)


def int4_rows(shape: str, batches: list[int], copy_bps: float) -> list[str]:
    experts, top_k, hidden, inter = SHAPES[shape]
    torch.manual_seed(0)
    w13, w2 = int4_like(experts, 2 * inter, hidden), int4_like(experts, hidden, inter)
    expert_bytes = sum(t[0].numel() * t.element_size() for w in (w13, w2) for t in (w.codes, w.scales, w.zeros))
    dense13, dense2 = w13.dequantize(torch.float16), w2.dequantize(torch.float16)
    rows = []
    for m in batches:
        x = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
        weights, ids = torch.softmax(torch.randn(m, experts, device="cuda"), -1).topk(top_k, dim=-1)
        cfg = fused_moe_tune.tune(x, w13, w2, weights, ids)
        dense_cfg = fused_moe_tune.tune(x, dense13, dense2, weights, ids)
        ours = fused_moe.fused_moe(x, w13, w2, weights, ids, cfg).float()
        want = fused_moe.fused_moe(x, dense13, dense2, weights, ids, dense_cfg).float()
        err = ((ours - want).abs().max() / want.abs().max()).item()
        ms = graph_ms(lambda cfg=cfg, x=x, weights=weights, ids=ids: fused_moe.fused_moe(x, w13, w2, weights, ids, cfg),
                      warmup=5, rep=50)
        fp16_ms = graph_ms(lambda c=dense_cfg, x=x, weights=weights, ids=ids: fused_moe.fused_moe(
            x, dense13, dense2, weights, ids, c), warmup=5, rep=50)
        picked = ids.unique().numel()
        bps = picked * expert_bytes / (ms * 1e-3)
        rows.append(f"{shape + ' int4':19} {m:>5} {picked:>6} {ms * 1e3:>9.1f} {fp16_ms * 1e3:>9.1f} "
                    f"{fp16_ms / ms:>6.2f}x {bps / 1e12:>7.2f} {100 * bps / copy_bps:>6.1f}% {err:>8.1e}  {cfg}")
    return rows


def run(shape: str, batches: list[int], copy_bps: float) -> list[str]:
    experts, top_k, hidden, inter = SHAPES[shape]
    torch.manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.float16) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.float16) * inter**-0.5
    expert_bytes = (w13[0].numel() + w2[0].numel()) * 2
    rows = []
    for m in batches:
        x = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
        weights, ids = torch.softmax(torch.randn(m, experts, device="cuda"), -1).topk(top_k, dim=-1)
        cfg = fused_moe_tune.tune(x, w13, w2, weights, ids)
        ours = fused_moe.fused_moe(x, w13, w2, weights, ids, cfg)
        twin = fused_moe.fused_moe_ref(x, w13, w2, weights, ids)
        err = ((ours.float() - twin.float()).abs().max() / twin.float().abs().max()).item()
        ms = graph_ms(lambda cfg=cfg, x=x, weights=weights, ids=ids: fused_moe.fused_moe(x, w13, w2, weights, ids, cfg),
                      warmup=5, rep=50)
        ref_ms = triton.testing.do_bench(lambda x=x, weights=weights, ids=ids: fused_moe.fused_moe_ref(x, w13, w2, weights, ids),
                                         warmup=5, rep=50, return_mode="median")
        picked = ids.unique().numel()
        bps = picked * expert_bytes / (ms * 1e-3)
        rows.append(f"{shape:14} {m:>5} {picked:>6} {ms * 1e3:>9.1f} {ref_ms * 1e3:>9.1f} {ref_ms / ms:>6.1f}x "
                    f"{bps / 1e12:>7.2f} {100 * bps / copy_bps:>6.1f}% {err:>8.1e}  {cfg}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--int4", action="store_true", help="also int4 experts beside fp16")
    parser.add_argument("--skip-fp16", action="store_true", help="only the int4 rows")
    args = parser.parse_args()
    copy_bps = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bps / 1e12:.2f} TB/s (1 GiB, read + write)")
    print(f"{'shape':14} {'batch':>5} {'experts':>6} {'ours us':>9} {'twin us':>9} {'speed':>7} {'TB/s':>7} "
          f"{'of copy':>7} {'rel err':>8}  config")
    for shape in [] if args.skip_fp16 else args.shapes:
        for row in run(shape, args.batches, copy_bps):
            print(row, flush=True)
    if args.int4:
        print(f"\n{'shape':19} {'batch':>5} {'experts':>6} {'int4 us':>9} {'fp16 us':>9} {'speed':>7} {'TB/s':>7} "
              f"{'of copy':>7} {'rel err':>8}  config (int4 vs the fp16 kernel on the same weights dequantized)")
        for shape in args.shapes:
            for row in int4_rows(shape, args.batches, copy_bps):
                print(row, flush=True)


if __name__ == "__main__":
    main()
