"""Generation speed of the default model (bench, not a test).

    python bench/generation_speed.py                 # 3 rounds, 128 new tokens, a ~30-token prompt
    python bench/generation_speed.py --rounds 5 --max-tokens 64

Rows, measured in turns within one process so that a busy machine slows them alike:
- before: the plain path (the quantized model, mlx-lm's stream_generate, BLAS threads as loaded);
- float32 copy: the previous landing's path, and today's where the compiled decoder does not cover
  a model (generation.inference_copy, one BLAS thread while decoding);
- after: what `generate`, `chat`, the demo and `serve --concurrency 1` run (load_tuned(...,
  inference=True): on the CPU the compiled decoder, steadytune/cpu_decode.py, on the 4-bit weights);
- anchor: mlx_lm's own `generate` on the quantized model.
Greedy answers must be the same in all four (checked). Tokens/s counts the new tokens over the
wall time from the prompt to the last token; cpu tokens/s divides by the process's CPU time
instead, which a machine shared with other work inflates less. The load average is printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import steadytune  # noqa: E402  (fast BLAS before mlx)

PROMPT = ("You are Pip, the assistant of a community garden. A new member asks: how should I plan "
          "a small vegetable bed for the spring?")


def timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model", default=None, help="a model folder or GGUF file (default: the embedded model)")
    args = p.parse_args()

    import mlx.core as mx
    from mlx_lm.generate import generate as mlx_lm_generate
    from mlx_lm.generate import stream_generate

    from steadytune.generation import inference_copy, load_tuned, render_prompt, stream_text, to_messages

    plain = load_tuned(None, args.model)
    fast = load_tuned(None, args.model, inference=True)  # prints the mode
    f32 = load_tuned(None, args.model)
    print(f"(float32 row: {inference_copy(f32.model)})", file=sys.stderr)
    prompt = render_prompt(plain.tokenizer, to_messages(PROMPT))

    def before(n=args.max_tokens):
        return [r.token for r in stream_generate(plain.model, plain.tokenizer, prompt, max_tokens=n)]

    def after(n=args.max_tokens):
        return "".join(stream_text(fast.model, fast.tokenizer, prompt, n))

    def copy(n=args.max_tokens):
        return "".join(stream_text(f32.model, f32.tokenizer, prompt, n))

    def anchor(n=args.max_tokens):
        return mlx_lm_generate(plain.model, plain.tokenizer, prompt, max_tokens=n)

    rows = {"before: plain path (quantized, stream_generate)": before,
            "float32 copy, adapters fused (previous path)": copy,
            "after: steadytune generate/chat/demo path": after,
            "anchor: mlx_lm.generate (quantized)": anchor}
    for fn in rows.values():  # warm-up: first-call costs out of the timings
        fn(8)
    times = {name: [] for name in rows}
    outputs = {}
    for r in range(args.rounds):
        for name, fn in rows.items():
            wall, cpu, out = timed(fn)
            times[name].append((wall, cpu))
            outputs[name] = out
            print(f"  round {r + 1}: {name}: {wall:.1f} s wall, {cpu:.1f} s cpu", file=sys.stderr, flush=True)
    tokens = outputs[next(iter(rows))]
    text = plain.tokenizer.decode(tokens)
    same = all(outputs[n] == text for n in list(rows)[1:])
    n = len(tokens)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    blas = "openblas" if steadytune.backend.fast_blas() else "reference"
    print(f"model={args.model or 'smollm2-135m (default)'} prompt={len(prompt)} tokens new={n} tokens rounds={args.rounds} "
          f"device={steadytune.backend.device_kind()} blas={blas} cpus={os.cpu_count()} "
          f"load1={load:.1f} {platform.machine()} mlx={mx.__version__}")
    print(f"| {'path':48s} | {'tok/s best':>10s} | {'tok/s median':>12s} | {'cpu tok/s median':>16s} |")
    print(f"|{'-' * 50}|{'-' * 12}|{'-' * 14}|{'-' * 18}|")
    for name, ts in times.items():
        walls = sorted(t[0] for t in ts)
        cpus = sorted(t[1] for t in ts)
        med = len(ts) // 2
        print(f"| {name:48s} | {n / walls[0]:10.1f} | {n / walls[med]:12.1f} | {n / cpus[med]:16.1f} |")
    print(f"greedy answers identical in all rows: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
