"""Float weights -> GGML quantized blocks (Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), vectorised
over all blocks of a tensor with numpy, and the per-tensor type mix of llama.cpp's file types.

Each quantizer is llama.cpp's reference quantizer without an importance matrix (ggml-quants.c,
`quantize_row_*_ref`, which is what `llama-quantize` runs when no imatrix is given) computed over
every block at once: the same search, the same float32 arithmetic in the same order (sums left to
right, see `_sum`), the same rounding (`nearest_int` is round-half-to-even, `roundf` half away from
zero, `(int)` casts truncate), the same bit layout. So the blocks are byte for byte llama.cpp's
(tests/test_export_quant.py checks bytes from llama.cpp's ggml_quantize_chunk; bench/gguf_quant.py
compares whole files and measures the quality in llama.cpp).

The type of each tensor is `tensor_type`: llama.cpp's `llama_tensor_get_type` for the file types
offered here (q8_0, q6_k, q5_k_m, q4_k_m, q4_0), including the fallbacks for rows that are not a
multiple of the block size (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).
"""

from __future__ import annotations

import numpy as np

from .gguf_quants import QK_K

# --quant name -> (llama.cpp file type, LLAMA_FTYPE_* number, default tensor type)
FILE_TYPES = {
    "f16": ("MOSTLY_F16", 1, "F16"),
    "q8_0": ("MOSTLY_Q8_0", 7, "Q8_0"),
    "q6_k": ("MOSTLY_Q6_K", 18, "Q6_K"),
    "q5_k_m": ("MOSTLY_Q5_K_M", 17, "Q5_K"),
    "q4_k_m": ("MOSTLY_Q4_K_M", 15, "Q4_K"),
    "q4_0": ("MOSTLY_Q4_0", 2, "Q4_0"),
}
QUANTS = tuple(FILE_TYPES)
BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q4_K": (QK_K, 144),
         "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}
# a type whose block does not divide the row -> what llama.cpp writes instead (tensor_type_fallback)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Values quantized at once: small enough that a step's temporaries stay in the CPU's cache (2^16
# measured 2-3x faster than 2^21), and the chunks run on all cores (numpy releases the GIL).
_CHUNK = 1 << 16


# --------------------------------------------------------------------------- which type per tensor

def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# Never quantized by llama-quantize (tensor_allows_quantization): expert routers and the small
# convolution taps (F32 from the converter), gemma3n's AltUp and Laurel matrices and its per-layer
# model projection (these stay in the file's float type: write_gguf keeps the export's dtype for "F32").
KEEP = ("ffn_gate_inp.weight", "ssm_conv1d", "shortconv.conv.weight", "altup", "laurel", "per_layer_model_proj")
_V_LIKE = ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")  # llama.cpp's category_is_attn_v


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layer: int, tied: bool,
                v_index: tuple[int, int] | None = None, n_expert: int = 0) -> str:
    """The GGML type llama.cpp's `llama_model_quantize` gives tensor `name` (GGUF name, numpy shape
    (..., rows, cols)) in a file of type `quant`, for a model of `n_layer` blocks: norms, routers and
    other 1-D tensors stay F32; output.weight (and token_embd.weight when tied to it) gets Q6_K, or
    Q8_0 where its rows are not a multiple of 256; _M puts Q6_K on attn_v / ffn_down of the layers
    `_more_bits` picks (attn_v counted among the attn_v tensors, `v_index` = (this one, how many),
    as llama.cpp counts them: the layer index where every block has one); a model of 8 experts gets
    Q8_0 on attn_v / attn_k; a type whose block does not divide the row falls back (FALLBACK)."""
    default = FILE_TYPES[quant][2]
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name or any(k in name for k in KEEP):
        return "F32"
    if default == "F16":
        return "F16"
    cols = shape[-1]
    kind = next((k for k in (*_V_LIKE, "ffn_down") if k in name), None)
    layer = int(name.split(".")[1]) if name.startswith("blk.") else 0
    i, n = v_index if v_index and kind in _V_LIKE else (layer, n_layer)
    wanted = default
    # llama.cpp counts gemma3n's per-layer embedding as a token embedding (tensor_name_match_token_embd)
    if name == "output.weight" or (tied and name in ("token_embd.weight", "per_layer_token_embd.weight")):
        # the block of the file's default type decides, then the fallback below may apply again
        wanted = "Q8_0" if cols % BLOCK[default][0] or default == "Q8_0" else "Q6_K"
    elif n_expert == 8 and ("attn_v.weight" in name or "attn_k.weight" in name):
        wanted = "Q8_0"  # llama.cpp: "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    elif n_expert == 8 and quant == "q4_k_m" and "attn_output.weight" in name:
        wanted = "Q5_K"
    elif quant in ("q4_k_m", "q5_k_m") and kind is not None and _more_bits(i, n):
        wanted = "Q6_K"
    if cols % BLOCK[wanted][0]:
        wanted = FALLBACK.get(wanted, "F16")
        if wanted == "F16" or cols % BLOCK[wanted][0]:
            return "F16"  # not even a multiple of 32: llama.cpp keeps such a matrix in F16
    return wanted


def tensor_types(tensors: list[tuple[str, tuple]], quant: str, n_layer: int, n_expert: int = 0) -> dict[str, str]:
    """tensor_type of every (GGUF name, shape) of a file, in file order, with what llama.cpp counts
    over the whole model: whether output.weight is there (else token_embd is tied to it), the
    attn_v-like tensors (a hybrid model has them in its attention blocks only), the expert count."""
    names = [name for name, _ in tensors]
    tied = "output.weight" not in names
    v_like = [name for name in names if any(k in name for k in _V_LIKE)]
    return {name: tensor_type(name, shape, quant, n_layer, tied,
                              (v_like.index(name), len(v_like)) if name in v_like else None, n_expert)
            for name, shape in tensors}


# --------------------------------------------------------------------------- rounding as C does it

def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (the FPU's mode), as int32."""
    return np.rint(x).astype(np.int32)


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: half away from zero (exact: no `+ 0.5` that would round 0.49999997 up)."""
    a = np.abs(x)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), x)


def _f16(x: np.ndarray) -> np.ndarray:
    """float32 -> the float16 bytes a block stores, (n, 2) uint8."""
    return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).reshape(-1, 1).view(np.uint8)


def _f16_back(x: np.ndarray) -> np.ndarray:
    """What the stored float16 is worth again, as float32 (llama.cpp re-reads d, dmin this way)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum over the first axis, a sub-block's values laid out value-major, left to right as the C
    loop adds. numpy reduces a non-contiguous axis row after row in order (it sums pairwise only
    along the contiguous axis), which is why the searches work on (values, sub-blocks) arrays: a
    pairwise sum rounds differently, and a search comparing two sums then picks another scale on
    near-ties (tests/test_export_quant.py pins the bytes to llama.cpp's)."""
    return a.sum(axis=0)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the value of largest magnitude, the first one on ties (the C loops use `>`)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]


def _nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return (low.astype(np.uint8) & 0x0F) | ((high.astype(np.uint8) & 0x0F) << 4)


# --------------------------------------------------------------------------- 32-value blocks

def _q8_0(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = _roundf(x * inv[:, None]).astype(np.int8)
    return np.concatenate([_f16(d), q.view(np.uint8)], axis=1)


def _symmetric(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0: d = -(value of largest magnitude) / half, codes (x/d + half + 0.5) truncated."""
    d = _signed_absmax(x) / np.float32(-half)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.minimum(2 * half - 1, (x * inv[:, None] + np.float32(half + 0.5)).astype(np.int8))
    return d, q.astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes as the little-endian uint32 `qh` (bit j = code j)."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _q4_0(x: np.ndarray) -> np.ndarray:
    d, q = _symmetric(x, 8)
    return np.concatenate([_f16(d), _nibbles(q[:, :16], q[:, 16:])], axis=1)


def _q5_0(x: np.ndarray) -> np.ndarray:
    d, q = _symmetric(x, 16)
    return np.concatenate([_f16(d), _high_bits(q), _nibbles(q[:, :16], q[:, 16:])], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    d = (hi - lo) / np.float32(31)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = ((x - lo[:, None]) * inv[:, None] + np.float32(0.5)).astype(np.uint8)
    return np.concatenate([_f16(d), _f16(lo), _high_bits(q), _nibbles(q[:, :16], q[:, 16:])], axis=1)


# --------------------------------------------------------------------------- K-quant searches

def _make_qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants over all sub-blocks at once, value-major (x, w: (k, n) for n
    sub-blocks of k values): the scale and min of `x ~ scale * L - min`, L in 0..nmax, searched over
    nstep+1 scales by weighted squared error. Returns (L (k, n) float32, scale (n,), min (n,) >= 0)."""
    f32 = np.float32
    lo = np.minimum(x.min(axis=0), f32(0))
    hi = x.max(axis=0)
    sum_w, sum_x = _sum(w), _sum(w * x)
    flat = hi == lo
    span = np.where(flat, f32(1), hi - lo)
    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    L = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
    diff = scale * L + lo - x
    best = _sum(w * (diff * diff))
    for step in range(nstep + 1):
        span = np.where(flat, f32(1), hi - lo)
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        la = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
        wl = w * la
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * la), _sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, f32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            diff = this_scale * la + this_min - x
            err = _sum(w * (diff * diff))
        take = (D > 0) & (err < best) & ~flat
        L = np.where(take, la, L)
        best = np.where(take, err, best)
        scale = np.where(take, this_scale, scale)
        lo = np.where(take, this_min, lo)
    return np.where(flat, f32(0), L), np.where(flat, f32(0), scale), -lo


def _make_qx(x, nmax: int):
    """ggml's make_qx_quants(rmse_type=1, no weights) over all sub-blocks, value-major (x: (k, n)):
    the scale of `x ~ scale * (L - nmax)`, searched over 19 scales with weights x². Returns
    (L (k, n) in 0..2*nmax-1, scale (n,))."""
    f32 = np.float32
    mx = np.take_along_axis(x, np.abs(x).argmax(axis=0)[None], axis=0)[0]  # first largest |x|
    zero = np.abs(mx) < f32(1e-15)
    mx = np.where(zero, f32(1), mx)
    w = x * x
    wx = w * x

    def fit(iscale):
        l = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        return l, _sum(wx * l), _sum(w * l * l)

    L, sumlx, suml2 = fit(f32(-nmax) / mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, sumlx, suml2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / mx)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(take, sumlx / suml2, scale)
        L = np.where(take, cand, L)
        best = np.where(take, scale * sumlx, best)
    return np.where(zero, f32(0), L + nmax), np.where(zero, f32(0), scale)


def _pack_scale_min(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 six-bit scales and mins -> 12 bytes (the inverse of get_scale_min_k4)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    first = (ls[:, :4] & 63) | ((ls[:, 4:] >> 4) << 6)
    second = (lm[:, :4] & 63) | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=1)


def _k_affine(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The shared part of Q4_K and Q5_K (quantize_row_q{4,5}_K_ref): per 32-value sub-block a
    make_qkx2 fit with weights rms + |x|, the 8 scales and mins to 6 bits under float16 super-scales,
    then every value re-rounded against the stored scale and min. Returns (d, dmin, scales, L)."""
    f32 = np.float32
    n = len(x)
    sub = np.ascontiguousarray(x.reshape(n * 8, 32).T)  # value-major: see _sum
    av = np.sqrt(_sum(sub * sub) / f32(32))
    L, scales, mins = _make_qkx2(sub, av + np.abs(sub), nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.T.reshape(n, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(f32)
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(f32)
    # (uint8)nearest_int(...) then MIN(63, ...): the cast wraps, as in C
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales).astype(np.uint8))
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins).astype(np.uint8))
    d, dmin = max_scale / f32(63), max_min / f32(63)
    dl = (_f16_back(d)[:, None] * ls.astype(f32))[:, :, None]
    ml = (_f16_back(dmin)[:, None] * lm.astype(f32))[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest_int((x.reshape(n, 8, 32) + ml) / dl), 0, nmax)
    L = np.where(dl != 0, again, L).astype(np.uint8)  # a zero scale keeps the search's codes
    return d, dmin, _pack_scale_min(ls, lm), L


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, L = _k_affine(x, 15, -1.0, 20)
    pairs = L.reshape(len(x), 4, 2, 32)  # 64 values: the low nibbles, then the high nibbles
    qs = _nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(len(x), 128)
    return np.concatenate([_f16(d), _f16(dmin), scales, qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, L = _k_affine(x, 31, -0.5, 15)
    n = len(x)
    pairs = L.reshape(n, 4, 2, 32)
    qs = _nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(n, 128)
    # bit s of qh[l]: the fifth bit of value l of sub-block s
    qh = (((L >> 4) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([_f16(d), _f16(dmin), scales, qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    f32 = np.float32
    n = len(x)
    L, scales = _make_qx(np.ascontiguousarray(x.reshape(n * 16, 16).T), 32)  # value-major: see _sum
    scales, L = scales.reshape(n, 16), L.T.reshape(n, 16, 16)
    max_scale = _signed_absmax(scales)
    zero = np.abs(max_scale) < f32(1e-15)
    iscale = f32(-128) / np.where(zero, f32(1), max_scale)
    d = np.where(zero, f32(0), f32(1) / iscale)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dl = (_f16_back(d)[:, None] * sc.astype(f32))[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest_int(x.reshape(n, 16, 16) / dl), -32, 31) + 32
    L = np.where(dl != 0, again, L).astype(np.uint8).reshape(n, 2, 4, 32)  # halves of 128: 4 x 32
    ql = np.concatenate([_nibbles(L[:, :, 0], L[:, :, 2]), _nibbles(L[:, :, 1], L[:, :, 3])], axis=2)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16(d)], axis=1)
    out[zero] = 0  # an all-zero super-block is written as zero bytes
    return out


QUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k,
              "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """A float tensor (..., cols) as GGML `type_name` blocks: uint8 (..., cols / block * bytes),
    the layout gguf.GGUFWriter.add_tensor takes with raw_dtype. Blocks are independent, so chunks of
    rows are quantized in parallel threads; the bytes do not depend on the chunking."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    block, size = BLOCK[type_name]
    shape = values.shape
    if shape[-1] % block:
        raise ValueError(f"{type_name}: a row of {shape[-1]} values is not a multiple of {block}")
    flat = values.reshape(-1, block)
    out = np.empty((len(flat), size), dtype=np.uint8)
    step = max(1, _CHUNK // block)

    def one(start: int) -> None:
        chunk = np.asarray(flat[start:start + step], dtype=np.float32)
        out[start:start + step] = QUANTIZERS[type_name](chunk)

    starts = range(0, len(flat), step)
    if len(starts) == 1:
        one(0)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=min(len(starts), cores)) as pool:
            list(pool.map(one, starts))
    return out.reshape(*shape[:-1], shape[-1] // block * size)
