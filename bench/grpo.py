"""GRPO speed and memory (bench, not tests): `steadytune train --method grpo` against mlx-lm-lora's
GRPO trainer (`train_grpo`, the `bench` extra), each side in a process of its own (peak memory is
per process), on the same model, prompts, group size, completion length, temperature, beta, LoRA
(steadytune's apply_lora on both: rank, blocks and targets) and number of steps.

    python bench/grpo.py                      # default model, CPU: 2 prompts x 4, 32 tokens, 3 steps
    python bench/grpo.py --only mlx-lm-lora   # one side (in its own process, as always)
    python bench/grpo.py --model 7b --prompts 4 --group-size 8 --max-new-tokens 256 --steps 5   # a GPU
    python bench/grpo.py --model 7b --prompts 8 --group-size 4 --max-new-tokens 768 --steps 2   # GPU memory
    python bench/grpo.py --prompts 8 --group-size 2 --max-new-tokens 16 --context-words 100 --steps 1 --mem-cap-gb 4.5

Per side: completions per second (completions generated / wall of the training steps, model
load and start-up excluded; "steps 2..S" also leaves out the first step, which compiles), steps,
peak memory (MLX's mx.get_peak_memory, and the process's max RSS), mean completion length
(tokens), the mean rewards and the share of the wall spent generating. The table is printed and
the JSON written to bench/results/.

The prompts are steadytune.grpo_data.arithmetic's (the result asked inside <answer></answer>),
records with "messages" (a worked example turn, then the question), templated by
steadytune.data.prompt_ids on both sides (the whole conversation, no system prompt of
mlx-lm-lora's own); the rewards are steadytune's built-in `answer` and `format` (rewards.py), on
mlx-lm-lora's side wrapped in its reward signature. Sampling is plain temperature sampling on both
(mlx-lm-lora's top-p 0.95 / top-k 20 defaults are switched off), and mlx-lm-lora stops at EOS
only, as steadytune does, unless --stop-text is given (its own default also stops at "</answer>").

--model 7b builds bench/time_to_result.py's 7B-shaped 4-bit model (random weights, a BPE
tokenizer trained on the alpaca demo: speed, not quality; completions then run to
--max-new-tokens) in --work, once. --mem-cap-gb caps each side's data segment (RLIMIT_DATA,
CPU only): MLX's CPU allocator does not survive a failed malloc, so a side over the cap dies
(SIGSEGV), which the table reports as out of memory. --context-words puts a passage of N words
before each question: long prompts raise the memory of the scoring pass without the cost of
generating long completions on a CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
SHARED = ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------- prompts and rewards

WORDS = ("river stone garden lamp window paper orange quiet market seven north engine letter "
         "summer bridge cloud silver forest table music winter harbor candle field copper").split()


def with_context(recs: list[dict], words: int, seed: int) -> list[dict]:
    """Each question (the conversation's last user turn) after a passage of `words` seeded filler
    words (a long-context prompt); the worked example turns before it stay as they are."""
    if not words:
        return recs
    rng = random.Random(seed)

    def long(r):
        last = r["messages"][-1]
        text = ("Read the passage, then answer the question.\n\n"
                + " ".join(rng.choice(WORDS) for _ in range(words)) + "\n\n" + last["content"])
        return {**r, "messages": r["messages"][:-1] + [{**last, "content": text}]}
    return [long(r) for r in recs]


def their_rewards():
    """steadytune's built-in rewards (rewards.py) with mlx-lm-lora's signature (lists in, one
    float per completion out): both sides score with the same functions. The names become its
    metric keys (reward_answer_mean, reward_format_mean)."""
    from steadytune import rewards

    def wrap(name):
        fn = rewards.BUILTIN[name]

        def reward(prompts, completions, answer, types=None):
            return [fn(p, c, {"answer": a}) for p, c, a in zip(prompts, completions, answer)]
        reward.__name__ = f"reward_{name}"
        return reward
    return [wrap("answer"), wrap("format")]


def write_data(folder: Path, a) -> Path:
    """train.jsonl (enough prompts for every step) and a small valid.jsonl, so that steadytune
    holds nothing of train out; both sides read train.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    from steadytune.grpo_data import arithmetic

    recs = with_context(arithmetic(max(64, a.prompts * a.steps) + 16, a.seed), a.context_words, a.seed)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[16:]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:16]))
    return folder


def seven_b(work: Path) -> Path:
    """bench/time_to_result.py's 7B-shaped 4-bit model folder (its alpaca chat split trains the
    tokenizer), built once."""
    import time_to_result as ttr

    chat = ttr.chat_split(SHARED / "alpaca_en_demo.json", work / "alpaca-chat")
    return ttr.gpu_model(work / "model-7b", chat)


def max_rss_gb(who: int) -> float:
    kb = resource.getrusage(who).ru_maxrss
    return kb / 1e9 if sys.platform == "darwin" else kb * 1024 / 1e9  # bytes on macOS, KiB on Linux


def cpu_s(who: int) -> float:
    """CPU-seconds (all threads, user + system) of this process or of its waited-for children:
    the measure that holds on a machine shared with other work."""
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime


# --------------------------------------------------------------------------- steadytune's side

def steadytune_side(a) -> dict:
    """`steadytune train --method grpo` as a user starts it; each output line time-stamped as it
    arrives (--progress lines --log-every 1: a line per step); the rest from its metrics.jsonl."""
    import time_to_result as ttr

    out = Path(a.work) / "runs" / f"steadytune-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "steadytune.cli", "train", "--method", "grpo", "--model", a.model,
           "--data", str(Path(a.work) / "data"), "--reward", "answer,format",
           "--group-size", str(a.group_size), "--max-new-tokens", str(a.max_new_tokens),
           "--temperature", str(a.temperature), "--beta", str(a.beta), "--batch-size", str(a.prompts),
           "--max-steps", str(a.steps), "--lora-rank", str(a.lora_rank), "--lora-alpha", str(a.lora_alpha),
           "--lora-layers", str(a.lora_layers),
           "--learning-rate", str(a.lr), "--lr-schedule", "constant", "--max-seq-length", str(a.max_seq_length),
           "--seed", str(a.seed), "--out", str(out), "--eval-every", "0", "--save-every", "0",
           "--log-every", "1", "--progress", "lines", *a.steadytune_flags.split()]
    lines, wall, rc = ttr.timed(cmd, timeout=3600)
    res = {"cmd": " ".join(cmd[2:]).replace(str(a.work), "WORK"), "rc": rc, "process_wall_s": wall,
           "max_rss_gb": max_rss_gb(resource.RUSAGE_CHILDREN), "process_cpu_s": cpu_s(resource.RUSAGE_CHILDREN)}
    if rc:
        text = "\n".join([x for _, x in lines[-15:]] + [died(rc, a.mem_cap_gb)])
        res["error"] = text.replace(str(a.work), "WORK").replace(str(ROOT), ".")  # no machine paths in results
    if not (out / "metrics.jsonl").exists():
        return res
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in recs if r.get("event") == "train"]
    startup = next((r for r in recs if r.get("event") == "startup"), {})
    ends = {int(m.group(1)): t for t, x in lines if (m := re.match(r"step (\d+)/\d+ ", x))}
    per_step = a.prompts * a.group_size
    comps = [r.get("completions", per_step) for r in train]
    total = sum(comps)

    def mean(key):  # completion-weighted over the records that have it
        have = [(r[key], c) for r, c in zip(train, comps) if isinstance(r.get(key), (int, float))]
        return sum(v * c for v, c in have) / sum(c for _, c in have) if have else None

    first = startup.get("compile_s")  # the first step's seconds (mostly compilation)
    steady = ends[a.steps] - ends[1] if a.steps > 1 and 1 in ends and a.steps in ends else None
    res.update(steps=max((r["step"] for r in train), default=0), completions=total,
               steady_wall_s=steady, wall_s=first + (steady or 0) if first else None,
               first_step_s=first, startup=startup,
               steady_completions=total - (comps[0] if train and train[0]["step"] == 1 else per_step),
               completion_len=mean("completion_len"), reward=mean("reward"),
               reward_answer=mean("reward_answer"), reward_format=mean("reward_format"), kl=mean("kl"),
               gen_s=sum(r["gen_s"] for r in train if isinstance(r.get("gen_s"), (int, float))) or None,
               peak_gb=max((r["peak_mem_gb"] for r in train if "peak_mem_gb" in r), default=None))
    return res


# --------------------------------------------------------------------------- mlx-lm-lora's side

def mlx_lm_lora_side(a) -> dict:
    """mlx-lm-lora's `train_grpo` driven from Python on steadytune's load of the model (its LoRA
    through steadytune's apply_lora: mlx-lm's layers, the same blocks and targets) and the same
    prompt token ids (the model's chat template over the record's messages: no system prompt of
    its own); its reference model a second load, as its CLI does. Times: the first batch drawn (start of step
    1), each step's end from its per-step report (steps_per_report=1, after the step's mx.eval),
    and each call of its generate_grpo."""
    import numpy as np

    import steadytune  # noqa: F401  (fast BLAS before mlx)
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora import _version
    from mlx_lm_lora.trainer import grpo_trainer as g

    from steadytune.config import Config
    from steadytune.data import prompt_ids
    from steadytune.model import apply_lora, load_base

    cfg = Config()
    cfg.model.path = a.model
    cfg.lora.rank, cfg.lora.num_layers = a.lora_rank, a.lora_layers
    cfg.lora.alpha = a.lora_alpha
    loaded = load_base(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    ref_model = None
    if a.beta:
        ref_model = load_base(cfg.model).model
        ref_model.freeze()
    apply_lora(model, cfg.lora, a.seed)
    recs = [json.loads(x) for x in (Path(a.work) / "data" / "train.jsonl").read_text().splitlines()]

    data = [(prompt_ids(tok, r["messages"]), tok.encode(r["answer"]), r["messages"][-1]["content"],
             r["answer"]) for r in recs]
    marks = {"start": None, "ends": {}, "gen": []}

    def batches(**kw):
        for b in g.iterate_grpo_batches(**kw):
            if marks["start"] is None:
                marks["start"], marks["cpu"] = time.perf_counter(), time.process_time()
            yield b

    generate = g.generate_grpo

    def timed_generate(**kw):  # generation returns concrete token lists: no lazy work escapes the timing
        t = time.perf_counter()
        out = generate(**kw)
        marks["gen"].append(time.perf_counter() - t)
        return out

    reports = []

    class Report(TrainingCallback):
        def on_train_loss_report(self, info):
            marks["ends"][info["iteration"]] = time.perf_counter()
            reports.append(info)

    g.generate_grpo = timed_generate  # a timing wrapper on the module global train_grpo calls
    np.random.seed(a.seed)
    mx.random.seed(a.seed)
    args = g.GRPOTrainingArgs(
        batch_size=a.prompts, iters=a.steps, steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
        max_seq_length=a.max_seq_length, group_size=a.group_size, max_completion_length=a.max_new_tokens,
        beta=a.beta, epsilon=0.2, temperature=a.temperature, top_p=1.0, top_k=0, min_p=0.0,
        grad_checkpoint=a.their_grad_checkpoint,
        adapter_file=str(Path(a.work) / "mlx_lm_lora_adapters.safetensors"))
    opt = optim.AdamW(learning_rate=a.lr, weight_decay=0.01)
    # no mx.reset_peak_memory(): steadytune's peak counts from its start too (the same loader)
    g.train_grpo(model, ref_model, tok, opt, data, None, reward_funcs=their_rewards(), args=args,
                 iterate_batches=batches, training_callback=Report(), end_answer_token=a.stop_text)
    per_step = a.prompts * a.group_size
    ends = marks["ends"]
    mean = lambda k: sum(r[k] for r in reports) / len(reports)  # noqa: E731  (every step holds P x G completions)
    return {"version": _version.__version__, "rc": 0, "steps": len(reports), "completions": per_step * len(reports),
            "wall_s": ends[a.steps] - marks["start"], "first_step_s": ends[1] - marks["start"],
            "steady_wall_s": ends[a.steps] - ends[1] if a.steps > 1 else None,
            "steady_completions": per_step * (a.steps - 1), "gen_s": sum(marks["gen"]),
            "steady_gen_s": sum(marks["gen"][1:]),
            "completion_len": mean("train_average_generated_tokens"), "reward": mean("train_total_rewards_mean"),
            "reward_answer": mean("train_reward_answer_mean"), "reward_format": mean("train_reward_format_mean"),
            "kl": mean("train_kl"), "hit_max_tokens": mean("train_hit_max_tokens_ratio"),
            "peak_gb": mx.get_peak_memory() / 1e9, "max_rss_gb": max_rss_gb(resource.RUSAGE_SELF),
            "process_cpu_s": cpu_s(resource.RUSAGE_SELF), "steps_cpu_s": time.process_time() - marks["cpu"],
            "per_step_s": [ends[i] - (ends[i - 1] if i > 1 else marks["start"]) for i in range(1, a.steps + 1)],
            "prompt_tokens": sum(len(d[0]) for d in data) / len(data)}


# --------------------------------------------------------------------------- the two processes

SIDES = ("steadytune", "mlx-lm-lora")


def died(rc: int, cap_gb: float) -> str:
    """Why a process ended with `rc`; under a cap, SIGSEGV is MLX's CPU allocator out of memory."""
    why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
    return why + (f" (over the {cap_gb:g} GB cap: out of memory)" if rc == -signal.SIGSEGV and cap_gb else "")


def run_side(side: str, a) -> dict:
    """One side in a process of its own, under --mem-cap-gb (inherited by steadytune's process)."""
    argv = [sys.executable, __file__, "--side", side] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                                          if k not in ("side", "json") and not isinstance(v, bool)]
    argv += ["--their-grad-checkpoint"] if a.their_grad_checkpoint else []
    cap = int(a.mem_cap_gb * 2**30)
    limit = (lambda: resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))) if cap else None
    t = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, preexec_fn=limit)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode == 0 and line:
        return json.loads(line[-1][7:])
    return {"rc": out.returncode, "error": died(out.returncode, a.mem_cap_gb), "seconds": time.perf_counter() - t,
            "tail": (out.stdout + out.stderr)[-3000:]}


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(res: dict) -> str:
    rows = ["| side | steps | completions | completions/s (all steps) | completions/s (steps 2..S) "
            "| completions per CPU-second (whole process) | generating (share of wall) | mean completion tokens "
            "| reward answer / format | KL | peak MLX GB | max RSS GB |", "|---" * 12 + "|"]
    for side, r in res.items():
        name = side if side == "steadytune" else f"mlx-lm-lora {r.get('version', '')}".strip()
        if r.get("rc"):
            done = f" after {r['steps']} steps (peak MLX {r['peak_gb']:.2f} GB)" if r.get("steps") else ""
            rows.append(f"| {name} | failed{done}: {r['error'].splitlines()[-1]} " + "|" * 11)
            continue
        cps = r["completions"] / r["wall_s"] if r.get("wall_s") else None
        steady = r["steady_completions"] / r["steady_wall_s"] if r.get("steady_wall_s") else None
        share = r["gen_s"] / r["wall_s"] if r.get("gen_s") and r.get("wall_s") else None
        per_cpu = r["completions"] / r["process_cpu_s"] if r.get("process_cpu_s") else None
        rows.append(f"| {name} | {r['steps']} | {r['completions']} | {fmt(cps, '.3f')} | {fmt(steady, '.3f')} "
                    f"| {fmt(per_cpu, '.3f')} | {fmt(share, '.0%')} | {fmt(r.get('completion_len'), '.1f')} "
                    f"| {fmt(r.get('reward_answer'), '.2f')} / {fmt(r.get('reward_format'), '.2f')} "
                    f"| {fmt(r.get('kl'), '.4f')} | {fmt(r.get('peak_gb'), '.2f')} "
                    f"| {fmt(r.get('max_rss_gb'), '.2f')} |")
    return "\n".join(rows)


def report(res: dict, a) -> None:
    """The table, the ratio against the issue's target, and the JSON in bench/results/."""
    import mlx.core as mx

    what = "the default model (SmolLM2-135M-Instruct)" if a.model == "smollm2-135m" else a.model
    blocks = "all blocks" if a.lora_layers < 0 else f"the last {a.lora_layers} blocks"
    print(f"\nGRPO, {what}, {mx.default_device()}, 4-bit, LoRA rank {a.lora_rank} alpha {a.lora_alpha:g} on "
          f"{blocks}, {a.prompts} prompts x group {a.group_size} a step, at most {a.max_new_tokens} new tokens, "
          f"temperature {a.temperature}, beta {a.beta}, {a.steps} steps"
          + (f", a {a.context_words}-word passage before each prompt" if a.context_words else "")
          + (f", each side capped at {a.mem_cap_gb:g} GB (RLIMIT_DATA)" if a.mem_cap_gb else "") + "\n")
    print(table(res))
    ours, theirs = res.get("steadytune", {}), res.get("mlx-lm-lora", {})
    if ours.get("steady_wall_s") and theirs.get("steady_wall_s") and not (ours.get("rc") or theirs.get("rc")):
        rate = lambda r: r["steady_completions"] / r["steady_wall_s"]  # noqa: E731
        print(f"\nsteadytune / mlx-lm-lora, completions per second over steps 2..S: {rate(ours) / rate(theirs):.2f}x, "
              f"peak MLX memory {ours['peak_gb'] / theirs['peak_gb']:.2f}x (target: at least 2x, at no more memory)")
    dev = "gpu" if "gpu" in str(mx.default_device()) else "cpu"
    path = Path(a.json or ROOT / "bench" / "results" / f"{dev}-grpo-{time.strftime('%Y-%m-%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {side: {k: v for k, v in r.items() if k != "tail"} for side, r in res.items()}  # tracebacks: paths
    settings = {k: str(v).replace(str(a.work), "WORK") if k == "model" else v for k, v in vars(a).items()
                if k not in ("work", "json", "side")}
    path.write_text(json.dumps({"settings": settings,
                                "device": str(mx.default_device()), "results": kept}, indent=1))
    print(f"\nwritten: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a model path, the default model, or 7b (built in --work)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (steadytune --batch-size)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (both sides score a reference when > 0)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0, help="the LoRA scale is alpha / rank")
    p.add_argument("--lora-layers", type=int, default=-1, help="adapt the last N blocks (-1 = all)")
    p.add_argument("--max-seq-length", type=int, default=2048, help="steadytune: prompt + completion; "
                   "mlx-lm-lora: the prompt (cut to it)")
    p.add_argument("--context-words", type=int, default=0, help="a passage of N words before each question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-text", default="", help="mlx-lm-lora only: also stop at this text (its own default "
                   "is </answer>; steadytune stops at EOS)")
    p.add_argument("--their-grad-checkpoint", action="store_true", help="mlx-lm-lora's grad_checkpoint")
    p.add_argument("--steadytune-flags", default="", help="extra flags for steadytune train")
    p.add_argument("--mem-cap-gb", type=float, default=0, help="RLIMIT_DATA of each side (CPU), 0 = none")
    p.add_argument("--work", default="runs/grpo-bench")
    p.add_argument("--side", choices=["both", *SIDES], default="both")
    p.add_argument("--only", default="", help="comma-separated sides to run (default both)")
    p.add_argument("--json", default=None, help="where to write the results (default bench/results/...)")
    a = p.parse_args()
    if a.side != "both":
        r = steadytune_side(a) if a.side == "steadytune" else mlx_lm_lora_side(a)
        print("RESULT " + json.dumps(r))
        return
    if a.model == "7b":
        a.model = str(seven_b(Path(a.work)))
    write_data(Path(a.work) / "data", a)
    res = {}
    for side in (a.only.split(",") if a.only else SIDES):
        res[side] = run_side(side, a)
        shown = {k: v for k, v in res[side].items() if k not in ("tail", "startup")}
        print(f"{side}: {json.dumps(shown)}", flush=True)
        if res[side].get("rc"):
            print(res[side].get("tail") or res[side]["error"])
    report(res, a)


if __name__ == "__main__":
    main()
