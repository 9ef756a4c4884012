"""MoE and hybrid models: steadytune against mlx_lm.lora on the shapes people fine-tune now.

    python bench/moe.py            # GPU: Qwen3-30B-A3B-shaped MoE and Qwen3-Next-80B-A3B-shaped hybrid
    python bench/moe.py --tiny     # CPU: the same families at hidden 64, a few examples (checks the bench)

Models (random weights, 4-bit g64, written once under --work):
- moe: Qwen3-30B-A3B's shape (qwen3_moe: hidden 2048, 32 heads / 4 KV heads of 128, 128 experts of
  768, 8 per token, vocabulary 151,936) with 24 of its 48 layers by default (--moe-layers), so that
  both trainers fit one 80 GB GPU with the 128-expert adapters (rank 8: 211M trainable parameters
  at 24 layers, 16 bytes each with gradients and AdamW's moments) and mlx-lm's float32 adapter inputs.
- hybrid: Qwen3-Next-80B-A3B's shape (qwen3_next: hidden 2048, Gated DeltaNet layers with 16 key /
  32 value heads of 128 and one full-attention layer in 4, 512 experts of 512, 10 per token plus a
  shared expert) with 12 of its 48 layers by default (--hybrid-layers): 45 GB of 4-bit weights at
  full depth would leave too little room for the 512-expert adapters (rank 8: 381M trainable
  parameters at 12 layers).

Data: the alpaca demo (../shared/data/alpaca_en_demo.json) as chat, 949 training examples, one
epoch at batch size 4. Both trainers take 4 examples per optimizer step (steadytune with its
defaults: packed where the family packs, which lays the same examples out in shared rows, and one
example a row where it does not, as the hybrid's recurrent layers need), each in its own process, adapters on what each
adapts by default (steadytune: every linear layer but the routers; mlx_lm.lora: every linear layer)
at rank 8. Per row: median tokens/s over steps 4 and later (each trainer's own report), examples per
minute of wall from the process's start to its last step's line (every output line is time-stamped
as it arrives: the one rate defined for a trainer that never reaches a steady step, as mlx_lm.lora
on the hybrid on a GPU), peak memory (steadytune's metrics.jsonl; mlx_lm.lora's
mx.get_peak_memory() at exit), and for steadytune the planner's prediction (`steadytune plan
--json`, the same flags). `--mlx-val-batches 0` skips mlx_lm.lora's validation before its first step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_ATTN = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
             tie_word_embeddings=False)
SHAPES = {
    "moe": dict(_ATTN, model_type="qwen3_moe", num_hidden_layers=48, intermediate_size=6144, num_experts=128,
                num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[],
                norm_topk_prob=True),
    "hybrid": dict(_ATTN, model_type="qwen3_next", num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                   num_hidden_layers=48, intermediate_size=5120, num_experts=512, num_experts_per_tok=10,
                   moe_intermediate_size=512, shared_expert_intermediate_size=512, decoder_sparse_step=1,
                   mlp_only_layers=[], norm_topk_prob=True, linear_num_value_heads=32, linear_num_key_heads=16,
                   linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                   full_attention_interval=4, partial_rotary_factor=0.25),
}
# --tiny: the same families, small enough for a CPU
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
            intermediate_size=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=16, linear_value_head_dim=16)


def model_config(kind: str, layers: int, tiny: bool) -> dict:
    c = dict(SHAPES[kind], num_hidden_layers=layers)
    if tiny:
        c.update({k: v for k, v in TINY.items() if k in c or kind == "hybrid"})
    return c


def chat_data(out: Path, n_train: int, n_valid: int) -> Path:
    """The alpaca demo as chat JSONL, shuffled with seed 0."""
    recs = json.loads(ALPACA.read_text())
    def user(r):
        return r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")

    rows = [{"messages": [{"role": "user", "content": user(r)}, {"role": "assistant", "content": r["output"]}]}
            for r in recs]
    random.Random(0).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[:n_train]))
    (out / "valid.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[n_train:n_train + n_valid]))
    return out


def write_tokenizer(folder: Path, data: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer trained offline on the data (its ids stay below the model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [m["content"] for line in (data / "train.jsonl").read_text().splitlines()
             for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=min(vocab, 32000), special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None,
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": CHATML}))


def build_model(folder: Path, config: dict, data: Path) -> Path:
    """A 4-bit g64 random model folder. Quantized one layer at a time: the float32 weights of a whole
    30B model never exist at once (the skeleton's random init is lazy)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model, save_model

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    model, config = quantize_model(model, dict(config), group_size=64, bits=4)
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9
    print(f"  {folder.name}: {size:.1f} GB of 4-bit weights", flush=True)
    save_model(folder, model)
    (folder / "config.json").write_text(json.dumps(dict(config, eos_token_id=2)))
    write_tokenizer(folder, data, config["vocab_size"])
    return folder


def run_lines(cmd: list[str], timeout: float) -> tuple[list[tuple[float, str]], int]:
    """The command's output lines, each with the seconds since the start at which it arrived, and
    its exit status; past `timeout` it gets SIGTERM (mlx_lm.lora's wrapper then prints its peak
    memory and exits), SIGKILL 15 s later, and rc 124 with the lines printed until then: a trainer
    too slow for the time given still reports its first steps."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, bufsize=1,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter() - t0, s.rstrip("\n"))
                                                          for s in p.stdout), daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        rc = 124
    reader.join(timeout=15)
    if rc:
        print("\n".join(s for _, s in lines[-15:]), file=sys.stderr)
    return lines, rc


def per_minute(arrivals: list[float], batch: int) -> tuple[float, float]:
    """Examples trained per minute of wall, from the process's start to its last step's line
    (start-up, compilation and validation included: what a short run of each trainer delivers
    when its steady rate is never reached), and the seconds to that line."""
    if not arrivals:
        return float("nan"), float("nan")
    return round(len(arrivals) * batch / arrivals[-1] * 60, 2), round(arrivals[-1], 1)


def steadytune_row(model: Path, data: Path, out: Path, flags: list[str], timeout: float, batch: int = 4) -> dict:
    run = out / "steadytune"
    common = ["--model", str(model), "--data", str(data), "--epochs", "1", "--batch-size", str(batch),
              "--lora-rank", "8", "--max-seq-length", "1024", *flags]
    plan_lines, _ = run_lines([sys.executable, "-m", "steadytune.cli", "plan", *common, "--json"], timeout)
    plan_lines = [s for _, s in plan_lines]
    try:
        plan = json.loads("\n".join(plan_lines[plan_lines.index("{"):]))
    except ValueError:
        plan = {}
    lines, rc = run_lines([sys.executable, "-m", "steadytune.cli", "train", *common, "--progress", "lines",
                           "--log-every", "1", "--save-every", "0", "--eval-every", "0", "--out", str(run)], timeout)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
            if x.strip()] if (run / "metrics.jsonl").exists() else []
    train = [r for r in recs if r.get("event") == "train"]
    rates = [r["tok_per_s"] for r in train if r["step"] > 3]
    step_line = re.compile(r"^step \d+/")
    ex_min, last = per_minute([t for t, s in lines if step_line.match(s)], batch)
    adapters = run / "adapters" / "adapters.safetensors"
    trainable = f"{adapter_parameters(adapters) / 1e6:.3f}M" if adapters.exists() else ""
    return {"trainer": "steadytune", "rc": rc, "steps": len(train),
            "tok_s": round(statistics.median(rates), 1) if rates else float("nan"),
            "ex_per_min": ex_min, "last_step_s": last,
            "peak_gb": max((r.get("peak_mem_gb", 0) for r in train), default=float("nan")),
            # the planner's MLX peak (what peak_mem_gb measures; its required_gb adds the overhead)
            "planned_gb": plan.get("mlx_peak_gb", float("nan")), "trainable": trainable}


def adapter_parameters(path: Path) -> int:
    import mlx.core as mx

    return sum(v.size for v in mx.load(str(path)).values())


# mlx_lm.lora in this process's Python, printing its peak memory every 5 s and when it exits: a
# trainer stopped inside a long compiled call (the hybrid's first step on a GPU) never returns to
# Python to run its exit handler, but MLX releases the GIL while it evaluates, so a thread can
_MLX_LM = ("import atexit, runpy, signal, sys, threading, time, mlx.core as mx; "
           "peak = lambda: print(f'PEAK_BYTES {mx.get_peak_memory()}', flush=True); atexit.register(peak); "
           "threading.Thread(target=lambda: [(time.sleep(5), peak()) for _ in iter(int, 1)], daemon=True).start(); "
           "signal.signal(signal.SIGTERM, lambda *a: sys.exit(124)); "
           "sys.argv = ['mlx_lm.lora'] + sys.argv[1:]; runpy.run_module('mlx_lm.lora', run_name='__main__')")


def mlx_lm_row(model: Path, data: Path, out: Path, timeout: float, batch: int = 4,
               val_batches: int = 1) -> dict:
    """mlx_lm.lora on the same folder and data; val_batches 0 skips its validation before step 1
    (one batch takes over a minute on a GPU for the hybrid: --mlx-val-batches)."""
    iters = sum(1 for _ in (data / "train.jsonl").open()) // batch
    # On the CPU both trainers get OpenBLAS (steadytune loads it on import; MLX's own is the reference
    # BLAS, about 30x slower), so the comparison is of the trainers, not of the BLAS.
    prelude = "from steadytune.backend import use_fast_blas; use_fast_blas(); " if os.environ.get(
        "STEADYTUNE_DEVICE") == "cpu" else ""
    lines, rc = run_lines([sys.executable, "-c", prelude + _MLX_LM, "--model", str(model), "--train", "--data", str(data),
                           "--batch-size", str(batch), "--num-layers", "-1", "--iters", str(iters),
                           "--max-seq-length", "1024", "--steps-per-report", "1", "--steps-per-eval", "1000000",
                           "--save-every", "1000000", "--adapter-path", str(out / "mlx_lm"), "--mask-prompt",
                           "--val-batches", str(val_batches)], timeout)
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    # mlx-lm 0.32's report table: iter, train loss (and a trend arrow), tokens/s, trained tokens
    row = re.compile(r"^\s*(\d+)\s+([\d.]+|nan)\s*[▼▲=]?\s+([\d,.]+)\s+[\d.]+k?\s*$")
    old = re.compile(r"Iter (\d+): Train loss .*Tokens/sec ([\d.]+)")
    rates, arrivals, peak = [], [], float("nan")
    for t, s in lines:
        s = ansi.sub("", s)
        if m := row.match(s):
            rates.append((int(m.group(1)), float(m.group(3).replace(",", ""))))
            arrivals.append(t)
        elif m := old.search(s):
            rates.append((int(m.group(1)), float(m.group(2))))
            arrivals.append(t)
        elif s.startswith("PEAK_BYTES"):
            peak = round(int(s.split()[1]) / 1e9, 3)
    steady = [r for step, r in rates if step > 3]
    ex_min, last = per_minute(arrivals, batch)
    adapters = out / "mlx_lm" / "adapters.safetensors"
    return {"trainer": "mlx_lm.lora", "rc": rc, "steps": len(rates),
            "tok_s": round(statistics.median(steady), 1) if steady else float("nan"),
            "ex_per_min": ex_min, "last_step_s": last, "peak_gb": peak,
            "planned_gb": "", "trainable": f"{adapter_parameters(adapters) / 1e6:.3f}M" if adapters.exists() else ""}


def table(rows: list[dict]) -> str:
    cols = ["model", "trainer", "rc", "steps", "tok_s", "ex_per_min", "last_step_s", "peak_gb", "planned_gb",
            "vs_mlx_lm", "trainable"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="hidden 64 and 24 examples: checks the bench on a CPU")
    p.add_argument("--models", default="moe,hybrid")
    p.add_argument("--moe-layers", type=int, default=24, help="of Qwen3-30B-A3B's 48")
    p.add_argument("--hybrid-layers", type=int, default=12, help="of Qwen3-Next-80B-A3B's 48")
    p.add_argument("--examples", type=int, default=949, help="training examples (one epoch of them)")
    p.add_argument("--work", type=Path, default=None, help="model folders and runs (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per trainer; a trainer still running then "
                   "is stopped and reports the steps it logged (rc 124)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step, both trainers")
    p.add_argument("--trainers", default="steadytune,mlx_lm", help="which trainers run (steadytune alone: "
                   "the planner's prediction against the measured peak)")
    p.add_argument("--mlx-val-batches", type=int, default=1, help="mlx_lm.lora's validation batches before "
                   "its first step (0: none; one batch of the hybrid takes over a minute on a GPU)")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-moe-"))
    n_train, n_valid = (24, 4) if a.tiny else (a.examples, 50)
    data = chat_data(work / "data", n_train, n_valid)
    if a.tiny:
        os.environ["STEADYTUNE_DEVICE"] = "cpu"
    rows = []
    for kind in a.models.split(","):
        layers = (2 if kind == "moe" else 4) if a.tiny else (a.moe_layers if kind == "moe" else a.hybrid_layers)
        config = model_config(kind, layers, a.tiny)
        name = f"{config['model_type']} {layers} layers{' (tiny)' if a.tiny else ''}"
        print(f"{name}: building", flush=True)
        model = build_model(work / f"{kind}-{layers}{'-tiny' if a.tiny else ''}", config, data)
        out = work / f"runs-{kind}-{time.strftime('%H%M%S')}"
        out.mkdir(parents=True)
        name += f", batch {a.batch_size}, {n_train} examples"
        got = []
        for trainer in a.trainers.split(","):
            row = (steadytune_row(model, data, out, [], a.timeout, a.batch_size) if trainer == "steadytune"
                   else mlx_lm_row(model, data, out, a.timeout, a.batch_size, a.mlx_val_batches))
            print(f"{name}: {json.dumps(row)}", flush=True)
            got.append(dict(row, model=name))
        ours = next((r for r in got if r["trainer"] == "steadytune"), None)
        theirs = next((r for r in got if r["trainer"] == "mlx_lm.lora"), None)
        if ours and theirs and isinstance(ours["tok_s"], float) and isinstance(theirs["tok_s"], float) \
                and theirs["tok_s"] > 0:
            ours["vs_mlx_lm"] = f"{ours['tok_s'] / theirs['tok_s']:.2f}x"
        elif ours and theirs and ours["ex_per_min"] == ours["ex_per_min"] and theirs["ex_per_min"] > 0:
            # mlx_lm.lora reported no steady rate (fewer than 4 steps): examples per minute of wall
            ours["vs_mlx_lm"] = f"{ours['ex_per_min'] / theirs['ex_per_min']:.2f}x (examples per minute of wall)"
        rows += got
    import mlx.core as mx
    import mlx_lm

    print(f"\nmlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"{'CPU (--tiny)' if a.tiny else mx.device_info().get('device_name', 'GPU')}")
    print(table(rows))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
