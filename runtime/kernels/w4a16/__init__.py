"""W4A16 Triton kernels: y = x @ dequant(W).T for the int4 layout of `pack` (fp16 / bf16 / fp32 x).

Five ways to compute it, one file each; `dispatch` picks one per shape (and
GPU) by timing them, or reads the choice from a tuned configuration file (`configs/`, shipped per GPU, or
the user's cache):

- `gemv` (`gemv`): small M (decode). No tensor cores: each program dots BLOCK_K channels of one
  row of x with BLOCK_N columns, in fp32. At M = 1 the GEMV is bound by instructions per weight, not
  bytes, so the inner product of a packed word with its eight x values is a few lines of PTX (about 3
  instructions per weight; Triton's own code for the same math took 5.5 to 6.5). Split-K spreads the K
  loop over more programs, so a 4096-wide layer still fills every SM; the last split of each column
  block to finish adds the partial sums up, so no second kernel is launched.
- `gemv_h2` (`gemv_h2`): the same GEMV for fp16 x in fp16x2 arithmetic, two weights per
  instruction (about 2.8 SASS instructions per weight against 4.4): code - zero is exact in fp16, the
  products are summed eight to an fp16 half (scaled so that no fp16 x can overflow them) and then in fp32.
- `gemv_rows` (`gemv_rows`): `gemv_h2` for 2 to 16 rows of fp16 x, 2, 4 or 8 rows a program: each word
  is loaded and unpacked once for all of them, then multiplied into each row's sum, bit-identical to
  `gemv_h2`'s (about 1.6 SASS instructions per weight and row at 4 rows, against 3.5 at one).
- `tiled` (`tiled`): M from a few rows to prefill, on tensor cores, computed as (W.T @ x.T).T: the
  dequantized weight tile is the MMA's first operand, which Hopper's wgmma reads from registers, and
  x.T its second, so as few as 16 rows of x cost no extra weight traffic. The interleaved packing puts
  each thread's unpacked words exactly in that operand's register layout: the tile never goes through
  shared memory and wgmma runs while the next block is unpacked. Split-K as for the GEMV, summed by a
  small second kernel.
- `dequant_mm` (`common`, with what the paths share): dequantize the whole weight once and let
  cuBLAS do the matmul (the reference path, and a candidate where nothing else is faster).

Every kernel reads each packed word once and unpacks its eight nibble lanes in registers (LOP3 with
the fp16 magic number 0x6400, in PTX where the GPU runs them), so every weight byte is loaded exactly
once. The tiled and dense paths dequantize a weight exactly as the reference does: (code - zero) *
scale rounded once to x's dtype (fp16 products of those operands are exact before rounding; bf16 goes
through fp32 because the scales are fp16). The GEMV keeps code - zero
exact and applies the scale in fp32 to each word's sum: it rounds less than the reference, never more.
Triton's interpreter (CPU tests) runs the same math in plain Triton instead of the PTX. The GEMVs and
the tiled path read only the interleaved packing (K and the group size multiples of 32, as in every
real model); other weights take the dense path.

Layers use this package's names alone: `from_quantized`, `can_concat` and `concat` make the packed weight
(`PackedW4`), `w4a16_linear` runs it, `pretune` tunes a model's shapes at start-up. The files, by concern:
`pack` (the layout), `common` (what the kernels share), `gemv`, `gemv_h2`, `gemv_rows`, `tiled` (the kernels), `dispatch`
(choosing, tuning, the configuration files).
"""

from __future__ import annotations

from llmctl.runtime.kernels.w4a16.common import ACT_DTYPES, Config, check_args, dequant_mm, dequantize
from llmctl.runtime.kernels.w4a16.dispatch import PATHS, pretune, w4a16_linear
from llmctl.runtime.kernels.w4a16.pack import PackedW4, can_concat, concat, from_quantized

__all__ = ["ACT_DTYPES", "PATHS", "Config", "PackedW4", "can_concat", "check_args", "concat", "dequant_mm", "dequantize",
           "from_quantized", "pretune", "w4a16_linear"]
