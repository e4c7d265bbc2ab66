"""Widening e4m3 (FP8) codes to fp16 four at a time: the PTX, and its Triton twin for the interpreter.

Triton widens an fp8 tensor element by element in whatever layout the consumer wants; where that layout is
not the one the bytes were loaded in (an MMA operand read across its contiguous dimension) it reads shared
memory a byte at a time (scripts/sass_report.py: 128 LDS.U8 a 128 x 128 tile of paged attention's V). Read
as 32-bit words instead, four codes are widened in the registers they were loaded into, by two
cvt.rn.f16x2.e4m3x2 (sm_89+; exact: every e4m3 value is an fp16), and the fp16 result goes on as any fp16
tile would.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Word $4, little-endian: code j (byte j) -> output $j.
_WORD = tl.constexpr("""
{
.reg .b16 lo, hi;
.reg .b32 h0, h1;
mov.b32 {lo, hi}, $4;
cvt.rn.f16x2.e4m3x2 h0, lo;
cvt.rn.f16x2.e4m3x2 h1, hi;
mov.b32 {$0, $1}, h0;
mov.b32 {$2, $3}, h1;
}
""")


@triton.jit
def e4m3(bits):
    """The e4m3 value of the low byte of an int32, as fp32: the twin of the PTX widening (the quantizers
    never write the NaN codes 0x7F / 0xFF)."""
    exp = (bits >> 3) & 0xF
    man = (bits & 0x7).to(tl.float32)
    mag = tl.where(exp == 0, man * 0.001953125, (8.0 + man) * tl.exp2((exp - 10).to(tl.float32)))
    return tl.where((bits & 0x80) != 0, -mag, mag)


@triton.jit
def widen_words(words, USE_ASM: tl.constexpr):
    """int32 words of four codes -> four fp16 tensors of words' shape (code j of each word in the j-th)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(_WORD, "=h,=h,=h,=h,r", [words],
                                         dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True,
                                         pack=1)
    else:
        return (e4m3(words).to(tl.float16), e4m3(words >> 8).to(tl.float16), e4m3(words >> 16).to(tl.float16),
                e4m3(words >> 24).to(tl.float16))


@triton.jit
def widen_rows(words, ROWS: tl.constexpr, COLS: tl.constexpr, USE_ASM: tl.constexpr):
    """A [ROWS, COLS / 4] tile of words -> the [ROWS, COLS] fp16 tile of their codes, in memory order."""
    a, b, c, d = widen_words(words, USE_ASM)
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [ROWS, COLS])


