"""Loading GGUF files (llama.cpp's format) into mlx-lm's model classes: llama, mistral, qwen2,
qwen3, gemma2, gemma3 and phi3. gguf_arch.py says how each architecture maps (tensor names, rope
layout, gemma's norm offsets, the config and RoPE scaling); this module reads the file and builds.

Over 500 lines on purpose: the header check, the load plan, the tensor reader and the tokenizer all
work from the one header walk; the tokenizer (the last ~170 lines) is the next seam to cut.

Quantized tensors stay quantized. Q4_0, Q4_1 and Q8_0 blocks are MLX affine groups of 32 already:
MLX's own reader (or `gguf_quants.affine_codes`) turns them into weight, scales and biases without
rounding, which become QuantizedLinear and QuantizedEmbedding layers as they are. Every other type
the gguf package knows (K-quants, IQ*, ...) is dequantized tensor by tensor with vectorised numpy
(gguf_quants.py) and re-quantized to MLX's affine format per `tensor_plan`, so no full-precision
copy of the whole base is ever made. F32, F16 and BF16 tensors load as plain arrays.

MLX's native reader trusts the file; on a truncated or corrupted one it can take the whole process
down. `check_gguf_header` therefore walks the header in pure Python first (it never reads tensor
data) and checks every length and offset against the file size. It also returns the metadata, so the
config and the tokenizer are built from it without a second parse.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .gguf_arch import (ARCHS, TOP_NAMES, Arch, arch_of, gguf_config, mlx_name, permute_rows,  # noqa: F401
                        unpermute_rows)

FLOAT_TYPES = ("F32", "F16", "BF16")
# MLX's own reader turns these into MLX affine arrays (weight, scales, biases) without rounding
NATIVE_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
GGUF_GROUP_SIZE = 32  # Q4_0/Q4_1/Q8_0 blocks hold 32 values: one MLX quantization group each

# GGUF value types: id -> struct format of a fixed-size value (8 = string and 9 = array are variable).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_MAX_COUNT = 1 << 24     # more tensors or keys than this is not a model, it is garbage
_MAX_KEY = 1 << 16       # llama.cpp keys are short ASCII names
_MAX_DIMS = 4            # GGML_MAX_DIMS
# A metadata array becomes a Python list of ~30 bytes an element, and a nested array costs a call
# an element: the largest real ones (vocabulary, scores, merges) hold ~260k, so more is refused
# before the list is built (a 32 MB array would otherwise take 650 MB).
_MAX_ARRAY = 1 << 21     # elements of one metadata array
_MAX_ELEMENTS = 1 << 23  # elements of all metadata arrays together
# GGML tensor types: id -> (name, values per block, bytes per block), as in ggml.h / gguf-py's
# GGML_QUANT_SIZES (copied so the header check does not import the gguf package: 0.7 s).
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# Tokens a chat template ends a turn with; generation must stop on them, not only on the file's eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "</s>")


@dataclass
class GGUFHeader:
    version: int
    metadata: dict                               # key -> value (numeric arrays as lists)
    tensors: dict = field(default_factory=dict)  # name -> (GGML type name, shape rows-first)
    data: dict = field(default_factory=dict)     # name -> (byte offset in the file, byte count)


# --------------------------------------------------------------------------- header check

class _Corrupt(Exception):
    pass


class _Cursor:
    """Reads little-endian GGUF values from a memory map, never past its end."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos, self.elements = buf, size, 0, 0

    def count(self, n: int, what: str) -> None:
        """Refuse an array longer than the limits, before anything is allocated for it."""
        self.elements += n
        if n > _MAX_ARRAY or self.elements > _MAX_ELEMENTS:
            raise _Corrupt(f"metadata array {what} claims {n} elements (at most {_MAX_ARRAY} an array and "
                           f"{_MAX_ELEMENTS} in all are read)")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"{what} at byte {self.pos} runs past the end of the file")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        """A length-prefixed string; names (given a limit) must be valid UTF-8, values may not be."""
        n = self.unpack("<Q", f"length of {what}")
        if limit is not None and n > limit:
            raise _Corrupt(f"{what} claims {n} bytes")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8", errors="strict" if limit else "replace")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} is not UTF-8 text") from None

    def strings(self, count: int, what: str) -> list[str]:
        """A string array (the vocabulary, the merges): the hot loop of the check, kept lean."""
        buf, pos, size, read = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of an element of {what}")
            end = pos + 8 + read(buf, pos)[0]
            if end > size:
                self.pos = pos
                raise _Corrupt(f"{what} at byte {pos} runs past the end of the file")
            out.append(buf[pos + 8:end].decode("utf-8", "replace"))
            pos = end
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth < 2:
            etype = self.unpack("<I", f"element type of {what}")
            count = self.unpack("<Q", f"length of {what}")
            if etype in _SCALARS:
                self.count(count, what)
                width = struct.calcsize(_SCALARS[etype])
                self.need(count * width, what)
                out = list(struct.unpack_from(f"<{count}{_SCALARS[etype][1]}", self.buf, self.pos))
                self.pos += count * width
                return out
            if etype not in (_STRING, _ARRAY):
                raise _Corrupt(f"{what} has unknown element type {etype}")
            if count > self.size:  # every element takes at least one byte
                raise _Corrupt(f"{what} claims {count} elements")
            self.count(count, what)
            if etype == _STRING:
                return self.strings(count, what)
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        raise _Corrupt(f"{what} has unknown value type {vtype}")


def check_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse and validate a GGUF header without reading tensor data; UserError if it is broken."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise _Corrupt(f"only {size} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, size))
    except _Corrupt as e:
        raise UserError(f"{path}: truncated or corrupted GGUF ({e}); re-download or re-convert it") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({e.strerror}); check the path and permissions") from None


def _parse(cur: _Cursor) -> GGUFHeader:
    if bytes(cur.buf[:4]) != b"GGUF":
        raise _Corrupt(f"no GGUF magic, the file starts with {bytes(cur.buf[:4])!r}")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise _Corrupt(f"GGUF version {version}; only versions 2 and 3 are read")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:  # the loops below read before they keep: nothing allocated
        raise _Corrupt(f"implausible counts: {n_tensors} tensors, {n_kv} metadata keys")
    metadata = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", limit=_MAX_KEY)
        vtype = cur.unpack("<I", f"type of {key}")
        metadata[key] = cur.value(vtype, key)
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}", limit=_MAX_KEY)
        n_dims = cur.unpack("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
        dims = [cur.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
        gtype = cur.unpack("<I", f"type of {name}")
        offset = cur.unpack("<Q", f"offset of {name}")
        infos.append((name, dims, gtype, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment is {alignment!r}, not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors, data = {}, {}
    for name, dims, gtype, offset in infos:
        if gtype not in GGML_TYPES:
            raise _Corrupt(f"tensor {name} has unknown type id {gtype}, newer than this steadytune or garbage")
        type_name, block, type_size = GGML_TYPES[gtype]
        if offset % alignment:  # llama.cpp and MLX read tensor data aligned; a shifted one is garbage
            raise _Corrupt(f"tensor {name}'s offset {offset} is not a multiple of general.alignment ({alignment})")
        if dims[0] % block:
            raise _Corrupt(f"tensor {name}: row of {dims[0]} values is not a whole number of "
                           f"{type_name} blocks")
        count = 1
        for d in dims:
            count *= d
        nbytes = count // block * type_size
        if data_start + offset + nbytes > cur.size:
            raise _Corrupt(f"tensor {name} ({nbytes} bytes at offset {offset}) ends past the "
                           f"end of the file ({cur.size} bytes)")
        tensors[name] = (type_name, tuple(reversed(dims)))  # GGUF lists the fastest axis first
        data[name] = (data_start + offset, nbytes)
    return GGUFHeader(version, metadata, tensors, data)


# --------------------------------------------------------------------------- tensor types, config

def loadable_types() -> set[str]:
    """GGML types whose tensors load: floats, our own dequantizers and the gguf package's."""
    import gguf.quants

    from .gguf_quants import OURS

    # the package's registry of the types it has a (de)quantizer for (it has no public list)
    package = getattr(gguf.quants, "_type_traits", {})
    return set(FLOAT_TYPES) | set(OURS) | {t.name for t in package}


def _check_tensors(header: GGUFHeader, path) -> None:
    ok = loadable_types()
    bad = {}
    for name, (gtype, _) in header.tensors.items():
        if gtype not in ok:
            bad.setdefault(gtype, []).append(name)
    if bad:
        what = "; ".join(f"{t} in {n[0]}" + (f" and {len(n) - 1} more" if len(n) > 1 else "")
                         for t, n in bad.items())
        raise UserError(f"{path}: tensor type not supported ({what}); use a file with K-quants, "
                        "Q4_0/Q5_0/Q8_0 or F16 tensors, e.g. llama-quantize model-f16.gguf model.gguf Q4_K_M")


def gguf_model_config(path: str, bits: int | None = 4, group_size: int = 64) -> dict:
    """The config of a GGUF file from its header alone, with mlx-lm's "quantization" entry for the
    layers as `load_gguf(path, bits, group_size)` will build them (the memory planner's view)."""
    header = check_gguf_header(path)
    config = gguf_config(header, path)
    quant = quantization_entry(header, ARCHS[arch_of(header, path)], bits, group_size)
    if quant:
        config["quantization"] = quant
    return config


# --------------------------------------------------------------------------- the load plan

def bits_per_weight(gtype: str) -> float:
    _, block, size = next(t for t in GGML_TYPES.values() if t[0] == gtype)
    return size * 8 / block


def tensor_plan(gtype: str, shape: tuple, bits: int | None, group_size: int):
    """(bits, group size) that a GGUF tensor of type `gtype` becomes as an MLX quantized layer, or
    None if it loads as floats. The one rule the loader, its summary and the memory planner share.

    Q4_0/Q4_1/Q8_0 blocks are MLX affine groups of 32 already and convert without rounding, and so
    do Q4_K's 32-value sub-blocks when 4 bits are asked for, whatever the group size. Every other
    quantized type is dequantized and re-quantized to `bits` with `group_size` (the largest of
    group_size, 64, 32 that divides the row), except that a type of 5 bits or more per weight (Q5_*,
    Q6_K: the output layer, attn_v and ffn_down of Q4_K_M files) becomes 8-bit, so that loading never
    throws away precision the file chose to spend. bits=None (--quantize none) keeps floats.

    Why (bench/gguf_requant.py, SmolLM2-135M as a Q4_K_M-like file, KL of next-token distributions
    from the dequantized file): every matrix re-quantized to 4-bit group 64 gives 0.98 nats, more
    than the file's own error (0.16); Q4_K alone re-quantized to group 64, 0.32; these rules, 1.7e-3.
    """
    if gtype in FLOAT_TYPES or len(shape) != 2:
        return None
    if gtype in NATIVE_TYPES:
        return NATIVE_TYPES[gtype], GGUF_GROUP_SIZE
    if bits is None:
        return None
    if gtype == "Q4_K" and bits == 4:
        return 4, GGUF_GROUP_SIZE
    if bits_per_weight(gtype) >= 5:
        bits = max(bits, 8)
    group = next(g for g in (group_size, 64, GGUF_GROUP_SIZE) if shape[1] % g == 0)
    return bits, group


def repacks_exactly(gtype: str, plan) -> bool:
    """Whether tensor_plan's (bits, group) holds `gtype`'s values without rounding."""
    return gtype in NATIVE_TYPES or (gtype == "Q4_K" and plan == (4, GGUF_GROUP_SIZE))


def layer_plans(header: GGUFHeader, spec: Arch, bits, group_size, path="GGUF") -> dict:
    """mlx-lm layer path -> {"group_size", "bits"} (quantized) or False, for every matrix."""
    per = {}
    for name, (gtype, shape) in header.tensors.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        plan = tensor_plan(gtype, shape, bits, group_size)
        per[mlx_name(name, spec, path).rsplit(".", 1)[0]] = (
            {"group_size": plan[1], "bits": plan[0]} if plan else False)
    return per


def quantization_entry(header: GGUFHeader, spec: Arch, bits, group_size) -> dict | None:
    """mlx-lm's config "quantization": the most common setting plus per-layer exceptions."""
    per = layer_plans(header, spec, bits, group_size)
    settings = [v for v in per.values() if v]
    if not settings:
        return None
    common = max(settings, key=settings.count)
    return {**common, **{k: v for k, v in per.items() if v != common}}


def load_summary(header: GGUFHeader, bits, group_size) -> list[str]:
    """One line per GGML type: how many tensors, and what they became."""
    seen = {}
    for gtype, shape in header.tensors.values():
        plan = tensor_plan(gtype, shape, bits, group_size)
        if plan is None:
            what = "float, as stored" if gtype in FLOAT_TYPES else "dequantized to float32"
        else:
            how = "exact" if repacks_exactly(gtype, plan) else "dequantized and re-quantized"
            what = f"MLX {plan[0]}-bit affine, group {plan[1]} ({how})"
        seen.setdefault(gtype, {}).setdefault(what, 0)
        seen[gtype][what] += 1
    return [f"{gtype}: " + "; ".join(f"{n} tensor{'s' * (n > 1)} -> {what}" for what, n in whats.items())
            for gtype, whats in seen.items()]


# --------------------------------------------------------------------------- weights

def _read_tensors(path, header: GGUFHeader, bits, group_size) -> dict:
    """GGUF name -> MLX array(s), tensor by tensor from a memory map: floats as stored, Q4_0/Q4_1/
    Q8_0 (and Q4_K at group 32) repacked exactly, the rest dequantized (vectorised numpy) and
    re-quantized per tensor_plan. Only one tensor's float copy exists at a time."""
    import mlx.core as mx
    import numpy as np

    from .gguf_quants import affine_codes, dequantize, pack

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, (gtype, shape) in header.tensors.items():
        start, nbytes = header.data[name]
        data = mm[start:start + nbytes]
        stem = name.rsplit(".", 1)[0]
        plan = tensor_plan(gtype, shape, bits, group_size)
        if gtype == "BF16":
            out[name] = mx.array(np.array(data).view(np.uint16).reshape(shape)).view(mx.bfloat16)
        elif gtype in ("F32", "F16"):
            out[name] = mx.array(np.array(data).view(np.dtype(gtype.replace("F", "float"))).reshape(shape))
        elif plan is None:
            out[name] = mx.array(dequantize(data, gtype, shape))
        elif repacks_exactly(gtype, plan):
            codes, scales, biases = affine_codes(data, gtype, shape)
            out[name] = mx.array(pack(codes, plan[0]))
            out[f"{stem}.scales"], out[f"{stem}.biases"] = mx.array(scales), mx.array(biases)
        else:
            w, s, b = mx.quantize(mx.array(dequantize(data, gtype, shape)), group_size=plan[1], bits=plan[0])
            out[name], out[f"{stem}.scales"], out[f"{stem}.biases"] = w, s, b
            mx.eval(w, s, b)  # free the float copy now, not at the end of the model
    return out


def _mlx_weights(raw: dict, config: dict, spec: Arch, path) -> dict:
    """Rename GGUF tensors to mlx-lm names, put q/k rows back in HF order, remove gemma's +1.

    Why un-permute rather than run llama.cpp's layout with traditional (adjacent-pair) RoPE: both
    give the same logits as the HF model, but only the HF row order makes the q/k LoRA adapters
    trained here the same adapters as on the HF/MLX copy of the model (mlx-lm, a fused export or
    another tool can use them). Rows of a quantized matrix are whole (packing runs along a row),
    so permuting the rows of the packed weight, scales and biases is exact and cheap.
    """
    import mlx.core as mx

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for name, value in raw.items():
        if name in spec.rope_tensors:
            continue  # RoPE factors: gguf_config made them the config's rope_scaling
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if spec.permuted_qk and kind in heads:
            value = mx.take(value, unpermute_rows(value.shape[0], heads[kind]), axis=0)
        if spec.norm_offset and name.endswith("norm.weight"):
            value = value.astype(mx.float32) - spec.norm_offset
        out[mlx_name(name, spec, path)] = value
    return out


def _build_model(config: dict, weights: dict, quant: dict):
    """The mlx-lm model of config["model_type"], its layers quantized per `quant` (layer_plans)."""
    import importlib

    import mlx.nn as nn

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = model.sanitize(dict(weights)) if hasattr(model, "sanitize") else weights
    nn.quantize(model, class_predicate=lambda p, m: quant.get(p, False))
    model.load_weights(list(weights.items()), strict=True)
    return model


def load_gguf(path: str, bits: int | None = 4, group_size: int = 64):
    """(model, tokenizer, config) from a GGUF file of a supported architecture; UserError otherwise.

    `bits`/`group_size`: what tensors of types MLX has no equivalent for become (see tensor_plan).
    """
    import mlx.core as mx

    header = check_gguf_header(path)
    try:
        spec = ARCHS[arch_of(header, path)]
        _check_tensors(header, path)  # a tensor type never read is the truer reason than its shape
        config = gguf_config(header, path)
        tokenizer = build_tokenizer(header.metadata, path)
    except UserError:
        raise
    except ImportError as e:  # a broken install, not a broken file
        raise UserError(f"{path}: reading GGUF needs the package {e.name!r}; run: pip install {e.name}") from None
    except Exception as e:  # wrong value types, merges naming unknown tokens, ... in the metadata
        raise UserError(f"{path}: invalid GGUF metadata ({_first_line(e)}); re-download or re-convert it") from None
    try:
        if all(t in FLOAT_TYPES or t in NATIVE_TYPES for t, _ in header.tensors.values()):
            raw = mx.load(str(path))  # MLX's native reader: fast, and keeps Q4_0/Q4_1/Q8_0 as they are
        else:
            import sys

            for line in load_summary(header, bits, group_size):
                print(f"{Path(path).name}: {line}", file=sys.stderr)
            raw = _read_tensors(path, header, bits, group_size)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path}: the tensors could not be read ({_first_line(e)}); "
                        "re-download or re-convert it") from None
    try:
        weights = _mlx_weights(raw, config, spec, path)
        model = _build_model(config, weights, layer_plans(header, spec, bits, group_size, path))
    except UserError:
        raise
    except (ValueError, KeyError, IndexError) as e:  # a tensor missing, extra or of the wrong shape
        raise UserError(f"{path}: the tensors do not fit the model its metadata describes "
                        f"({_first_line(e)}); re-download or re-convert it") from None
    quant = quantization_entry(header, spec, bits, group_size)
    if quant:  # recorded like mlx-lm's config.json: the common setting plus per-layer exceptions
        config["quantization"] = quant
    config["eos_token_id"] = sorted(tokenizer.eos_token_ids)
    return model, tokenizer, config


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


# --------------------------------------------------------------------------- tokenizer

# tokenizer.ggml.pre -> the split regex llama.cpp applies before byte-level BPE (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
              "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
              "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "tekken": _TEKKEN_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4


def _byte_level_pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre in PRE_SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre not in (None, "default", "gpt2", "gpt-2", "mpt", "olmo", "jais"):
        import warnings

        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known to steadytune; splitting text like "
                      "GPT-2, so some rare strings may tokenize differently from llama.cpp")
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: a pair merges with its result's score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


def _backend_tokenizer(meta: dict, path):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for this vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{path}: the file has no tokenizer (tokenizer.ggml.tokens); re-convert it "
                        "with llama.cpp's convert_hf_to_gguf.py")
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        llama3_like = meta.get("tokenizer.ggml.pre") in PRE_SPLITS
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=llama3_like))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        tok.decoder = decoders.ByteLevel()
        return tok
    if kind == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab, spm_merges(tokens, scores), fuse_unk=True, byte_fallback=True,
                                   unk_token=tokens[unk] if unk is not None else None))
        space = meta.get("tokenizer.ggml.add_space_prefix", True)
        steps = [normalizers.Prepend("▁")] if space else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
        strip = [decoders.Strip(" ", 1, 0)] if space else []
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()] + strip)
        return tok
    raise UserError(f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' and "
                    "SentencePiece 'llama' are); use the model's HF folder instead")


def build_tokenizer(meta: dict, path="GGUF"):
    """An mlx-lm TokenizerWrapper built offline from the GGUF tokenizer metadata."""
    from functools import partial

    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, TokenizerWrapper
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    tok = _backend_tokenizer(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def special(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    if (add_bos and bos) or (add_eos and eos):
        first = [bos] if add_bos and bos else []
        last = [eos] if add_eos and eos else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(first + ["$A"] + last), pair=" ".join(first + ["$A"] + last + ["$B"] + last),
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(first + last)])
    template = meta.get("tokenizer.chat_template")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                 unk_token=special("unknown"), pad_token=special("padding"),
                                 chat_template=template, clean_up_tokenization_spaces=False)
    eos_ids = {meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")
               if isinstance(meta.get(f"tokenizer.ggml.{k}_token_id"), int)}
    vocab = hf.get_vocab()
    eos_ids |= {vocab[t] for t in END_OF_TURN if template and t in template and t in vocab}
    if meta.get("tokenizer.ggml.model") == "gpt2":
        detok = BPEStreamingDetokenizer
    else:
        detok = partial(SPMStreamingDetokenizer, trim_space=meta.get("tokenizer.ggml.add_space_prefix", True))
    return TokenizerWrapper(hf, detok, eos_token_ids=sorted(eos_ids))
