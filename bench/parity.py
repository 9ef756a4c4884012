"""Quality parity with mlx_lm.lora (bench, not a test): the same model, data, batch size, learning
rate, LoRA rank/scale/keys and number of optimizer steps, trained by `mlx_lm lora` and by
`steadytune train`, and every adapter set scored the same way in this process.

    python bench/parity.py [--steps 60] [--n-train 240] [--n-valid 40] [--work /tmp/parity]
    python bench/parity.py --score MODEL DATA ADAPTERS [ADAPTERS ...]   # score trained adapter
        sets (an mlx-lm adapter folder, or a steadytune run's adapters/) on DATA/valid.jsonl

The model is the tests' tiny llama (tests/conftest.build_model: 2 blocks, hidden 64, a 384-token
byte-level BPE with a ChatML template), quantized 4-bit by mlx_lm.convert (float32 otherwise, so
both trainers compute in float32 on the CPU); the data is the alpaca demo as single-turn chat
(bench/time_to_result.chat_split), the setting of issue 28's H100 comparison. Runs:

  mlx_lm.lora               --mask-prompt, constant lr, Adam, no clipping (the anchor)
  steadytune matched        --pack false --lr-schedule constant --max-grad-norm null --weight-decay 0
  steadytune matched packed the same, packed (the default layout)
  steadytune matched --group-by-length false   the same with random batch compositions
  steadytune default        packed, cosine, AdamW wd 0.01, clip 1.0

Batches differ: mlx-lm 0.32's iterate_batches means to sort by length, but CacheDataset.itemlen
is len() of the raw record (1 for {"messages": ...}), so its batches are runs of 4 consecutive
examples of the (shuffled) file, in a shuffled order: random compositions. steadytune groups by
length by default (batching.epoch_steps: sorted inside windows of 32 micro-batches).

Each adapter set is scored on the validation conversations with three loss masks, from one forward
pass per example over its ids followed by one padding token (id 0), as mlx-lm's batches have it:

  ours      the assistant's answer through its end-of-turn token (steadytune's training mask)
  +tail     plus the tokens the template puts after the end-of-turn token ("\\n" for ChatML)
  mlx-test  plus one padding target: mlx-lm's `default_loss` masks targets up to and including
            index len(ids) (`steps <= lengths`), so it trains and scores predicting the padding
            token after each example. `mlx_lm.lora --test` reports this one (printed too, from
            mlx-lm's own `evaluate`, which also drops the len % batch_size last examples).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import steadytune  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
from time_to_result import DATA, PROJECTIONS, chat_split  # noqa: E402

RANK, ALPHA = 16, 32.0


def tiny_model(work: Path) -> Path:
    """The tests' tiny llama, quantized 4-bit (group 64) with float32 elsewhere."""
    from conftest import build_model

    q = work / "tiny-q4"
    if not q.exists():
        src = build_model(work / "tiny-f32")
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(q),
                        "-q", "--q-bits", "4", "--q-group-size", "64", "--dtype", "float32"],
                       check=True, capture_output=True)
    return q


def data_split(work: Path, n_train: int, n_valid: int) -> Path:
    d = chat_split(DATA / "alpaca_en_demo.json", work / "data", n_train, n_valid)
    shutil.copy(d / "valid.jsonl", d / "test.jsonl")  # mlx_lm.lora --test reads test.jsonl
    return d


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def train_mlx_lm(model: Path, data: Path, out: Path, a) -> float:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(json.dumps({"lora_parameters": {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                                                   "keys": PROJECTIONS}}))
    return run([sys.executable, "-m", "mlx_lm", "lora", "-c", str(cfg), "--model", str(model), "--train",
                "--data", str(data), "--batch-size", "4", "--num-layers", "-1", "--iters", str(a.steps),
                "--max-seq-length", str(a.max_seq_length), "--learning-rate", str(a.lr), "--mask-prompt",
                "--steps-per-eval", str(10 ** 6), "--save-every", str(10 ** 6), "--val-batches", "1",
                "--seed", str(a.seed), "--adapter-path", str(out)])


def train_steadytune(model: Path, data: Path, out: Path, a, flags: list[str]) -> float:
    wall = run([sys.executable, "-m", "steadytune.cli", "train", "--model", str(model), "--data", str(data),
                "--batch-size", "4", "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA),
                "--max-seq-length", str(a.max_seq_length), "--learning-rate", str(a.lr), "--max-steps",
                str(a.steps), "--eval-every", "0", "--save-every", "0", "--progress", "none",
                "--seed", str(a.seed), "--out", str(out), *flags])
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    end = next((r for r in reversed(recs) if r.get("event") == "end"), {})
    print(f"  {out.name}: {len(recs)} records, step_shapes {end.get('step_shapes')}", flush=True)
    return wall


def masks_of(val_records, tokenizer):
    """Per example: (ids, mask ours, mask +tail, mask mlx-test) over the targets of ids + [0]."""
    from mlx_lm.tuner.datasets import ChatDataset

    ours = _steadytune_tokens(val_records, tokenizer)
    ds = ChatDataset(val_records, tokenizer, mask_prompt=True)
    out, differ = [], 0
    for r, (ids_s, m_s) in zip(val_records, zip(ours.ids, ours.masks)):
        ids, offset = ds.process(r)
        differ += list(ids) != list(ids_s)
        n = len(ids)
        steps = np.arange(1, n + 1)  # the target at position t is token t + 1 (mlx-lm's `steps`)
        ours_m = np.zeros(n, bool)
        ours_m[: len(m_s) - 1] = m_s[1:] if list(ids) == list(ids_s) else False
        tail = (steps >= offset) & (steps <= n - 1)
        mlx = (steps >= offset) & (steps <= n)
        out.append((list(ids) + [0], ours_m, tail, mlx))
    return out, differ


def _steadytune_tokens(records, tokenizer):
    from steadytune.data import tokenize_all
    from steadytune.formats import Example

    examples = [Example(kind="chat", messages=r["messages"], where=f"valid:{i + 1}") for i, r in enumerate(records)]
    return tokenize_all(examples, tokenizer, max_seq_length=10 ** 6)


def score(model_path: Path, adapters: Path | None, val_records, data: Path, max_seq_length: int) -> dict:
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import evaluate

    model, tok = load(str(model_path), adapter_path=str(adapters) if adapters else None)
    model.eval()
    per, differ = masks_of(val_records, tok)
    sums = {"ours": [0.0, 0], "+tail": [0.0, 0], "mlx-test": [0.0, 0]}
    for ids, *ms in per:
        x = mx.array(ids)[None]
        logp = model(x[:, :-1]).astype(mx.float32)
        ce = np.array(mx.logsumexp(logp, axis=-1) - mx.take_along_axis(logp, x[:, 1:, None], -1)[..., 0])[0]
        for key, m in zip(sums, ms):
            sums[key][0] += float(ce[m].sum())
            sums[key][1] += int(m.sum())
    res = {k: s / n for k, (s, n) in sums.items()}
    res["tokens"] = {k: n for k, (_, n) in sums.items()}
    res["ids_differ"] = differ
    res["mlx_lm --test"] = evaluate(model, CacheDataset(ChatDataset(val_records, tok, mask_prompt=True)),
                                    batch_size=4, num_batches=-1, max_seq_length=max_seq_length)
    return res


def lora_stats(adapters: Path) -> str:
    w = mx.load(str(adapters / "adapters.safetensors"))
    a = np.concatenate([np.array(v).ravel() for k, v in w.items() if k.endswith("lora_a")])
    b = np.concatenate([np.array(v).ravel() for k, v in w.items() if k.endswith("lora_b")])
    cfg = json.loads((adapters / "adapter_config.json").read_text())
    lp = cfg["lora_parameters"]
    return (f"rank {lp['rank']} scale {lp['scale']} dropout {lp['dropout']} keys {len(lp['keys'])}, "
            f"|A| rms {np.sqrt((a ** 2).mean()):.4f}, |B| rms {np.sqrt((b ** 2).mean()):.5f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--n-train", type=int, default=240)
    p.add_argument("--n-valid", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="mlx,matched,matched_packed,default",
                   help="comma-separated runs: mlx, matched, matched_packed, matched_nogroup, default, "
                   "matched_seed1")
    p.add_argument("--work", default="/tmp/steadytune-parity")
    p.add_argument("--score", nargs="+", metavar="PATH", help="MODEL DATA ADAPTERS...: only score")
    a = p.parse_args(argv)
    if a.score:
        return score_only(*a.score[:2], a.score[2:], a.max_seq_length)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data = tiny_model(work), data_split(work, a.n_train, a.n_valid)
    tag = f"s{a.steps}-lr{a.lr}-seed{a.seed}"
    matched = ["--lr-schedule", "constant", "--max-grad-norm", "null", "--weight-decay", "0",
               "--warmup-steps", "0"]
    runs = {"mlx": ("mlx_lm.lora (constant, Adam, no clip)", lambda o: train_mlx_lm(model, data, o, a)),
            "matched": ("steadytune matched --pack false",
                        lambda o: train_steadytune(model, data, o, a, [*matched, "--pack", "false"])),
            "matched_packed": ("steadytune matched, packed",
                               lambda o: train_steadytune(model, data, o, a, [*matched, "--pack", "true"])),
            "matched_seed1": ("steadytune matched --pack false, seed+1",
                              lambda o: train_steadytune(model, data, o, a,
                                                         [*matched, "--pack", "false", "--seed", str(a.seed + 1)])),
            "matched_nogroup": ("steadytune matched --pack false --group-by-length false",
                                lambda o: train_steadytune(model, data, o, a, [*matched, "--pack", "false",
                                                                               "--group-by-length", "false"])),
            "default": ("steadytune default (cosine, wd 0.01, clip 1.0, packed)",
                        lambda o: train_steadytune(model, data, o, a, []))}
    val = [json.loads(x) for x in (data / "valid.jsonl").read_text().splitlines()]
    rows = [("base model (no adapters)", None, score(model, None, val, data, a.max_seq_length))]
    for key in a.only.split(","):
        name, train = runs[key]
        out = work / f"{key}-{tag}"
        if out.exists():
            shutil.rmtree(out)
        wall = train(out)
        adapters = out if key == "mlx" else out / "adapters"
        print(f"  {name}: {wall:.0f} s; {lora_stats(adapters)}", flush=True)
        rows.append((name, wall, score(model, adapters, val, data, a.max_seq_length)))
    print(f"\ntiny llama 4-bit, alpaca chat {a.n_train} train / {a.n_valid} valid, batch 4, {a.steps} steps, "
          f"lr {a.lr}, rank {RANK} scale {ALPHA / RANK}; mlx {mx.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print_table(rows)
    return 0


def score_only(model: str, data: str, adapters: list[str], max_seq_length: int) -> int:
    val = [json.loads(x) for x in (Path(data) / "valid.jsonl").read_text().splitlines()]
    rows = [("base model (no adapters)", None, score(Path(model), None, val, Path(data), max_seq_length))]
    rows += [(x, None, score(Path(model), Path(x), val, Path(data), max_seq_length)) for x in adapters]
    print(f"\n{model} on {data}/valid.jsonl; mlx {mx.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print_table(rows)
    return 0


def print_table(rows) -> None:
    tokens = rows[0][2]["tokens"]
    print(f"validation target tokens: ours {tokens['ours']}, +tail {tokens['+tail']}, mlx-test {tokens['mlx-test']}; "
          f"examples whose ids differ between the trainers' tokenizations: {rows[0][2]['ids_differ']}")
    print("| run | wall s | val ours | val +tail | val mlx-test | mlx_lm --test |\n|---|---|---|---|---|---|")
    for name, wall, r in rows:
        print(f"| {name} | {'' if wall is None else f'{wall:.0f}'} | {r['ours']:.4f} | {r['+tail']:.4f} | "
              f"{r['mlx-test']:.4f} | {r['mlx_lm --test']:.4f} |")


if __name__ == "__main__":
    raise SystemExit(main())
