"""`steadytune serve RUN`: serve a tuned model over an OpenAI-compatible HTTP API (the server:
steadytune/serve.py; docs/serve.md)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from ..errors import UserError
from ..serve import API_KEY_ENV, CONCURRENCY, check_exposure, start_server
from .chat import add_model_arguments, check_sampling


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this "
                   "machine only; any other address requires an API key)")
    p.add_argument("--port", type=int, default=8080, help="port (0 = any free port; it is printed)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on every "
                   f"request (or set {API_KEY_ENV}, which keeps the key out of the process list)")
    p.add_argument("--allowed-origins", default="", help="comma-separated web origins allowed to "
                   "call the API from a browser, e.g. http://localhost:3000 (default: none)")
    p.add_argument("--model-name", default=None, help="the model id /v1/models lists "
                   "(default: the run folder's name)")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY, help="requests answered at once "
                   f"(batched); more get 503 with Retry-After (default {CONCURRENCY}); on the CPU, 1 answers "
                   "through the compiled decoder, one request at a time and several times faster")


def command(args) -> int:
    from ..generation import load_tuned

    check_sampling(args)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: a port is 0-65535 (0 = any free port)")
    if args.concurrency < 1:
        raise UserError(f"--concurrency must be at least 1 (got {args.concurrency})")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(args.host, api_key)  # before the model loads: a refusal costs nothing
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
    loaded = load_tuned(args.run, args.model, inference=True, batched=args.concurrency > 1)
    more_open_files()
    name = args.model_name or Path(args.run).resolve().name
    server = start_server(loaded, args.host, args.port, api_key, args.max_tokens, args.temperature,
                          origins, name, verbose=True, concurrency=args.concurrency)
    print(f"serving {name} on {server.url}/v1/chat/completions"
          + (" (API key required)" if api_key else "") + "; Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, _exit_now)
    server.wait()
    return 0


def more_open_files(most: int = 4096) -> None:
    """Raise this process's soft limit on open files toward its hard one (up to `most`): each
    client still sending its request head holds a socket, and the server takes up to a quarter of
    the limit for them (serve_http.heads_cap). A soft limit of 1,024, common on Linux, would leave
    room for 256."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = most if hard == resource.RLIM_INFINITY else min(most, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):  # not allowed here: the server works within the limit it has
            pass


def _exit_now(signum, frame):
    """SIGTERM or Ctrl-C: exit at once. The server keeps nothing on disk, and a clean shutdown
    waits for a generation step, the clients' sockets and the interpreter's teardown of MLX and the
    tokenizer: seconds on a busy machine (measured), with threads starved of the GIL. Requests in
    flight see their connection close."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no native teardown: nothing can hang or abort on the way out
