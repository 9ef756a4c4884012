"""Loading a tuned model (base + adapters of a run) and answering prompts with mlx-lm's generator.

Fast generation on the CPU (`load_tuned(..., inference=True)`, used by generate, chat, serve and the
demo; a server answering several requests at once keeps the batched float32 copy): decoding reads every weight once per token. MLX's CPU quantized matmul runs at about
1 GMAC/s, so the model answers through steadytune's compiled CPU decoder (cpu_decode.py), which
reads the 4-bit weights with SIMD code, adapters applied as low-rank products. Where it does not
cover the model (another family, no C compiler) it answers from a float32 copy with the adapters
fused in (`inference_copy`), with OpenBLAS on one thread while decoding (its idle second thread
spins in sched_yield between the per-token matmuls, taking the core the other thread needs).
Measured in bench/generation_speed.py, results in bench/RESULTS.md. On a GPU the quantized model
stays: there the quantized kernels read a quarter of the bytes, which is what decoding waits on.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import DataConfig, ModelConfig, load_yaml
from .data import prompt_ids, raw_text_ids, use_chat_template
from .errors import UserError
from .model import LoadedModel, load_base


def adapter_dir(run: str | Path) -> Path:
    """A run folder's adapters (or an adapter folder itself)."""
    p = Path(run)
    for cand in (p / "adapters", p):
        if (cand / "adapter_config.json").is_file() and (cand / "adapters.safetensors").is_file():
            return cand
    raise UserError(f"{p}: no adapters found (expected adapters/adapters.safetensors and "
                    "adapter_config.json); pass a run folder of steadytune train")


def _run_section(run: str | Path, section: str, cls):
    """A section of a run's config.yaml as `cls` (its defaults where the run has no config)."""
    run = Path(run)
    for cand in (run / "steadytune-config.yaml", run / "config.yaml", run.parent / "steadytune-config.yaml",
                 run.parent / "config.yaml"):  # steadytune-config.yaml: the user's config.yaml was in --out
        if cand.is_file():
            tree = load_yaml(cand)
            return cls(**{k: v for k, v in (tree.get(section) or {}).items() if k in cls.__dataclass_fields__})
    return cls()


def run_model_config(run: str | Path) -> ModelConfig:
    """The model section of a run's config.yaml (which base the adapters belong to)."""
    return _run_section(run, "model", ModelConfig)


def load_tuned(run: str | Path | None, model: str | None = None, dtype: str = "auto",
               inference: bool = False, batched: bool = False) -> LoadedModel:
    """Base model (from `model`, else the run's config) with the run's adapters applied. With
    `inference`, the model is made fast to answer with (answering_model; it cannot train any more)
    and a line on stderr says which mode runs; `batched`: for several sequences at once (the server)."""
    from mlx_lm.tuner.utils import load_adapters

    mcfg = run_model_config(run) if run else ModelConfig()
    if model:
        mcfg.path = model
    mcfg.dtype = dtype
    loaded = load_base(mcfg)
    if run:
        use_chat_template(loaded.tokenizer, _run_section(run, "data", DataConfig))  # the run's --chat-template
        adir = adapter_dir(run)
        try:
            load_adapters(loaded.model, str(adir))
        except (ValueError, KeyError, AttributeError, TypeError, RuntimeError, json.JSONDecodeError) as e:
            raise UserError(f"{adir}: adapters do not fit this model ({str(e).splitlines()[0]}); "
                            "pass the --model the run was trained on") from None
    loaded.model.eval()
    mx.eval(loaded.model.parameters())  # lazy adapter weights fail if first used from another thread
    if inference:
        loaded.model, mode = answering_model(loaded.model, batched=batched)
        print(f"(answering with {mode})", file=sys.stderr, flush=True)
    return loaded


def answering_model(model, available_bytes: int | None = None, batched: bool = False):
    """(model to answer with, the mode in words). On the CPU: the compiled decoder where it covers
    the model (STEADYTUNE_CPU_DECODER=0 turns it off), else the float32 copy (inference_copy).
    `batched` keeps the float32 copy: the decoder answers one sequence at a time, and a server
    that answers several clients at once must not make a short answer wait for a long one."""
    from .backend import device_kind

    why = ""
    if batched and device_kind() == "cpu":
        why = "; answering several requests at once (--concurrency 1 answers through the compiled decoder)"
    elif device_kind() == "cpu" and os.environ.get("STEADYTUNE_CPU_DECODER", "1") != "0":
        from .cpu_decode import CpuDecoder, Unsupported

        try:
            dec = CpuDecoder(model)
            return dec, dec.describe()
        except Unsupported as e:
            why = f"; the compiled decoder does not cover it: {e}"
    return model, inference_copy(model, available_bytes) + why


def inference_copy(model, available_bytes: int | None = None) -> str:
    """On the CPU, replace the quantized layers of `model` by float ones in place, with LoRA
    adapters fused into them, when the float weights take at most half the free memory. Greedy
    answers stay the same: the float weights are the exact dequantized values (the matmul sums
    them in another order). Returns the mode, in words."""
    from .backend import device_kind

    quantized = {n: m for n, m in model.named_modules() if hasattr(m, "scales")}
    if not quantized:
        return "the model's own float weights"
    if device_kind() != "cpu":
        if device_kind() == "cuda":
            from .qlora import rows_layout

            rows_layout(model)  # several requests decode together: one matrix of rows per product
        return "quantized weights (GPU: its quantized kernels decode faster than float weights)"
    extra = sum(float_bytes(m) for m in quantized.values())
    free = available_bytes if available_bytes is not None else available_memory()
    if free and extra > free / 2:
        return (f"quantized weights (a float32 copy needs {extra / 1e9:.1f} GB, "
                f"{free / 1e9:.1f} GB free)")
    _replace_quantized(model)
    mx.eval(model.parameters())
    return f"a float32 copy of the weights, adapters fused ({extra / 1e6:,.0f} MB)"


def float_bytes(layer) -> int:
    """Bytes of a quantized layer's weight as floats of its scales' dtype."""
    packed = layer.weight.shape[-1]  # uint32 words of 32 // bits values each
    return layer.weight.size // packed * (packed * 32 // layer.bits) * layer.scales.itemsize


def _dequantized(layer):
    return mx.dequantize(layer.weight, layer.scales, getattr(layer, "biases", None),
                         group_size=layer.group_size, bits=layer.bits,
                         **({"mode": layer.mode} if hasattr(layer, "mode") else {}))


def _replace_quantized(model) -> None:
    from mlx.utils import tree_unflatten

    modules = model.named_modules()
    lora = {name for name, m in modules if hasattr(m, "lora_a") and hasattr(m, "fuse")}
    new = []
    for name, m in modules:
        if any(name.startswith(d + ".") for d in lora):
            continue  # inside a LoRA layer, which is fused as a whole
        if name in lora:
            new.append((name, m.fuse(dequantize=True)))
        elif isinstance(m, nn.QuantizedLinear):
            layer = nn.Linear(1, 1, bias="bias" in m)
            layer.weight = _dequantized(m)
            if "bias" in m:
                layer.bias = m.bias
            new.append((name, layer))
        elif isinstance(m, nn.QuantizedEmbedding):
            layer = nn.Embedding(1, 1)
            layer.weight = _dequantized(m)
            new.append((name, layer))
    model.update_modules(tree_unflatten(new))
    model.freeze()


def available_memory() -> int:
    """Bytes of memory free for a new allocation (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


@contextlib.contextmanager
def one_blas_thread():
    """OpenBLAS (the fast BLAS on Linux) with one thread while decoding, restored afterwards."""
    from .backend import fast_blas

    lib = None
    if fast_blas() and "openblas" in fast_blas():
        try:
            lib = ctypes.CDLL(fast_blas().split(":")[0])
            before = lib.openblas_get_num_threads()
            lib.openblas_set_num_threads(1)
        except (OSError, AttributeError):
            lib = None
    try:
        yield
    finally:
        if lib is not None:
            lib.openblas_set_num_threads(before)


def to_messages(prompt: str | list | None = None, system: str | None = None) -> list[dict]:
    if isinstance(prompt, list):
        return prompt
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt or ""}]


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt tokens through the chat template (plain text when the tokenizer has none): the ids
    training gave the same prompt (data.prompt_ids)."""
    return prompt_ids(tokenizer, messages)


def generate(loaded: LoadedModel, messages: list[dict] | str, max_tokens: int = 256,
             temperature: float = 0.0, stream: bool = False):
    """Greedy by default. With stream=True, yields text pieces; otherwise returns the answer."""
    from mlx_lm.sample_utils import make_sampler

    tokens = render_prompt(loaded.tokenizer, to_messages(messages))
    pieces = stream_text(loaded.model, loaded.tokenizer, tokens, max_tokens, make_sampler(temp=temperature))
    return pieces if stream else "".join(pieces)


def answer_all(loaded: LoadedModel, conversations: list, max_tokens: int = 256) -> list[str]:
    """Greedy answers to several conversations. On the compiled CPU decoder, one after another
    (the demo's four questions: 2.6-3.8 s on 2 cores). Otherwise at once (mlx-lm's batch_generate,
    one BLAS thread; its text may start with a space where generate's does not): one decode step
    reads the weights once for every row; on the float32 copy 11 s instead of 39-40 s one by one,
    the same answers (bench/RESULTS.md)."""
    from mlx_lm.generate import batch_generate

    from .cpu_decode import CpuDecoder

    from .grpo import batch_problem

    prompts = [render_prompt(loaded.tokenizer, to_messages(c)) for c in conversations]
    tok = loaded.tokenizer
    # one sequence at a time on the compiled decoder (each is fast on its own), and where mlx-lm
    # cannot decode the model in a batch (gemma2's rows would get each other's padding)
    if isinstance(loaded.model, CpuDecoder) or len(prompts) == 1 or batch_problem(
            loaded.model, set(getattr(tok, "eos_token_ids", None) or [tok.eos_token_id])):
        return ["".join(stream_text(loaded.model, tok, p, max_tokens)) for p in prompts]
    with one_blas_thread():
        return batch_generate(loaded.model, loaded.tokenizer, prompts, max_tokens=max_tokens).texts


def stream_text(model, tokenizer, tokens: list[int], max_tokens: int, sampler=None):
    """Text pieces of the answer to prompt `tokens` (mlx-lm's stream_generate, which computes the
    next token while this one is detokenized), with one BLAS thread."""
    from mlx_lm.generate import stream_generate

    with one_blas_thread():
        for r in stream_generate(model, tokenizer, tokens, max_tokens=max_tokens, sampler=sampler):
            yield r.text


def complete(model, tokenizer, prompt: str, max_tokens: int = 64, stop: str | None = None) -> str:
    """Greedy raw-text continuation of `prompt` (no chat template), cut at `stop`."""
    out = ""
    for text in stream_text(model, tokenizer, raw_text_ids(tokenizer, prompt), max_tokens):
        out += text
        if stop and stop in out:
            return out.split(stop)[0]
    return out
