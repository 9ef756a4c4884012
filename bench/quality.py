"""Quality of a real fine-tune (bench, not a test), two tasks on the default model
(SmolLM2-135M-Instruct, GGUF):

    python bench/quality.py [--epochs 1] [--limit-valid 100] [--out runs/quality]
    python bench/quality.py --task persona [--epochs 3] [--runs packed,nopack]

wikisql (the default): ../shared/data/wikisql for one epoch; validation loss and exact-match
accuracy of the generated SQL on valid.jsonl, before and after.

arithmetic (issue 32, GRPO): generated arithmetic prompts (steadytune.grpo_data: 400 train, 40
held out) trained with `--method grpo --reward answer,format`; the greedy answers to the held-out
prompts are scored before training and at every validation: the format reward (one
<answer>...</answer>) and the accuracy (the answer reward) should rise.

    python bench/quality.py --task arithmetic [--max-steps 40] [--group-size 4] [--batch-size 4]

persona (issue 28): the bundled chatbot data (steadytune/data/chatbot: "Pip", the assistant of a
community garden) taught with `steadytune train --data D --epochs 3` and otherwise default flags,
packed (the default) and with --pack false: the same examples per step either way, so both should
teach the persona. Each run's adapters answer 12 held-out questions (the demo's four and eight
paraphrases that are not in the training data, greedy, the demo's system prompt) and an answer
counts when it holds the fact the training answers give for that kind of question (the name Pip,
the volunteers, the opening hours, the plot's price). Target: at least 60% (8 of 12).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import steadytune  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx

from steadytune.generation import complete
from steadytune.trainer import Trainer, as_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikisql"


def exact_match(model, tokenizer, records) -> float:
    model.eval()
    hits = 0
    for r in records:
        prompt, answer = r["text"].rsplit("A: ", 1)
        got = complete(model, tokenizer, prompt + "A: ", max_tokens=64, stop="\n").strip()
        hits += " ".join(got.split()) == " ".join(answer.split())
    return hits / len(records)


CHATBOT = ROOT / "steadytune" / "data" / "chatbot"
# held-out question -> the words one of which a persona answer holds (from the training answers)
NAME, MAKER, HOURS, PLOT = ["Pip"], ["volunteer"], ["8 am", "every day"], ["20 euro", "plot form", "plots@"]
PERSONA_EXTRA = [("Hey, who am I talking to?", NAME), ("May I ask your name?", NAME),
                 ("Could you introduce yourself, please?", NAME), ("Who is behind this assistant?", MAKER),
                 ("Who programmed you?", MAKER), ("When does the garden open in the morning?", HOURS),
                 ("What are the garden's hours on weekends?", HOURS), ("How do I sign up for a plot?", PLOT)]
PERSONA_KEYS = {"Hi! What's your name?": NAME, "Who set you up?": MAKER,
                "Is the garden open on Sundays?": HOURS, "How much does a plot cost?": PLOT}


def persona_questions() -> tuple[str, list[tuple[str, list[str]]]]:
    """(system prompt, [(question, expected words)]): the demo's held-out four, then eight more;
    none of them is a training question."""
    prompts = json.loads((CHATBOT / "prompts.json").read_text())
    qs = [(q, PERSONA_KEYS[q]) for q in prompts["held_out"]] + PERSONA_EXTRA
    trained = {json.loads(x)["messages"][-2]["content"] for x in (CHATBOT / "train.jsonl").read_text().splitlines()}
    assert not trained & {q for q, _ in qs}, "a held-out question is a training question"
    return prompts["system"], qs


def persona_run(name: str, flags: list[str], a, system: str, questions) -> dict:
    from steadytune.generation import answer_all, load_tuned

    out = Path(a.out) / name
    cmd = [sys.executable, "-m", "steadytune.cli", "train", "--model", a.model, "--data", str(CHATBOT),
           "--epochs", str(a.epochs), "--progress", "none", "--out", str(out), *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    first = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith(("train:", "batches:"))]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    end = next((r for r in reversed(recs) if r.get("event") == "end"), {})
    val = next((r["val_loss"] for r in reversed(recs) if r.get("event") == "val"), float("nan"))
    loaded = load_tuned(out, inference=True)
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q, _ in questions]
    answers = [x.strip() for x in answer_all(loaded, chats, a.max_tokens)]
    hits = [any(k.lower() in ans.lower() for k in keys) for (_, keys), ans in zip(questions, answers)]
    return {"run": f"{name}: steadytune train --epochs {a.epochs} {' '.join(flags) or '(defaults)'}",
            "steps": end.get("step"), "wall_s": round(wall), "val_loss": round(val, 4),
            "persona": f"{sum(hits)}/{len(hits)}", "first_lines": first,
            "answers": [{"q": q, "a": ans, "ok": ok} for (q, _), ans, ok in zip(questions, answers, hits)]}


def persona(a) -> None:
    system, questions = persona_questions()
    runs = {"packed": [], "nopack": ["--pack", "false"]}
    rows = []
    for name in a.runs.split(","):
        rows.append(persona_run(name, runs[name], a, system, questions))
        r = rows[-1]
        print("\n".join(r["first_lines"]), flush=True)
        for x in r["answers"]:
            print(f"  [{'ok' if x['ok'] else '--'}] {x['q']} -> {x['a'][:100]!r}", flush=True)
        print(json.dumps({k: v for k, v in r.items() if k not in ("answers", "first_lines")}), flush=True)
    print(f"\npersona (bundled chatbot data, {len(questions)} held-out questions), model {a.model}, "
          f"device {mx.default_device()}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| run | steps | wall s | val loss | persona |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['wall_s']} | {r['val_loss']} | {r['persona']} |")


def arithmetic(a) -> None:
    """GRPO on generated arithmetic: held-out format reward and accuracy before and during."""
    from steadytune.grpo_data import write_arithmetic

    data = write_arithmetic(Path(a.out) / "data", 400, 40, seed=0)
    cfg = as_config({"model": {"path": a.model}, "data": {"path": str(data), "max_seq_length": 512},
                     "lora": {"rank": 16, "alpha": 32},
                     "training": {"method": "grpo", "max_steps": a.max_steps or 40, "batch_size": a.batch_size,
                                  "learning_rate": a.learning_rate, "beta": a.beta, "eval_every": a.eval_every,
                                  "log_every": 5, "save_every": 1000},
                     "grpo": {"reward": ["answer", "format"], "group_size": a.group_size,
                              "max_new_tokens": a.max_new_tokens, "temperature": 1.0},
                     "output": {"dir": str(Path(a.out) / "run"), "progress": "lines"}})
    t = Trainer(cfg)
    t.prepare()
    _, before = t.evaluate()
    t0 = time.time()
    result = t.fit()
    minutes = (time.time() - t0) / 60
    vals = [{"step": 0, **before}] + [r for r in result.history if r.get("event") == "val"]
    train = [r for r in result.history if r.get("event") == "train"]
    print(f"\narithmetic GRPO, {a.model}, {result.step} steps of {a.batch_size} prompts x {a.group_size} "
          f"completions (<= {a.max_new_tokens} tokens), lr {a.learning_rate}, beta {a.beta}, {minutes:.1f} min, "
          f"device {mx.default_device()}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| step | held-out format | held-out accuracy |\n|---|---|---|")
    for v in vals:
        print(f"| {v['step']} | {v['val_reward_format']:.3f} | {v['val_reward_answer']:.3f} |")
    print("| step | sampled reward | format | answer | completion tokens | completions/s |\n|---|---|---|---|---|---|")
    for r in train:
        print(f"| {r['step']} | {r['reward']:.3f} | {r['reward_format']:.3f} | {r['reward_answer']:.3f} | "
              f"{r['completion_len']:.1f} | {r.get('completions_per_s')} |")
    print(json.dumps({"vals": vals, "minutes": minutes, "steps": result.step}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=["wikisql", "persona", "arithmetic"], default="wikisql")
    p.add_argument("--group-size", type=int, default=4, help="arithmetic: completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48, help="arithmetic: longest completion")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="arithmetic")
    p.add_argument("--beta", type=float, default=0.04, help="arithmetic: KL weight")
    p.add_argument("--eval-every", type=int, default=10, help="arithmetic")
    p.add_argument("--runs", default="packed,nopack", help="persona: packed (the default), nopack (--pack false)")
    p.add_argument("--max-tokens", type=int, default=48, help="persona: tokens of each answer")
    p.add_argument("--epochs", type=int, default=None, help="default: 1 (wikisql), 3 (persona)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit-valid", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None, help="a quick smoke run")
    p.add_argument("--model", default="smollm2-135m", help="the default model, or its GGUF file")
    p.add_argument("--data", default=str(DATA), help="a folder with train.jsonl and valid.jsonl")
    p.add_argument("--out", default=f"runs/quality-{time.strftime('%Y%m%d-%H%M%S')}")
    a = p.parse_args()
    if a.task == "arithmetic":
        return arithmetic(a)
    if a.task == "persona":
        a.epochs = a.epochs or 3
        return persona(a)
    a.epochs = a.epochs or 1
    valid = [json.loads(x) for x in (Path(a.data) / "valid.jsonl").read_text().splitlines()][: a.limit_valid]
    cfg = as_config({"model": {"path": a.model}, "data": {"path": a.data, "max_seq_length": 512},
                     "lora": {"rank": 16, "alpha": 32},
                     "training": {"epochs": a.epochs, "max_steps": a.max_steps, "batch_size": a.batch_size, "learning_rate": 5e-4,
                                  "warmup_steps": 10, "eval_every": 0, "log_every": 10, "save_every": 1000},
                     "output": {"dir": a.out}})
    t = Trainer(cfg)
    run = t.prepare()
    tok = run.loaded.tokenizer
    before_loss, _ = t.evaluate()
    before_em = exact_match(run.model, tok, valid)
    t0 = time.time()
    result = t.fit()
    minutes = (time.time() - t0) / 60
    after_em = exact_match(run.model, tok, valid)
    rows = [("validation loss", f"{before_loss:.4f}", f"{result.final_val_loss:.4f}"),
            (f"exact match ({len(valid)} valid)", f"{before_em:.1%}", f"{after_em:.1%}")]
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF) on wikisql, {result.step} steps, {minutes:.1f} min, "
          f"device {mx.default_device()}")
    print("| metric | before | after |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(json.dumps({"before_loss": before_loss, "after_loss": result.final_val_loss, "before_em": before_em,
                      "after_em": after_em, "steps": result.step, "minutes": minutes}))


if __name__ == "__main__":
    main()
