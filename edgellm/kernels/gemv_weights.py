"""The GEMV's weight reading (kernels/gemv.py): packed codes made floats without conversion
instructions, int4 tiles and their tensor-core dots, the one-row CUDA-core dot product, and a tile of
full-precision, int8 or fp8 rows. kernels/dequantize.py unpacks with the same pieces. No op of its own,
so no `_ref` here: what these compute is checked through gemv.gemv_ref and dequantize.dequantize_ref."""

import torch

from ._triton import HAS_TRITON, interpreter_on, run_settings, tl, triton
from .gemv_fusions import load_x


# Weight formats (the QUANT constexpr): full precision, then quant/formats.py's kinds.
QUANT_CODES = {None: 0, "int8": 1, "int4": 2, "fp8": 3}
# How the int4 tensor-core path makes its codes floats (RunSettings.int4_codes -> the CODES constexpr of
# _int4_dots; all but f32 with float16 activations only, the PTX ones in compiled kernels only).
INT4_CODES = {"f32": 0, "f16": 1, "ptx": 2, "words": 3, "words-ptx": 4}


def codes_mode(quant: str | None, dtype: torch.dtype, words: bool = True) -> int:
    """The CODES constexpr (INT4_CODES) of RunSettings.int4_codes (int8, fp8: 2 for their PTX,
    as RunSettings.byte_codes asks): its halves need float16 activations, its PTX a compiled kernel (the
    interpreter takes the same halves from Triton ops), its words (3, 4) `words` (else the bytes: 1, 2)."""
    if quant is None or dtype != torch.float16:
        return 0
    if quant in ("int8", "fp8"):  # (one-byte codes: their PTX or not, RunSettings.byte_codes)
        return 2 if run_settings().byte_codes == "ptx" and not interpreter_on() else 0
    chosen = INT4_CODES[run_settings().int4_codes]
    if interpreter_on() and chosen in (2, 4):  # (the PTX's twins: the same halves from Triton's ops)
        chosen -= 1
    if chosen >= 3 and not words:  # (words read x as 32-bit pairs; past 16 rows a program, bytes)
        chosen = 2 if chosen == 4 else 1
    return chosen


@triton.jit
def _codes_f32(q):
    """Integer codes (int32, 0..255) to float32 without a conversion instruction (those issue at an
    eighth of the FMA rate on Hopper, slower than int4 bytes arrive): q or-ed into the mantissa of
    2^23 is the float 2^23 + q exactly; the 2^23 comes off, exactly, with the zero (_zero_f32)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _zero_f32(z):
    """A zero point as _codes_f32's codes carry it: 2^23 + z, so _codes_f32(q) - _zero_f32(z) = q - z
    exactly (integer zeros)."""
    return z.to(tl.float32) + 8388608.0


@triton.jit
def _codes_f16(q):
    """Codes 0..255 (int32: int4's, int8's) to float16 without a conversion instruction: q or-ed into the
    mantissa of 2^10 (0x6400) is the half 1024 + q exactly (integers to 2048 are); the 1024 comes off,
    exactly, with the zero (_zero_f16)."""
    return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _zero_f16(z):
    """A zero point (an integer 0..255, float32) as _codes_f16's codes carry it: 1024 + z, in float16."""
    return (z + 1024.0).to(tl.float16)


# The int4 codes of four bytes less their zero as float16, in PTX: 1.5-2 instructions a code where Triton's
# elementwise ops take 4-5 (extract, or, convert, subtract, one code at a time). $2: the four bytes (pack=4);
# $3, $4: four halves 1024 + z (_zero_f16); out $0, $1: the four codes' halves, two to a register. Each
# pair of bytes is spread into the low byte of a 16-bit lane (prmt), its nibble kept and or-ed into the
# exponent of 1024 (lop3: (a & b) | c), and the zero taken off two lanes at a time (sub.f16x2):
# (1024 + q) - (1024 + z) = q - z exactly. The high nibbles: the same after a shift by 4.
_NIBBLES_PTX = """{{
.reg .b32 w, t0, t1;
{shift}
prmt.b32 t0, w, 0, 0x4140;
prmt.b32 t1, w, 0, 0x4342;
lop3.b32 t0, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t1, t1, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 $0, t0, $3;
sub.f16x2 $1, t1, $4;
}}"""
_LOW_PTX = tl.constexpr(_NIBBLES_PTX.format(shift="mov.b32 w, $2;")) if HAS_TRITON else None
_HIGH_PTX = tl.constexpr(_NIBBLES_PTX.format(shift="shr.b32 w, $2, 4;")) if HAS_TRITON else None


@triton.jit
def _int4_halves(packed, zm, HIGH: tl.constexpr, PTX: tl.constexpr):
    """The low (HIGH: high) nibbles of the uint8 tile `packed` less the zero, float16 q - z (exact):
    zm (broadcast to the tile) is 1024 + z in float16 (_zero_f16). PTX: the four-byte PTX above
    (compiled GPU kernels only; the same halves as the elementwise ops)."""
    if PTX:
        return tl.inline_asm_elementwise(_HIGH_PTX if HIGH else _LOW_PTX, "=r,=r,r,r,r",
                                         [packed, tl.broadcast_to(zm, packed.shape)], dtype=tl.float16,
                                         is_pure=True, pack=4)
    q = packed.to(tl.int32)
    return _codes_f16((q >> 4) if HIGH else (q & 0xF)) - zm


# The same from 16-bit words (two bytes: four codes), two words a register, all four nibbles at once
# ($4: the words; $5: two halves 1024 + z; $6: two halves -(64 + z); out $0..$3: nibble j's halves). A
# nibble kept where it lies: at bits 0-3 of each 16-bit lane, or-ed into the exponent of 1024, it is the
# half 1024 + q (less 1024 + z: q - z, sub.f16x2); at bits 4-7, 1024 + 16 q (times 1/16, less 64 + z:
# q - z, one fma.f16x2); the upper byte's two nibbles the same after one shift by 8. All exact: 9
# instructions for 8 codes, no byte shuffles.
_WORDS_PTX = tl.constexpr("""{
.reg .b32 t, u, sixteenth;
mov.b32 sixteenth, 0x2C002C00;
lop3.b32 t, $4, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 $0, t, $5;
lop3.b32 t, $4, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 $1, t, sixteenth, $6;
shr.b32 u, $4, 8;
lop3.b32 t, u, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 $2, t, $5;
lop3.b32 t, u, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 $3, t, sixteenth, $6;
}""") if HAS_TRITON else None


# int8 codes likewise: each pair of bytes spread into the low bytes of two 16-bit lanes whose high bytes
# are 0x64 (prmt with a constant: the halves 1024 + q), the zero taken off (sub.f16x2): one instruction a code.
_BYTES_PTX = tl.constexpr("""{
.reg .b32 t0, t1;
prmt.b32 t0, $2, 0x64646464, 0x4140;
prmt.b32 t1, $2, 0x64646464, 0x4342;
sub.f16x2 $0, t0, $3;
sub.f16x2 $1, t1, $4;
}""") if HAS_TRITON else None


@triton.jit
def _int8_halves(codes, zm, PTX: tl.constexpr):
    """The uint8 tile `codes` less the zero, float16 q - z (exact): zm (broadcast) is 1024 + z in float16.
    PTX: _BYTES_PTX (compiled kernels only; the same halves as the elementwise ops)."""
    if PTX:
        return tl.inline_asm_elementwise(_BYTES_PTX, "=r,=r,r,r,r", [codes, tl.broadcast_to(zm, codes.shape)],
                                         dtype=tl.float16, is_pure=True, pack=4)
    return _codes_f16(codes.to(tl.int32)) - zm


# fp8 e4m3 codes to float16 in Hopper's conversion, two bytes an instruction ($2: four bytes; $0, $1:
# their halves, exact: every e4m3 value is a float16).
_FP8_PTX = tl.constexpr("""{
.reg .b16 lo, hi;
mov.b32 {lo, hi}, $2;
cvt.rn.f16x2.e4m3x2 $0, lo;
cvt.rn.f16x2.e4m3x2 $1, hi;
}""") if HAS_TRITON else None


@triton.jit
def _fp8_halves(bits, PTX: tl.constexpr):
    """The e4m3 bytes `bits` (uint8) as float16 values: PTX, Hopper's conversion; else its bits moved
    into a half's (exponent bias 15 against 7) and scaled by 2^8 (the same values)."""
    if PTX:
        return tl.inline_asm_elementwise(_FP8_PTX, "=r,=r,r", [bits], dtype=tl.float16, is_pure=True, pack=4)
    wide = bits.to(tl.int16)
    half_bits = ((wide & 0x80) << 8) | ((wide & 0x7F) << 7)
    return half_bits.to(tl.float16, bitcast=True) * 256.0


@triton.jit
def _int4_word_halves(words, z, PTX: tl.constexpr):
    """The four nibbles of each int16 word of `words` (nibble j: bits 4j..4j+3) less the zero, float16 q - z
    (exact): four tiles, nibble 0's first. z [BLOCK_N, 1] float32 (an integer). PTX: _WORDS_PTX."""
    if PTX:
        zm = tl.broadcast_to(_zero_f16(z), words.shape)
        zo = tl.broadcast_to((-64.0 - z).to(tl.float16), words.shape)
        return tl.inline_asm_elementwise(_WORDS_PTX, "=r,=r,=r,=r,r,r,r", [words, zm, zo],
                                         dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
    q = words.to(tl.int32)
    zm = _zero_f16(z)
    return (_codes_f16(q & 0xF) - zm, _codes_f16((q >> 4) & 0xF) - zm, _codes_f16((q >> 8) & 0xF) - zm,
            _codes_f16((q >> 12) & 0xF) - zm)


@triton.jit
def _cols_of(b0, BLOCK_K: tl.constexpr):
    """The low-nibble columns [BLOCK_K // 32, 16] of the int4 blocks from byte b0 (_int4_block_bytes)."""
    return 2 * b0 + tl.arange(0, BLOCK_K // 32)[:, None] * 32 + tl.arange(0, 16)[None, :]


@triton.jit
def _int4_block_bytes(w_base, sc_ptr, zp_ptr, rows_n, n_ok, s_sn, b0, k, group, NB: tl.constexpr):
    """The int4 tile of NB blocks (32 columns, 16 bytes: formats.py) from byte b0 of each row, each block
    inside one group: its bytes (uint8) [BLOCK_N, NB, 16], the blocks' scales and zeros [BLOCK_N, NB] (float32),
    and the low nibbles' columns [NB, 16] (the high ones' are 16 further)."""
    blk = tl.arange(0, NB)
    t = tl.arange(0, 16)
    cols = _cols_of(b0, NB * 32)
    packed = tl.load(w_base[:, :, None] + (b0 + blk[:, None] * 16 + t[None, :])[None],
                     mask=n_ok[:, None, None] & (cols < k)[None], other=0)
    first = 2 * b0 + blk * 32  # each block's first column
    at = rows_n[:, None] * s_sn + (first // group)[None, :]
    b_ok = n_ok[:, None] & (first < k)[None, :]
    s = tl.load(sc_ptr + at, mask=b_ok, other=0.0).to(tl.float32)
    z = tl.load(zp_ptr + at, mask=b_ok, other=0.0).to(tl.float32)
    return packed, s, z, cols


@triton.jit
def _int4_tile(w_base, sc_ptr, zp_ptr, rows_n, n_ok, s_sn, b0, k, group, NB: tl.constexpr):
    """_int4_block_bytes with the low and high nibbles as _codes_f32 floats [BLOCK_N, NB, 16]."""
    packed, s, z, cols = _int4_block_bytes(w_base, sc_ptr, zp_ptr, rows_n, n_ok, s_sn, b0, k, group, NB)
    q = packed.to(tl.int32)
    return _codes_f32(q & 0xF), _codes_f32(q >> 4), s, z, cols


@triton.jit
def _x_pairs(x32_base, at, ok, nw32_ptr, rstd, NORM: tl.constexpr):
    """Columns 2a and 2a + 1 of x's rows (float16) at the 32-bit words `at` [W] (x32_base [BLOCK_M, 1]: the
    rows' starts as int32 pointers): (even, odd) [BLOCK_M, W], each a 16-bit half of the words (no shuffle
    between threads); NORM: RMS-normalised as load_x does (nw32_ptr: the norm weight's words)."""
    pairs = tl.load(x32_base + at[None, :], mask=ok, other=0)
    even = (pairs & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    odd = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    if NORM:
        weights = tl.load(nw32_ptr + at[None, :], mask=ok, other=0)
        even = (even.to(tl.float32) * rstd[:, None]).to(tl.float16) * \
            (weights & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        odd = (odd.to(tl.float32) * rstd[:, None]).to(tl.float16) * \
            (weights >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return even, odd


@triton.jit
def _int4_dots(x_base, x32_base, m_ok, w_base, w16_base, n_ok, sc_ptr, zp_ptr, rows_n, s_sn, k, k_lo, k_hi, group,
               nw_ptr, nw32_ptr, rstd, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr, NORM: tl.constexpr, CODES: tl.constexpr,
               WEIGHTS_FIRST: tl.constexpr, EVEN_K: tl.constexpr = False):
    """x @ W^T [BLOCK_M, BLOCK_N] over columns k_lo..k_hi (of k) in int4 tiles that each lie in one group
    (BLOCK_K <= group) on the tensor cores: a tile's BLOCK_K / 2 bytes of each row as they lie, their low
    and their high nibbles (less the zero: small integers, exact in fp16 / bf16) in two dots against the x
    columns they hold (byte c of the tile: column c + 16 (c // 16), and 16 further), the group's scale on
    the result. WEIGHTS_FIRST: the dots as W x^T, the unpacked weights the first operand (with 64-row
    tiles, the one a Hopper tensor-core MMA can take from registers: no trip through shared memory) and
    the few rows of x the second. CODES (INT4_CODES): 0 the codes made float32 from their bits, the zero
    taken off, then converted; with float16 x, 1 the codes made halves from their bits and the zero taken
    off in float16 (the same exact integers, no conversion of each code), 2 the same four bytes at a time
    in PTX (_int4_halves); 3 the tile's bytes read as int16 words of four codes, in four dots of
    BLOCK_K / 4 (nibble j of each word against its columns; x, and the norm weight, read as 32-bit pairs
    of halves: _x_pairs), 4 the same in PTX, two words (eight codes) at a time (_int4_word_halves).
    EVEN_K: k a whole number of tiles, so only the rows' bounds mask the loads."""
    if WEIGHTS_FIRST:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    c = tl.arange(0, BLOCK_K // 2)
    lo_cols = c + (c // 16) * 16  # (the tile's low-nibble columns; formats.py's blocks of 32)
    if CODES >= 3:  # (the same bytes read as int16 words: four codes each)
        cw = tl.arange(0, BLOCK_K // 4)
        word_cols = 32 * (cw // 8) + 2 * (cw % 8)  # (nibble 0's column; 1: +16, 2: +1, 3: +17)
    for b0 in tl.range(k_lo // 2, (k_hi + 1) // 2, BLOCK_K // 2, num_stages=NUM_STAGES):
        cols = 2 * b0 + lo_cols
        if CODES >= 3:
            # (a word whose block starts before k is stored, zero-padded: masked by the row's word count, runs
            # of 8 words stay one vector load)
            if EVEN_K:  # (whole tiles: the rows' bounds are the only mask)
                words = tl.load(w16_base + (b0 // 2 + cw)[None, :], mask=n_ok[:, None], other=0)
            else:
                words = tl.load(w16_base + (b0 // 2 + cw)[None, :],
                                mask=n_ok[:, None] & (b0 // 2 + cw < (k + 31) // 32 * 8)[None, :], other=0)
        elif EVEN_K:
            packed = tl.load(w_base + (b0 + c)[None, :], mask=n_ok[:, None], other=0)
        else:
            packed = tl.load(w_base + (b0 + c)[None, :], mask=n_ok[:, None] & (cols < k)[None, :], other=0)
        at = rows_n * s_sn + 2 * b0 // group
        s = tl.load(sc_ptr + at, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(zp_ptr + at, mask=n_ok, other=0.0).to(tl.float32)
        if CODES >= 3:  # four dots of BLOCK_K / 4: nibble j of each word against its x columns
            x_at = b0 + word_cols // 2  # (x as 32-bit pairs of columns: nibbles 0 and 2's, then 16 further 1 and 3's)
            if EVEN_K:
                lo_ok = m_ok[:, None]
                hi_ok = lo_ok
            else:
                lo_ok = m_ok[:, None] & (2 * x_at < k)[None, :]
                hi_ok = m_ok[:, None] & (2 * x_at + 16 < k)[None, :]
            lo_even, lo_odd = _x_pairs(x32_base, x_at, lo_ok, nw32_ptr, rstd, NORM)
            hi_even, hi_odd = _x_pairs(x32_base, x_at + 8, hi_ok, nw32_ptr, rstd, NORM)
            w0, w1, w2, w3 = _int4_word_halves(words, z[:, None], CODES == 4)
            if WEIGHTS_FIRST:
                d = tl.dot(w0, tl.trans(lo_even), input_precision=PRECISION)
                d = tl.dot(w1, tl.trans(hi_even), acc=d, input_precision=PRECISION)
                d = tl.dot(w2, tl.trans(lo_odd), acc=d, input_precision=PRECISION)
                d = tl.dot(w3, tl.trans(hi_odd), acc=d, input_precision=PRECISION)
                acc += d * s[:, None]
            else:
                d = tl.dot(lo_even, tl.trans(w0), input_precision=PRECISION)
                d = tl.dot(hi_even, tl.trans(w1), acc=d, input_precision=PRECISION)
                d = tl.dot(lo_odd, tl.trans(w2), acc=d, input_precision=PRECISION)
                d = tl.dot(hi_odd, tl.trans(w3), acc=d, input_precision=PRECISION)
                acc += d * s[None, :]
        else:  # two dots: the low nibbles, then the high ones
            x_lo = load_x(x_base + cols[None, :], m_ok[:, None] & (cols < k)[None, :], nw_ptr + cols[None, :],
                          (cols < k)[None, :], rstd[:, None], NORM)
            x_hi = load_x(x_base + cols[None, :] + 16, m_ok[:, None] & (cols + 16 < k)[None, :],
                          nw_ptr + cols[None, :] + 16, (cols + 16 < k)[None, :], rstd[:, None], NORM)
            dtype = x_lo.dtype
            if CODES > 0:  # (float16 x)
                zm = _zero_f16(z)[:, None]
                lo = _int4_halves(packed, zm, False, CODES == 2)  # small integers, exact in fp16
                hi = _int4_halves(packed, zm, True, CODES == 2)
            else:
                zm = _zero_f32(z)[:, None]
                q = packed.to(tl.int32)
                lo = (_codes_f32(q & 0xF) - zm).to(dtype)  # small integers, exact in fp16 / bf16
                hi = (_codes_f32(q >> 4) - zm).to(dtype)
            if WEIGHTS_FIRST:
                d = tl.dot(lo, tl.trans(x_lo), input_precision=PRECISION)
                d = tl.dot(hi, tl.trans(x_hi), acc=d, input_precision=PRECISION)
                acc += d * s[:, None]
            else:
                d = tl.dot(x_lo, tl.trans(lo), input_precision=PRECISION)
                d = tl.dot(x_hi, tl.trans(hi), acc=d, input_precision=PRECISION)
                acc += d * s[None, :]
    if WEIGHTS_FIRST:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _row_gemv(x_ptr, w_base, n_ok, sc_ptr, zp_ptr, rows_n, s_sn, k, k_lo, k_hi, group, nw_ptr, rstd,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, QUANT: tl.constexpr,
              NORM: tl.constexpr, PTX: tl.constexpr = False):
    """x[0] . W[rows_n] over columns k_lo..k_hi (of k) on the CUDA cores, [BLOCK_N] float32, less the
    per-channel scales (int8 / fp8 apply them after). Products accumulate elementwise in the tile (int4:
    per block of 32 columns, to take the block's scale), reduced over K once at the end. NORM: x is
    RMS-normalised on the way in (load_x). PTX: int4 and fp8 codes through their PTX (_int4_halves,
    _fp8_halves)."""
    if QUANT == 2:  # int4: blocks of 32 columns, each in one group: per block and row, the codes
        # less the zero dotted with x, times the scale
        acc = tl.zeros([BLOCK_N, BLOCK_K // 32], dtype=tl.float32)
        for b0 in tl.range(k_lo // 2, (k_hi + 1) // 2, BLOCK_K // 2, num_stages=NUM_STAGES):
            cols = _cols_of(b0, BLOCK_K)
            x_lo = load_x(x_ptr + cols, cols < k, nw_ptr + cols, cols < k, rstd, NORM).to(tl.float32)[None]
            x_hi = load_x(x_ptr + cols + 16, cols + 16 < k, nw_ptr + cols + 16, cols + 16 < k, rstd,
                          NORM).to(tl.float32)[None]
            if PTX:  # the codes less the zero as halves, four bytes at a time (exact), then float32
                packed, s, z, _ = _int4_block_bytes(w_base, sc_ptr, zp_ptr, rows_n, n_ok, s_sn, b0, k, group,
                                                       BLOCK_K // 32)
                zm = _zero_f16(z)[:, :, None]
                lo = _int4_halves(packed, zm, False, True).to(tl.float32)
                hi = _int4_halves(packed, zm, True, True).to(tl.float32)
                acc += tl.sum(lo * x_lo + hi * x_hi, axis=2) * s
            else:
                lo, hi, s, z, _ = _int4_tile(w_base, sc_ptr, zp_ptr, rows_n, n_ok, s_sn, b0, k, group, BLOCK_K // 32)
                zm = _zero_f32(z)[:, :, None]
                acc += tl.sum((lo - zm) * x_lo + (hi - zm) * x_hi, axis=2) * s
        return tl.sum(acc, axis=1)
    else:
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if QUANT == 1:  # the row's zero, with the 2^23 of _codes_f32
            zm = _zero_f32(tl.load(zp_ptr + rows_n, mask=n_ok, other=0.0))[:, None]
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            kk = k0 + cols
            x = load_x(x_ptr + kk, kk < k, nw_ptr + kk, kk < k, rstd, NORM).to(tl.float32)[None, :]
            if QUANT == 1:
                q = tl.load(w_base + kk[None, :], mask=n_ok[:, None] & (kk < k)[None, :], other=0).to(tl.int32)
                acc += (_codes_f32(q) - zm) * x
            else:
                acc += _weight_tile(w_base, kk, k, n_ok, tl.float32, QUANT, PTX=PTX) * x
        return tl.sum(acc, axis=1)


@triton.jit
def _weight_tile(w_base, kk, k, n_ok, dtype: tl.constexpr, QUANT: tl.constexpr, zm=None, PTX: tl.constexpr = False):
    """W[rows, kk] in the compute dtype: full precision, or int8 / fp8 codes (int8's are 0..255, exact
    in fp16 and bf16; the per-channel zero and scale apply to the accumulator once, after the K loop).
    int8 codes for float16 come less their zero zm (1024 + z, float16) from their bits (_int8_halves: no
    conversion instruction, which issued 128 a K step where the loop's other work was ~570). PTX: int8
    and fp8 codes through their PTX (compiled kernels, float16 x)."""
    k_ok = kk < k
    if QUANT == 1 and dtype == tl.float16:
        w = _int8_halves(tl.load(w_base + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0), zm, PTX)
    elif QUANT == 3:  # fp8 e4m3 stored as bytes (_fp8_halves)
        w = _fp8_halves(tl.load(w_base + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0), PTX).to(dtype)
    else:
        w = tl.load(w_base + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(dtype)
    return w
