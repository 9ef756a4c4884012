"""Preference tuning benchmarks (bench, not tests).

quality: the default model (SmolLM2-135M-Instruct), DPO for N epochs on
    ../shared/data/dpo_en_demo/train.json; on valid.json, before and after: the share of pairs
    where the model gives the chosen answer the higher mean token log-probability (the base
    model's is the "before"), and the tuned model's DPO reward accuracy and mean margin; the
    training's wall time.
speed: steadytune's DPO step (preference.PairStep) against mlx-lm-lora's DPO trainer on the same
    model, pairs and settings: tokens/s and peak memory over a second pass (the first compiles); and the
    DPO reference computed once (steadytune's cached pass) against recomputed in every step.
    Needs `pip install mlx-lm-lora` (the `bench` extra).

    python bench/preference.py quality [--epochs 1] [--max-seq-length 1024] [--out runs/pref-quality]
    python bench/preference.py speed [--pairs 32] [--batch-size 2] [--max-seq-length 512] [--model 7b]

--data names the dpo_en_demo folder (default ../shared/data/dpo_en_demo); --model 7b (speed only)
builds bench/throughput.py's 7B-shaped 4-bit model with a tokenizer trained on the pairs (random
weights: speed, not quality) in --work, once.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import steadytune  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dpo_en_demo"


def preference_table(run, valid, max_seq_length, beta, batch=4):
    """(base mean-log-prob accuracy, tuned mean-log-prob accuracy, reward accuracy, margin, pairs)."""
    from steadytune.generation import load_tuned
    from steadytune.preference import all_logps, preference_scores, read_pairs, reference_logps, tokenize_pairs

    from steadytune.qlora import apply_compute

    loaded = load_tuned(run)
    apply_compute(loaded.model, "auto")
    tp = tokenize_pairs(read_pairs(valid), loaded.tokenizer, max_seq_length)
    ref = reference_logps(loaded.model, tp, batch)
    pol = all_logps(loaded.model, tp, batch)
    n = tp.answer_tokens()
    s = preference_scores(pol, ref, n, "dpo", beta)
    tuned = float(((pol[:, 0] / n[:, 0]) > (pol[:, 1] / n[:, 1])).mean())
    return s["base_accuracy"], tuned, s["accuracy"], s["mean_margin"], s["pairs"]


def fitting_pairs(folder: Path, max_seq_length: int, source: Path = DATA) -> dict:
    """Copies of train.json and valid.json in `folder` without the pairs whose prompt alone is
    max_seq_length tokens or more (an error by the truncation rule, docs/preference.md): the
    multi-turn pairs of dpo_en_demo reach 4,100 prompt tokens. Returns {split: (kept, of)}."""
    from steadytune.config import ModelConfig
    from steadytune.errors import UserError
    from steadytune.model import load_base
    from steadytune.preference import read_pairs, tokenize_pair

    tok = load_base(ModelConfig()).tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "valid"):
        recs = json.loads((source / f"{split}.json").read_text())
        keep = []
        for p in read_pairs(source / f"{split}.json"):
            try:
                tokenize_pair(p, tok, max_seq_length)
                keep.append(recs[int(p.where.rsplit(":", 1)[1]) - 1])
            except UserError:
                pass
        (folder / f"{split}.json").write_text(json.dumps(keep))
        counts[split] = (len(keep), len(recs))
    return counts


def quality(a):
    out = Path(a.out)
    data = Path(str(out) + "-data")
    counts = fitting_pairs(data, a.max_seq_length, Path(a.data))
    cmd = [sys.executable, "-m", "steadytune.cli", "train", "--data", str(data), "--out", str(out),
           "--method", "dpo", "--beta", str(a.beta), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
           "--learning-rate", str(a.lr), "--max-seq-length", str(a.max_seq_length), "--eval-every", "0",
           "--log-every", "5", "--save-every", "1000", "--progress", "lines"]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    minutes = (time.time() - t0) / 60
    base, tuned, acc, margin, n = preference_table(out, data / "valid.json", a.max_seq_length, a.beta)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in recs if r["event"] == "train")
    print(f"\nDPO, default model, {a.epochs} epoch(s) of {DATA.name}/train.json ({steps} steps, batch "
          f"{a.batch_size} pairs, lr {a.lr}, beta {a.beta}, max_seq_length {a.max_seq_length}): "
          f"{minutes:.1f} min wall (setup, reference pass and training); pairs whose prompt fits: "
          f"train {counts['train'][0]} of {counts['train'][1]}, valid {counts['valid'][0]} of {counts['valid'][1]}\n")
    print(f"| metric ({n} pairs of valid.json) | before (base) | after |")
    print("|---|---|---|")
    print(f"| chosen has the higher mean token log-prob | {base:.1%} | {tuned:.1%} |")
    print(f"| DPO reward accuracy (margin > 0) | 0.0% (margins are 0) | {acc:.1%} |")
    print(f"| mean DPO reward margin | 0 | {margin:.4f} |")


def _pairs(n, max_seq_length, tokenizer, source: Path = DATA):
    """The first n pairs of train.json whose prompt fits in max_seq_length (docs/preference.md)."""
    from steadytune.errors import UserError
    from steadytune.preference import read_pairs, tokenize_pair, tokenize_pairs

    keep = []
    for p in read_pairs(source / "train.json"):
        try:
            tokenize_pair(p, tokenizer, max_seq_length)
        except UserError:
            continue
        keep.append(p)
        if len(keep) == n:
            break
    return keep, tokenize_pairs(keep, tokenizer, max_seq_length)


def steadytune_speed(a):
    """Tokens/s and peak memory of PairStep (cached reference), and of the reference recomputed
    in every step (a forward pass with the adapters off before each step)."""
    import mlx.optimizers as optim

    from steadytune.config import Config
    from steadytune.model import apply_lora, load_base
    from steadytune.preference import PairStep, adapters_off, reference_logps
    from steadytune.qlora import apply_compute

    cfg = Config()
    cfg.model.path = a.model
    loaded = load_base(cfg.model)
    _, tp = _pairs(a.pairs, a.max_seq_length, loaded.tokenizer, Path(a.data))
    model = loaded.model
    apply_lora(model, cfg.lora, 0)
    apply_compute(model, cfg.model.compute)
    tic = time.perf_counter()
    ref = reference_logps(model, tp, a.batch_size)
    ref_s = time.perf_counter() - tic
    opt = optim.AdamW(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    step = PairStep(model, opt, tp, ref, method="dpo", beta=0.1, max_grad_norm=1.0)
    batches = [list(range(i, min(i + a.batch_size, len(tp)))) for i in range(0, len(tp), a.batch_size)]
    real = lambda mb: sum(len(tp.seqs[s]) - 1 for i in mb for s in (2 * i, 2 * i + 1))  # noqa: E731
    # recomputed: each step preceded by the reference forward pass of its pairs (one compiled
    # function, traced with the adapters off: their scale 0 is a constant of the trace)
    from steadytune.preference import pair_batch, sequence_logps

    ref_fn = mx.compile(lambda i, t, m: sequence_logps(model, i, t, m)[0])

    def recompute(mb):
        inputs, targets, mask, _, _ = pair_batch(tp, mb)
        model.eval()
        with adapters_off(model):
            lp = ref_fn(mx.array(inputs), mx.array(targets), mx.array(mask))
            step.ref[mb] = np.array(lp).reshape(-1, 2)

    for mb in batches:  # warm-up pass: every batch shape compiled once, untimed
        recompute(mb)
        step([mb], 1e-5)
    step.ref[:] = ref
    mx.reset_peak_memory()
    tic, cpu, toks = time.perf_counter(), time.process_time(), 0
    for k, mb in enumerate(batches):
        step([mb], 1e-5, k)
        toks += real(mb)
    cached = (toks / (time.perf_counter() - tic), toks / (time.process_time() - cpu), mx.get_peak_memory() / 1e9)
    mx.reset_peak_memory()
    tic, cpu = time.perf_counter(), time.process_time()
    for k, mb in enumerate(batches):
        recompute(mb)
        step([mb], 1e-5, k)
    recomputed = (toks / (time.perf_counter() - tic), toks / (time.process_time() - cpu), mx.get_peak_memory() / 1e9)
    return {"cached": cached, "recomputed": recomputed, "ref_pass_s": ref_s, "tokens": toks}


def mlx_lm_lora_speed(a):
    """mlx-lm-lora's `train_dpo` on the same tokens (prompt + answer ids and the answer's start),
    the same model (a fresh 4-bit load with mlx-lm's LoRA layers; its reference model a second
    load, as its CLI does), batch and optimizer. Its loop draws a random batch each iteration;
    the batches it draws are recorded to count their non-padding tokens, and each iteration's
    time comes from its own per-iteration report (steps_per_report=1)."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora import _version
    from mlx_lm_lora.trainer import dpo_trainer

    from steadytune.config import Config
    from steadytune.model import apply_lora, load_base

    cfg = Config()
    cfg.model.path = a.model
    loaded = load_base(cfg.model)
    ref_model = load_base(cfg.model).model
    ref_model.freeze()
    _, tp = _pairs(a.pairs, a.max_seq_length, loaded.tokenizer, Path(a.data))
    model = loaded.model
    apply_lora(model, cfg.lora, 0)
    data = [{"chosen": tp.seqs[2 * i], "rejected": tp.seqs[2 * i + 1],
             "chosen_prompt_length": tp.masks[2 * i].index(True),
             "rejected_prompt_length": tp.masks[2 * i + 1].index(True)} for i in range(len(tp))]
    drawn = []
    orig = dpo_trainer.iterate_dpo_batches

    def recording(*args, **kw):
        for batch in orig(*args, **kw):
            c, r = np.array(batch[0]), np.array(batch[1])
            drawn.append(int((c != 0).sum() + (r != 0).sum()) - c.shape[0] - r.shape[0])
            yield batch

    marks, peaks = [], []

    class Report(TrainingCallback):
        def on_train_loss_report(self, info):  # after each iteration's mx.eval
            if info["iteration"] == per_pass:
                marks.append((time.perf_counter(), time.process_time()))
            peaks.append(info["peak_memory"])

    dpo_trainer.iterate_dpo_batches = recording
    info = mx.device_info  # train_dpo reads a Metal-only key (a KeyError on the CPU): give it one
    mx.device_info = lambda: {"max_recommended_working_set_size": 0, **info()}
    np.random.seed(0)
    per_pass = -(-len(tp) // a.batch_size)
    iters = 2 * per_pass  # the first pass untimed (compilation of the shapes it meets)
    args = dpo_trainer.DPOTrainingArgs(batch_size=a.batch_size, iters=iters, steps_per_report=1,
                                       steps_per_eval=10**9, steps_per_save=10**9,
                                       max_seq_length=a.max_seq_length, beta=0.1,
                                       adapter_file=str(Path(a.tmp) / "mlx_lm_lora_adapters.safetensors"))
    opt = optim.AdamW(learning_rate=1e-5)
    dpo_trainer.train_dpo(model, ref_model, opt, data, None, args, training_callback=Report())
    wall, cpu = time.perf_counter() - marks[0][0], time.process_time() - marks[0][1]
    toks = sum(drawn[per_pass:iters])
    return {"version": _version.__version__, "tok_s": toks / wall, "cpu_tok_s": toks / cpu, "peak_gb": max(peaks),
            "tokens": toks}


def seven_b(folder: Path, data: Path) -> Path:
    """bench/throughput.py's 7B-shaped 4-bit model folder, its tokenizer trained on the pairs' text."""
    sys.path.insert(0, str(ROOT / "bench"))
    import throughput as tp

    if not (folder / "model.safetensors").exists():
        texts = [json.dumps(r) for r in json.loads((data / "train.json").read_text())]
        tp.write_model_folder(folder, "7b", tp.build_base("7b", mx.bfloat16), texts * 3)
    return folder


def speed(a):
    """Each side in a process of its own (peak memory is per process)."""
    if a.side == "steadytune":
        r = steadytune_speed(a)
        print("RESULT " + json.dumps(r))
        return
    if a.side == "mlx-lm-lora":
        print("RESULT " + json.dumps(mlx_lm_lora_speed(a)))
        return
    if a.model == "7b":
        a.model = str(seven_b(Path(a.work) / "model-7b", Path(a.data)))
    res = {}
    for side in ("steadytune", "mlx-lm-lora"):
        cmd = [sys.executable, __file__, "speed", "--side", side, "--pairs", str(a.pairs), "--batch-size",
               str(a.batch_size), "--max-seq-length", str(a.max_seq_length), "--data", a.data,
               "--model", a.model, "--tmp", a.tmp]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"{side} failed:\n{out.stderr[-3000:]}")
            continue
        res[side] = json.loads(line[-1][7:])
    ours = res.get("steadytune")
    rows = []
    if ours:
        rows += [(f"steadytune PairStep, reference cached (one pass over the pairs: {ours['ref_pass_s']:.1f} s)",
                  *ours["cached"]),
                 ("steadytune PairStep, reference recomputed before every step (adapters off)",
                  *ours["recomputed"])]
    if "mlx-lm-lora" in res:
        t = res["mlx-lm-lora"]
        rows.append((f"mlx-lm-lora {t['version']} train_dpo (reference: a second model)", t["tok_s"], t["cpu_tok_s"],
                     t["peak_gb"]))
    what = "the default model" if a.model == "smollm2-135m" else "the 7B-shaped model (random weights)"
    print(f"\nDPO step, {what} ({mx.default_device()}, 4-bit, LoRA rank 8, all layers), the first {a.pairs} pairs of "
          f"{Path(a.data).name}/train.json, batch {a.batch_size} pairs, max_seq_length {a.max_seq_length}, "
          "a first pass over them untimed (compilation), the second timed; tokens count the non-padding "
          "tokens of both sides; tokens per CPU-second (process time, all threads) is the measure that "
          "holds on a machine shared with other work\n")
    print("| step | tokens/s (wall) | tokens per CPU-second | peak memory (GB) |")
    print("|---|---|---|---|")
    for name, tps, cps, mem in rows:
        print(f"| {name} | {tps:,.0f} | {cps:,.0f} | {mem:.2f} |")
    print("\nRESULTS " + json.dumps(res))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--epochs", type=int, default=1)
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--lr", type=float, default=2e-4)
    q.add_argument("--beta", type=float, default=0.1)
    q.add_argument("--max-seq-length", type=int, default=1024)
    q.add_argument("--out", default=f"runs/pref-quality-{time.strftime('%Y%m%d-%H%M%S')}")
    s = sub.add_parser("speed")
    s.add_argument("--pairs", type=int, default=24)
    s.add_argument("--batch-size", type=int, default=2)
    s.add_argument("--max-seq-length", type=int, default=512)
    s.add_argument("--side", choices=["both", "steadytune", "mlx-lm-lora"], default="both")
    s.add_argument("--tmp", default="/tmp")
    for sp in (q, s):
        sp.add_argument("--data", default=str(DATA), help="the dpo_en_demo folder (train.json, valid.json)")
    s.add_argument("--model", default="smollm2-135m", help="a model path, or 7b (built in --work)")
    s.add_argument("--work", default="runs/pref-speed", help="where --model 7b is built")
    a = p.parse_args()
    quality(a) if a.cmd == "quality" else speed(a)


if __name__ == "__main__":
    main()
