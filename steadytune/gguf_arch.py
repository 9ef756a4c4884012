"""How each GGUF architecture maps onto an mlx-lm model class: tensor names and layouts (ARCHS), the
config.json its metadata implies (gguf_config), and RoPE scaling, which a converter writes partly as
tensors: Llama 3's `rope_freqs` and Phi-3's `rope_factors_long/short` hold one factor per rotary
frequency (llama.cpp divides each base frequency by it). They become the HF-style rope_scaling that
mlx-lm's model builds the same frequencies from, not weights, so a fused export or an HF copy of the
model describes them as the original config did; `add_rope_scaling` writes them back.

gguf.py reads the file (header, tensors, tokenizer) and builds the model from what this module says.
"""

from __future__ import annotations

import math
import re
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

def add_rope_scaling(writer, config: dict) -> None:
    """Write an mlx-lm config's rope_scaling to a GGUFWriter as llama.cpp's converter does (linear as
    metadata, llama3 as rope_freqs, phi3 longrope as rope_factors_long/short plus the original context
    and attention factor), so that gguf_config reads the same rope_scaling back."""
    import gguf
    import numpy as np

    scaling = config.get("rope_scaling")
    kind = scaling and scaling.get("type", scaling.get("rope_type"))
    if not scaling or kind == "default":
        return
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "llama3" and writer.arch == "llama":
        factors = llama3_factors(scaling, config.get("rope_theta", 10000.0), head_dim)
        writer.add_tensor(ROPE_FREQS, factors.astype(np.float32))
    elif kind in ("longrope", "su") and writer.arch == "phi3":
        original = config.get("original_max_position_embeddings", 4096)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(longrope_attn_factor(config["max_position_embeddings"], original))
        for name, key in zip(LONGROPE, ("long_factor", "short_factor")):
            writer.add_tensor(name, np.array(scaling[key], np.float32))
    else:
        from .export import instead

        raise UserError(f"--format gguf: RoPE scaling {scaling} is not written by steadytune; "
                        f"{instead(config.get('model_type'), 'gguf')}")
