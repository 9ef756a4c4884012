"""`steadytune export RUN --format mlx|hf|gguf|ollama|gguf-lora [--quant Q] [--out DIR]`: fold a run's
adapters into its base model and write one model that other tools load without steadytune.

The adapters are fused into *dequantized* weights (float16 by default), so a float export answers
like base + adapters. A quantized GGUF (--quant) is made from those fused weights in one step, as
llama.cpp's llama-quantize would make it from the float16 export (bench/gguf_quant.py measures the
cost against llama.cpp's own quantizer). Formats:

- mlx:  an mlx-lm folder (model.safetensors, config.json, tokenizer), for `mlx_lm.generate`.
- hf:   a Hugging Face folder (HF tensor names, config.json, generation_config.json, tokenizer),
        for transformers, vLLM, or llama.cpp's convert_hf_to_gguf.py.
- gguf: model.gguf (the architecture llama.cpp names the family by, gguf_arch.EXPORTS: llama,
        qwen2, qwen3, qwen3moe, gemma2, gemma3, gemma3n, phi3, olmo2 (olmo2, olmo3), granite, smollm3,
        mistral3, gpt-oss, deepseek2, glm4moe, lfm2, lfm2moe, granitehybrid, nemotron_h_moe;
        F16/BF16/F32; its tensor names and transforms: q/k rows in llama.cpp's order where its RoPE
        rotates adjacent pairs, gemma's norms stored as 1 + w, experts stacked, Mamba-2's A as
        -exp(A_log), gemma3n's AltUp projections stacked;
        tokenizer and chat template metadata) and an Ollama Modelfile next to it:
        `ollama create NAME -f Modelfile`. `--quant q8_0|q6_k|q5_k_m|q4_k_m|q4_0`
        quantizes it as llama.cpp's llama-quantize would (gguf_quantize.py: the same blocks, the same
        per-tensor types) from the fused float weights.
- ollama: the same, q4_k_m unless --quant says otherwise, for `ollama create`.
- gguf-lora: adapter.gguf, the adapters unfused as a llama.cpp LoRA GGUF (`llama-cli --lora`,
        Ollama's ADAPTER) for users who keep the base GGUF.

The export is written to a hidden folder beside --out and renamed into place when complete, so an
interrupted export never leaves a half-written model that looks finished.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .data import raw_text_ids
from .errors import UserError
from .gguf_arch import EXPORTS, gguf_hparams, rope_scaling_problem, text_config

FORMATS = ("mlx", "hf", "gguf", "ollama", "gguf-lora")
GGUF_FORMATS = ("gguf", "ollama")  # fused, written by write_gguf (with --quant)
DTYPES = ("float16", "bfloat16", "float32")
# model types written as an HF folder (HF_EXPORTS below: the names and layouts HF reads)
HF_NAMED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "phi3", "qwen3_moe", "mixtral",
            "olmo2", "smollm3", "gpt_oss", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "olmo3", "granite", "phimoe",
            "ministral3", "lfm2", "lfm2_moe", "qwen3_next", "granitemoehybrid", "nemotron_h",
            "falcon_h1", "qwen3_5", "qwen3_5_moe", "gemma4_text", "gemma3n", "mistral3",
            "llama4", "mistral4")
# mlx-lm model type -> the GGUF architecture written (gguf_arch.EXPORTS: one table per type)
GGUF_ARCH = {model_type: spec.arch for model_type, spec in EXPORTS.items()}
# model types whose adapters are written as a LoRA GGUF: dense blocks of 2-D matrices
LORA_GGUF = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def export(run, fmt: str, out=None, model: str | None = None, dtype: str = "float16",
           quant: str | None = None) -> Path:
    """Fuse RUN's adapters into its base and write `fmt` to `out`; returns the folder written.
    `quant` (gguf, ollama): the llama.cpp file type written (gguf_quantize.FILE_TYPES); the
    default is f16 for gguf and q4_k_m for ollama."""
    import mlx.core as mx
    import numpy as np

    from . import checkpoint as ckpt
    from .generation import adapter_dir, load_tuned

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    quant = _check_quant(fmt, quant)
    adapter_dir(run)  # fail on a wrong RUN before anything loads
    out = Path(out) if out else Path(run) / f"export-{fmt}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; pass another --out or remove it")
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists() and not ckpt.ours(tmp):  # only a partial export of ours is ever removed
        raise UserError(f"{tmp}: exists and was not written by steadytune; move it away, or pass another --out")
    # Fused in float32 (the small LoRA update survives the addition), then cast to `dtype`.
    loaded = load_tuned(run, model, dtype="float32")
    config = dict(loaded.config)
    model_type = config.get("model_type")
    if fmt == "hf" and model_type not in HF_NAMED:
        raise UserError(f"--format hf: model type {model_type!r} is not written as an HF folder by steadytune "
                        f"({', '.join(HF_NAMED)} are); {instead(model_type, fmt)}")
    refuse_gguf(fmt, config)
    refuse_nonfinite(loaded.model, "float32", f"{adapter_dir(run)} with its base")
    if fmt != "gguf-lora":  # the LoRA GGUF holds the adapters themselves, unfused
        reference = answers(loaded)  # base + adapters, float32: what the export must still answer
        if not all(np.isfinite(r).all() for r in reference):
            raise UserError(f"{adapter_dir(run)}: base + adapters answers NaN or inf in float32 (is "
                            "adapter_config.json's scale finite?); nothing was written")
        fuse(loaded.model, getattr(mx, dtype))
        check_fused(loaded, reference, dtype, lambda d: _fused_works(run, model, d, reference))
    config = export_config(config, loaded.tokenizer, dtype)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ckpt.mark(tmp, out.name)  # an interrupted export's leftover is ours to remove next time
    try:
        if fmt in GGUF_FORMATS:
            WRITERS[fmt](tmp, loaded, config, quant, data_system(run))
        else:
            WRITERS[fmt](tmp, loaded, config)
        if out.exists():
            out.rmdir()  # empty, checked above
        (tmp / ckpt.OURS).unlink()
        tmp.rename(out)
    finally:
        if ckpt.ours(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- checking what is written
# A fused model is checked before anything is written: every tensor finite, and its answers in the
# export dtype against base + adapters (float32) on a few prompts. float16 overflows where
# activations pass 65504 (a trained MLP can), giving inf, then NaN, then <unk> answers.
CHECK_PROMPTS = ("The capital of France is", "hello, how are you?", "1 2 3 4 5 6")
# An exported model's greedy token may differ from base + adapters' where the two are nearly tied;
# it is wrong where base + adapters rates it more than MARGIN nats below its own choice.
MARGIN = 1.0
MAX_WRONG = 0.25  # refused when more positions than this are wrong


def nonfinite(model) -> list[str]:
    """Names of the model's float tensors holding NaN or inf."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return [k for k, v in tree_flatten(model.parameters())
            if mx.issubdtype(v.dtype, mx.floating) and not mx.all(mx.isfinite(v)).item()]


def refuse_nonfinite(model, dtype: str, what: str) -> None:
    """A UserError naming the first tensor holding NaN or inf."""
    bad = nonfinite(model)
    if bad:
        raise UserError(f"{what}: {bad[0]} holds NaN or inf in {dtype} ({len(bad)} tensors in all); nothing "
                        "was written. Export an earlier checkpoint (--run RUN/checkpoints/best) or retrain "
                        "with a lower --learning-rate")


def answers(loaded):
    """The model's logits (float32 numpy, one array per prompt) on CHECK_PROMPTS."""
    import mlx.core as mx
    import numpy as np

    model = loaded.model
    dtype = _cpu_gather_dtype(model)
    if dtype is not None:  # run the float16 / bfloat16 values exactly, in float32; cast back after
        model.apply(lambda x: x.astype(mx.float32) if x.dtype == dtype else x)
    try:
        out = []
        for text in CHECK_PROMPTS:
            ids = [i for i in raw_text_ids(loaded.tokenizer, text) if 0 <= i < _vocab_rows(model)][:32] or [0]
            out.append(np.array(model(mx.array([ids]))[0].astype(mx.float32)))
        return out
    finally:
        if dtype is not None:
            model.apply(lambda x: x.astype(dtype) if x.dtype == mx.float32 else x)


def _cpu_gather_dtype(model):
    """The 16-bit dtype of a model with experts on the CPU, whose gather_mm (MLX) computes float32
    only; None where the model runs as it is. Its answers are then the same weights computed in
    float32, so a float16 overflow of the activations would go unseen there (a GPU sees it)."""
    import mlx.core as mx
    from mlx_lm.models.switch_layers import SwitchLinear

    if mx.default_device() != mx.cpu or not any(isinstance(m, SwitchLinear) for _, m in model.named_modules()):
        return None
    return next((v.dtype for _, v in _floats(model) if v.dtype != mx.float32), None)


def _floats(model):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]


def _vocab_rows(model) -> int:
    from mlx.utils import tree_flatten

    for k, v in tree_flatten(model.parameters()):
        if k.endswith("embed_tokens.weight"):
            return v.shape[0]
    return 1 << 62


def answer_problem(reference, got) -> str | None:
    """Why logits `got` do not answer like `reference` (None: they do)."""
    import numpy as np

    wrong = total = 0
    for ref, out in zip(reference, got):
        if not np.isfinite(out).all():
            return "its logits overflow to NaN or inf"
        picked = ref[np.arange(len(ref)), out.argmax(-1)]
        wrong += int((picked < ref.max(-1) - MARGIN).sum())
        total += len(ref)
    if wrong > MAX_WRONG * total:
        return f"its greedy tokens differ from base + adapters' at {wrong} of {total} positions"
    return None


def check_fused(loaded, reference, dtype: str, works) -> None:
    """Refuse a fused model (in `dtype`) that holds non-finite tensors or answers unlike base +
    adapters; `works(other_dtype)` says whether another dtype would do (the advice)."""
    problem = fused_problem(loaded, reference)
    if problem is None:
        return
    others = [d for d in ("bfloat16", "float32") if d != dtype and DTYPES.index(d) > DTYPES.index(dtype)]
    good = next((d for d in others if works(d)), None)
    advice = (f"export with --dtype {good} (checked: it answers like base + adapters)" if good else
              "no export dtype does: export an earlier checkpoint (--run RUN/checkpoints/best)")
    raise UserError(f"--dtype {dtype}: the fused model does not answer like base + adapters in {dtype} "
                    f"({problem}); nothing was written; {advice}")


def _fused_works(run, model, dtype: str, reference) -> bool:
    import mlx.core as mx

    from .generation import load_tuned

    loaded = load_tuned(run, model, dtype="float32")
    fuse(loaded.model, getattr(mx, dtype))
    return fused_problem(loaded, reference) is None


def fused_problem(loaded, reference) -> str | None:
    bad = nonfinite(loaded.model)
    if bad:
        return f"{bad[0]} holds NaN or inf ({len(bad)} tensors in all)"
    return answer_problem(reference, answers(loaded))


# Model types llama.cpp has an architecture for that steadytune does not write yet, and what in them is
# not mapped: the refusal says so rather than "not supported".
NOT_YET = {"qwen3_next": ("qwen3next", "Gated DeltaNet layers"), "qwen3_5": ("qwen35", "Gated DeltaNet layers"),
           "qwen3_5_moe": ("qwen35moe", "Gated DeltaNet layers"),
           "gemma4_text": ("gemma4", "per-layer inputs and shared KV layers"),
           "phimoe": ("phimoe", "experts"),
           "falcon_h1": ("falcon-h1", "parallel Mamba-2 heads"),
           "llama4": ("llama4", "chunked attention and experts"),
           "mistral4": ("mistral4", "multi-head latent attention with Llama 4 scaling")}


def refuse_gguf(fmt: str, config: dict) -> None:
    """One line saying why this model is not written as `fmt` (gguf, ollama, gguf-lora), before anything
    is fused or written: its type has no table in gguf_arch.EXPORTS, or its settings are outside what
    llama.cpp's architecture computes (Export.refuse)."""
    model_type = config.get("model_type")
    if fmt in GGUF_FORMATS:
        spec = EXPORTS.get(model_type)
        if spec is None:
            arch, part = NOT_YET.get(model_type, (None, None))
            why = (f"llama.cpp reads it as {arch}, but steadytune does not write its {part} in that layout yet"
                   if arch else "llama.cpp has no architecture steadytune writes it as")
            raise UserError(f"--format {fmt}: model type {model_type!r} is not written to GGUF: {why}; "
                            f"{instead(model_type, fmt)}")
        c = text_config(config)
        why = (spec.refuse(c) if spec.refuse else None) or rope_scaling_problem(c, spec.arch)
        if why:
            raise UserError(f"--format {fmt}: this {model_type} model is not written as llama.cpp's {spec.arch}: "
                            f"{why}; {instead(model_type, fmt)}")
    if fmt == "gguf-lora" and model_type not in LORA_GGUF:
        other = ("use --format gguf (the adapters fused into the model)" if model_type in EXPORTS
                 else instead(model_type, fmt))
        raise UserError(f"--format gguf-lora: model type {model_type!r} is not written as a LoRA GGUF (steadytune "
                        f"writes them for {', '.join(LORA_GGUF)}); {other}")


def instead(model_type: str | None, refused: str) -> str:
    """The advice of a refused export: one that works for this model type (an MLX folder works for
    every type mlx-lm loads; an HF folder, which llama.cpp's convert_hf_to_gguf.py reads, where
    steadytune writes one)."""
    if refused != "hf" and model_type in HF_NAMED:
        return "use --format hf and llama.cpp's convert_hf_to_gguf.py, or --format mlx"
    return "use --format mlx (an mlx-lm folder: mlx_lm.generate --model OUT)"


def fuse(model, dtype) -> None:
    """Fold LoRA/DoRA layers into dequantized weights (as mlx_lm.fuse does), dequantize the rest,
    cast every float to `dtype`."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    fused = [(name, m.fuse(dequantize=True)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    dequantize_model(model)
    _dequantize_multilinear(model)
    model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x)
    mx.eval(model.parameters())


def _dequantize_multilinear(model) -> None:
    """MLA's per-head projections (mlx-lm's QuantizedMultiLinear: deepseek_v3, glm4_moe_lite,
    mistral4), which mlx-lm's dequantize_model leaves quantized: the config is written without
    "quantization", so every layer must be float."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

    layers = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedMultiLinear):
            weight = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, m.mode)
            heads, out, d_in = weight.shape
            layer = MultiLinear(d_in, out, heads)
            layer.weight = weight
            layers.append((name, layer))
    if layers:
        model.update_modules(tree_unflatten(layers))


def export_config(config: dict, tokenizer, dtype: str) -> dict:
    """The base config without quantization, with the dtype and every stop token."""
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = dtype
    eos = sorted(tokenizer.eos_token_ids)
    config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


# --------------------------------------------------------------------------- mlx and hf folders

def write_mlx(out: Path, loaded, config: dict) -> None:
    from mlx_lm.utils import save_config, save_model

    save_model(out, loaded.model)
    save_config(dict(config), out / "config.json")
    loaded.tokenizer.save_pretrained(str(out))


def write_hf(out: Path, loaded, config: dict) -> None:
    """model.safetensors in HF's names and layouts (HF_EXPORTS: the reverse of mlx-lm's sanitize),
    config.json with the settings mlx-lm ran (HFSpec.config), generation_config.json, tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    spec = HF_EXPORTS[config["model_type"]]
    weights = dict(tree_flatten(loaded.model.parameters()))
    config = dict(config)
    # Tied where the MLX model has no lm_head (gemma2 always ties; gemma3_text when the base had none;
    # olmo2's mlx-lm default is tied, HF's untied): the config says what the weights are.
    tied = not any(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in weights)
    config["tie_word_embeddings"] = tied
    if isinstance(config.get("text_config"), dict):  # qwen3_5: the text model reads its own
        config["text_config"] = {**config["text_config"], "tie_word_embeddings": tied}
    weights = dict(spec.weights(weights) if spec.weights else weights)
    if spec.config:
        config = spec.config(config, loaded.model.args)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    config["architectures"] = [spec.architecture]
    # the model's own special ids, null where it has none: left out, transformers fills in its class's
    # defaults (phi3: pad 32000, smollm3: pad 128004), ids the model may not have at all
    for key in ("bos_token_id", "pad_token_id"):
        if key not in config:
            config[key] = getattr(loaded.tokenizer, key, None)
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    loaded.tokenizer.save_pretrained(str(out))


# --------------------------------------------------------------------------- HF names per model type
# What write_hf does per mlx-lm model type: the HF class, the reverse of mlx-lm's sanitize (in each
# mlx_lm/models/<type>.py) on the parameter names and layouts, and the config keys HF reads
# differently from mlx-lm (written explicitly, so transformers runs what mlx-lm ran).

@dataclass(frozen=True)
class HFSpec:
    architecture: str
    weights: Callable | None = None  # {mlx name: array} -> {HF name: array}; None: the names are HF's
    config: Callable | None = None   # (config, mlx-lm ModelArgs) -> HF config


def _unstack_experts(names: dict[str, str], block: str):
    """mlx-lm's `<block>.switch_mlp.<proj>.weight` (experts, out, in), stacked by its sanitize from HF's
    per-expert matrices, back to `<block>.experts.E.<HF proj>.weight` (out, in), the layout of the
    released checkpoints (transformers merges them on loading: conversion_mapping.py)."""
    def weights(params: dict) -> dict:
        out = {}
        for name, value in params.items():
            head, sep, tail = name.partition(f".{block}.switch_mlp.")
            if not sep:
                out[name] = value
                continue
            proj, leaf = tail.split(".", 1)
            for e in range(value.shape[0]):
                out[f"{head}.{block}.experts.{e}.{names[proj]}.{leaf}"] = value[e]
        return out
    return weights


def _args(*keys: str, **fixed):
    """Write mlx-lm's value of `keys` (its defaults where the base config left them out, which HF may
    default otherwise) and `fixed`: what mlx-lm computes whatever the config says (its activation)."""
    def config(c: dict, args) -> dict:
        return {**c, **{k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}, **fixed}
    return config


def _rope_parameters(theta: float, scaling: dict | None) -> dict:
    """HF's rope_parameters for mlx-lm's RoPE base and scaling (mlx-lm reads "type" before "rope_type")."""
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    scaling = dict(scaling)
    kind = scaling.pop("type", None) or scaling.pop("rope_type", "default")
    scaling.pop("rope_type", None)
    return {**scaling, "rope_type": kind, "rope_theta": theta}


def _with_rope(config: Callable, scaled: bool = True) -> Callable:
    """`config`, then rope_parameters written from mlx-lm's rope_theta (and rope_scaling unless `scaled`
    is False: the families whose mlx-lm RoPE ignores it), for the HF classes whose default is not plain
    RoPE (gpt_oss: YaRN). transformers moves a top-level partial_rotary_factor into them."""
    def with_rope(c: dict, args) -> dict:
        c = config(c, args)
        c["rope_parameters"] = _rope_parameters(args.rope_theta, args.rope_scaling if scaled else None)
        if not scaled or "rope_scaling" in c:  # HF reads a non-null rope_scaling over rope_parameters
            c["rope_scaling"] = c["rope_parameters"] if c.get("rope_scaling") and scaled else None
        return c
    return with_rope


def _olmo3_config(c: dict, args) -> dict:
    """OLMo 3: rope_scaling on the full-attention layers only, plain RoPE on the sliding ones (mlx-lm's
    rule), which HF reads per layer type."""
    c = _args("head_dim", "sliding_window", "layer_types", "attention_bias", hidden_act="silu")(c, args)
    c.pop("rope_scaling", None)
    c["rope_parameters"] = {"full_attention": _rope_parameters(args.rope_theta, args.rope_scaling),
                            "sliding_attention": _rope_parameters(args.rope_theta, None)}
    return c


def _gemma3_config(c: dict, args) -> dict:
    """Gemma 3: sliding layers every layer but each sliding_window_pattern-th (mlx-lm's rule), local RoPE
    base on those, rope_theta (and rope_scaling, mlx-lm applies it to the global layers only) on the
    others; no soft-capping (mlx-lm has none; HF's default is none)."""
    c = _args("head_dim", "query_pre_attn_scalar", "sliding_window", "rope_theta", "rope_local_base_freq",
              "max_position_embeddings", "rms_norm_eps", hidden_activation="gelu_pytorch_tanh")(c, args)
    pattern = args.sliding_window_pattern
    c["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                        for i in range(args.num_hidden_layers)]
    c["rope_parameters"] = {"full_attention": _rope_parameters(args.rope_theta, args.rope_scaling),
                            "sliding_attention": {"rope_type": "default", "rope_theta": args.rope_local_base_freq}}
    c.pop("rope_scaling", None)
    c["final_logit_softcapping"] = c["attn_logit_softcapping"] = None
    return c


def _rename(*pairs: tuple[str, str]):
    """Parameter names with each `old` part replaced by `new`, in order (the layouts are HF's)."""
    def weights(params: dict) -> dict:
        out = {}
        for name, value in params.items():
            for old, new in pairs:
                name = name.replace(old, new)
            out[name] = value
        return out
    return weights


def _chain(*steps: Callable):
    def weights(params: dict) -> dict:
        for step in steps:
            params = step(params)
        return params
    return weights


def _gpt_oss_weights(params: dict) -> dict:
    """gpt-oss's experts as HF holds them: gate_up_proj (experts, in, 2 x out) with gate and up
    *interleaved* along the last axis (mlx-lm's sanitize takes [..., ::2] and [..., 1::2]), down_proj
    (experts, in, out): transposed from mlx-lm's (experts, out, in); biases `<proj>_bias`."""
    import mlx.core as mx

    out = {}
    for name, value in params.items():
        head, sep, tail = name.partition(".mlp.experts.")
        if not sep:
            out[name] = value
        elif tail == "gate_proj.weight":
            gate, up = value.swapaxes(1, 2), params[f"{head}.mlp.experts.up_proj.weight"].swapaxes(1, 2)
            out[f"{head}.mlp.experts.gate_up_proj"] = mx.stack([gate, up], axis=-1).reshape(*gate.shape[:2], -1)
        elif tail == "gate_proj.bias":
            up = params[f"{head}.mlp.experts.up_proj.bias"]
            out[f"{head}.mlp.experts.gate_up_proj_bias"] = mx.stack([value, up], axis=-1).reshape(value.shape[0], -1)
        elif tail == "down_proj.weight":
            out[f"{head}.mlp.experts.down_proj"] = value.swapaxes(1, 2)
        elif tail == "down_proj.bias":
            out[f"{head}.mlp.experts.down_proj_bias"] = value
    return out


def _mla_kv_b(params: dict) -> dict:
    """Multi-head latent attention (deepseek_v3, glm4_moe_lite): mlx-lm's sanitize splits HF's kv_b_proj
    (heads x (nope + v), kv_lora_rank) per head into embed_q (heads, kv_lora_rank, nope), transposed,
    and unembed_out (heads, v, kv_lora_rank); joined back here."""
    import mlx.core as mx

    out = {}
    for name, value in params.items():
        if name.endswith(".embed_q.weight"):
            v = params[name.replace(".embed_q.", ".unembed_out.")]
            kv_b = mx.concatenate([value.swapaxes(1, 2), v], axis=1)
            out[name.replace(".embed_q.", ".kv_b_proj.")] = kv_b.reshape(-1, kv_b.shape[-1])
        elif not name.endswith(".unembed_out.weight"):
            out[name] = value
    return out


def _mla_config(config: Callable) -> Callable:
    """`config` for multi-head latent attention: every head has its own keys and values (HF repeats
    keys num_attention_heads / num_key_value_heads times), and no head_dim (HF reads it as
    qk_rope_head_dim; mlx-lm ignores it)."""
    def mla(c: dict, args) -> dict:
        c = {k: v for k, v in config(c, args).items() if k != "head_dim"}
        c["num_key_value_heads"] = args.num_attention_heads
        return c
    return mla


def _conv_taps(suffix: str):
    """Depthwise convolutions (Mamba-2's conv1d, LFM2's short convolution): mlx-lm's Conv1d holds
    (channels, taps, 1), torch's (channels, 1, taps); sanitize swaps the last two axes, as here."""
    def weights(params: dict) -> dict:
        return {name: value.swapaxes(1, 2) if name.endswith(suffix) else value for name, value in params.items()}
    return weights


def _norms_minus_one(*suffixes: str):
    """Norm weights HF applies as (1 + w) and mlx-lm's sanitize stores as 1 + w (qwen3_next, qwen3_5)."""
    def weights(params: dict) -> dict:
        return {name: value - 1.0 if value.ndim == 1 and name.endswith(suffixes) else value
                for name, value in params.items()}
    return weights


def _granite_moe_weights(params: dict) -> dict:
    """Granite 4 as released: input_linear holds gate then up (mlx-lm's sanitize splits it in halves),
    output_linear the down projection: the experts' (experts, 2 x out, in) in block_sparse_moe, and
    the dense models' MLP (2 x out, in) as shared_mlp (mlx-lm renames it mlp)."""
    import mlx.core as mx

    out = {}
    for name, value in params.items():
        for mlx_block, hf_block, axis in ((".block_sparse_moe.switch_mlp.", ".block_sparse_moe.", 1),
                                          (".mlp.", ".shared_mlp.", 0)):
            head, sep, tail = name.partition(mlx_block)
            if sep:
                break
        if not sep:
            out[name] = value
        elif tail == "gate_proj.weight":
            up = params[f"{head}{mlx_block}up_proj.weight"]
            out[f"{head}{hf_block}input_linear.weight"] = mx.concatenate([value, up], axis=axis)
        elif tail == "down_proj.weight":
            out[f"{head}{hf_block}output_linear.weight"] = value
    return out


def _granite_hybrid_config(c: dict, args) -> dict:
    """Granite 4.0-H; a dense one's MLP is intermediate_size wide in mlx-lm, HF's shared_mlp
    shared_intermediate_size."""
    c = _args("layer_types", "embedding_multiplier", "attention_multiplier", "logits_scaling", "residual_multiplier",
              "position_embedding_type", "rope_theta", "attention_bias", hidden_act="silu")(c, args)
    if not args.use_moe:
        c["shared_intermediate_size"] = args.intermediate_size
    return c


def _fuse_experts(switch: str, experts: str):
    """mlx-lm's `<switch>{gate,up,down}_proj.weight` (experts, out, in), split by its sanitize from the
    released fused layout, back to `<experts>gate_up_proj` (experts, 2 x out, in: gate then up) and
    `<experts>down_proj` (qwen3_5_moe, gemma4_text's MoE block)."""
    import mlx.core as mx

    def weights(params: dict) -> dict:
        out = {}
        for name, value in params.items():
            head, sep, tail = name.partition(switch)
            if not sep:
                out[name] = value
            elif tail == "gate_proj.weight":
                up = params[f"{head}{switch}up_proj.weight"]
                out[f"{head}{experts}gate_up_proj"] = mx.concatenate([value, up], axis=1)
            elif tail == "down_proj.weight":
                out[f"{head}{experts}down_proj"] = value
        return out
    return weights


def _falcon_h1_config(c: dict, args) -> dict:
    """Falcon-H1: mlx-lm folds the muP multipliers into the weights (its sanitize), so HF's are written
    as 1, but for the tied output: mlx-lm scales the (folded) embedding's logits by lm_head_multiplier /
    embedding_multiplier."""
    c = _args("head_dim", "rope_theta", "attention_bias", "mlp_bias", "projectors_bias", "mamba_chunk_size",
              "mamba_conv_bias", "mamba_d_conv", "mamba_d_head", "mamba_d_ssm", "mamba_d_state", "mamba_expand",
              "mamba_n_groups", "mamba_n_heads", "mamba_norm_before_gate", "mamba_proj_bias", "mamba_rms_norm",
              "rms_norm_eps", hidden_act="silu")(c, args)
    c.update(embedding_multiplier=1.0, attention_in_multiplier=1.0, attention_out_multiplier=1.0, key_multiplier=1.0,
             ssm_in_multiplier=1.0, ssm_out_multiplier=1.0, mlp_multipliers=[1.0, 1.0], ssm_multipliers=[1.0] * 5,
             lm_head_multiplier=(args.lm_head_multiplier / args.embedding_multiplier
                                 if c["tie_word_embeddings"] else 1.0))
    return c


def _text_model(hf_type: str, text_args: str, config: Callable | None = None) -> Callable:
    """A multimodal mlx-lm type's text model (its config's text_config) written as transformers'
    text-only `hf_type`: the text settings at the top level with the export's own (dtype, stop tokens,
    tying), then `config` with mlx-lm's text args (`text_args`: "module.Class" in mlx_lm.models)."""
    def text(c: dict, args) -> dict:
        import importlib

        module, name = text_args.rsplit(".", 1)
        read = getattr(importlib.import_module(f"mlx_lm.models.{module}"), name).from_dict(c["text_config"])
        outer = {k: c[k] for k in ("torch_dtype", "eos_token_id", "bos_token_id", "pad_token_id",
                                   "tie_word_embeddings") if k in c}
        c = {**c["text_config"], **outer, "model_type": hf_type}
        return config(c, read) if config else c
    return text


def _gemma3n_config(c: dict, args) -> dict:
    """Gemma 3n's text model: mlx-lm's RoPE bases per layer type (rope_local_base_freq on the sliding
    layers) and no rope_scaling (mlx-lm's gemma3n ignores it)."""
    c = _args("head_dim", "sliding_window", "layer_types", "final_logit_softcapping", "activation_sparsity_pattern",
              "num_kv_shared_layers", "hidden_size_per_layer_input", "vocab_size_per_layer_input", "altup_num_inputs",
              "altup_coef_clip", "altup_correct_scale", "altup_active_idx", "laurel_rank", "rms_norm_eps",
              "max_position_embeddings", hidden_activation="gelu_pytorch_tanh")(c, args)
    for key in ("rope_scaling", "rope_theta", "rope_local_base_freq"):
        c.pop(key, None)
    c["rope_parameters"] = {"full_attention": _rope_parameters(args.rope_theta, None),
                            "sliding_attention": _rope_parameters(args.rope_local_base_freq, None)}
    return c


def _llama4_experts(params: dict) -> dict:
    """Llama 4's experts as HF holds them: gate_up_proj (experts, in, 2 x out: gate then up) and
    down_proj (experts, in, out), transposed from mlx-lm's (experts, out, in) (its sanitize splits the
    last axis in halves and swaps the last two)."""
    import mlx.core as mx

    out = {}
    for name, value in params.items():
        head, sep, tail = name.partition(".feed_forward.experts.")
        if not sep:
            out[name] = value
        elif tail == "gate_proj.weight":
            up = params[f"{head}{sep}up_proj.weight"]
            out[f"{head}{sep}gate_up_proj"] = mx.concatenate([value, up], axis=1).swapaxes(1, 2)
        elif tail == "down_proj.weight":
            out[f"{head}{sep}down_proj"] = value.swapaxes(1, 2)
    return out


def _llama4_config(c: dict, args) -> dict:
    """Llama 4's text model as mlx-lm runs it: no RoPE (and full attention, temperature-tuned) on every
    4th layer, chunked attention on the others; RoPE scaling as mlx-lm reads it."""
    rope = [int((i + 1) % 4 != 0) for i in range(args.num_hidden_layers)]
    c = _args("head_dim", "attention_chunk_size", "interleave_moe_layer_step", "intermediate_size_mlp",
              "use_qk_norm", "floor_scale", "attn_scale", "attention_bias", "rms_norm_eps",
              "max_position_embeddings", hidden_act="silu")(c, args)
    c.update(no_rope_layers=rope, attn_temperature_tuning=bool(args.attn_temperature_tuning),
             layer_types=["chunked_attention" if r else "full_attention" for r in rope])
    return c


def _mistral4_config(c: dict, args) -> dict:
    """Mistral 4: RoPE and Llama 4's attention scaling as mlx-lm reads them (rope_parameters: its theta
    and scaling), rotating the qk_rope_head_dim of each head (HF's partial_rotary_factor of
    nope + rope). transformers 5.25's Mistral 4 rotates the whole head under plain RoPE (its default
    init ignores the factor), so plain RoPE is written as YaRN at factor 1: the same frequencies, no
    attention factor (the released models' RoPE is YaRN)."""
    c = _args(*_DEEPSEEK_KEYS, rope_interleave=True, hidden_act="silu")(c, args)
    rope = dict(args.rope_parameters or _rope_parameters(args.rope_theta, args.rope_scaling))
    rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type", "default")  # mlx-lm reads "type" first
    if rope["rope_type"] == "default":
        rope.update(rope_type="yarn", factor=1.0)
    rope["partial_rotary_factor"] = args.qk_rope_head_dim / (args.qk_nope_head_dim + args.qk_rope_head_dim)
    c["rope_parameters"] = rope
    c.pop("rope_scaling", None)
    return c


_MLP_EXPERTS = _unstack_experts({"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}, "mlp")
_DEEPSEEK_KEYS = ("moe_intermediate_size", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                  "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim",
                  "n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob",
                  "attention_bias", "rms_norm_eps", "max_position_embeddings")


_ONE_PLUS_NORMS = _norms_minus_one(".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                                  ".q_norm.weight", ".k_norm.weight")
# a multimodal model's text model, named as transformers' text-only class reads it (model.*, lm_head.*)
_GEMMA3N_NAMES = _rename(("model.language_model.", "model."))
_LANGUAGE_MODEL_NAMES = _rename(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))
_MINISTRAL3_CONFIG = _args("head_dim", "rope_parameters", "sliding_window", hidden_act="silu")
_QWEN3_5_NAMES = _rename(("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))


HF_EXPORTS = {
    "llama": HFSpec("LlamaForCausalLM"),
    "mistral": HFSpec("MistralForCausalLM"),
    "qwen2": HFSpec("Qwen2ForCausalLM"),
    "qwen3": HFSpec("Qwen3ForCausalLM"),
    # mlx-lm's gemma3_text names are HF's; its sanitize only drops lm_head when the base had none
    "gemma3_text": HFSpec("Gemma3ForCausalLM", config=_gemma3_config),
    # mlx-lm's gemma2 attends in full on every layer; HF (and the released model) uses a sliding window
    # on every other layer: the same up to the window (sliding_window, 4096 released)
    "gemma2": HFSpec("Gemma2ForCausalLM", config=_args("head_dim", "query_pre_attn_scalar", "rope_theta",
                                                     "attn_logit_softcapping", "final_logit_softcapping",
                                                     hidden_activation="gelu_pytorch_tanh")),
    "phi3": HFSpec("Phi3ForCausalLM", config=_args("partial_rotary_factor", "original_max_position_embeddings",
                                                 "max_position_embeddings", "rope_theta", hidden_act="silu")),
    "qwen3_moe": HFSpec("Qwen3MoeForCausalLM", _MLP_EXPERTS,
                        _args("head_dim", "rope_theta", "norm_topk_prob", hidden_act="silu")),
    "mixtral": HFSpec("MixtralForCausalLM",
                      _unstack_experts({"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
                                       "block_sparse_moe"), _args("rope_theta", hidden_act="silu")),
    "olmo2": HFSpec("Olmo2ForCausalLM", config=_args("head_dim", "rope_theta", "attention_bias",
                                                   hidden_act="silu")),
    "smollm3": HFSpec("SmolLM3ForCausalLM", config=_args("no_rope_layers", "no_rope_layer_interval",
                                                       "rope_theta", "attention_bias", "mlp_bias",
                                                       hidden_act="silu")),
    # gpt-oss: experts fused as HF's GptOssExperts holds them; without rope_scaling mlx-lm runs plain RoPE
    # (HF's default is YaRN x32); the clamped SwiGLU's constants are mlx-lm's (swiglu_oai)
    "gpt_oss": HFSpec("GptOssForCausalLM", _gpt_oss_weights,
                      _with_rope(_args("head_dim", "sliding_window", "layer_types", "rms_norm_eps",
                                       attention_bias=True, swiglu_alpha=1.702, swiglu_limit=7.0))),
    # rope_interleave: mlx-lm rotates adjacent pairs (traditional RoPE), as HF does with it on
    "deepseek_v3": HFSpec("DeepseekV3ForCausalLM", _chain(_mla_kv_b, _MLP_EXPERTS),
                          _mla_config(_with_rope(_args(*_DEEPSEEK_KEYS, rope_interleave=True, num_mtp_layers=0,
                                                       hidden_act="silu")))),
    "glm4_moe_lite": HFSpec("Glm4MoeLiteForCausalLM", _chain(_mla_kv_b, _MLP_EXPERTS),
                            _mla_config(_with_rope(_args(*_DEEPSEEK_KEYS, rope_interleave=True, hidden_act="silu")))),
    # mlx-lm's GLM-4.5 attention runs plain RoPE whatever rope_scaling says
    "glm4_moe": HFSpec("Glm4MoeForCausalLM", _MLP_EXPERTS,
                       _with_rope(_args("head_dim", "partial_rotary_factor", "use_qk_norm", "moe_intermediate_size",
                                        "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                                        "n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace",
                                        "norm_topk_prob", "attention_bias", hidden_act="silu"), scaled=False)),
    "olmo3": HFSpec("Olmo3ForCausalLM", config=_olmo3_config),
    "granite": HFSpec("GraniteForCausalLM", config=_args("logits_scaling", "attention_multiplier",
                                                       "embedding_multiplier", "residual_multiplier",
                                                       "rope_theta", "attention_bias", "mlp_bias",
                                                       hidden_act="silu")),
    "phimoe": HFSpec("PhimoeForCausalLM",
                     _unstack_experts({"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}, "block_sparse_moe"),
                     _args("rope_theta", "router_jitter_noise", "original_max_position_embeddings",
                           "max_position_embeddings", attention_bias=True, lm_head_bias=True, hidden_act="silu")),
    "ministral3": HFSpec("Ministral3ForCausalLM", config=_MINISTRAL3_CONFIG),
    # Mistral 3's text model (mlx-lm runs ministral3 on it), as transformers' text-only Ministral 3
    "mistral3": HFSpec("Ministral3ForCausalLM", _LANGUAGE_MODEL_NAMES,
                       _text_model("ministral3", "ministral3.ModelArgs", _MINISTRAL3_CONFIG)),
    "lfm2": HFSpec("Lfm2ForCausalLM", _conv_taps(".conv.conv.weight")),
    # mlx-lm names the dense layers' w1 / w3 / w2 gate / up / down; the experts as released, one per index
    "lfm2_moe": HFSpec("Lfm2MoeForCausalLM",
                       _chain(_conv_taps(".conv.conv.weight"),
                              _unstack_experts({"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
                                               "feed_forward"),
                              _rename((".feed_forward.gate_proj.", ".feed_forward.w1."),
                                      (".feed_forward.up_proj.", ".feed_forward.w3."),
                                      (".feed_forward.down_proj.", ".feed_forward.w2.")))),
    "qwen3_next": HFSpec("Qwen3NextForCausalLM",
                         _chain(_conv_taps(".conv1d.weight"), _MLP_EXPERTS, _ONE_PLUS_NORMS),
                         _with_rope(_args("head_dim", "full_attention_interval", "decoder_sparse_step",
                                          "mlp_only_layers", "norm_topk_prob", "moe_intermediate_size",
                                          "shared_expert_intermediate_size", "partial_rotary_factor",
                                          hidden_act="silu"))),
    "granitemoehybrid": HFSpec("GraniteMoeHybridForCausalLM",
                               _chain(_conv_taps(".conv1d.weight"), _granite_moe_weights),
                               _granite_hybrid_config),
    # the released checkpoints' names (backbone.*; experts one per index, fc1 / fc2 as up / down)
    "nemotron_h": HFSpec("NemotronHForCausalLM",
                         _chain(_conv_taps(".conv1d.weight"),
                                _unstack_experts({"fc1": "up_proj", "fc2": "down_proj"}, "mixer"))),
    "falcon_h1": HFSpec("FalconH1ForCausalLM", _conv_taps(".conv1d.weight"), _falcon_h1_config),
    # the text model of Qwen 3.5, named as released (model.language_model.*, which transformers'
    # Qwen3_5ForCausalLM reads), norms as 1 + w
    "qwen3_5": HFSpec("Qwen3_5ForCausalLM", _chain(_conv_taps(".conv1d.weight"), _ONE_PLUS_NORMS, _QWEN3_5_NAMES)),
    "qwen3_5_moe": HFSpec("Qwen3_5MoeForCausalLM",
                          _chain(_conv_taps(".conv1d.weight"), _ONE_PLUS_NORMS,
                                 _fuse_experts(".mlp.switch_mlp.", ".mlp.experts."), _QWEN3_5_NAMES)),
    # Gemma 3n's text model (AltUp, LAuReL, per-layer inputs, shared KV layers), as transformers'
    # text-only Gemma3nForCausalLM; mlx-lm's names are the released ones under model.language_model
    "gemma3n": HFSpec("Gemma3nForCausalLM", _GEMMA3N_NAMES,
                      _text_model("gemma3n_text", "gemma3n.TextConfig", _gemma3n_config)),
    # Llama 4's text model, as transformers' text-only Llama4ForCausalLM
    "llama4": HFSpec("Llama4ForCausalLM", _chain(_llama4_experts, _LANGUAGE_MODEL_NAMES),
                     _text_model("llama4_text", "llama4.TextArgs", _with_rope(_llama4_config))),
    # Mistral 4: multi-head latent attention as deepseek_v3, the experts fused as released, RoPE and
    # Llama 4's attention scaling from rope_parameters (mlx-lm reads its theta and scaling there)
    "mistral4": HFSpec("Mistral4ForCausalLM", _chain(_mla_kv_b, _fuse_experts(".mlp.switch_mlp.", ".mlp.experts.")),
                       _mla_config(_mistral4_config)),
    "gemma4_text": HFSpec("Gemma4ForCausalLM", _fuse_experts(".experts.switch_glu.", ".experts."),
                          _args("head_dim", "global_head_dim", "num_global_key_value_heads", "rope_parameters",
                                "sliding_window", "layer_types", "final_logit_softcapping", "use_double_wide_mlp",
                                "num_kv_shared_layers", "hidden_size_per_layer_input", "vocab_size_per_layer_input",
                                "attention_k_eq_v", "enable_moe_block", "num_experts", "top_k_experts",
                                "moe_intermediate_size", "rms_norm_eps", "max_position_embeddings",
                                hidden_activation="gelu_pytorch_tanh")),
}
assert set(HF_NAMED) == set(HF_EXPORTS)


# --------------------------------------------------------------------------- gguf + Modelfile

def _check_quant(fmt: str, quant: str | None) -> str:
    """The --quant to write: checked against --format before anything loads."""
    from .gguf_quantize import QUANTS

    if quant is None:
        return "q4_k_m" if fmt == "ollama" else "f16"
    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    if fmt not in GGUF_FORMATS and quant != "f16":
        raise UserError(f"--quant {quant} applies to --format gguf and ollama, not {fmt}; "
                        "drop --quant or pass --format gguf")
    return quant


def write_gguf(out: Path, loaded, config: dict, quant: str = "f16", system: str | None = None) -> None:
    """model.gguf (`quant`: f16 keeps the export's dtype; the others are llama.cpp's file types, each
    tensor quantized by gguf_quantize as llama-quantize would) and an Ollama Modelfile."""
    import gguf
    import numpy as np

    from .gguf_quantize import quantize, tensor_types

    tensors = list(_gguf_tensors(loaded.model, config))
    hparams = gguf_hparams(config, {name: array.shape for name, array, _ in tensors})
    path = out / "model.gguf"
    writer = gguf.GGUFWriter(str(path), EXPORTS[config["model_type"]].arch)
    _add_hyperparameters(writer, config, hparams, quant)
    for key, value, vtype in _tokenizer_fields(loaded, config):
        writer.add_key_value(key, value, vtype)
    types = (tensor_types([(name, array.shape) for name, array, _ in tensors], quant, hparams["block_count"],
                          hparams.get("expert_count", 0)) if quant != "f16" else {})
    for name, array, raw_dtype in tensors:
        # F32/F16 from tensor_types (norms, routers; a row no block divides) keep the export's float dtype
        gtype = types.get(name)
        if gtype not in (None, "F32", "F16"):
            if raw_dtype == gguf.GGMLQuantizationType.BF16:  # raw bfloat16 words -> float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            array, raw_dtype = quantize(array, gtype), gguf.GGMLQuantizationType[gtype]
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (out / "Modelfile").write_text(modelfile(loaded.tokenizer, "./model.gguf", system))


def _add_hyperparameters(w, config: dict, hparams: dict, quant: str = "f16") -> None:
    """The architecture's metadata (gguf_arch.gguf_hparams: GGUFWriter.add_<key> -> value), RoPE
    scaling, the file type."""
    import gguf

    from .gguf_arch import add_rope_scaling

    w.add_name(str(config.get("_name_or_path", "steadytune export")).split("/")[-1])
    for key, value in hparams.items():
        getattr(w, f"add_{key}")(value)
    add_rope_scaling(w, text_config(config))  # linear / yarn as metadata, llama3 / longrope as factor tensors
    dtype = config.get("torch_dtype")
    if quant != "f16":
        from .gguf_quantize import FILE_TYPES

        w.add_file_type(gguf.LlamaFileType[FILE_TYPES[quant][0]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        return
    w.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}
                    .get(dtype, gguf.LlamaFileType.MOSTLY_F16))


def _gguf_tensors(model, config: dict):
    """(GGUF name, numpy array, raw GGML type or None) for every weight, named and laid out as
    llama.cpp's converter writes them (gguf_arch.EXPORTS): q/k rows in llama.cpp's order where its
    RoPE rotates adjacent pairs, 1 + w for gemma's norms, short-convolution taps as a matrix."""
    import gguf
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from .gguf_arch import ALWAYS_F32, TRANSFORMS, gguf_tensor_parts, permute_rows, stacked

    spec = EXPORTS[config["model_type"]]
    c = text_config(config)
    heads = {"attn_q": c["num_attention_heads"], "attn_k": c.get("num_key_value_heads") or c["num_attention_heads"]}
    for name, value in stacked(spec, tree_flatten(model.parameters())):  # gemma3n's AltUp lists: one tensor
        if not name.startswith(spec.prefix):
            raise UserError(f"--format gguf: {name} is not part of the text model llama.cpp's {spec.arch} "
                            "reads, so nothing was written; use --format mlx")
        name = name[len(spec.prefix):]
        if name == "lm_head.weight" and c.get("tie_word_embeddings"):
            continue
        for gname, kind, value in gguf_tensor_parts(spec, name, value):  # one, or a fused matrix's parts
            if spec.permuted_qk and kind in heads:
                # llama.cpp rotates adjacent pairs, so each head's rows go back to its interleaved order
                value = mx.take(value, permute_rows(value.shape[0], heads[kind]), axis=0)
            if spec.norm_offset and gname.endswith("norm.weight"):
                value = value.astype(mx.float32) + spec.norm_offset
            if kind in TRANSFORMS:
                value = TRANSFORMS[kind](value, c)
            # F32 as the converter writes them: 1-D tensors, norms, biases, routers, convolution taps, SSM A/D
            f32 = (value.ndim == 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight")
                   or kind in ALWAYS_F32)
            if f32 or value.dtype == mx.float32:
                yield gname, np.array(value.astype(mx.float32)), None
            elif value.dtype == mx.bfloat16:  # numpy has no bfloat16: hand over the raw 16-bit words
                yield gname, np.array(value.view(mx.uint16)), gguf.GGMLQuantizationType.BF16
            else:
                yield gname, np.array(value.astype(mx.float16)), None


def _tokenizer_fields(loaded, config: dict):
    """(key, value, GGUF type) of the tokenizer: copied from a GGUF base, else built from tokenizer.json:
    byte-level BPE as "gpt2" (merges), SentencePiece-style BPE (byte fallback) as "llama" (scores)."""
    import gguf

    from .gguf import check_gguf_header

    T = gguf.GGUFValueType
    if loaded.kind == "gguf":
        meta = check_gguf_header(loaded.source).metadata
        for key, value in meta.items():
            if key.startswith("tokenizer."):
                yield key, value, _value_type(value)
        return
    tok = loaded.tokenizer
    spec = json.loads(tok.backend_tokenizer.to_str())
    model, pre = spec.get("model", {}), _pre_name(spec.get("pre_tokenizer"))
    vocab = tok.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(max(text_config(config)["vocab_size"], len(vocab)))]
    for t, i in vocab.items():
        tokens[i] = t
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    if model.get("type") != "BPE" or (pre is None and not model.get("byte_fallback")):
        raise UserError(_not_written(loaded, spec, config))
    if pre is None:  # SentencePiece-style: byte fallback instead of a byte-level alphabet
        space = _space_prefix(spec, vocab)
        if space is None:
            raise UserError(_not_written(loaded, spec, config))
        yield from _spm_fields(tok, model, tokens, vocab, added, space)
    else:
        types = [3 if t in added and added[t]["special"] else 4 if t in added else 1 if t in vocab else 5
                 for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        yield "tokenizer.ggml.model", "gpt2", T.STRING
        yield "tokenizer.ggml.pre", pre, T.STRING
        yield "tokenizer.ggml.tokens", tokens, T.ARRAY
        yield "tokenizer.ggml.token_type", types, T.ARRAY
        yield "tokenizer.ggml.merges", merges, T.ARRAY
        yield "tokenizer.ggml.add_bos_token", bool(getattr(tok, "add_bos_token", False)), T.BOOL
    for key, token in (("bos", tok.bos_token), ("eos", tok.eos_token), ("unknown", tok.unk_token),
                       ("padding", tok.pad_token)):
        if token in vocab:
            yield f"tokenizer.ggml.{key}_token_id", vocab[token], T.UINT32
    if tok.chat_template:
        yield "tokenizer.chat_template", tok.chat_template, T.STRING


def _not_written(loaded, spec: dict, config: dict) -> str:
    """The one-line refusal, naming the tokenizer's parts that steadytune does not write to GGUF."""
    model = spec.get("model") or {}
    parts = [f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"]
    for key, inner in (("normalizer", "normalizers"), ("pre_tokenizer", "pretokenizers")):
        steps = [s.get("type") for s in _steps(spec.get(key), inner)]
        parts.append(f"{key.replace('_', '-')} {'+'.join(map(str, steps)) or 'none'}")
    where = Path(loaded.source) / "tokenizer.json" if loaded.kind == "folder" else loaded.source
    return (f"--format gguf: {where}: this tokenizer ({', '.join(parts)}) is not one steadytune writes to "
            f"GGUF (byte-level BPE and SentencePiece-style BPE are); "
            f"{instead(config.get('model_type'), 'gguf')}")


def _steps(part: dict | None, key: str) -> list[dict]:
    """The steps of a normalizer or pre-tokenizer, a Sequence flattened one level."""
    if not part:
        return []
    return list(part.get(key) or []) if part.get("type") == "Sequence" else [part]


_SPACE_TO_META = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
_PREPEND_META = {"type": "Prepend", "prepend": "▁"}
_META_NORMALIZERS = ([_SPACE_TO_META], [_PREPEND_META, _SPACE_TO_META], [_SPACE_TO_META, _PREPEND_META])


def _space_prefix(spec: dict, vocab: dict) -> bool | None:
    """tokenizer.ggml.add_space_prefix for a SentencePiece-style tokenizer.json, or None where its
    normalizer / pre-tokenizer is not what llama.cpp's "llama" tokenizer does (spaces become "▁",
    optionally one "▁" before each piece of text, nothing else)."""
    norm = _steps(spec.get("normalizer"), "normalizers")
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    if not pre and norm in _META_NORMALIZERS:
        return _PREPEND_META in norm  # the Llama 2 / TinyLlama layout (and Gemma's, without the prefix)
    if norm or len(pre) != 1 or pre[0].get("type") != "Metaspace" or pre[0].get("replacement") != "▁":
        return None
    # Metaspace(split=True) cuts the text before every "▁"; the "llama" tokenizer does not, which is
    # the same only while no token has a "▁" past its first character.
    if pre[0].get("split", True) and any("▁" in t[1:] for t in vocab):
        return None
    scheme = pre[0].get("prepend_scheme") or ("always" if pre[0].get("add_prefix_space", True) else "never")
    # llama.cpp prefixes every piece of text, also one after a special token ("first" does not) or one
    # that starts with a space (Metaspace does not): there the GGUF gives one more "▁" (docs/export.md).
    return scheme != "never"


def spm_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """tokenizer.ggml.scores that give a BPE tokenizer.json's merges back: -(rank of the first merge
    that makes the token); tokens no merge makes (characters, bytes, special tokens) score below all.

    Why the tokenization is the same: HF's BPE merges the adjacent pair of lowest rank first (leftmost
    on ties); llama.cpp's SPM tokenizer merges the adjacent pair whose concatenation is a token of the
    highest score first (leftmost on ties), and steadytune's reader (gguf.spm_merges) ranks every split
    of a token by the token's score. Highest score is lowest rank, so the merges come in the same order.
    Both also merge a split that the list does not name (a token "abc" made from "ab"+"c" can then
    come from "a"+"bc"); transformers' converter writes every split of a SentencePiece vocabulary
    (Llama, Mistral, Gemma), so for those nothing is added. Ranks stay exact in float32 below 2**24.
    """
    rank = {}
    for k, (left, right) in enumerate(merges):
        rank.setdefault(left + right, k)
    return [-float(rank[t]) if t in rank else -float(len(merges)) for t in tokens]


def _spm_types(tokens: list[str], vocab: dict, added: dict, unk: str | None) -> list[int]:
    """llama.cpp's token type of each token, as its converter assigns them for a SentencePiece vocabulary."""
    import re

    from gguf import TokenType

    def kind(t):
        if t == unk:
            return TokenType.UNKNOWN
        if t in added:
            return TokenType.CONTROL if added[t].get("special") else TokenType.USER_DEFINED
        if t not in vocab:
            return TokenType.UNUSED  # a row of the embedding past the tokenizer's vocabulary
        return TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) else TokenType.NORMAL

    return [int(kind(t)) for t in tokens]


def _adds_bos_eos(backend, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, from what the tokenizer does (its post-processor) rather than an
    add_bos_token attribute that only some tokenizer classes have."""
    full = backend.encode("x").ids
    plain = backend.encode("x", add_special_tokens=False).ids
    return (bos is not None and full[:1] == [bos] and plain[:1] != [bos],
            eos is not None and full[-1:] == [eos] and plain[-1:] != [eos])


def _spm_fields(tok, model: dict, tokens: list[str], vocab: dict, added: dict, space: bool):
    """The "llama" (SentencePiece) GGUF tokenizer of a BPE tokenizer.json with byte fallback."""
    import gguf

    T = gguf.GGUFValueType
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    bos, eos = (vocab.get(t) if t else None for t in (tok.bos_token, tok.eos_token))
    add_bos, add_eos = _adds_bos_eos(tok.backend_tokenizer, bos, eos)
    yield "tokenizer.ggml.model", "llama", T.STRING
    yield "tokenizer.ggml.tokens", tokens, T.ARRAY
    yield "tokenizer.ggml.scores", spm_scores(tokens, merges), T.ARRAY
    yield "tokenizer.ggml.token_type", _spm_types(tokens, vocab, added, tok.unk_token), T.ARRAY
    yield "tokenizer.ggml.add_bos_token", add_bos, T.BOOL
    yield "tokenizer.ggml.add_eos_token", add_eos, T.BOOL
    yield "tokenizer.ggml.add_space_prefix", space, T.BOOL


def _value_type(value):
    import gguf

    T = gguf.GGUFValueType
    if isinstance(value, bool):
        return T.BOOL
    if isinstance(value, int):
        return T.UINT32 if 0 <= value < 1 << 32 else T.INT64
    if isinstance(value, float):
        return T.FLOAT32
    if isinstance(value, str):
        return T.STRING
    return T.ARRAY


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level pre-tokenizer, or None if unknown."""
    from .gguf import PRE_SPLITS

    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return next((name for name, r in PRE_SPLITS.items() if r == regex), None)
    return None


# Chat formats Ollama's Go templates can express, recognised by how the model's template renders a
# probe: (with a system message, without one, the Go template). {s}/{u}: the system / user text.
_GEMMA_GO = ('{{- $system := "" }}{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
             '{{- if eq .Role "system" }}{{- $system = .Content }}'
             '{{- else if eq .Role "user" }}<start_of_turn>user\n{{ if $system }}{{ $system }}\n\n'
             '{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}'
             '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
             '{{ if not $last }}<end_of_turn>\n{{ end }}{{- end }}{{- end }}')
_OLLAMA_TEMPLATES = {
    "chatml": ("<|im_start|>system\n{s}<|im_end|>\n<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n",
               '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n'
               '{{ .Content }}<|im_end|>\n{{ end }}{{- end }}<|im_start|>assistant\n'),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\n{u}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
               "<|start_header_id|>user<|end_header_id|>\n\n{u}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               '{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
               '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}'
               '<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{- end }}'
               '<|start_header_id|>assistant<|end_header_id|>\n\n'),
    # Mistral v0.3 / Nemo: the system text goes into the last user turn, as Ollama's mistral template does
    "mistral": ("[INST] {s}\n\n{u}[/INST]", "[INST] {u}[/INST]",
                '{{- range $i, $_ := .Messages }}{{- if eq .Role "user" }}'
                '{{- if and (eq (len (slice $.Messages $i)) 1) $.System }}'
                '[INST] {{ $.System }}\n\n{{ .Content }}[/INST]'
                '{{- else }}[INST] {{ .Content }}[/INST]{{- end }}'
                '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}'),
    # Gemma 2/3: no system turn; Gemma 3 puts the system text before the first user message
    "gemma": ("<start_of_turn>user\n{s}\n\n{u}<end_of_turn>\n<start_of_turn>model\n",
              "<start_of_turn>user\n{u}<end_of_turn>\n<start_of_turn>model\n", _GEMMA_GO),
}
_BOS_SLACK = len("<|begin_of_text|>")  # what a template may put before the probe's first turn


def modelfile(tokenizer, gguf_file: str, system: str | None = None) -> str:
    """An Ollama Modelfile: FROM, the chat TEMPLATE (ChatML, Llama 3, Mistral, Gemma), SYSTEM (the
    run's data's system prompt if every training example had the same one, else the template's
    default one), a PARAMETER stop for every end-of-turn token."""
    lines = [f"FROM {gguf_file}"]
    _, template, default, has_system = _ollama_template(tokenizer)
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not ChatML, Llama 3, Mistral or Gemma; Ollama uses "
                     "the one stored in the GGUF (the model's own) if it knows it")
    system = system or default
    if system and template and not has_system:
        lines.append(f"# no SYSTEM: this model's chat template has no system turn (the data's was {system!r})")
    elif system:
        lines.append(f'SYSTEM """{system}"""')
    for token in tokenizer.convert_ids_to_tokens(sorted(tokenizer.eos_token_ids)):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    return "\n".join(lines) + "\n"


def _ollama_template(tokenizer) -> tuple[str | None, str | None, str | None, bool]:
    """(family, Go template, the template's default system prompt, whether it has a system turn)."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None, None, False

    def render(messages):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # a template may refuse a system message
            return ""

    probe = render([{"role": "system", "content": "SYS"}, {"role": "user", "content": "USR"}])
    bare = render([{"role": "user", "content": "USR"}])
    for family, (with_system, without, go_template) in _OLLAMA_TEMPLATES.items():
        body = with_system.format(s="SYS", u="USR")
        if probe.endswith(body) and len(probe) - len(body) <= _BOS_SLACK:
            # A template that writes a system turn of its own when given none: that text is the SYSTEM.
            head, after = with_system.split("{s}")
            tail = after.split("{u}")[0]
            i = bare.find(head)
            j = bare.find(tail, i + len(head)) if i >= 0 else -1
            return family, go_template, (bare[i + len(head):j] or None) if j > i else None, True
        plain = without.format(u="USR")
        if not probe and bare.endswith(plain) and len(bare) - len(plain) <= _BOS_SLACK:
            return family, go_template, None, False
    return None, None, None, False


def data_system(run) -> str | None:
    """The system prompt every training example of RUN's data starts with, if they all share one
    (read from the data path in RUN/config.yaml; None when the data is not there or varies)."""
    import yaml

    from .data import load_splits

    folder = Path(run) if (Path(run) / "config.yaml").exists() else Path(run).parent  # RUN or RUN/adapters
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        splits = load_splits(cfg["data"]["path"], valid_fraction=0)
    except Exception:  # the data moved or the run has no config: the Modelfile goes without
        return None
    systems = {ex.messages[0]["content"] if ex.messages and ex.messages[0].get("role") == "system" else None
               for ex in splits.train}
    return systems.pop() if len(systems) == 1 and None not in systems else None


# --------------------------------------------------------------------------- adapters as a LoRA GGUF

def write_gguf_lora(out: Path, loaded, config: dict) -> None:
    """adapter.gguf: the run's LoRA adapters as llama.cpp's convert_lora_to_gguf.py writes them
    (general.type = adapter, adapter.type = lora, adapter.lora.alpha; blk.N.attn_q.weight.lora_a
    (rank x in) and .lora_b (out x rank)), for `llama-cli -m BASE.gguf --lora adapter.gguf` or
    Ollama's ADAPTER. llama.cpp scales B·A by alpha / rank, so alpha = mlx-lm's scale * rank."""
    import gguf
    import mlx.core as mx
    import numpy as np

    from .gguf import ARCHS, TOP_NAMES, permute_rows

    spec = ARCHS[GGUF_ARCH[config["model_type"]]]
    top = {v: k for k, v in TOP_NAMES.items()}
    block = {v: k for k, v in spec.blocks.items()}
    heads = {"attn_q": config["num_attention_heads"],
             "attn_k": config.get("num_key_value_heads") or config["num_attention_heads"]}
    tensors, scales = [], set()
    for path, module in loaded.model.named_modules():
        if not hasattr(module, "lora_a"):
            continue
        if hasattr(module, "m") or not hasattr(module, "linear"):
            kind = "DoRA" if hasattr(module, "m") else type(module).__name__
            raise UserError(f"--format gguf-lora: {path} is a {kind} adapter, which llama.cpp's LoRA GGUF "
                            "cannot hold; use --format gguf (fused) instead")
        if path.startswith("model.layers."):
            _, _, i, rest = path.split(".", 3)
            short, name = block[rest], f"blk.{i}.{block[rest]}.weight"
        else:
            short = top[path]
            name = f"{short}.weight"
        a = np.array(module.lora_a.astype(mx.float32)).T            # (rank, in)
        b = np.array(module.lora_b.astype(mx.float32)).T            # (out, rank)
        if spec.permuted_qk and short in heads:  # the base's rows are in llama.cpp's order, so B's are too
            b = b[np.array(permute_rows(b.shape[0], heads[short]))]
        tensors += [(f"{name}.lora_a", np.ascontiguousarray(a)), (f"{name}.lora_b", np.ascontiguousarray(b))]
        scales.add(float(module.scale) * a.shape[0])
    if not tensors:
        raise UserError("--format gguf-lora: the run's adapters hold no LoRA layers")
    if len(scales) != 1:
        raise UserError(f"--format gguf-lora: the layers' scales differ ({sorted(scales)}); llama.cpp's "
                        "LoRA GGUF has one alpha; use --format gguf (fused) instead")
    writer = gguf.GGUFWriter(str(out / "adapter.gguf"), GGUF_ARCH[config["model_type"]])
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", scales.pop())
    writer.add_name(str(config.get("_name_or_path", "steadytune adapter")).split("/")[-1])
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


WRITERS = {"mlx": write_mlx, "hf": write_hf, "gguf": write_gguf, "ollama": write_gguf,
           "gguf-lora": write_gguf_lora}
