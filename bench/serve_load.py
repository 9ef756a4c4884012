"""Load test of `steadytune serve` on loopback (bench, not a test).

    python bench/serve_load.py                       # default model, 200 requests, 8 at a time
    python bench/serve_load.py --model tiny          # a random 2-block llama: the server's own overhead
    python bench/serve_load.py --requests 50 --concurrency 4 --max-tokens 8
    python bench/serve_load.py --model tiny --attack # 1,000 hostile + 1,000 normal requests from 32
                                                     # clients, 500 slowloris sockets (--scale 0.5: half)

Serves the model with fresh (zero-update) LoRA adapters, so it measures serving, not a training run,
and sends a bounded number of chat completions from `--concurrency` client threads to 127.0.0.1,
each with the API key. Prints latency percentiles, errors and throughput, next to the anchor measured
in the same run: the same requests answered one after another by generation.generate in-process
(no HTTP, no batching). Traffic never leaves this machine; every request has a timeout and the whole
run a deadline.

--attack runs `steadytune serve` as its own process (a crash is seen, not suffered) and sends, from
32 client threads, normal requests alone (the anchor), then normal requests shuffled with hostile
ones of every kind the server refuses (fields out of range for the model, NaN, deep JSON, bad
lengths, wrong key, oversized heads) while 500 sockets drip request heads a byte a second. It
reports what each kind got, the normal requests' latency alone and under attack, how the slowloris
sockets fared, and the server's resident memory; it exits 1 unless every normal request was
answered, every hostile one got its status and the server is still up.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import steadytune  # noqa: E402,F401  (fast BLAS before mlx)

QUESTIONS = ["Hi! What's your name?", "Is the garden open on Sundays?", "How much does a plot cost?",
             "What should I plant in spring?", "How often should I water tomatoes?",
             "Can children join the garden?", "Where do I leave compost?", "Who runs the garden?"]


def make_run(model: str, folder: Path) -> tuple[Path, int]:
    """A run folder with untrained adapters (B = 0: answers equal the base model's), and the
    model's vocabulary size."""
    from steadytune import checkpoint
    from steadytune.config import Config, LoraConfig, ModelConfig, save_yaml
    from steadytune.model import apply_lora, load_base

    loaded = load_base(ModelConfig(path=model))
    adapter_config = apply_lora(loaded.model, LoraConfig(), seed=0)
    cfg = Config()
    cfg.model.path = model
    save_yaml(cfg, folder / "config.yaml")
    checkpoint.save_final_adapters(folder, loaded.model, adapter_config)
    return folder, int(loaded.config["vocab_size"])


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


# --- under attack: hostile requests, slowloris sockets, normal requests (--attack) ---------------

def hostile_requests(key: str, vocab: int) -> dict[str, tuple[bytes, int]]:
    """Each kind of hostile request as raw bytes, with the status the server must answer."""
    def post(body: bytes, auth: str = f"Bearer {key}") -> bytes:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    def fields(**f) -> bytes:  # json.dumps writes NaN for float("nan"), as a careless client would
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **f}
        return post(json.dumps(body).encode())

    return {
        "top_k = vocabulary size": (fields(top_k=vocab), 400),
        "min_p NaN": (fields(min_p=float("nan")), 400),
        "stop: 5": (fields(stop=5), 400),
        "logit_bias id 999999999": (fields(logit_bias={"999999999": 100}), 400),
        "seed 2**80": (fields(seed=2 ** 80), 400),
        "temperature NaN": (fields(temperature=float("nan")), 400),
        "temperature -1": (fields(temperature=-1), 400),
        "template keyword": (fields(chat_template_kwargs={"tokenize": False}), 400),
        "image part": (fields(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]), 400),
        "JSON nested 100,000 deep": (post(b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400),
        "body not UTF-8": (post(b'{"messages": "\xff\xfe"}'), 400),
        "prompt over the context": (fields(messages=[{"role": "user", "content": "count " * 100_000}]), 413),
        "wrong API key": (post(b'{"messages": []}', auth="Bearer wrong"), 401),
        "no Content-Length": (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                              f"Authorization: Bearer {key}\r\n\r\n".encode(), 411),
        "Content-Length 5 GB, never sent": (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                            f"Authorization: Bearer {key}\r\nContent-Length: "
                                            "5000000000\r\n\r\n".encode(), 413),
        "head over 64 KiB": (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n", 431),
    }


def raw_exchange(host: str, port: int, data: bytes, timeout: float) -> tuple[float, int | str]:
    """(seconds, status or error name) for one hand-made request."""
    t = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            try:
                s.sendall(data)
            except OSError:  # refused before the whole request was sent (413, 431): read the answer
                pass
            reply = b""
            while b"\r\n" not in reply and len(reply) < 1 << 16:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError as e:
        return time.perf_counter() - t, type(e).__name__
    dt = time.perf_counter() - t
    try:
        return dt, int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return dt, "no answer"


def ask_until_answered(url: str, key: str, question: str, max_tokens: int, deadline: float):
    """A normal client: retries a 503 (Retry-After) until answered or `deadline` seconds pass.
    (seconds from the first try, tries, error or '')."""
    t, tries = time.perf_counter(), 0
    while True:
        tries += 1
        dt, _, error = ask(url, key, question, max_tokens, deadline)
        if error != "HTTP 503" or time.perf_counter() - t > deadline:
            return time.perf_counter() - t, tries, error
        time.sleep(1.0)


class Slowloris:
    """`n` sockets that each send a request head one byte a second, reconnecting when the server
    drops them, until stop(). Loopback only; one thread."""

    HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000

    def __init__(self, host: str, port: int, n: int):
        self.host, self.port, self.n = host, port, n
        self.opened = self.dropped = 0
        self.lifetimes: list[float] = []
        self.stopped, self.error = threading.Event(), None
        self.thread = threading.Thread(target=self._run_or_record, daemon=True)

    def _run_or_record(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by stop(): an attack that did not run proves nothing
            self.error = e

    def _connect(self):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((self.host, self.port))
        self.opened += 1
        return [s, time.monotonic(), 0]  # socket, opened at, bytes sent

    def _run(self) -> None:
        socks = [self._connect() for _ in range(self.n)]
        while not self.stopped.wait(1.0):
            poll = select.poll()  # not select.select: its descriptors end at 1024
            for s, _, _ in socks:
                poll.register(s, select.POLLIN)
            readable = {fd for fd, _ in poll.poll(0)}
            for i, entry in enumerate(socks):
                s, opened, sent = entry
                try:
                    if s.fileno() in readable and not s.recv(4096):
                        raise ConnectionError("closed by the server")
                    entry[2] += s.send(self.HEAD[sent:sent + 1])
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self.dropped += 1
                    self.lifetimes.append(time.monotonic() - opened)
                    s.close()
                    socks[i] = self._connect()
        for s, _, _ in socks:
            s.close()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"the slowloris sockets failed: {self.error!r}") from self.error


def rss_mib(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of process `pid`, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_serve_process(run: Path, key: str, max_tokens: int, log: Path):
    """`steadytune serve RUN --port 0` as its own process (a crash is then seen, not suffered);
    returns (process, url)."""
    env = dict(os.environ, STEADYTUNE_API_KEY=key, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "steadytune.cli", "serve", str(run), "--port", "0",
                             "--max-tokens", str(max_tokens)], env=env, stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"serve did not start: {line!r}; see {log}")
    return proc, line.split(" on ")[1].split("/v1/")[0]


def run_clients(jobs: list, clients: int, deadline: float) -> list:
    """Run the callables in `jobs` from `clients` threads; their results, in order of completion."""
    results = []
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(j) for j in jobs]
        try:
            for f in as_completed(futures, timeout=deadline):
                results.append(f.result())
        except TimeoutError:
            for f in futures:
                f.cancel()
    return results


def attack(args) -> int:
    """Normal requests alone (the anchor), then mixed with hostile ones and slowloris sockets,
    against one `steadytune serve` process; a table of what each got, the normal requests'
    latency and the server's memory."""
    n_normal, n_hostile, n_slow = (round(x * args.scale) for x in (1000, 1000, 500))
    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_model

        model = str(build_model(Path(tmp.name) / "tiny"))
    (Path(tmp.name) / "run").mkdir()
    run, vocab = make_run(model, Path(tmp.name) / "run")
    key = secrets.token_urlsafe(16)
    log = Path(tmp.name) / "serve.log"
    proc, url = start_serve_process(run, key, args.max_tokens, log)
    host, port = url.split("//")[1].rsplit(":", 1)
    port = int(port)
    kinds = hostile_requests(key, vocab)
    rows, slow = {}, None
    try:
        for q in QUESTIONS[:2]:
            ask(url, key, q, args.max_tokens, args.timeout)
        rss_start = rss_mib(proc.pid)[0]
        normal = partial(ask_until_answered, url, key, max_tokens=args.max_tokens, deadline=args.timeout)
        t = time.perf_counter()
        rows["anchor"] = run_clients([partial(normal, QUESTIONS[i % 8]) for i in range(args.anchor_normal)],
                                     args.concurrency, args.deadline)
        anchor_wall = time.perf_counter() - t
        rss_anchor = rss_mib(proc.pid)[0]

        slow = Slowloris(host, port, n_slow)
        slow.start()
        time.sleep(2.0)  # the sockets are open and dripping
        rng = random.Random(0)
        names = list(kinds)
        jobs = [("normal", partial(normal, QUESTIONS[i % 8])) for i in range(n_normal)]
        jobs += [(names[i % len(names)], partial(raw_exchange, host, port, kinds[names[i % len(names)]][0],
                                                 args.timeout)) for i in range(n_hostile)]
        rng.shuffle(jobs)
        t, done, rss_rounds = time.perf_counter(), [], []
        for r in range(args.rounds):  # the memory after each round: flat, or growing?
            part = jobs[r * len(jobs) // args.rounds:(r + 1) * len(jobs) // args.rounds]
            done += run_clients([lambda kind=kind, job=job: (kind, job()) for kind, job in part],
                                args.concurrency, args.deadline)
            rss_rounds.append(rss_mib(proc.pid)[0])
        attack_wall = time.perf_counter() - t
        # the slowloris sockets run past the server's head deadline at least once
        time.sleep(max(0.0, args.slow_seconds - attack_wall))
        after = normal(QUESTIONS[0])  # still answered with the sockets dripping
        slow.stop()
        for kind, result in done:
            rows.setdefault(kind, []).append(result)
        health = raw_exchange(host, port, f"GET /health HTTP/1.0\r\nAuthorization: Bearer {key}\r\n\r\n"
                              .encode(), 30)[1]
        rss_end, rss_peak = rss_mib(proc.pid)
        alive = proc.poll() is None
    finally:
        if slow is not None and slow.thread.is_alive():
            slow.stop()
        proc.terminate()
        proc.wait(timeout=60)
        tracebacks = log.read_text(errors="replace").count("Traceback")
        tmp.cleanup()

    print(f"model={args.model} clients={args.concurrency} max_tokens={args.max_tokens} scale={args.scale}: "
          f"{n_normal} normal + {n_hostile} hostile requests, {n_slow} slowloris sockets; "
          f"anchor: {args.anchor_normal} normal requests alone")
    print(f"| {'requests':40s} | {'sent':>5s} | {'as expected':>11s} | {'other':>5s} | {'p50 s':>6s} "
          f"| {'p99 s':>6s} | {'max s':>6s} |")
    print(f"|{'-' * 42}|{'-' * 7}|{'-' * 13}|{'-' * 7}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    failed, surprises = 0, {}
    for kind in ["anchor", "normal"] + names:
        results = rows.get(kind, [])
        want = 200 if kind in ("anchor", "normal") else kinds[kind][1]
        if kind in ("anchor", "normal"):
            ok = [r for r in results if not r[2]]
            sent = args.anchor_normal if kind == "anchor" else n_normal
        else:
            ok = [r for r in results if r[1] == want]
            sent = len(results)
        other = sent - len(ok)
        failed += other
        if other:
            surprises[kind] = sorted({str(r[1] if kind not in ("anchor", "normal") else r[2]) for r in results
                                      if r not in ok} | ({"unanswered"} if len(results) < sent else set()))
        lat = [r[0] for r in ok] or [float("nan")]
        label = {"anchor": "normal, alone (anchor)", "normal": "normal, under attack"}.get(kind, kind)
        label += f" -> {want}"
        print(f"| {label:40s} | {sent:5d} | {len(ok):11d} | {other:5d} | {percentile(lat, 50):6.3f} "
              f"| {percentile(lat, 99):6.3f} | {max(lat):6.3f} |")
    for kind, got in surprises.items():
        print(f"  {kind}: got {', '.join(got)}")
    retries = sum(r[1] - 1 for r in rows.get("normal", []))
    print(f"\nnormal requests retried after a 503: {retries}; wall: anchor {anchor_wall:.1f} s, "
          f"attack {attack_wall:.1f} s")
    life = sorted(slow.lifetimes) or [float("nan")]
    print(f"a normal request after {max(attack_wall, args.slow_seconds):.0f} s of slowloris: "
          f"{after[2] or 'answered'} in {after[0]:.3f} s")
    print(f"slowloris: {slow.opened} sockets opened, {slow.dropped} dropped by the server, "
          f"median life {percentile(life, 50):.1f} s")
    print(f"server: alive {alive}, /health after the attack {health}, tracebacks in its log {tracebacks}; "
          f"RSS MiB: {rss_start:.0f} after warm-up, {rss_anchor:.0f} after the anchor, "
          f"after each {100 // args.rounds}% of the attack {', '.join(f'{x:.0f}' for x in rss_rounds)}, "
          f"{rss_end:.0f} at the end (peak {rss_peak:.0f})")
    return 0 if alive and failed == 0 and health == 200 and not after[2] else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="base model (default: the embedded one); "
                   "'tiny' builds the test suite's random 2-block llama")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=None, help="client threads (default 8; 32 "
                   "with --attack)")
    p.add_argument("--attack", action="store_true", help="hostile requests and slowloris sockets "
                   "mixed with normal requests (see above)")
    p.add_argument("--scale", type=float, default=1.0, help="--attack: scales the 1,000 normal, "
                   "1,000 hostile requests and 500 slowloris sockets")
    p.add_argument("--rounds", type=int, default=4, help="--attack: the mixed requests in this many "
                   "parts, the server's memory read after each")
    p.add_argument("--slow-seconds", type=float, default=15.0, help="--attack: the slowloris "
                   "sockets run at least this long (past the server's 10 s head deadline)")
    p.add_argument("--anchor-normal", type=int, default=200, help="--attack: normal requests sent "
                   "alone first")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--anchor-requests", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--deadline", type=float, default=900.0, help="whole load phase, seconds")
    args = p.parse_args()
    args.concurrency = args.concurrency or (32 if args.attack else 8)
    if args.attack:
        return attack(args)

    from steadytune.generation import load_tuned
    from steadytune.serve import start_server

    tmp, label = tempfile.TemporaryDirectory(), args.model
    if args.model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_model

        args.model = str(build_model(Path(tmp.name) / "tiny"))
    loaded = load_tuned(make_run(args.model, Path(tmp.name))[0])
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
