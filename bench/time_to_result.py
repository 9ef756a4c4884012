"""Time to result: a user's first command, timed from the command to the saved adapters.

    python bench/time_to_result.py gpu    # Mistral-7B shape, 4-bit random base, 32k BPE tokenizer,
                                          # alpaca demo data as chat JSONL (949 train / 50 valid)
    python bench/time_to_result.py cpu    # the embedded default model on the same data, 2-core CPU

Every trainer runs as a subprocess, as a user would start it, on the same model folder and data:
`steadytune train` with default flags (plus --lora-rank 16 --max-seq-length 1024 --batch-size 4,
the issue's setting), the same with --batch-size 1 --grad-accumulation 4 and with
--grad-checkpoint true, and `mlx_lm.lora` (rank 16 on all 7 projections, batch 4) as the anchor,
with and without --grad-checkpoint. `--only ...,mlx_lm_lora` adds mlx-lm-lora's SFT trainer
(`python -m mlx_lm_lora.train -c CONFIG`, the pip package mlx-lm-lora) with the mlx_lm.lora row's
settings: batch 4, rank 16, scale 2.0, all blocks, lr 1e-4, max length 1024, prompt masked, the
same data, --mlx-iters iterations, fuse off (no merged model is written). It drops the `keys` it is
given and adapts every linear layer of a block, which on a Llama block is the same 7 projections
(the `targets` column reads them back from the saved adapters). On the CPU it needs a launcher
that gives mx.device_info() a Metal-only key (see LORA_CLI). Per run it prints: wall from command to
saved adapters, the seconds until the first optimizer step ends, the median seconds between steps
from step 4 on (`s_step`, from the output lines' arrival: the one rate that counts the same work
for every trainer), steady tokens/s (the median of each trainer's own per-step rate over steps 4
and later: compilation and start-up are out; mlx-lm reports every step with --steps-per-report 1;
steadytune counts every non-padding token, both mlx-lm trainers with --mask-prompt only the answer
tokens they score, so their tokens/s are not comparable with steadytune's), peak memory, optimizer
steps, the validation loss after the run on the same 50 validation conversations (mlx-lm with
--mask-prompt, so both score the answers only; both mlx-lm trainers evaluate before their last
step) and, for steadytune, the distinct step shapes the run compiled and the wall until its
validation loss (every 40 steps) first reached mlx-lm's one-epoch value. Every trainer takes 4
examples per optimizer step. Each output line is time-stamped as it arrives, so nothing here
depends on the trainers' own clocks.

In gpu mode the model weights are random (speed does not depend on them) and the tokenizer is
trained offline on the data; cpu mode trains the embedded default model. Nothing is downloaded.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def chat_split(source: Path, out: Path, n_train: int = 949, n_valid: int = 50) -> Path:
    """The alpaca demo records as chat JSONL, shuffled with seed 0, split 949 / 50."""
    recs = json.loads(source.read_text())
    rows = [{"messages": [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")},
                          {"role": "assistant", "content": r["output"]}]} for r in recs]
    random.Random(0).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[:n_train]))
    (out / "valid.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[n_train:n_train + n_valid]))
    return out


def gpu_model(folder: Path, data: Path) -> Path:
    """The 7B-shaped 4-bit model folder of bench/throughput.py with a tokenizer trained on `data`."""
    sys.path.insert(0, str(ROOT / "bench"))
    import mlx.core as mx
    import throughput as tp

    if not (folder / "model.safetensors").exists():
        texts = [m["content"] for line in (data / "train.jsonl").read_text().splitlines()
                 for m in json.loads(line)["messages"]]
        tp.write_model_folder(folder, "7b", tp.build_base("7b", mx.bfloat16), texts * 3)
    return folder


def timed(cmd: list[str], env: dict | None = None, timeout: float = 900) -> tuple[list[tuple[float, str]], float, int]:
    """Run `cmd`; every output line with the seconds since the start; the wall; the exit status."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                         env={**os.environ, **(env or {})})
    lines = []
    for line in p.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip()))
        if os.environ.get("BENCH_ECHO"):
            print(f"  [{lines[-1][0]:7.1f}] {lines[-1][1]}", flush=True)
    rc = p.wait(timeout=timeout)
    return lines, time.perf_counter() - t0, rc


# The trainer as it was before steps were left in flight and validation packed (A/B in one
# session): every step waited for, validation in calls of batch_size examples.
WAITING_CLI = ("import steadytune.step as s, steadytune.trainer as t; t.Trainer.pipeline = False; "
               "init = s.Step.__init__; "
               "s.Step.__init__ = lambda self, *a, **k: (init(self, *a, **k), setattr(self, 'few_val_shapes', False))[0]; "
               "import sys; from steadytune.cli import main; sys.exit(main())")

# The trainer without the cache clear after each validation (trainer.validate_and_checkpoint): on
# CUDA MLX's allocator takes its buffers from the device's default memory pool, whose release
# threshold MLX leaves at 0, so what the clear frees goes back to the driver and the next steps
# map it again. The `keepcache` row asked whether that is the 0.5-0.7 s of the step after each
# validation: it is not (H100, 2026-12-07: 0.41-0.62 s without the clear, 0.47-0.63 s with it;
# bench/RESULTS.md).
KEEPCACHE_CLI = ("import steadytune.trainer, mlx.core as mx; mx.clear_cache = lambda: None; "
                 "import sys; from steadytune.cli import main; sys.exit(main())")


# The trainer with the CUDA row floor of before 2026-12-07 (later): none for a 7B shape
# (batching.CUDA_IDLE_WORK = 7.2e9 x 128) where the default now pads calls to at least 512
# positions. `--only plain,plain_nofloor,plain_nofloor,plain` alternates the two.
NOFLOOR_CLI = ("import steadytune.batching as b; b.CUDA_IDLE_WORK = 7.2e9 * 128; "
               "import sys; from steadytune.cli import main; sys.exit(main())")


def steadytune_run(name: str, model: Path, data: Path, out: Path, flags: list[str], every: bool = True,
                   waiting: bool = False, env: dict | None = None, cli: str | None = None) -> dict:
    """One `steadytune train`; every: validation every 40 steps, no checkpoints but the epoch's
    (the rows' usual settings: the wall until mlx-lm's loss is reached), else the defaults
    (validation and a checkpoint every 100 steps: the issue's command as a user types it);
    waiting: the trainer before steps in flight and packed validation (WAITING_CLI); env: more
    environment (the `nographs` rows: MLX_USE_CUDA_GRAPHS=0, against MLX's default, graphs on);
    cli: a launcher of the trainer changed for the row (KEEPCACHE_CLI)."""
    run = out / name
    cli = WAITING_CLI if waiting else cli
    launch = [sys.executable, "-c", cli] if cli else [sys.executable, "-m", "steadytune.cli"]
    cmd = [*launch, "train", "--model", str(model), "--data", str(data),
           "--lora-rank", "16", "--lora-alpha", "32", "--max-seq-length", "1024", "--epochs", "1",
           "--progress", "lines", "--log-every", "1",
           *(["--save-every", "0", "--eval-every", "40"] if every else []), "--out", str(run), *flags]
    lines, wall, rc = timed(cmd, env)
    if rc != 0:
        print("\n".join(s for _, s in lines[-12:]), file=sys.stderr)
    step_re = re.compile(r"^step (\d+)/")
    val_re = re.compile(r"^step (\d+): val_loss ([\d.]+)")
    arrivals = {int(m.group(1)): t for t, s in lines if (m := step_re.match(s))}
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
    train = [r for r in recs if r.get("event") == "train"]
    rates = [r["tok_per_s"] for r in train if r["step"] > 3]
    startup = next((r for r in recs if r.get("event") == "startup"), {})
    end = next((r for r in reversed(recs) if r.get("event") == "end"), {})
    final = next((r["val_loss"] for r in reversed(recs) if r.get("event") == "val"), None)
    vals = [(t, float(m.group(2))) for t, s in lines if (m := val_re.match(s))]
    label = " ".join(flags + ([] if every else ["(eval/save every 100)"]) + (["(waiting steps)"] if waiting else [])
                     + (["(cache kept after validation)"] if cli == KEEPCACHE_CLI else [])
                     + (["(no row floor)"] if cli == NOFLOOR_CLI else [])
                     + [f"{k}={v}" for k, v in (env or {}).items()])
    return {"run": f"steadytune {label or '(defaults)'}", "rc": rc, "wall_s": round(wall, 1),
            "timeline": timeline(lines, wall, step_re, val_re),
            "first_step_s": round(arrivals.get(1, float("nan")), 1), "steps": len(train),
            "s_step": step_seconds([arrivals[k] for k in sorted(arrivals)]),
            "tok_s": round(statistics.median(rates), 1) if rates else "",
            "peak_gb": max((r.get("peak_mem_gb", 0) for r in train), default=float("nan")),
            "val_loss": round(final, 4) if final is not None else "", "vals": vals + [(wall, final)],
            "shapes": end.get("step_shapes", startup.get("step_shapes", "")),
            "startup": {k: v for k, v in startup.items() if k.endswith("_s")},
            "targets": adapted(run / "adapters" / "adapters.safetensors")}


def timeline(lines, wall: float, step_re, val_re) -> dict:
    """Where a run's wall went, from its output lines' arrivals: until the first step's line; the
    steps (each the gap from the line before, a validation's time taken out); the slow steps
    among them (over 3x the median: a new shape compiling); the validations (from the step's
    line to the validation's); and after the last step (last validation, checkpoint, adapters,
    exit)."""
    marks = [(t, int(m.group(1)), "step") for t, s in lines if (m := step_re.match(s))]
    marks += [(t, int(m.group(1)), "val") for t, s in lines if (m := val_re.match(s))]
    marks.sort()
    steps = [(t, k) for t, k, kind in marks if kind == "step"]
    if not steps:
        return {}
    gaps, val_s, prev = [], [], steps[0][0]  # gaps: (step, seconds since the line before)
    for t, k, kind in marks[1:]:
        (val_s if kind == "val" else gaps).append((k, t - prev))
        prev = t
    med = statistics.median(g for _, g in gaps) if gaps else 0.0
    slow = [(k, g) for k, g in gaps if g > 3 * med]
    return {"first_step_s": round(steps[0][0], 2), "steps_s": round(sum(g for _, g in gaps), 2),
            "median_step_ms": round(1000 * med, 1), "slow_steps": len(slow),
            "slow_steps_s": round(sum(g for _, g in slow), 2),
            "slow_steps_excess_s": round(sum(g for _, g in slow) - len(slow) * med, 2),
            "slow": [[k, round(g, 2)] for k, g in slow],  # which steps, to tell new shapes from saves
            "validation_s": round(sum(g for _, g in val_s), 2), "after_last_step_s": round(wall - prev, 2)}


def reached(row: dict, target: float):
    """Seconds until a steadytune run's validation loss first was at most `target` (None: never)."""
    return next((round(t, 1) for t, v in row.get("vals", []) if v is not None and v <= target), None)


def mlx_lm_run(name: str, model: Path, data: Path, out: Path, iters: int, batch: int, ckpt: bool) -> dict:
    cfg = out / f"{name}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({"lora_parameters": {"rank": 16, "scale": 2.0, "dropout": 0.0,
                                                   "keys": PROJECTIONS}}))
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "-c", str(cfg), "--model", str(model), "--train",
           "--data", str(data), "--batch-size", str(batch), "--num-layers", "-1", "--iters", str(iters),
           "--max-seq-length", "1024", "--steps-per-report", "1", "--steps-per-eval", str(iters),
           "--save-every", "1000000", "--adapter-path", str(out / name), "--learning-rate", "1e-4",
           "--mask-prompt", "--val-batches", "-1"]
    if ckpt:
        cmd.append("--grad-checkpoint")
    lines, wall, rc = timed(cmd)
    # mlx-lm 0.32 prints a table: iter, train loss (and a trend arrow), tok/s, trained tokens;
    # older versions a line "Iter N: Train loss ..., Tokens/sec ..., Peak mem ... GB"
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    table_row = re.compile(r"^\s*(\d+)\s+([\d.]+|nan)\s*[▼▲=]?\s+([\d,]+)\s+[\d.]+k?\s*$")
    old_row = re.compile(r"Iter (\d+): Train loss [^,]+, Learning Rate [^,]+, It/sec [\d.]+, "
                         r"Tokens/sec ([\d.]+), Trained Tokens \d+, Peak mem ([\d.]+) GB")
    # (0.32's table has no peak memory column); validation is "N  val 1.234  5.67s" in 0.32
    points, peak, val = [], float("nan"), None  # (arrival, its tokens/s)
    val_re = re.compile(r"Val loss ([\d.]+)|^\s*\d+\s+val\s+([\d.]+)\s")
    for t, s in lines:
        s = ansi.sub("", s)
        if (m := val_re.search(s)) and points:  # the evaluation before the last iteration
            val = float(m.group(1) or m.group(2))
        if m := table_row.match(s):
            points.append((t, float(m.group(3).replace(",", ""))))
        elif m := old_row.search(s):
            points.append((t, float(m.group(2))))
            peak = float(m.group(3))
    if rc != 0:
        print("\n".join(s for _, s in lines[-15:]), file=sys.stderr)
    epoch_iters = sum(1 for _ in (data / "train.jsonl").open()) / batch
    per_step = (points[-1][0] - points[2][0]) / (len(points) - 3) if len(points) > 3 else float("nan")
    return {"run": f"mlx_lm.lora batch {batch}{' --grad-checkpoint' if ckpt else ''} ({iters} iters)",
            "rc": rc, "wall_s": round(wall, 1),
            "epoch_wall_s_est": round(points[0][0] + per_step * (epoch_iters - 1), 1) if points else "",
            "first_step_s": round(points[0][0], 1) if points else "", "steps": len(points),
            "s_step": step_seconds([t for t, _ in points]),
            "tok_s": round(statistics.median(r for _, r in points[3:]), 1) if len(points) > 3 else "",
            "peak_gb": peak, "val_loss": val if val is not None else "", "shapes": "",
            "targets": adapted(out / name / "adapters.safetensors")}


# mlx-lm-lora's trainers set a wired limit from a Metal-only key of mx.device_info(): on the CPU
# `python -m mlx_lm_lora.train` stops with KeyError: 'max_recommended_working_set_size' before its
# first step. bench/preference.py gives it the key; so does this launcher, then runs its CLI.
LORA_CLI = ("import mlx.core as mx; info = mx.device_info; "
            "mx.device_info = lambda: {'max_recommended_working_set_size': 0, **info()}; "
            "from mlx_lm_lora.train import main; main()")


def mlx_lm_lora_run(name: str, model: Path, data: Path, out: Path, iters: int, batch: int) -> dict:
    """mlx-lm-lora's SFT trainer with the mlx_lm.lora row's settings. Its config drops `keys`
    (train.build_lora_config passes rank, scale, dropout and layers only), so mlx-lm adapts every
    linear layer of each block; the row's `targets` says what the saved adapters hold. fuse is
    off: fusing writes a merged model after training, which no other row does."""
    cfg = out / f"{name}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({
        "model": str(model), "train": True, "data": str(data), "train_type": "lora", "train_mode": "sft",
        "batch_size": batch, "iters": iters, "learning_rate": 1e-4, "num_layers": -1,
        "lora_parameters": {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": PROJECTIONS},
        "max_seq_length": 1024, "mask_prompt": True, "steps_per_report": 1, "steps_per_eval": iters,
        "val_batches": -1, "save_every": 1000000, "adapter_path": str(out / name), "fuse": False,
        "seed": 0}))
    lines, wall, rc = timed([sys.executable, "-c", LORA_CLI, "-c", str(cfg)])
    # sft_trainer prints "Iter N: loss L, lr R, it/s S, tok/s T, trained_tok K, peak_mem P GB" after
    # each step and "Iter N: Val loss V, Val took S s" before steps 1 and `iters` (as mlx-lm does)
    step_re = re.compile(r"Iter (\d+): loss [^,]+, lr [^,]+, it/s [\d.]+, tok/s ([\d.]+), "
                         r"trained_tok \d+, peak_mem ([\d.]+)GB")
    val_re = re.compile(r"Iter \d+: Val loss ([\d.]+|nan)")
    points, peaks, val = [], [], None
    for t, s in lines:
        if (m := val_re.search(s)) and points:
            val = float(m.group(1))
        elif m := step_re.search(s):
            points.append((t, float(m.group(2))))
            peaks.append(float(m.group(3)))
    if rc != 0:
        print("\n".join(s for _, s in lines[-15:]), file=sys.stderr)
    epoch_iters = sum(1 for _ in (data / "train.jsonl").open()) / batch
    per_step = (points[-1][0] - points[2][0]) / (len(points) - 3) if len(points) > 3 else float("nan")
    return {"run": f"mlx_lm_lora.train sft batch {batch} ({iters} iters)", "rc": rc,
            "wall_s": round(wall, 1),
            "epoch_wall_s_est": round(points[0][0] + per_step * (epoch_iters - 1), 1) if points else "",
            "first_step_s": round(points[0][0], 1) if points else "", "steps": len(points),
            "s_step": step_seconds([t for t, _ in points]),
            "tok_s": round(statistics.median(r for _, r in points[3:]), 1) if len(points) > 3 else "",
            "peak_gb": max(peaks, default=float("nan")), "val_loss": val if val is not None else "",
            "shapes": "", "targets": adapted(out / name / "adapters.safetensors")}


def step_seconds(arrivals: list[float]) -> float | str:
    """Median seconds between consecutive steps' output lines from step 4 on: the one rate that
    means the same for every trainer (their tokens/s count different tokens, see the docstring)."""
    gaps = [b - a for a, b in zip(arrivals[2:], arrivals[3:])]
    return round(statistics.median(gaps), 2) if gaps else ""


def adapted(adapters: Path) -> str:
    """What a saved adapter file trains, from its safetensors header: the module names inside a
    block and how many blocks (what the trainer did, whatever its config asked for)."""
    if not adapters.exists():
        return ""
    with adapters.open("rb") as f:
        names = [k for k in json.loads(f.read(int.from_bytes(f.read(8), "little"))) if k != "__metadata__"]
    blocks = {m.group(1) for k in names if (m := re.search(r"layers\.(\d+)\.", k))}
    modules = sorted({re.sub(r"^.*layers\.\d+\.|\.lora_[ab]$", "", k) for k in names})
    return f"{len(modules)} x {len(blocks)} blocks: {' '.join(modules)}"


def generation_rows(model: str | None) -> list[dict]:
    """Tokens/s of answering (bench/generation_speed.py, 2 rounds of 128 new tokens): steadytune's
    generate/chat/demo path and mlx_lm.generate, one row each."""
    cmd = [sys.executable, str(ROOT / "bench" / "generation_speed.py"), "--rounds", "2"]
    lines, wall, rc = timed(cmd + (["--model", model] if model else []))
    rows = []
    for _, s in lines:
        cells = [c.strip() for c in s.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith(("after:", "anchor:")):
            rows.append({"run": f"generation, {cells[0]}", "rc": rc, "tok_s": float(cells[2])})
    return rows or [{"run": "generation", "rc": rc or 1}]


def table(rows: list[dict]) -> str:
    cols = ["run", "wall_s", "epoch_wall_s_est", "first_step_s", "s_step", "tok_s", "peak_gb", "val_loss",
            "reached_mlx_val_s", "shapes", "steps", "targets", "rc"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["gpu", "cpu"])
    p.add_argument("--work", default=None, help="folder for the model, data and runs (default: a temp dir)")
    p.add_argument("--mlx-iters", type=int, default=60, help="mlx_lm.lora and mlx_lm_lora iterations "
                   "(their epoch is estimated)")
    p.add_argument("--only", default="", help="comma-separated runs, in order: default,accum,ckpt,mlx,mlx_ckpt,gen "
                   "(mlx_lm_lora: mlx-lm-lora's SFT trainer, run only when named) "
                   "(gen: tokens/s of answering; also: nopack, one example a row; constant: mlx-lm's constant "
                   "learning rate; keepcache: no cache clear after validation; plain: default validation "
                   "and checkpoints, every 100 steps; plain_nofloor: the same without the CUDA row floor; waiting, plain_waiting: the same with every step waited "
                   "for and validation in calls of batch_size, as before steps were left in flight; "
                   "nographs: without MLX's CUDA graphs; big, big_nographs: the same at --batch-size 16) "
                   "(a run named twice runs twice: the second finds the GPU's kernel cache warm)")
    p.add_argument("--alpaca", default=str(DATA / "alpaca_en_demo.json"), help="the alpaca demo records")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--data", default=None, help="cpu mode: a chat data folder (train.jsonl, valid.jsonl) "
                   "instead of the alpaca split, e.g. steadytune/data/chatbot (uniform short examples)")
    p.add_argument("--cpu-steps", type=int, default=20, help="steps of each steadytune run in cpu mode "
                   "(an epoch of 949 examples takes hours on 2 cores; steady tokens/s needs 6 or more)")
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="ttr-"))
    data = Path(a.data) if a.data and a.mode == "cpu" else chat_split(Path(a.alpaca), work / "data")
    if a.mode == "gpu":
        model = gpu_model(work / "model", data)
        extra: list[str] = []
    else:
        model, extra = "smollm2-135m", ["--max-steps", str(a.cpu_steps)]
    runs = work / "runs"
    done: dict[str, int] = {}

    def name(key: str) -> str:  # a key given twice runs twice (the second run finds warm caches)
        done[key] = done.get(key, 0) + 1
        return key if done[key] == 1 else f"{key}{done[key]}"

    def mlx_model() -> Path:
        """mlx-lm reads no GGUF: on the CPU its model is the default model exported to an MLX
        folder and quantized 4-bit g64 by mlx_lm.convert (same shapes; values don't matter)."""
        if a.mode == "gpu":
            return model
        q = work / "default-mlx-q4"
        if not q.exists():
            run = runs / "export-src"
            subprocess.run([sys.executable, "-m", "steadytune.cli", "train", "--data", str(data),
                            "--max-steps", "1", "--progress", "none", "--out", str(run)], check=True)
            subprocess.run([sys.executable, "-m", "steadytune.cli", "export", str(run), "--format", "hf",
                            "--out", str(work / "default-hf")], check=True)
            subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(work / "default-hf"),
                            "--mlx-path", str(q), "-q", "--q-bits", "4", "--q-group-size", "64"], check=True)
        return q

    plan = {"default": lambda n: steadytune_run(n, model, data, runs, ["--batch-size", "4", *extra]),
            "accum": lambda n: steadytune_run(n, model, data, runs,
                                              ["--batch-size", "1", "--grad-accumulation", "4", *extra]),
            "nopack": lambda n: steadytune_run(n, model, data, runs,
                                               ["--batch-size", "4", "--pack", "false", *extra]),
            "constant": lambda n: steadytune_run(n, model, data, runs,
                                                 ["--batch-size", "4", "--lr-schedule", "constant", *extra]),
            "keepcache": lambda n: steadytune_run(n, model, data, runs, ["--batch-size", "4", *extra],
                                                  cli=KEEPCACHE_CLI),
            "plain": lambda n: steadytune_run(n, model, data, runs, ["--batch-size", "4", *extra], every=False),
            "plain_nofloor": lambda n: steadytune_run(n, model, data, runs, ["--batch-size", "4", *extra],
                                                      every=False, cli=NOFLOOR_CLI),
            "waiting": lambda n: steadytune_run(n, model, data, runs, ["--batch-size", "4", *extra], waiting=True),
            "nographs": lambda n: steadytune_run(n, model, data, runs, ["--batch-size", "4", *extra],
                                                 env={"MLX_USE_CUDA_GRAPHS": "0"}),
            "big": lambda n: steadytune_run(n, model, data, runs, ["--batch-size", "16", *extra]),
            "big_nographs": lambda n: steadytune_run(n, model, data, runs, ["--batch-size", "16", *extra],
                                                     env={"MLX_USE_CUDA_GRAPHS": "0"}),
            "plain_waiting": lambda n: steadytune_run(n, model, data, runs, ["--batch-size", "4", *extra],
                                                      every=False, waiting=True),
            "ckpt": lambda n: steadytune_run(n, model, data, runs,
                                             ["--batch-size", "4", "--grad-checkpoint", "true", *extra]),
            "mlx": lambda n: mlx_lm_run(n, mlx_model(), data, runs, a.mlx_iters, 4, False),
            "mlx_ckpt": lambda n: mlx_lm_run(n, mlx_model(), data, runs, a.mlx_iters, 4, True),
            "mlx_lm_lora": lambda n: mlx_lm_lora_run(n, mlx_model(), data, runs, a.mlx_iters, 4)}
    plan["gen"] = lambda n: generation_rows(None if a.mode == "cpu" else str(model))
    rows = []
    for key in (a.only or "default,accum,ckpt,mlx,mlx_ckpt,gen").split(","):
        new = plan[key](name(key))
        rows.extend(new if isinstance(new, list) else [new])
        print(json.dumps(rows[-1]), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    anchor = next((r["val_loss"] for r in rows if r["run"].startswith("mlx_lm.lora") and r.get("val_loss") != ""),
                  None)  # mlx_lm.lora's, not mlx-lm-lora's
    for r in rows:  # wall until steadytune's validation loss reached mlx-lm's after its epoch
        if anchor is not None and "vals" in r:
            r["reached_mlx_val_s"] = reached(r, anchor)
        r.pop("vals", None)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    import mlx.core as mx
    import mlx_lm
    from importlib.metadata import PackageNotFoundError, version

    try:
        lora = f", mlx-lm-lora {version('mlx-lm-lora')}"
    except PackageNotFoundError:
        lora = ""
    print(f"\n{a.mode}: mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}{lora}, {time.strftime('%Y-%m-%d')}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
