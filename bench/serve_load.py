"""Load test of `steadytune serve` on loopback (bench, not a test).

    python bench/serve_load.py                       # default model, 200 requests, 8 at a time
    python bench/serve_load.py --model tiny          # a random 2-block llama: the server's own overhead
    python bench/serve_load.py --requests 50 --concurrency 4 --max-tokens 8

Serves the model with fresh (zero-update) LoRA adapters, so it measures serving, not a training run,
and sends a bounded number of chat completions from `--concurrency` client threads to 127.0.0.1,
each with the API key. Prints latency percentiles, errors and throughput, next to the anchor measured
in the same run: the same requests answered one after another by generation.generate in-process
(no HTTP, no batching). Traffic never leaves this machine; every request has a timeout and the whole
run a deadline.
"""

from __future__ import annotations

import argparse
import http.client
import json
import secrets
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import steadytune  # noqa: E402,F401  (fast BLAS before mlx)

QUESTIONS = ["Hi! What's your name?", "Is the garden open on Sundays?", "How much does a plot cost?",
             "What should I plant in spring?", "How often should I water tomatoes?",
             "Can children join the garden?", "Where do I leave compost?", "Who runs the garden?"]


def make_run(model: str, folder: Path) -> Path:
    """A run folder with untrained adapters (B = 0: answers equal the base model's)."""
    from steadytune import checkpoint
    from steadytune.config import Config, LoraConfig, ModelConfig, save_yaml
    from steadytune.model import apply_lora, load_base

    loaded = load_base(ModelConfig(path=model))
    adapter_config = apply_lora(loaded.model, LoraConfig(), seed=0)
    cfg = Config()
    cfg.model.path = model
    save_yaml(cfg, folder / "config.yaml")
    checkpoint.save_final_adapters(folder, loaded.model, adapter_config)
    return folder


def ask(url: str, key: str, question: str, max_tokens: int, timeout: float) -> tuple[float, int, str]:
    """(seconds, completion tokens, error or '') for one chat completion."""
    host, port = url.split("//")[1].rsplit(":", 1)
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens})
    t = time.perf_counter()
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        r = conn.getresponse()
        data = r.read()
        conn.close()
    except OSError as e:
        return time.perf_counter() - t, 0, type(e).__name__
    dt = time.perf_counter() - t
    if r.status != 200:
        return dt, 0, f"HTTP {r.status}"
    return dt, json.loads(data)["usage"]["completion_tokens"], ""


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def anchor(loaded, n: int, max_tokens: int) -> tuple[float, float]:
    """Serial in-process generation: (mean seconds per request, requests/s)."""
    from steadytune.generation import generate

    t = time.perf_counter()
    for i in range(n):
        generate(loaded, QUESTIONS[i % len(QUESTIONS)], max_tokens)
    dt = time.perf_counter() - t
    return dt / n, n / dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="base model (default: the embedded one); "
                   "'tiny' builds the test suite's random 2-block llama")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--anchor-requests", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--deadline", type=float, default=900.0, help="whole load phase, seconds")
    args = p.parse_args()

    from steadytune.generation import load_tuned
    from steadytune.serve import start_server

    tmp, label = tempfile.TemporaryDirectory(), args.model
    if args.model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_model

        args.model = str(build_model(Path(tmp.name) / "tiny"))
    loaded = load_tuned(make_run(args.model, Path(tmp.name)))
    key = secrets.token_urlsafe(16)
    server = start_server(loaded, "127.0.0.1", 0, api_key=key, max_tokens=args.max_tokens)
    try:
        for q in QUESTIONS[:2]:  # warm-up: compile paths, fill the prompt cache
            ask(server.url, key, q, args.max_tokens, args.timeout)
        mean_serial, rps_serial = anchor(loaded, args.anchor_requests, args.max_tokens)
        results, t0 = [], time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(ask, server.url, key, QUESTIONS[i % len(QUESTIONS)], args.max_tokens,
                                   args.timeout) for i in range(args.requests)]
            try:
                for f in as_completed(futures, timeout=args.deadline):
                    results.append(f.result())
            except TimeoutError:
                for f in futures:
                    f.cancel()
        wall = time.perf_counter() - t0
    finally:
        server.shutdown()
        tmp.cleanup()

    ok = [r for r in results if not r[2]]
    errors = len(results) - len(ok) + (args.requests - len(results))
    lat = [r[0] for r in ok] or [float("nan")]
    tokens = sum(r[1] for r in ok)
    print(f"model={label} requests={args.requests} concurrency={args.concurrency} "
          f"max_tokens={args.max_tokens} device={steadytune.backend.device_kind()}")
    print(f"| {'setup':38s} | {'ok':>4s} | {'errors':>6s} | {'p50 s':>6s} | {'p90 s':>6s} | {'p99 s':>6s} "
          f"| {'max s':>6s} | {'req/s':>6s} | {'tok/s':>6s} |")
    print(f"|{'-' * 40}|{'-' * 6}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    print(f"| {'steadytune serve, HTTP, ' + str(args.concurrency) + ' clients':38s} | {len(ok):4d} | "
          f"{errors:6d} | {percentile(lat, 50):6.2f} | {percentile(lat, 90):6.2f} | {percentile(lat, 99):6.2f} "
          f"| {max(lat):6.2f} | {len(ok) / wall:6.2f} | {tokens / wall:6.1f} |")
    print(f"| {'anchor: generate() in-process, serial':38s} | {args.anchor_requests:4d} | {0:6d} | "
          f"{mean_serial:6.2f} | {'':6s} | {'':6s} | {'':6s} | {rps_serial:6.2f} | {'':6s} |")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
