"""The error re-quantizing a K-quant GGUF adds (bench, not a test).

The default model (SmolLM2-135M-Instruct, shipped as Q4_1) is written again as a file like
llama.cpp's Q4_K_M makes of it: ffn_down in Q4_K, every matrix whose rows (576 values) are not whole
256-value super-blocks in Q5_0, llama.cpp's fallback for those. That file is loaded four ways:
dequantized to float32 (the anchor), and as steadytune loads it with --quantize 4 (group 64, the
default, and 32) and --quantize 8: Q4_K repacked exactly at 4 bits, Q5_0 re-quantized to 8 bits.
For each: the KL divergence of the next-token distributions from the anchor, in nats, averaged
over every position of a few chat prompts, and how often the most likely next token is the
anchor's. For scale: the file's own quantization error (shipped Q4_1 -> this file), and every
matrix re-quantized to 4-bit group 64, what loading did before the rules of tensor_plan.

    python bench/gguf_requant.py
"""

import sys
import tempfile
from pathlib import Path

import steadytune  # noqa: F401  (fast BLAS before mlx)
import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from steadytune.export import _value_type
from steadytune.gguf import check_gguf_header, load_gguf
from steadytune.gguf_quants import dequantize
from steadytune.model import default_model_path

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a hash table is in two sentences.", "List three prime numbers greater than 50.",
           "Translate 'good morning' into Spanish and German.", "Why is the sky blue?"]


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Plain round-to-nearest Q4_K (no search for the best scales, unlike llama-quantize):
    (n, 256) float32 -> (n, 144) bytes."""
    n = len(x)
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0)
    step = (sub.max(-1) - lo) / 15
    d = (step.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (-lo.min(-1, keepdims=True) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.nan_to_num(np.clip(np.rint(step / d.astype(np.float32)), 0, 63)).astype(np.uint8)
        mn = np.nan_to_num(np.clip(np.rint(-lo / dmin.astype(np.float32)), 0, 63)).astype(np.uint8)
        scale = (d.astype(np.float32) * sc)[..., None]
        q = np.nan_to_num(np.clip(np.rint((sub + (dmin.astype(np.float32) * mn)[..., None]) / scale), 0, 15))
    q = q.astype(np.uint8)
    packed = np.empty((n, 12), np.uint8)  # get_scale_min_k4 in reverse
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)  # sub-blocks 2c, 2c+1 share 32 bytes
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed, qs], axis=1)


def write_q4_k_m_like(src: Path, dst: Path) -> dict:
    header = check_gguf_header(src)
    mm = np.memmap(src, dtype=np.uint8, mode="r")
    w = gguf.GGUFWriter(str(dst), header.metadata["general.architecture"])
    for key, value in header.metadata.items():
        if not key.startswith(("general.architecture", "general.alignment", "general.file_type")):
            w.add_key_value(key, value, _value_type(value))
    types = {}
    for name, (gtype, shape) in header.tensors.items():
        start, nbytes = header.data[name]
        x = dequantize(mm[start:start + nbytes], gtype, shape)
        if x.ndim == 1:
            w.add_tensor(name, x)
            continue
        qtype = gguf.GGMLQuantizationType.Q4_K if x.shape[1] % 256 == 0 else gguf.GGMLQuantizationType.Q5_0
        raw = (quantize_q4_k(x.reshape(-1, 256)).reshape(x.shape[0], -1) if qtype.name == "Q4_K"
               else gguf.quants.quantize(x, qtype))
        w.add_tensor(name, raw, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def next_token_logprobs(model, ids):
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def compare(anchor, model, prompts) -> tuple[float, float]:
    kl, agree, n = 0.0, 0, 0
    for ids in prompts:
        p, q = next_token_logprobs(anchor, ids), next_token_logprobs(model, ids)
        kl += (mx.exp(p) * (p - q)).sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        n += len(ids)
    return kl / n, agree / n


def main():
    src = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smollm2-135m-q4_k_m-like.gguf"
        types = write_q4_k_m_like(src, path)
        print(f"wrote {path.name}: " + ", ".join(f"{n} {t}" for t, n in types.items()), file=sys.stderr)
        anchor, tok, _ = load_gguf(str(path), bits=None)
        shipped, _, _ = load_gguf(str(src))
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in PROMPTS]
        print(f"{len(prompts)} prompts, {sum(map(len, prompts))} positions; KL in nats vs the dequantized file")
        print(f"{'model':<44} {'KL':>10} {'top-1 same':>11}")
        naive, _, _ = load_gguf(str(path), bits=None)
        nn.quantize(naive, group_size=64, bits=4)
        rows = [("shipped Q4_1 file (the file's own error)", shipped),
                ("every matrix re-quantized to 4-bit, group 64", naive)]
        for bits, group in ((4, 64), (4, 32), (8, 64)):
            model, _, _ = load_gguf(str(path), bits=bits, group_size=group)
            rows.append((f"loaded with --quantize {bits} --group-size {group}", model))
        for name, model in rows:
            kl, agree = compare(anchor, model, prompts)
            print(f"{name:<44} {kl:>10.2e} {agree:>10.1%}")


if __name__ == "__main__":
    main()
