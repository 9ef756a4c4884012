"""Predicted vs measured peak memory of QLoRA training steps (the planner's accuracy, issue 6).

    python bench/memory.py          # CPU grid: small llama models, float32 compute (~5 min, 2 cores)
    python bench/memory.py --gpu    # GPU grid: the 7B architecture, bfloat16 compute (one H100)

Each configuration runs in a fresh process (so one run's compiled graphs and allocator cache don't
touch the next): build an mlx-lm llama model from ModelArgs with random weights, cast it to the
compute dtype and quantize it 4-bit g64 exactly as steadytune.model.load_base does, add LoRA with
steadytune.model.apply_lora (and qlora.apply_compute for dequant), then run a few training steps
with the trainer's own compiled functions (Trainer._build_steps: value_and_grad of the masked
cross-entropy, AdamW update, model/optimizer/random state as inputs and outputs), evaluated in
the trainer's order; gradient checkpointing with the trainer's checkpoint_blocks. The measured
number is mx.get_peak_memory() over the steps (the peak is reset after the model is built, so
loading is not part of it); the predicted one is steadytune.plan.estimate(...).peak, the part of
the plan that MLX's allocator sees (framework overhead is outside it). Random weights are fine:
memory does not depend on the values.

Exit status 1 if any prediction is off by more than 15%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 0.15
ALL_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

# name: model shape (mlx-lm llama ModelArgs names) and run settings. CPU models are small enough
# for 2 cores yet have the proportions of real ones (GQA, MLP ~2.7x hidden, a large vocabulary).
SMALL = dict(hidden_size=256, num_hidden_layers=8, intermediate_size=704, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=8192)
MID = dict(hidden_size=512, num_hidden_layers=6, intermediate_size=1408, num_attention_heads=8,
           num_key_value_heads=4, vocab_size=32000)
SMOL = dict(hidden_size=576, num_hidden_layers=6, intermediate_size=1536, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
B7 = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
          num_key_value_heads=8, vocab_size=32000)

GRIDS = {
    "cpu": [
        dict(name="small 4x128", model=SMALL, batch=4, seq=128),
        dict(name="small 4x128 ckpt", model=SMALL, batch=4, seq=128, ckpt=True),
        dict(name="small 1x512", model=SMALL, batch=1, seq=512),
        dict(name="small 2x256 q,v r16 last4", model=SMALL, batch=2, seq=256, rank=16,
             keys=["self_attn.q_proj", "self_attn.v_proj"], lora_layers=4),
        dict(name="mid 2x256", model=MID, batch=2, seq=256),
        dict(name="mid 2x256 ckpt", model=MID, batch=2, seq=256, ckpt=True),
        dict(name="smol-like tied 2x192", model=SMOL, batch=2, seq=192),
        dict(name="smollm2 shape 4x224 dequant", model=dict(SMOL, num_hidden_layers=30), batch=4,
             seq=224, compute="dequant"),
        dict(name="smollm2 shape 4x224 deq ckpt", model=dict(SMOL, num_hidden_layers=30), batch=4,
             seq=224, compute="dequant", ckpt=True),
        dict(name="small 2x128 bf16", model=dict(SMALL, num_hidden_layers=4), batch=2, seq=128,
             dtype="bfloat16"),
        dict(name="small 4x128 dequant", model=SMALL, batch=4, seq=128, compute="dequant"),
        dict(name="mid 2x256 dequant", model=MID, batch=2, seq=256, compute="dequant"),
    ],
    "gpu": [
        dict(name="7B 4x1024", model=B7, batch=4, seq=1024, rank=16),
        dict(name="7B 4x1024 ckpt", model=B7, batch=4, seq=1024, rank=16, ckpt=True),
        dict(name="7B 1x2048", model=B7, batch=1, seq=2048, rank=16),
        dict(name="7B 2x512", model=B7, batch=2, seq=512, rank=16),
        dict(name="7B 2x512 ckpt", model=B7, batch=2, seq=512, rank=16, ckpt=True),
        dict(name="7B 2x1056 (not /128)", model=B7, batch=2, seq=1056, rank=16),
        dict(name="7B 4x1024 dequant", model=B7, batch=4, seq=1024, rank=16, compute="dequant"),
        dict(name="7B 1x2048 dequant ckpt", model=B7, batch=1, seq=2048, rank=16, compute="dequant",
             ckpt=True),
    ],
}


def model_config(spec: dict) -> dict:
    """The spec's model as a config.json-style dict (what the planner reads)."""
    return dict({"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                 "tie_word_embeddings": False}, **spec["model"])


def settings(spec: dict, device: str) -> dict:
    return dict(batch=spec["batch"], seq=spec["seq"], ckpt=spec.get("ckpt", False),
                rank=spec.get("rank", 8), keys=spec.get("keys", ALL_KEYS),
                lora_layers=spec.get("lora_layers", -1), compute=spec.get("compute", "native"),
                chunked_ce=spec.get("chunked_ce", "auto"),
                dtype=spec.get("dtype", "float32" if device == "cpu" else "bfloat16"))


def predict(spec: dict, device: str):
    from steadytune import plan

    s = settings(spec, device)
    arch = plan.arch_from_config(model_config(spec))
    run = plan.Run(batch=s["batch"], seq=s["seq"], checkpoint=s["ckpt"], rank=s["rank"],
                   keys=tuple(s["keys"]), lora_layers=s["lora_layers"], bits=4, group_size=64,
                   dtype=s["dtype"], compute=s["compute"], device=device,
                   loss_chunk=plan._loss_chunk(arch, s["chunked_ce"]))
    return plan.estimate(arch, run)


def build(spec: dict, s: dict):
    """The model as the trainer would have it: compute dtype, 4-bit g64 base, LoRA."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    from steadytune.config import LoraConfig
    from steadytune.model import apply_lora

    dtype = getattr(mx, s["dtype"])
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(model_config(spec)))
    model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x)
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0)
    for layer in model.layers:  # one block at a time: never the whole float model at once
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    model.freeze()
    apply_lora(model, LoraConfig(rank=s["rank"], target_modules=list(s["keys"]),
                                 num_layers=s["lora_layers"]), seed=0)
    from steadytune.qlora import apply_compute, set_loss_chunking

    apply_compute(model, s["compute"])
    set_loss_chunking(model, s["chunked_ce"])
    return model


def measure(spec: dict, device: str, steps: int) -> dict:
    """Peak bytes over `steps` optimizer steps, run with the trainer's own compiled functions and
    evaluated in the trainer's order (the order of mx.eval's outputs decides MLX's schedule, and
    with it the peak)."""
    from types import SimpleNamespace

    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from steadytune.batching import pad_batch
    from steadytune.trainer import Trainer, checkpoint_blocks

    if device == "cpu":
        mx.set_default_device(mx.cpu)
    s = settings(spec, device)
    model = build(spec, s)
    if s["ckpt"]:
        checkpoint_blocks(model)
    opt = optim.AdamW(learning_rate=1e-5, weight_decay=0.01)
    opt.init(model.trainable_parameters())
    trainer = SimpleNamespace(model=model, optimizer=opt)
    Trainer._build_steps(trainer)  # sets _grad, _norm, _update and compiled_state, as in training

    rng = np.random.default_rng(0)
    vocab = spec["model"]["vocab_size"]
    ids = [rng.integers(0, vocab, s["seq"] + 1).tolist() for _ in range(s["batch"])]
    masks = [[True] * (s["seq"] + 1) for _ in range(s["batch"])]
    inputs, targets, mask = (mx.array(a) for a in pad_batch(ids, masks))
    scale = mx.array(1.0 / mask.sum().item(), dtype=mx.float32)
    model.train()
    mx.eval(inputs, targets, mask, scale)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for _ in range(steps):  # Trainer.accumulate + train_step for one micro-batch
        part, acc = trainer._grad(inputs, targets, mask, scale, None)
        total = mx.array(0.0) + part
        mx.eval(acc, total)
        norm = trainer._norm(acc)
        mx.eval(norm, total)
        trainer._update(acc, mx.array(1e-5, dtype=mx.float32), mx.array(1.0, dtype=mx.float32))
        mx.eval(trainer.compiled_state)
        del acc
    return {"peak": mx.get_peak_memory(), "base": base, "seconds": time.perf_counter() - tic,
            "width": int(inputs.shape[1])}


def run_one(spec: dict, device: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec), "--device", device, "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{spec['name']}: measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = (f"{'configuration':<28} {'tokens':>6} {'measured GB':>11} {'predicted GB':>12} {'error':>7}  "
            f"{'weights':>7} {'lora+opt':>8} {'activ.':>7} {'logits':>7} {'in-flight':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        b = r["breakdown"]
        lines.append(f"{r['name']:<28} {r['tokens']:>6} {r['measured'] / 1e9:>11.3f} {r['predicted'] / 1e9:>12.3f} "
                     f"{r['error']:>+6.1%}  {b['base_weights'] / 1e9:>7.3f} "
                     f"{(b['lora_weights'] + b['optimizer']) / 1e9:>8.3f} {b['activations'] / 1e9:>7.3f} "
                     f"{b['logits'] / 1e9:>7.3f} {b['in_flight'] / 1e9:>9.3f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="the 7B grid on the GPU (bfloat16)")
    p.add_argument("--steps", type=int, default=3, help="training steps per configuration")
    p.add_argument("--only", help="run the configurations whose name contains this")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    a = p.parse_args()
    import steadytune  # noqa: F401  (fast BLAS before mlx)

    if a.one:
        print(json.dumps(measure(json.loads(a.one), a.device, a.steps)))
        return 0
    device = "cuda" if a.gpu else "cpu"
    if a.gpu:
        import mlx.core as mx

        if mx.default_device() != mx.gpu:
            raise SystemExit("--gpu: MLX has no GPU here (install mlx[cuda] on an NVIDIA machine)")
        if sys.platform == "darwin":
            device = "metal"
    grid = [g for g in GRIDS["gpu" if a.gpu else "cpu"] if not a.only or a.only in g["name"]]
    rows = []
    for spec in grid:
        m = run_one(spec, device, a.steps)
        est = predict(spec, device)
        rows.append({"name": spec["name"], "tokens": spec["batch"] * m["width"], "measured": m["peak"],
                     "predicted": est.peak, "error": est.peak / m["peak"] - 1,
                     "breakdown": est.as_dict(), "seconds": round(m["seconds"], 2)})
        print(f"{spec['name']}: measured {m['peak'] / 1e9:.3f} GB, predicted {est.peak / 1e9:.3f} GB "
              f"({rows[-1]['error']:+.1%})", file=sys.stderr, flush=True)
    print(table(rows))
    worst = max(abs(r["error"]) for r in rows)
    print(f"\n{len(rows)} configurations on {device}; largest error {worst:.1%} "
          f"(tolerance {TOLERANCE:.0%})")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
