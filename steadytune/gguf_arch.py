"""How each GGUF architecture maps onto an mlx-lm model class: tensor names and layouts (ARCHS), the
config.json its metadata implies (gguf_config), and RoPE scaling, which a converter writes partly as
tensors: Llama 3's `rope_freqs` and Phi-3's `rope_factors_long/short` hold one factor per rotary
frequency (llama.cpp divides each base frequency by it). They become the HF-style rope_scaling that
mlx-lm's model builds the same frequencies from, not weights, so a fused export or an HF copy of the
model describes them as the original config did; `add_rope_scaling` writes them back.

gguf.py reads the file (header, tensors, tokenizer) and builds the model from what this module says.
For writing (`export --format gguf`), EXPORTS holds one table per mlx-lm model type: llama.cpp's
architecture, tensor names and layouts, and the metadata its loader reads (gguf_hparams).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UserError

# GGUF tensor name -> mlx-lm parameter name (blk.N.* go under model.layers.N), as llama.cpp's
# gguf-py/gguf/constants.py names them for each architecture.
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ATTN = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTN, **_MLP}
_GEMMA_BLOCK = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                **_ATTN, **_MLP}
_PHI3_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
               "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}  # ffn_up holds gate and up
# RoPE factor tensors (one float per rotary frequency), by the scaling that writes them
ROPE_FREQS = "rope_freqs.weight"                                    # llama3
LONGROPE = ("rope_factors_long.weight", "rope_factors_short.weight")  # phi3 longrope
FACTOR_TENSORS = (ROPE_FREQS, *LONGROPE)


@dataclass(frozen=True)
class Arch:
    """How one GGUF architecture maps onto an mlx-lm model class."""
    model_type: str           # mlx_lm.models.<model_type>
    hf_class: str             # config.json "architectures"
    blocks: dict              # blk.N.<GGUF name> -> model.layers.N.<mlx-lm name>
    permuted_qk: bool         # llama.cpp interleaved each q/k head's rows (LlamaModel.permute)
    norm_offset: float = 0.0  # gemma: the converter stores 1 + w for every RMSNorm weight
    rope_tensors: tuple = ()  # RoPE factor tensors read into rope_scaling, not loaded as weights


ARCHS = {
    "llama": Arch("llama", "LlamaForCausalLM", BLOCK_NAMES, True, rope_tensors=(ROPE_FREQS,)),  # + SmolLM
    "mistral": Arch("llama", "MistralForCausalLM", BLOCK_NAMES, True, rope_tensors=(ROPE_FREQS,)),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM", BLOCK_NAMES, False),  # + q/k/v biases
    "qwen3": Arch("qwen3", "Qwen3ForCausalLM", {**BLOCK_NAMES, **_QK_NORM}, False),
    "gemma2": Arch("gemma2", "Gemma2ForCausalLM", _GEMMA_BLOCK, False, 1.0),
    "gemma3": Arch("gemma3_text", "Gemma3ForCausalLM", {**_GEMMA_BLOCK, **_QK_NORM}, False, 1.0),
    "phi3": Arch("phi3", "Phi3ForCausalLM", _PHI3_BLOCK, False, rope_tensors=LONGROPE),
}


def arch_of(header, path) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in ARCHS:
        raise UserError(f"{path}: architecture {arch!r} is not supported from GGUF (steadytune reads "
                        f"{', '.join(ARCHS)}); use the model's HF folder instead")
    return arch


def mlx_name(gguf_name: str, spec: Arch, path) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # weight, scales, biases or bias
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in spec.blocks:
        return f"model.layers.{match.group(1)}.{spec.blocks[match.group(2)]}.{suffix}"
    raise UserError(f"{path}: tensor {gguf_name} is not part of a {spec.model_type} model (mixture-of-"
                    "experts and other layouts are not supported); use the model's HF folder instead")


def unpermute_rows(n_rows: int, n_head: int):
    """Row order that undoes llama.cpp's q/k permutation (convert_hf_to_gguf.py `permute`).

    llama.cpp stores each head's rows interleaved (r0, r_d/2, r1, r_d/2+1, ...) so its RoPE can
    rotate adjacent pairs; HF's layout keeps the two halves apart (rotate_half). The HF row (h, p, j)
    sits at GGUF row h*d + 2*j + p.
    """
    import mlx.core as mx

    d = n_rows // n_head
    h = mx.arange(n_head).reshape(-1, 1, 1)
    p = mx.arange(2).reshape(1, -1, 1)
    j = mx.arange(d // 2).reshape(1, 1, -1)
    return (h * d + 2 * j + p).reshape(-1)


def permute_rows(n_rows: int, n_head: int):
    """The inverse order: HF rows -> llama.cpp rows (used when writing a GGUF)."""
    import mlx.core as mx

    return mx.argsort(unpermute_rows(n_rows, n_head))


# --------------------------------------------------------------------------- config

def gguf_config(header, path="GGUF") -> dict:
    """A config.json-like dict for the mlx-lm model class of the file's architecture."""
    arch = arch_of(header, path)
    spec = ARCHS[arch]
    m = header.metadata

    def get(key, default=None):
        value = m.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"{path}: metadata key {arch}.{key} is missing; re-convert the model "
                            "with a current llama.cpp")
        if isinstance(value, list) and len(set(value)) == 1:
            value = value[0]  # some converters write a per-layer list that does not vary
        if isinstance(value, list):
            raise UserError(f"{path}: metadata key {arch}.{key} varies per layer, which the mlx-lm "
                            f"{spec.model_type} model does not; use the model's HF folder instead")
        return value

    def count(key, default=None):
        """A whole number in range, checked before anything is derived from it (hidden // heads)."""
        value, limit = get(key, default), _LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            _bad(path, f"{arch}.{key}", value, f"it must be a whole number from 1 to {limit}")
        return value

    tied = "output.weight" not in header.tensors
    embedding = header.tensors.get("token_embd.weight")
    vocab = embedding[1][0] if embedding else len(m.get("tokenizer.ggml.tokens", []))
    heads = count("attention.head_count")
    hidden = count("embedding_length")
    config = {
        "model_type": spec.model_type,
        "architectures": [spec.hf_class],
        "hidden_size": hidden,
        "num_hidden_layers": count("block_count"),
        "intermediate_size": count("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": count("attention.head_count_kv", heads),
        "head_dim": count("attention.key_length", max(hidden // heads, 1)),
        # float32 in the file: 7 significant digits give back the decimal the model was made with
        "rms_norm_eps": float(f'{get("attention.layer_norm_rms_epsilon", 1e-5):.7g}'),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": count("context_length", 4096),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    }
    rope_dims = count("rope.dimension_count", config["head_dim"])
    if arch == "phi3":
        config["partial_rotary_factor"] = rope_dims / config["head_dim"]
    elif rope_dims != config["head_dim"]:
        raise UserError(f"{path}: partial rotary embedding ({rope_dims} of {config['head_dim']} dims) "
                        f"is not part of the {arch} layout; use the model's HF folder instead")
    config.update(_rope_config(arch, header, path, config, rope_dims, get))
    if arch.startswith("gemma"):
        config.update(_gemma_config(arch, m, config, path))
    elif f"{arch}.attention.sliding_window" in m:  # phi3, mistral: recorded; mlx-lm attends in full
        config["sliding_window"] = m[f"{arch}.attention.sliding_window"]
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in m:
            config[key] = m[f"tokenizer.ggml.{key}"]
    check_config(config, header, arch, path)
    return config


# The counts a model is built from, with their largest sane value: the model is built before a
# tensor is read, so a corrupted count (block_count 100000, feed_forward_length 2^32 - 1) would
# allocate gigabytes first. Checked as read; check_config then holds them against the tensors.
_LIMITS = {"embedding_length": 1 << 17, "block_count": 1 << 12, "feed_forward_length": 1 << 20,
           "attention.head_count": 1 << 12, "attention.head_count_kv": 1 << 12,
           "attention.key_length": 1 << 12, "context_length": 1 << 26, "rope.dimension_count": 1 << 12}
_POSITIVE = {"rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
             "query_pre_attn_scalar": "attention.scale", "attn_logit_softcapping": "attn_logit_softcapping",
             "final_logit_softcapping": "final_logit_softcapping"}


def _bad(path, key: str, value, rule: str):
    raise UserError(f"{path}: metadata key {key} is {value!r}; {rule}. The file is damaged or was converted "
                    "wrongly: re-download it or re-convert it with a current llama.cpp")


def check_config(config: dict, header, arch: str, path) -> None:
    """Every hyper-parameter a model is built from: a whole number in range, a positive finite
    float, divisible where the layout needs it, and matching the tensors' shapes; a UserError
    naming the metadata key otherwise."""
    def bad(key: str, value, rule: str):
        _bad(path, f"{arch}.{key}", value, rule)

    if not 1 <= config["vocab_size"] <= 1 << 22:
        _bad(path, "tokenizer.ggml.tokens", config["vocab_size"], "the vocabulary must hold 1 to 4194304 tokens")
    for entry, key in _POSITIVE.items():
        v = config.get(entry)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            bad(key, v, "it must be a positive finite number")
    scaling = config.get("rope_scaling") or {}
    if "factor" in scaling and not 0 < scaling["factor"] < math.inf:
        bad("rope.scaling.factor", scaling["factor"], "it must be a positive finite number")
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    if heads % kv:
        bad("attention.head_count_kv", kv, f"it must divide attention.head_count ({heads})")
    blocks = {int(n.split(".")[1]) for n in header.tensors if re.match(r"blk\.\d+\.", n)}
    if blocks != set(range(config["num_hidden_layers"])):
        bad("block_count", config["num_hidden_layers"], f"the file holds tensors for {len(blocks)} blocks "
            f"(numbered {min(blocks, default=0)} to {max(blocks, default=-1)})")
    hidden, head_dim, ff = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    shapes = header.tensors
    expect = [("token_embd.weight", 1, hidden, "embedding_length"),
              ("blk.0.attn_q.weight", 0, heads * head_dim, "attention.head_count"),
              ("blk.0.attn_k.weight", 0, kv * head_dim, "attention.head_count_kv"),
              ("blk.0.ffn_down.weight", 1, ff, "feed_forward_length")]
    for name, axis, want, key in expect:
        shape = shapes.get(name, (None, ()))[1]
        if len(shape) == 2 and shape[axis] != want:
            value = {"embedding_length": hidden, "attention.head_count": heads,
                     "attention.head_count_kv": kv, "feed_forward_length": ff}[key]
            bad(key, value, f"{name} has shape {list(shape)}, which does not fit it")


def _gemma_config(arch: str, m: dict, config: dict, path) -> dict:
    """Gemma 2/3 settings llama.cpp keeps in metadata or derives (llama-model.cpp, load_hparams)."""
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    # Queries are scaled by 1/sqrt(query_pre_attn_scalar): head_dim, except for the 27B models
    # (46 layers for Gemma 2, 62 for Gemma 3), which use hidden/heads, as llama.cpp hard-codes.
    scale = m.get(f"{arch}.attention.scale")
    if scale:
        scalar = 1.0 / float(scale) ** 2
    elif layers == {"gemma2": 46, "gemma3": 62}[arch]:
        scalar = config["hidden_size"] // heads
    else:
        scalar = config["head_dim"]
    out = {"query_pre_attn_scalar": scalar, "hidden_act": "gelu_pytorch_tanh",
           "sliding_window": m.get(f"{arch}.attention.sliding_window", 4096)}
    if arch == "gemma2":
        out["attn_logit_softcapping"] = float(m.get("gemma2.attn_logit_softcapping", 50.0))
        out["final_logit_softcapping"] = float(m.get("gemma2.final_logit_softcapping", 30.0))
    else:  # every 6th layer is global (llama.cpp: set_swa_pattern(6)); local layers use base 10000
        pattern = m.get("gemma3.attention.sliding_window_pattern", 6)
        out.update(sliding_window_pattern=swa_period(pattern, layers, path), rope_local_base_freq=10000.0)
        if "rope_scaling" in config:
            out["rope_scaling"] = {"rope_type": "linear", "factor": config["rope_scaling"]["factor"]}
    return out


def swa_period(pattern, layers: int, path) -> int:
    """mlx-lm's sliding_window_pattern N (layer i is global iff (i + 1) % N == 0) for a pattern given
    as N or as per-layer flags (gguf-py: true = sliding window, false = full attention)."""
    if isinstance(pattern, int):
        return pattern
    flags = [bool(f) for f in pattern]
    n = flags.index(False) + 1 if False in flags else 0
    if len(flags) == layers and n and all(f == ((i + 1) % n != 0) for i, f in enumerate(flags)):
        return n
    shown = "".join("S" if f else "G" for f in flags)
    raise UserError(f"{path}: gemma3 sliding window pattern {shown} (S sliding, G global, per layer) is "
                    "not every Nth layer global, the only pattern mlx-lm's gemma3 has; use the model's "
                    "HF folder instead")


# --------------------------------------------------------------------------- RoPE scaling

def _rope_config(arch: str, header, path, config: dict, rope_dims: int, get) -> dict:
    """rope_scaling (and phi3's original context) from the scaling metadata or factor tensors."""
    scaling = header.metadata.get(f"{arch}.rope.scaling.type", "none")
    present = [n for n in FACTOR_TENSORS if n in header.tensors]
    if present and (scaling != "none" or set(present) != set(ARCHS[arch].rope_tensors)):
        what = " and ".join(present + [f"scaling type {scaling!r}"] * (scaling != "none"))
        raise UserError(f"{path}: RoPE scaling by {what} is not supported in a {arch} GGUF (steadytune reads "
                        "llama3 rope_freqs in llama files and both longrope factor tensors in phi3 files); "
                        "use the model's HF folder instead")
    if ROPE_FREQS in present:
        return _llama3_config(factor_tensor(header, path, ROPE_FREQS, rope_dims // 2), config, path)
    if present:
        long, short = (factor_tensor(header, path, n, rope_dims // 2) for n in LONGROPE)
        return _longrope_config(long, short, config, get, path)
    if scaling == "linear":
        return {"rope_scaling": {"type": "linear", "factor": float(get("rope.scaling.factor"))}}
    if scaling != "none":
        raise UserError(f"{path}: RoPE scaling {scaling!r} is not supported from GGUF; use the "
                        "model's HF folder instead")
    return {}


def factor_tensor(header, path, name: str, count: int) -> list[float]:
    """The values of a small F32/F16 factor tensor, read from the file (the header checked its bounds)."""
    import numpy as np

    gtype, shape = header.tensors[name]
    if gtype not in ("F32", "F16") or shape not in ((count,), (1, count)):
        raise UserError(f"{path}: {name} is {gtype} {list(shape)}, not the F32 [{count}] llama.cpp's "
                        "converter writes for this model; re-convert it with a current llama.cpp")
    start, nbytes = header.data[name]
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(nbytes)
    return [float(x) for x in np.frombuffer(raw, np.float32 if gtype == "F32" else np.float16)]


def _f32(x: float) -> float:
    """The shortest decimal that is this float32 (1.08, not 1.0800000429153442): what the HF config
    said, and the very float32 mlx-lm makes of it again."""
    import numpy as np

    return float(str(np.float32(x)))


def _llama3_config(factors: list[float], config: dict, path) -> dict:
    if max(factors) == 1.0 and min(factors) == 1.0:
        return {}  # nothing scaled: plain RoPE
    scaling = llama3_scaling(factors, config["rope_theta"], config["head_dim"])
    if scaling is None:
        raise UserError(f"{path}: {ROPE_FREQS} does not follow Llama 3's RoPE scaling rule, the only one "
                        "steadytune reads from that tensor; use the model's HF folder instead")
    return {"rope_scaling": scaling}


def llama3_factors(scaling: dict, base: float, dims: int):
    """The per-frequency factors of a llama3 rope_scaling, as convert_hf_to_gguf.py's LlamaModel
    writes them to rope_freqs: 1 for wavelengths under original/high_freq_factor, `factor` over
    original/low_freq_factor, a smooth blend between. llama.cpp divides each frequency by its factor;
    mlx-lm's Llama3RoPE multiplies each period base**(2i/dims) by the same number."""
    import numpy as np

    factor, old = scaling["factor"], scaling.get("original_max_position_embeddings", 8192)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    wavelen = 2 * np.pi * float(base) ** (np.arange(0, dims, 2) / dims)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = (old / wavelen - low) / (high - low)
        blend = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blend))


def llama3_scaling(factors, base: float, dims: int) -> dict | None:
    """The llama3 rope_scaling whose factors (llama3_factors) are `factors`, or None if none is.

    Only the two boundary wavelengths original/low and original/high matter (the blend is linear in
    1/wavelength between them), so a tensor fixes the ratios, not the three numbers. Llama 3.1-3.3
    use low 1, high 4, original 8192 (Llama 3.2 with factor 32): that is tried first; otherwise the
    boundaries are solved from the blended factors and written with low_freq_factor 1.
    """
    import numpy as np

    factors = np.asarray(factors, np.float64)
    if not (np.isfinite(factors).all() and factors.min() >= 1):
        return None  # llama3 factors lie in [1, factor]
    factor = _f32(factors.max())
    for guess in ({"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                  *_solved_boundaries(factors, base, dims)):
        scaling = {"rope_type": "llama3", "factor": factor, **guess}
        # float32 factors from float32 arithmetic (torch in the converter) against float64: ~1e-7
        if np.allclose(llama3_factors(scaling, base, dims), factors, rtol=1e-5, atol=0):
            return scaling
    return None


def _solved_boundaries(factors, base: float, dims: int) -> list[dict]:
    """Candidate {low 1, high, original} from the factors: the blend s = (1/f - 1/factor) / (1 -
    1/factor) is (u - u_lo) / (u_hi - u_lo) in u = 1/wavelength; with fewer than two blended
    frequencies any boundaries between the unscaled and fully scaled ones reproduce the tensor."""
    import numpy as np

    factor = factors.max()
    u = 1 / (2 * np.pi * float(base) ** (np.arange(0, dims, 2) / dims))
    high, low = factors <= 1 + 1e-6, factors >= factor * (1 - 1e-6)
    mid = ~high & ~low
    if factor <= 1 or not low.any():
        return []
    s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
    a, b = u[low].max(), u[high].min() if high.any() else 2 * u.max()
    if mid.sum() >= 2:
        slope, icpt = np.polyfit(u[mid], s, 1)
        if slope <= 0:
            return []  # blended factors that do not grow with the wavelength: not llama3's rule
        u_lo, u_hi = -icpt / slope, (1 - icpt) / slope
    elif mid.sum() == 1:  # s = (u_m - u_lo) / (u_hi - u_lo): keep the ratio, stay inside (a, b)
        u_m, k = u[mid][0], (1 - s[0]) / s[0]
        t = min(u_m - a, (b - u_m) / k) / 2
        u_lo, u_hi = u_m - t, u_m + k * t
    else:
        u_lo, u_hi = a + (b - a) / 3, a + 2 * (b - a) / 3
    if u_lo <= 0:
        return []
    guesses = [(1 / u_lo, u_hi / u_lo)]  # (original context, high_freq_factor) with low 1
    if mid.sum() == 1:  # Llama 3's high 4 first: u_lo = u_hi / 4 fixes the original context
        guesses.insert(0, ((3 * s[0] + 1) / u[mid][0], 4.0))
    out = []
    for old, high in guesses:  # rounded first (the numbers a config would say), then as solved
        for o, h in ((_round(old), float(f"{high:.4g}")), (float(old), float(high))):
            out.append({"low_freq_factor": 1.0, "high_freq_factor": h, "original_max_position_embeddings": o})
    return out


def _round(x: float):
    """An integer if x is one to 1e-3 (a context length solved from float32 factors), else x."""
    return int(round(x)) if math.isfinite(x) and abs(x - round(x)) < 1e-3 * x else float(x)


def _longrope_config(long: list, short: list, config: dict, get, path) -> dict:
    """Phi-3 longrope: mlx-lm's SuScaledRoPE takes both factor lists, the original context, and
    derives the attention factor llama.cpp stores from the two context lengths."""
    original = get("rope.scaling.original_context_length")
    want = longrope_attn_factor(config["max_position_embeddings"], original)
    attn = get("rope.scaling.attn_factor", want)
    if abs(attn - want) > 1e-5 * want:
        raise UserError(f"{path}: phi3.rope.scaling.attn_factor is {attn:.6g}, not the {want:.6g} that "
                        "mlx-lm's phi3 derives from the context lengths; use the model's HF folder instead")
    return {"rope_scaling": {"type": "longrope", "long_factor": [_f32(x) for x in long],
                             "short_factor": [_f32(x) for x in short]},
            "original_max_position_embeddings": original}


def longrope_attn_factor(context: int, original: int) -> float:
    """convert_hf_to_gguf.py's Phi3MiniModel attn_factor, SuScaledRoPE's default scale."""
    scale = context / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0


# --------------------------------------------------------------------------- writing

def rope_scaling(config: dict) -> dict | None:
    """A text config's RoPE scaling (rope_scaling, or rope_parameters where mlx-lm reads it there, as
    ministral3 does), None for plain RoPE."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    kind = scaling and scaling.get("type", scaling.get("rope_type"))
    return None if not scaling or kind in (None, "default") else scaling


# Architectures whose YaRN llama.cpp computes as mlx-lm's YarnRoPE does (bench/gguf_families.py checks
# each), and how the converter writes mscale_all_dim for it (rope.scaling.yarn_log_multiplier).
# llama.cpp assumes mscale = 1 (deepseek2: mscale = mscale_all_dim); only mistral3 reads beta_fast /
# beta_slow, the others use 32 and 1.
YARN_LOG_MUL = {"mistral3": 1.0, "deepseek2": 0.1, "gpt-oss": None}


def rope_scaling_problem(config: dict, arch: str) -> str | None:
    """Why a text config's RoPE scaling is not written for llama.cpp's `arch` (None: it is)."""
    scaling = rope_scaling(config)
    if scaling is None:
        return None
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind == "linear" or (kind == "llama3" and arch == "llama") or (kind in ("longrope", "su") and arch == "phi3"):
        return None
    if kind != "yarn" or arch not in YARN_LOG_MUL:
        return (f"its RoPE scaling {kind!r} is not written for llama.cpp's {arch} (steadytune writes linear; "
                f"llama3 for llama; longrope for phi3; yarn for {', '.join(YARN_LOG_MUL)})")
    a, b = scaling.get("mscale", 1.0), scaling.get("mscale_all_dim", 0.0)
    fits = {"deepseek2": bool(b) and a == b, "mistral3": a == 1.0, "gpt-oss": a == 1.0 and not b}[arch]
    if arch != "mistral3" and (scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)) != (32, 1):
        fits = False
    if not fits:
        return (f"its YaRN settings (mscale {a}, mscale_all_dim {b}, beta_fast {scaling.get('beta_fast', 32)}, "
                f"beta_slow {scaling.get('beta_slow', 1)}) scale attention otherwise than llama.cpp's {arch}")
    return None


def add_rope_scaling(writer, config: dict) -> None:
    """Write a text config's RoPE scaling to a GGUFWriter as llama.cpp's converter does (linear and
    yarn as metadata, llama3 as rope_freqs, phi3 longrope as rope_factors_long/short plus the original
    context and attention factor), so that gguf_config reads the same rope_scaling back."""
    import gguf
    import numpy as np

    scaling = rope_scaling(config)
    if scaling is None:
        return
    problem = rope_scaling_problem(config, writer.arch)
    if problem:
        from .export import instead

        raise UserError(f"--format gguf: {problem}; {instead(config.get('model_type'), 'gguf')}")
    kind = scaling.get("type", scaling.get("rope_type"))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "llama3":
        factors = llama3_factors(scaling, config.get("rope_theta", 10000.0), head_dim)
        writer.add_tensor(ROPE_FREQS, factors.astype(np.float32))
    elif kind == "yarn":  # mlx-lm's YarnRoPE defaults: original context 4096, beta_fast 32, beta_slow 1
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling.get("original_max_position_embeddings", 4096))
        writer.add_rope_scaling_yarn_beta_fast(scaling.get("beta_fast", 32.0))
        writer.add_rope_scaling_yarn_beta_slow(scaling.get("beta_slow", 1.0))
        if YARN_LOG_MUL[writer.arch] and scaling.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(YARN_LOG_MUL[writer.arch] * scaling["mscale_all_dim"])
    else:  # phi3 longrope
        original = config.get("original_max_position_embeddings", 4096)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(longrope_attn_factor(config["max_position_embeddings"], original))
        for name, key in zip(LONGROPE, ("long_factor", "short_factor")):
            writer.add_tensor(name, np.array(scaling[key], np.float32))


# --------------------------------------------------------------------------- writing: one table per model type
# What `export --format gguf` writes for each mlx-lm model type: the file llama.cpp's
# convert_hf_to_gguf.py makes of the same model (architecture, tensor names and layouts, metadata),
# which llama.cpp's loader reads. A block table maps GGUF names inside blk.N to mlx-lm modules inside
# model.layers.N; the parameter's ".weight" or ".bias" follows the module. Experts are written as
# mlx-lm holds them, stacked (experts, out, in): llama.cpp's ffn_*_exps, which the converter stacks
# from HF's per-expert matrices.

_EXPERTS = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
            "ffn_up_exps": "mlp.switch_mlp.up_proj", "ffn_down_exps": "mlp.switch_mlp.down_proj"}
_SHARED_EXPERTS = {"ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                   "ffn_down_shexp": "mlp.shared_experts.down_proj"}
_ROUTER_BIAS = {"mlp.gate.e_score_correction_bias": "exp_probs_b.bias"}  # DeepSeek V3 / GLM-4.5 routing bias
# Multi-head latent attention as llama.cpp runs it (MQA over the compressed KV): HF's kv_b_proj split
# per head into k_b (transposed) and v_b, which is exactly mlx-lm's embed_q and unembed_out.
_MLA = {"attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
        "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
        "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_k_b": "self_attn.embed_q",
        "attn_v_b": "self_attn.unembed_out", "attn_output": "self_attn.o_proj"}
_POST_NORMS = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_PRE_FFN_AS_POST_ATTN = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"}
_LFM2_BLOCK = {"attn_norm": "operator_norm", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
               "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.out_proj",
               "attn_q_norm": "self_attn.q_layernorm", "attn_k_norm": "self_attn.k_layernorm",
               "shortconv.conv": "conv.conv", "shortconv.in_proj": "conv.in_proj",
               "shortconv.out_proj": "conv.out_proj"}
# Granite 4.0-H: Mamba-2 blocks (Mamba2Model's names; A_log written as A = -exp(A_log), dt_bias as
# ssm_dt.bias), attention blocks, and experts with a shared MLP whose fused gate/up input_linear is split
_GRANITEHYBRID_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTN, **_MLP,
                        "ssm_in": "mamba.in_proj", "ssm_conv1d": "mamba.conv1d", "ssm_norm": "mamba.norm",
                        "ssm_out": "mamba.out_proj", "ffn_gate_inp": "block_sparse_moe.router.layer",
                        "ffn_gate_exps": "block_sparse_moe.switch_mlp.gate_proj",
                        "ffn_up_exps": "block_sparse_moe.switch_mlp.up_proj",
                        "ffn_down_exps": "block_sparse_moe.switch_mlp.down_proj",
                        "ffn_down_shexp": "shared_mlp.output_linear"}
_GRANITEHYBRID_PARAMS = (("mamba.A_log", "ssm_a"), ("mamba.D", "ssm_d"), ("mamba.dt_bias", "ssm_dt.bias"))
# Nemotron-H with experts (Nemotron 3 Nano): one mixer per block, under backbone.layers
_NEMOTRON_H_BLOCK = {"attn_norm": "norm", "attn_q": "mixer.q_proj", "attn_k": "mixer.k_proj", "attn_v": "mixer.v_proj",
                     "attn_output": "mixer.o_proj", "ssm_in": "mixer.in_proj", "ssm_conv1d": "mixer.conv1d",
                     "ssm_norm": "mixer.norm", "ssm_out": "mixer.out_proj", "ffn_gate_inp": "mixer.gate",
                     "ffn_up_exps": "mixer.switch_mlp.fc1", "ffn_down_exps": "mixer.switch_mlp.fc2",
                     "ffn_up_shexp": "mixer.shared_experts.up_proj",
                     "ffn_down_shexp": "mixer.shared_experts.down_proj"}
_NEMOTRON_H_PARAMS = (("mixer.A_log", "ssm_a"), ("mixer.D", "ssm_d"), ("mixer.dt_bias", "ssm_dt.bias"),
                      ("mixer.gate.e_score_correction_bias", "exp_probs_b.bias"))
_NEMOTRON_H_TOP = (("token_embd", "backbone.embeddings"), ("output_norm", "backbone.norm_f"), ("output", "lm_head"))
_LFM2_TOP = (("token_embd", "model.embed_tokens"), ("token_embd_norm", "model.embedding_norm"), ("output", "lm_head"))
# Gemma 3n (names after the prefix model.language_model.): AltUp's four streams, Laurel's low-rank
# residual, and per-layer inputs (an embedding of width layers x 256 and a projection of the token
# embedding, read by each block through inp_gate / proj). Norm weights are used as they are (no 1 + w).
_GEMMA3N_BLOCK = {**_GEMMA_BLOCK, **_QK_NORM, "altup_correct_coef": "altup.correction_coefs",
                  "altup_predict_coef": "altup.prediction_coefs", "altup_router": "altup.modality_router",
                  "altup_router_norm": "altup.router_norm", "laurel_l": "laurel.linear_left",
                  "laurel_r": "laurel.linear_right", "laurel_post_norm": "laurel.post_laurel_norm",
                  "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
                  "post_norm": "post_per_layer_input_norm"}
_GEMMA3N_TOP = (("token_embd", "embed_tokens"), ("per_layer_token_embd", "embed_tokens_per_layer"),
                ("per_layer_model_proj", "per_layer_model_projection"),
                ("per_layer_proj_norm", "per_layer_projection_norm"), ("altup_proj", "altup_projections"),
                ("altup_unembd_proj", "altup_unembed_projections"), ("output_norm", "norm"))
# Written F32 whatever the export's dtype, as the converter writes them (and llama-quantize leaves them):
# routers and short-convolution taps; also every 1-D tensor, norm and bias.
ALWAYS_F32 = ("ffn_gate_inp", "shortconv.conv", "ssm_conv1d", "altup_correct_coef", "altup_predict_coef")


@dataclass(frozen=True)
class Export:
    """How one mlx-lm model type is written as a GGUF file llama.cpp reads."""
    arch: str                  # general.architecture: llama.cpp's name for the family
    blocks: dict               # GGUF name inside blk.N -> mlx-lm module inside model.layers.N
    params: tuple = ()         # (mlx-lm parameter inside a block, GGUF name): parameters not named weight/bias
    permuted_qk: bool = False  # q/k rows interleaved for llama.cpp's adjacent-pair RoPE (LlamaModel.permute)
    norm_offset: float = 0.0   # gemma: the converter stores 1 + w for every RMSNorm weight
    top: tuple = tuple(TOP_NAMES.items())  # (GGUF name, mlx-lm module) outside the blocks
    prefix: str = ""           # where mlx-lm keeps the text model's parameters (mistral3: language_model.)
    hparams: Callable[[dict, dict], dict] | None = None  # (text config, {GGUF name: shape}) -> own metadata
    refuse: Callable[[dict], str | None] | None = None  # text config -> why llama.cpp computes otherwise
    splits: dict | None = None  # mlx-lm module inside a block -> GGUF names its rows are split into, in order
    layers: str = "model.layers"  # where mlx-lm keeps the blocks (nemotron_h: backbone.layers)
    stacks: tuple = ()         # mlx-lm lists of equal matrices llama.cpp keeps as one 3-D tensor (gemma3n)


def text_config(config: dict) -> dict:
    """The text model's settings as mlx-lm's model runs them: text_config lifted to the top (as the
    converter reads it), then every setting the config leaves out at mlx-lm's default (ModelArgs),
    which the model computes with (glm4_moe_lite's routed_scaling_factor is 1.8 when not given)."""
    import importlib

    c = {**config, **(config.get("text_config") or {})}
    try:
        args = importlib.import_module(f"mlx_lm.models.{c['model_type']}").ModelArgs.from_dict(c)
    except (ImportError, KeyError, TypeError, ValueError):
        return c  # not an mlx-lm text model type: the config as it is
    return {**c, **{k: v for k, v in vars(args).items() if v is not None}}


def _rope_theta(c: dict) -> float:
    return float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def _qwen3moe(c: dict, shapes: dict) -> dict:
    return {"expert_feed_forward_length": c["moe_intermediate_size"]}


def _qwen3moe_refuse(c: dict) -> str | None:
    """llama.cpp's qwen3moe has experts in every block and always renormalizes the top-k weights."""
    dense = [i for i in range(c["num_hidden_layers"])
             if i in (c.get("mlp_only_layers") or []) or (i + 1) % c.get("decoder_sparse_step", 1)]
    if dense:
        return (f"blocks {dense} have a dense MLP (mlp_only_layers / decoder_sparse_step), where llama.cpp's "
                "qwen3moe has experts in every block")
    if not c.get("norm_topk_prob"):
        return "norm_topk_prob is false, where llama.cpp's qwen3moe always renormalizes the top-k expert weights"
    return None


def _smollm3_refuse(c: dict) -> str | None:
    """llama.cpp's smollm3 leaves RoPE out of every 4th layer (n_no_rope_layer_step = 4), nothing else."""
    n = c["num_hidden_layers"]
    rope = c.get("no_rope_layers") or [int((i + 1) % c.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    if list(rope) != [int((i + 1) % 4 != 0) for i in range(n)]:
        nope = [i for i, r in enumerate(rope) if not r]
        return (f"its layers without RoPE are {nope}, where llama.cpp's smollm3 leaves RoPE out of every 4th "
                "layer (3, 7, 11, ...) only")
    return None


def _mistral3(c: dict, shapes: dict) -> dict:
    """Llama 4's attention temperature: queries scaled by 1 + beta * log(1 + floor(pos / original)),
    original = rope.scaling.original_context_length (llama.cpp: n_attn_temp_floor_scale)."""
    rope = c.get("rope_parameters") or {}
    out = {}
    if rope.get("llama_4_scaling_beta"):
        out["attn_temperature_scale"] = rope["llama_4_scaling_beta"]
        if rope_scaling(c) is None:  # with YaRN, add_rope_scaling writes the same key
            out["rope_scaling_orig_ctx_len"] = rope["original_max_position_embeddings"]
    return out


def _gpt_oss(c: dict, shapes: dict) -> dict:
    return {"sliding_window": c["sliding_window"], "expert_feed_forward_length": c["intermediate_size"]}


def _gpt_oss_refuse(c: dict) -> str | None:
    """llama.cpp's gpt-oss puts the sliding window on the even layers (load_swa_pattern(ml, 2))."""
    n = c["num_hidden_layers"]
    kinds = c.get("layer_types") or ["sliding_attention", "full_attention"] * (n // 2)
    if list(kinds) != ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]:
        return (f"its layer_types {kinds} are not sliding and full attention alternating from a sliding first "
                "layer, the only layout llama.cpp's gpt-oss has")
    return None


def _deepseek2(c: dict, shapes: dict) -> dict:
    """MLA written as llama.cpp runs it: MQA (one KV head) over the compressed KV of width
    kv_lora_rank + qk_rope_head_dim, decompressed per head by k_b / v_b."""
    import gguf

    kv, rope = c["kv_lora_rank"], c["qk_rope_head_dim"]
    out = {"head_count_kv": 1, "key_length": kv + rope, "value_length": kv,
           "key_length_mla": c["qk_nope_head_dim"] + rope, "value_length_mla": c["v_head_dim"],
           "rope_dimension_count": rope, "q_lora_rank": c["q_lora_rank"], "kv_lora_rank": kv,
           "leading_dense_block_count": c.get("first_k_dense_replace", 0),
           "expert_feed_forward_length": c["moe_intermediate_size"], "expert_count": c["n_routed_experts"],
           "expert_shared_count": c.get("n_shared_experts") or 0,
           "expert_weights_scale": c.get("routed_scaling_factor", 1.0),
           "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,  # mlx-lm's deepseek_v3 routes by sigmoid
           "expert_group_count": c.get("n_group", 1), "expert_group_used_count": c.get("topk_group", 1),
           "layer_norm_rms_eps": c.get("rms_norm_eps", 1e-6)}
    if c.get("norm_topk_prob", True):
        out["expert_weights_norm"] = True
    return out


def _mla_refuse(c: dict) -> str | None:
    if not c.get("q_lora_rank"):
        return ("it has no q_lora_rank (queries without the low-rank projection), which llama.cpp's deepseek2 "
                "reads only at DeepSeek-V2-Lite's layer counts")
    if c.get("moe_layer_freq", 1) != 1:
        return (f"its experts are only in the layers moe_layer_freq ({c['moe_layer_freq']}) divides, where "
                "llama.cpp's deepseek2 has them in every layer after the first dense ones")
    return None


def _deepseek2_refuse(c: dict) -> str | None:
    if c.get("rms_norm_eps", 1e-6) != 1e-6:
        return (f"rms_norm_eps is {c['rms_norm_eps']}, where mlx-lm's deepseek_v3 normalizes the compressed "
                "q and kv with 1e-6 and llama.cpp with rms_norm_eps")
    return _mla_refuse(c)


def _glm4moe(c: dict, shapes: dict) -> dict:
    import gguf

    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    out = {"rope_dimension_count": int(head_dim * c.get("partial_rotary_factor", 0.5)),
           "expert_count": c["n_routed_experts"], "expert_feed_forward_length": c["moe_intermediate_size"],
           "expert_shared_count": c.get("n_shared_experts") or 0,
           "leading_dense_block_count": c.get("first_k_dense_replace", 0),
           "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,
           "expert_weights_scale": c.get("routed_scaling_factor", 1.0),
           "expert_weights_norm": bool(c.get("norm_topk_prob"))}
    return out


def _lfm2(c: dict, shapes: dict) -> dict:
    """Convolution blocks have no attention: head_count_kv 0 there (how llama.cpp tells the kinds apart)."""
    n, kv = c["num_hidden_layers"], c.get("num_key_value_heads") or c["num_attention_heads"]
    dense = shapes.get("blk.0.ffn_gate.weight")  # mlx-lm's own width (lfm2 may adjust block_ff_dim)
    return {"head_count_kv": [kv if f"blk.{i}.attn_q.weight" in shapes else 0 for i in range(n)],
            "feed_forward_length": dense[0] if dense else c["intermediate_size"],
            "shortconv_l_cache": c["conv_L_cache"], "layer_norm_rms_eps": c["norm_eps"]}


def _lfm2_refuse(c: dict) -> str | None:
    if c.get("conv_bias"):
        return "its short convolutions have biases (conv_bias), which llama.cpp's lfm2 has no place for"
    return None


def _lfm2moe(c: dict, shapes: dict) -> dict:
    import gguf

    return {**_lfm2(c, shapes), "expert_feed_forward_length": c["moe_intermediate_size"],
            "leading_dense_block_count": c["num_dense_layers"],
            "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID}


def _lfm2moe_refuse(c: dict) -> str | None:
    """llama.cpp's lfm2moe routes by sigmoid + expert bias and renormalizes, with no scale."""
    if not c.get("use_expert_bias") or not c.get("norm_topk_prob") or c.get("routed_scaling_factor", 1.0) != 1.0:
        return (f"its routing (use_expert_bias {c.get('use_expert_bias')}, norm_topk_prob {c.get('norm_topk_prob')}, "
                f"routed_scaling_factor {c.get('routed_scaling_factor', 1.0)}) is not llama.cpp's lfm2moe routing "
                "(expert bias, renormalized, unscaled)")
    return _lfm2_refuse(c)


def _granitehybrid(c: dict, shapes: dict) -> dict:
    """Mamba-2 blocks have no attention: head_count_kv 0 there (how llama.cpp tells the kinds apart);
    Granite's multipliers; RoPE switched by rope.scaling.finetuned (llama.cpp: rope_finetuned), as
    mlx-lm applies it unless position_embedding_type is "nope" (the released Granite 4.0-H models)."""
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    kv = c.get("num_key_value_heads") or heads
    out = {"head_count_kv": [kv if kind == "attention" else 0 for kind in c["layer_types"]],
           "ssm_conv_kernel": c["mamba_d_conv"], "ssm_state_size": c["mamba_d_state"],
           "ssm_group_count": c["mamba_n_groups"], "ssm_inner_size": c["mamba_n_heads"] * c["mamba_d_head"],
           "ssm_time_step_rank": c["mamba_n_heads"], "attention_scale": c["attention_multiplier"],
           "embedding_scale": c["embedding_multiplier"], "residual_scale": c["residual_multiplier"],
           "logit_scale": c["logits_scaling"], "rope_dimension_count": hidden // heads}
    if c.get("head_dim") and c["head_dim"] != hidden // heads:  # mlx-lm's (and HF's) heads are hidden / heads
        out.update(key_length=hidden // heads, value_length=hidden // heads)
    if c.get("num_local_experts"):
        out["expert_shared_feed_forward_length"] = c["shared_intermediate_size"]
    else:  # dense: the MLP's own width
        out["feed_forward_length"] = shapes["blk.0.ffn_gate.weight"][0] if "blk.0.ffn_gate.weight" in shapes \
            else c["intermediate_size"]
    rope = c.get("position_embedding_type", "rope") != "nope"
    out["rope_scaling_finetuned"] = rope
    if not rope:
        out["context_length"] = 2 ** 20  # as the converter writes it for a model without RoPE
    return out


def _granitehybrid_refuse(c: dict) -> str | None:
    if c.get("mamba_n_groups", 1) != 1:
        return (f"its Mamba-2 layers have {c['mamba_n_groups']} groups (mamba_n_groups): mlx-lm normalizes the "
                "gated output over all channels, llama.cpp's granitehybrid per group")
    inner = c["mamba_n_heads"] * c["mamba_d_head"]
    if inner != 2 * c["hidden_size"]:
        return (f"its Mamba-2 inner size (mamba_n_heads x mamba_d_head = {inner}) is not twice hidden_size "
                f"({c['hidden_size']}), the only size llama.cpp's granitehybrid loads")
    if c.get("mamba_proj_bias"):
        return "its Mamba-2 projections have biases (mamba_proj_bias), which llama.cpp's granitehybrid has no place for"
    if rope_scaling(c) is not None:
        return "it has rope_scaling, which mlx-lm's granitemoehybrid ignores and llama.cpp would apply"
    return None


def _nemotron_h_moe(c: dict, shapes: dict) -> dict:
    """Per block one of Mamba-2 (M), attention (*) or experts (E): llama.cpp tells them apart by
    head_count_kv (attention only) and feed_forward_length (experts only), as the converter writes them."""
    pattern, kv = c["hybrid_override_pattern"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return {"head_count_kv": [kv if kind == "*" else 0 for kind in pattern],
            "feed_forward_length": [c["moe_intermediate_size"] if kind == "E" else 0 for kind in pattern],
            "key_length": head_dim, "value_length": head_dim, "layer_norm_eps": c["layer_norm_epsilon"],
            "layer_norm_rms_eps": c["layer_norm_epsilon"],
            "ssm_conv_kernel": c["conv_kernel"], "ssm_state_size": c["ssm_state_size"],
            "ssm_group_count": c["n_groups"], "ssm_inner_size": c["mamba_num_heads"] * c["mamba_head_dim"],
            "ssm_time_step_rank": c["mamba_num_heads"],
            "expert_feed_forward_length": c["moe_intermediate_size"],
            "expert_shared_feed_forward_length": c["moe_shared_expert_intermediate_size"],
            "expert_shared_count": c["n_shared_experts"], "expert_weights_norm": bool(c.get("norm_topk_prob")),
            "expert_weights_scale": c.get("routed_scaling_factor") or 1.0, "expert_group_count": c.get("n_group") or 1,
            "rope_scaling_finetuned": False, "context_length": 2 ** 20}  # no RoPE (the converter's values)


def _nemotron_h_refuse(c: dict) -> str | None:
    pattern = list(c.get("hybrid_override_pattern") or [])
    if "E" not in pattern:
        return ("it has no expert layers (Nemotron-H), which llama.cpp reads as nemotron_h; steadytune writes the "
                "expert models (nemotron_h_moe) only")
    if "-" in pattern:
        return (f"its layers {[i for i, k in enumerate(pattern) if k == '-']} are dense MLPs among expert layers, "
                "where llama.cpp's nemotron_h_moe has experts in every MLP layer")
    if c.get("n_shared_experts") is None:
        return "it has no shared expert, which llama.cpp's nemotron_h_moe always adds"
    if (c.get("n_group") or 1) != 1:
        return f"it routes by expert groups (n_group {c['n_group']}), which the converter does not write for llama.cpp"
    if c.get("moe_latent_size"):
        return "its experts work in a latent space (moe_latent_size), not written yet"
    if c.get("mamba_proj_bias") or c.get("mlp_bias"):
        return "its Mamba-2 projections or MLPs have biases, which llama.cpp's nemotron_h_moe has no place for"
    limit = tuple(c.get("time_step_limit") or (0.0, math.inf))
    if limit != (0.0, math.inf):
        return (f"mlx-lm clips its Mamba-2 time step to {list(limit)} (time_step_limit), llama.cpp does not")
    return None


def _olmo3(c: dict, shapes: dict) -> dict:
    """Olmo 3 is written as llama.cpp's olmo2 with a sliding window (convert_hf_to_gguf.py's Olmo2Model):
    the window and each layer's kind as flags (true = sliding)."""
    return {"sliding_window": c["sliding_window"],
            "sliding_window_pattern": [kind == "sliding_attention" for kind in c["layer_types"]]}


def _olmo3_refuse(c: dict) -> str | None:
    """mlx-lm's olmo3 scales RoPE in the full-attention layers only: not written for llama.cpp yet."""
    if rope_scaling(c) is not None:
        return ("it has rope_scaling, which mlx-lm's olmo3 applies to its full-attention layers only; not written "
                "for llama.cpp's olmo2 yet")
    return None


def _granite(c: dict, shapes: dict) -> dict:
    """Granite's multipliers (GraniteModel in convert_hf_to_gguf.py); mlx-lm's heads are hidden / heads wide."""
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    out = {"attention_scale": c["attention_multiplier"], "embedding_scale": c["embedding_multiplier"],
           "residual_scale": c["residual_multiplier"], "logit_scale": c["logits_scaling"],
           "rope_dimension_count": hidden // heads}
    if c.get("head_dim") and c["head_dim"] != hidden // heads:
        out.update(key_length=hidden // heads, value_length=hidden // heads)
    return out


def _granite_refuse(c: dict) -> str | None:
    if c.get("attention_bias") or c.get("mlp_bias"):
        return "its attention or MLP projections have biases (attention_bias, mlp_bias), not written yet"
    return None


def _gemma3n(c: dict, shapes: dict) -> dict:
    """What Gemma3NModel (convert_hf_to_gguf.py) writes beyond Gemma 3's keys: per-layer feed-forward
    widths (intermediate_size is a list), AltUp, per-layer inputs, shared KV layers, each layer's
    sparsity as the normal quantile of its target (-inf for none, as torch's icdf(0) gives), sliding
    layers as flags, and the sliding layers' RoPE base."""
    from statistics import NormalDist

    n = c["num_hidden_layers"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    sparsity = c.get("activation_sparsity_pattern") or [0.0] * n
    return {"key_length": head_dim, "value_length": head_dim, "altup_active_idx": c["altup_active_idx"],
            "altup_num_inputs": c["altup_num_inputs"],
            "embedding_length_per_layer_input": c["hidden_size_per_layer_input"],
            "shared_kv_layers": c.get("num_kv_shared_layers") or 0,
            "activation_sparsity_scale": [NormalDist().inv_cdf(s) if s > 0 else -math.inf for s in sparsity],
            "sliding_window_pattern": [kind == "sliding_attention" for kind in c["layer_types"]],
            "rope_freq_base_swa": c["rope_local_base_freq"]}


# What llama.cpp's gemma3n fixes in code (llama-hparams.h, models/gemma3n.cpp) instead of reading it
# from the file: the released E2B and E4B models' values
GEMMA3N_FIXED = {"altup_num_inputs": 4, "altup_active_idx": 0, "laurel_rank": 64, "hidden_size_per_layer_input": 256,
                 "final_logit_softcapping": 30.0}


def _gemma3n_refuse(c: dict) -> str | None:
    """Beyond GEMMA3N_FIXED, llama.cpp's gemma3n makes every 5th layer global (the converter's per-layer
    flags are not read), lets layers from 20 on reuse the keys and values of layers 18 (sliding) and
    19 (global), and applies activation sparsity 0.95 to the first 10 layers."""
    for key, value in GEMMA3N_FIXED.items():
        if c.get(key) != value:
            return (f"its {key} is {c.get(key)}, where llama.cpp's gemma3n has {value} fixed (the released "
                    "models' value)")
    n, widths = c["num_hidden_layers"], c["intermediate_size"]
    if isinstance(widths, list) and len(set(widths)) > 1:
        return (f"its intermediate_size varies per layer ({widths}), where llama.cpp's gemma3n gives every layer "
                "the first layer's width")
    if list(c["layer_types"]) != ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]:
        return ("its layer_types are not full attention in every 5th layer (4, 9, ...) and sliding elsewhere, the "
                "only layout llama.cpp's gemma3n has")
    shared = c.get("num_kv_shared_layers") or 0
    if n - shared != min(n, 20):
        return (f"its last {shared} of {n} layers reuse keys and values (num_kv_shared_layers), where llama.cpp's "
                "gemma3n reuses them in the layers from 20 on")
    sparsity = [float(s) for s in c.get("activation_sparsity_pattern") or [0.0] * n]
    if sparsity != [0.95 if i < 10 else 0.0 for i in range(n)]:
        return (f"its activation_sparsity_pattern {sparsity} is not 0.95 in the first 10 layers and 0 after, the "
                "only sparsity llama.cpp's gemma3n computes")
    if rope_scaling(c) is not None:
        return "it has rope_scaling, which mlx-lm's gemma3n ignores and llama.cpp would apply"
    return None


def _per_layer_rows(value, c: dict):
    """gemma3n's per-layer embedding (vocab_size_per_layer_input rows) -> one row per token: mlx-lm (as
    HF) gives the tokens past it the row of token 0, llama.cpp looks every token up, so those rows are
    written as copies of row 0 (the converter pads zeros, meant for image and audio tokens)."""
    import mlx.core as mx

    n = c["vocab_size"]
    if value.shape[0] >= n:
        return value[:n]
    return mx.concatenate([value, mx.broadcast_to(value[:1], (n - value.shape[0], value.shape[1]))])


def _altup_coefs(value, c: dict):
    """mlx-lm clips AltUp's coefficient matrices to altup_coef_clip before each use and llama.cpp does
    not (the converter leaves it as a TODO): the clipped values are written."""
    import mlx.core as mx

    clip = c.get("altup_coef_clip")
    return value if clip is None else mx.clip(value, -clip, clip)


def _altup_correct_scale(value, c: dict):
    """llama.cpp always scales the corrected stream by altup_correct_scale, mlx-lm only with
    altup_correct_scale true: ones otherwise."""
    import mlx.core as mx

    return value if c.get("altup_correct_scale", True) else mx.ones_like(value)


def stacked(spec: Export, params: list) -> list:
    """[(name, value)] of a model's parameters with each list of Export.stacks (gemma3n's AltUp
    projections, one matrix per added stream) stacked in list order under the list's name, as the
    converter stacks them into llama.cpp's 3-D tensor; the other parameters as they are."""
    import mlx.core as mx

    if not spec.stacks:
        return params
    pattern = re.compile(rf"({re.escape(spec.prefix)}(?:{'|'.join(map(re.escape, spec.stacks))}))\.(\d+)\.(\w+)")
    out, lists = [], {}
    for name, value in params:
        match = pattern.fullmatch(name)
        if match is None:
            out.append((name, value))
            continue
        key = f"{match.group(1)}.{match.group(3)}"
        if key not in lists:
            lists[key] = {}
            out.append((key, None))
        lists[key][int(match.group(2))] = value
    return [(name, mx.stack([v for _, v in sorted(lists[name].items())]) if value is None else value)
            for name, value in out]


def _conv_taps(value, c: dict):
    """mlx-lm's depthwise Conv1d weight (channels, taps, 1) -> llama.cpp's shortconv.conv / ssm_conv1d
    (channels, taps); a bias stays as it is."""
    return value.reshape(value.shape[:2])


def _ssm_a(value, c: dict):
    """mlx-lm's A_log (heads) -> llama.cpp's ssm_a, A = -exp(A_log) as the converter computes it, (heads, 1)."""
    import mlx.core as mx

    return -mx.exp(value.astype(mx.float32)).reshape(-1, 1)


def _ssm_norm(value, c: dict):
    """Mamba-2's gated norm weight (channels) -> (groups, channels / groups), as llama.cpp normalizes it."""
    return value.reshape(c.get("mamba_n_groups") or c.get("n_groups") or 1, -1)


# GGUF name inside a block -> what the tensor goes through (value, text config)
TRANSFORMS = {"shortconv.conv": _conv_taps, "ssm_conv1d": _conv_taps, "ssm_a": _ssm_a,
              "ssm_d": lambda value, c: value.reshape(-1, 1), "ssm_norm": _ssm_norm,
              "per_layer_token_embd": _per_layer_rows, "altup_predict_coef": _altup_coefs,
              "altup_correct_coef": _altup_coefs, "altup_correct_scale": _altup_correct_scale}

EXPORTS = {
    "llama": Export("llama", BLOCK_NAMES, permuted_qk=True),
    "mistral": Export("llama", BLOCK_NAMES, permuted_qk=True),  # llama.cpp reads Mistral 7B as llama
    "qwen2": Export("qwen2", BLOCK_NAMES),
    "qwen3": Export("qwen3", {**BLOCK_NAMES, **_QK_NORM}),
    "qwen3_moe": Export("qwen3moe", {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                                     **_ATTN, **_QK_NORM, **_EXPERTS}, hparams=_qwen3moe, refuse=_qwen3moe_refuse),
    "gemma2": Export("gemma2", _GEMMA_BLOCK, norm_offset=1.0),
    "gemma3_text": Export("gemma3", {**_GEMMA_BLOCK, **_QK_NORM}, norm_offset=1.0),
    "gemma3n": Export("gemma3n", _GEMMA3N_BLOCK, params=(("altup.correct_output_scale", "altup_correct_scale.weight"),),
                      top=_GEMMA3N_TOP, prefix="model.language_model.", layers="layers", hparams=_gemma3n,
                      refuse=_gemma3n_refuse, stacks=("altup_projections", "altup_unembed_projections")),
    "phi3": Export("phi3", _PHI3_BLOCK),
    "olmo2": Export("olmo2", {**_ATTN, **_QK_NORM, **_POST_NORMS, **_MLP}),
    "olmo3": Export("olmo2", {**_ATTN, **_QK_NORM, **_POST_NORMS, **_MLP}, hparams=_olmo3, refuse=_olmo3_refuse),
    "granite": Export("granite", BLOCK_NAMES, permuted_qk=True, hparams=_granite, refuse=_granite_refuse),
    "smollm3": Export("smollm3", BLOCK_NAMES, permuted_qk=True, refuse=_smollm3_refuse),
    "ministral3": Export("mistral3", BLOCK_NAMES, permuted_qk=True, hparams=_mistral3),
    "mistral3": Export("mistral3", BLOCK_NAMES, permuted_qk=True, hparams=_mistral3, prefix="language_model."),
    "gpt_oss": Export("gpt-oss", {**_PRE_FFN_AS_POST_ATTN, **_ATTN, "ffn_gate_inp": "mlp.router",
                                  "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
                                  "ffn_down_exps": "mlp.experts.down_proj"},
                      params=(("self_attn.sinks", "attn_sinks.weight"),), hparams=_gpt_oss, refuse=_gpt_oss_refuse),
    "deepseek_v3": Export("deepseek2", {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                                        **_MLA, **_MLP, **_EXPERTS, **_SHARED_EXPERTS},
                          params=tuple(_ROUTER_BIAS.items()), hparams=_deepseek2, refuse=_deepseek2_refuse),
    # GLM-4.7-Flash: DeepSeek's MLA and routing (its MLA norms use rms_norm_eps, as llama.cpp's do)
    "glm4_moe_lite": Export("deepseek2", {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                                          **_MLA, **_MLP, **_EXPERTS, **_SHARED_EXPERTS},
                            params=tuple(_ROUTER_BIAS.items()), hparams=_deepseek2, refuse=_mla_refuse),
    "mixtral": Export("llama", {**BLOCK_NAMES, "ffn_gate_inp": "block_sparse_moe.gate",
                                "ffn_gate_exps": "block_sparse_moe.switch_mlp.gate_proj",
                                "ffn_up_exps": "block_sparse_moe.switch_mlp.up_proj",
                                "ffn_down_exps": "block_sparse_moe.switch_mlp.down_proj"}, permuted_qk=True),
    "glm4_moe": Export("glm4moe", {**_PRE_FFN_AS_POST_ATTN, **_ATTN, **_QK_NORM, **_MLP, **_EXPERTS,
                                   **_SHARED_EXPERTS}, params=tuple(_ROUTER_BIAS.items()), hparams=_glm4moe),
    "lfm2": Export("lfm2", _LFM2_BLOCK, top=_LFM2_TOP, hparams=_lfm2, refuse=_lfm2_refuse),
    "lfm2_moe": Export("lfm2moe", {**{k: v for k, v in _LFM2_BLOCK.items() if not v.startswith("feed_forward.")},
                                   "ffn_gate": "feed_forward.gate_proj", "ffn_up": "feed_forward.up_proj",
                                   "ffn_down": "feed_forward.down_proj", "ffn_gate_inp": "feed_forward.gate",
                                   "ffn_gate_exps": "feed_forward.switch_mlp.gate_proj",
                                   "ffn_up_exps": "feed_forward.switch_mlp.up_proj",
                                   "ffn_down_exps": "feed_forward.switch_mlp.down_proj"},
                       params=(("feed_forward.expert_bias", "exp_probs_b.bias"),), top=_LFM2_TOP,
                       hparams=_lfm2moe, refuse=_lfm2moe_refuse),
    "granitemoehybrid": Export("granitehybrid", _GRANITEHYBRID_BLOCK, params=_GRANITEHYBRID_PARAMS,
                               permuted_qk=True, hparams=_granitehybrid, refuse=_granitehybrid_refuse,
                               splits={"shared_mlp.input_linear": ("ffn_gate_shexp", "ffn_up_shexp")}),
    "nemotron_h": Export("nemotron_h_moe", _NEMOTRON_H_BLOCK, params=_NEMOTRON_H_PARAMS, permuted_qk=True,
                         top=_NEMOTRON_H_TOP, layers="backbone.layers", hparams=_nemotron_h_moe,
                         refuse=_nemotron_h_refuse),
}


def gguf_tensor_name(spec: Export, name: str) -> tuple[str, str]:
    """(GGUF name, its kind: the GGUF name inside the block or at the top) of an mlx-lm parameter;
    a UserError naming it when llama.cpp's architecture has no place for it."""
    match = re.fullmatch(re.escape(spec.layers) + r"\.(\d+)\.(.+)", name)
    if match:
        block, rest = match.groups()
        exact = dict(spec.params).get(rest)
        if exact:
            return f"blk.{block}.{exact}", exact.rpartition(".")[0] or exact
        module, _, suffix = rest.rpartition(".")
        kind = {v: k for k, v in spec.blocks.items()}.get(module)
        if kind:
            return f"blk.{block}.{kind}.{suffix}", kind
    else:
        module, _, suffix = name.rpartition(".")
        kind = {v: k for k, v in spec.top}.get(module)
        if kind:
            return f"{kind}.{suffix}", kind
    raise UserError(f"--format gguf: {spec.prefix}{name} has no place in llama.cpp's {spec.arch} "
                    "architecture, so nothing was written; use --format mlx")


def gguf_tensor_parts(spec: Export, name: str, value) -> list:
    """[(GGUF name, kind, value)] of an mlx-lm parameter: one tensor, or the equal row blocks of a
    fused matrix that llama.cpp keeps apart (Export.splits, e.g. Granite's shared gate/up)."""
    match = re.fullmatch(re.escape(spec.layers) + r"\.(\d+)\.(.+)\.(\w+)", name)
    if match and match.group(2) in (spec.splits or {}):
        block, module, suffix = match.groups()
        kinds = spec.splits[module]
        rows = value.shape[0] // len(kinds)
        return [(f"blk.{block}.{kind}.{suffix}", kind, value[i * rows:(i + 1) * rows]) for i, kind in enumerate(kinds)]
    return [(*gguf_tensor_name(spec, name), value)]


def gguf_hparams(config: dict, shapes: dict) -> dict:
    """The metadata written for a model (GGUFWriter.add_<key> -> value): what convert_hf_to_gguf.py's
    TextModel writes for every family, then the architecture's own keys (Export.hparams)."""
    c = text_config(config)
    spec = EXPORTS[config["model_type"]]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    out = {"context_length": c.get("max_position_embeddings") or 4096, "embedding_length": c["hidden_size"],
           "block_count": c["num_hidden_layers"],
           "feed_forward_length": c.get("intermediate_size") or c.get("block_ff_dim"),
           "head_count": heads, "head_count_kv": c.get("num_key_value_heads") or heads,
           "rope_dimension_count": int(head_dim * c.get("partial_rotary_factor", 1.0))}
    if head_dim != c["hidden_size"] // heads:
        out.update(key_length=head_dim, value_length=head_dim)
    out.update(layer_norm_rms_eps=c.get("rms_norm_eps", 1e-5), rope_freq_base=_rope_theta(c),
               vocab_size=c["vocab_size"])
    experts = c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts")
    if experts:
        out.update(expert_count=experts, expert_used_count=c["num_experts_per_tok"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        if c.get(key):
            out[key] = c[key]
    if spec.hparams:
        out.update(spec.hparams(c, shapes))
    return out
