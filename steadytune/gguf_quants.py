"""GGML block formats -> float32, vectorised over all blocks of a tensor with numpy.

Each function takes the raw bytes of a tensor as a (n_blocks, bytes per block) uint8 array and
returns (n_blocks, values per block) float32, computed in the order ggml-quants.c computes it
(`(d * scale) * q - (dmin * min)` in float32), so the result equals llama.cpp's and the gguf
package's dequantization bit for bit. The common types of the files people have (the K-quants of
Q4_K_M/Q5_K_M/Q3_K_M/Q2_K files, Q5_0/Q5_1, IQ4_NL/IQ4_XS) are implemented here; the rarer ones
(IQ1-IQ3, TQ*, MXFP4) fall back on the gguf package.

Layouts (ggml-common.h): QK_K = 256 values per super-block, split into sub-blocks of 16 or 32
values with their own 4-, 6- or 8-bit scale; `d`/`dmin` are float16 super-block scales.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      dtype=np.float32)


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) values: the k low nibbles, then the k high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(b: np.ndarray, width: int, count: int) -> np.ndarray:
    """(n, k) bytes -> (n, count, k): field i of every byte is bits [width*i, width*(i+1))."""
    shifts = (np.arange(count, dtype=np.uint8) * width).reshape(1, -1, 1)
    return (b[:, None, :] >> shifts) & np.uint8((1 << width) - 1)


def q5_0(blocks: np.ndarray) -> np.ndarray:
    # d f16 | qh u32 (bit j: high bit of value j) | qs[16] (value j low nibble, j+16 high nibble)
    d = _f16(blocks[:, :2])
    high = np.unpackbits(blocks[:, 2:6], axis=-1, bitorder="little")
    q = (_nibbles(blocks[:, 6:]) | (high << 4)).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def q5_1(blocks: np.ndarray) -> np.ndarray:
    # d f16 | m f16 | qh u32 | qs[16]: x = d*q + m
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    high = np.unpackbits(blocks[:, 4:8], axis=-1, bitorder="little")
    q = _nibbles(blocks[:, 8:]) | (high << 4)
    return d * q.astype(np.float32) + m


def q2_k(blocks: np.ndarray) -> np.ndarray:
    # scales[16] (low nibble scale, high nibble min, per 16 values) | qs[64] | d | dmin.
    # Value n*128 + j*32 + l is bits 2j..2j+1 of qs[n*32 + l].
    n = len(blocks)
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0x0F).astype(np.float32))[:, :, None]
    ml = (dmin * (scales >> 4).astype(np.float32))[:, :, None]
    q = _bits(qs.reshape(n * 2, 32), 2, 4).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """12 bytes -> 16 signed 6-bit scales: low nibbles from bytes 0-7 (scales 0-7 low, 8-15 high
    nibble), the top two bits from bytes 8-11 (scale i: byte 8 + i%4, bits 2*(i//4))."""
    low = _nibbles(s[:, :8])
    high = _bits(s[:, 8:12], 2, 4).reshape(len(s), 16)
    return ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)


def q3_k(blocks: np.ndarray) -> np.ndarray:
    # hmask[32] | qs[64] | scales[12] | d. Value n*128 + j*32 + l: low 2 bits from qs like Q2_K,
    # and 4 is subtracted unless bit n*4 + j of hmask[l] is set.
    n = len(blocks)
    hmask, qs, scales, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
    dl = (d * _q3_k_scales(scales))[:, :, None]
    low = _bits(qs.reshape(n * 2, 32), 2, 4).reshape(n, 16, 16).astype(np.int8)
    minus = ((_bits(hmask, 1, 8) ^ 1) << 2).reshape(n, 16, 16).astype(np.int8)
    return (dl * (low - minus).astype(np.float32)).reshape(n, QK_K)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return scale.astype(np.float32), mins.astype(np.float32)


def q4_k(blocks: np.ndarray) -> np.ndarray:
    # d | dmin | scales[12] | qs[128]: sub-block 2c (2c+1) is the low (high) nibbles of qs[32c:32c+32]
    n = len(blocks)
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].reshape(n * 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(n, QK_K)


def q5_k(blocks: np.ndarray) -> np.ndarray:
    # Q4_K plus qh[32] before qs: bit s of qh[l] is the fifth bit of value l of sub-block s
    n = len(blocks)
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    low = _nibbles(blocks[:, 48:].reshape(n * 4, 32)).reshape(n, 8, 32)
    q = (low | (_bits(blocks[:, 16:48], 1, 8) << 4)).astype(np.float32)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(n, QK_K)


def q6_k(blocks: np.ndarray) -> np.ndarray:
    # ql[128] | qh[64] | scales[16] int8 | d. In half n, value j*32 + l takes the low nibble
    # (j = 0, 1) or high nibble (j = 2, 3) of ql[n*64 + (j%2)*32 + l] and bits 2j of qh[n*32 + l].
    n = len(blocks)
    ql, qh = blocks[:, :128].reshape(n * 2, 64), blocks[:, 128:192].reshape(n * 2, 32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(blocks[:, 208:210])
    low = _nibbles(ql).reshape(n * 2, 4, 32)
    q = (low | (_bits(qh, 2, 4) << 4)).astype(np.int8) - np.int8(32)
    return ((d * scales)[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def iq4_nl(blocks: np.ndarray) -> np.ndarray:
    # d | qs[16]: like Q4_0, but each nibble indexes a non-linear table of 16 values
    return _f16(blocks[:, :2]) * IQ4_VALUES[_nibbles(blocks[:, 2:])]


def iq4_xs(blocks: np.ndarray) -> np.ndarray:
    # d | scales_h u16 (2 bits per sub-block) | scales_l[4] (a nibble per sub-block) | qs[128]
    n = len(blocks)
    d = _f16(blocks[:, :2])
    high = _bits(blocks[:, 2:4], 2, 4).transpose(0, 2, 1).reshape(n, 8)
    low = _bits(blocks[:, 4:8], 4, 2).transpose(0, 2, 1).reshape(n, 8)
    dl = d * ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    q = IQ4_VALUES[_nibbles(blocks[:, 8:].reshape(n * 8, 16))].reshape(n, 8, 32)
    return (dl[:, :, None] * q).reshape(n, QK_K)


def _q8_0(blocks):
    return _f16(blocks[:, :2]) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(blocks):
    return _f16(blocks[:, :2]) * (_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(blocks):
    return _f16(blocks[:, :2]) * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16(blocks[:, 2:4])


OURS = {"Q5_0": q5_0, "Q5_1": q5_1, "Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k,
        "Q6_K": q6_k, "IQ4_NL": iq4_nl, "IQ4_XS": iq4_xs, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1}


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values of a tensor of GGML type `type_name` (its raw bytes in `data`)."""
    floats = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
    if type_name in floats:
        return np.asarray(data).view(floats[type_name]).astype(np.float32).reshape(shape)
    if type_name == "BF16":
        words = np.asarray(data).view(np.uint16).astype(np.uint32) << 16
        return words.view(np.float32).reshape(shape)
    from .gguf import GGML_TYPES

    block, size = next((b, s) for name, b, s in GGML_TYPES.values() if name == type_name)
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, size)
    if type_name in OURS:
        return OURS[type_name](blocks).reshape(shape)
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.dequantize(blocks, qtype).reshape(shape)


def affine_codes(data: np.ndarray, type_name: str, shape: tuple[int, int]):
    """Q4_0/Q4_1/Q8_0/Q4_K as MLX affine groups of 32 without rounding: (codes uint8 rows x cols,
    scales, biases as float32 rows x cols/32) with value = code * scale + bias.

    Q8_0 x = d*q (q in -128..127) -> code q+128, bias -128d; Q4_0 x = d*(q-8) -> code q, bias -8d;
    Q4_1 x = d*q + m -> code q, bias m; Q4_K sub-block x = (d*sc)*q - dmin*m -> code q, scale d*sc,
    bias -dmin*m. d is float16 (sc, m 6-bit), so these products are exact in float32.
    """
    rows, cols = shape
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144}[type_name]
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, size)
    d = _f16(blocks[:, :2])
    if type_name == "Q4_K":
        n = len(blocks)
        sc, mn = _k_scale_min(blocks[:, 4:16])
        codes = _nibbles(blocks[:, 16:].reshape(n * 4, 32))
        return codes.reshape(rows, cols), (d * sc).reshape(rows, -1), (-(_f16(blocks[:, 2:4]) * mn)).reshape(rows, -1)
    if type_name == "Q8_0":
        codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = -128 * d
    elif type_name == "Q4_0":
        codes, bias = _nibbles(blocks[:, 2:]), -8 * d
    else:
        codes, bias = _nibbles(blocks[:, 4:]), _f16(blocks[:, 2:4])
    return codes.reshape(rows, cols), d.reshape(rows, -1), bias.reshape(rows, -1)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing of `bits`-bit codes into uint32 words, first value in the lowest bits."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 4:
        codes = np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4))
    return codes.view("<u4")
