"""Talking to a tuned model: `steadytune chat RUN` in the terminal, `steadytune serve RUN` over HTTP.

Both load the base model of the run with its adapters (generation.load_tuned), so a GGUF base works
too. `serve` is mlx-lm's OpenAI-compatible server (batching, streaming, prompt cache) with the
already-loaded model handed to it through a ModelProvider subclass: mlx-lm itself loads models by
path only, and cannot read our GGUF bases.

Security: the server binds to loopback unless told otherwise, and refuses a non-loopback address
without an API key. With a key set, every request must carry `Authorization: Bearer KEY` (401
otherwise). Requests from web pages of other origins are refused (a page you visit could otherwise
use a loopback server), and so are image inputs: mlx-lm would download their URLs from the server.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import signal
import socket
import sys
import threading

from .errors import UserError

API_KEY_ENV = "STEADYTUNE_API_KEY"
MAX_BODY_BYTES = 4 << 20  # a chat request is text; anything bigger is a mistake or an attack


# --- chat ----------------------------------------------------------------------------------------

def add_model_arguments(p) -> None:
    p.add_argument("run", help="a run folder of steadytune train (or its adapters/ folder)")
    p.add_argument("--model", default=None, help="base model (default: the one the run was trained on)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")


def add_chat_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system message to start the conversation with")


def fit_history(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], int]:
    """Drop the oldest exchanges (never the system message or the newest user turn) until the
    prompt fits `budget` tokens. Returns (messages, number of messages dropped)."""
    from .generation import render_prompt

    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    dropped = 0
    while len(turns) > 1 and len(render_prompt(tokenizer, head + turns)) > budget:
        cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
        turns, dropped = turns[cut:], dropped + cut
    return head + turns, dropped


def context_length(loaded) -> int:
    return int(loaded.config.get("max_position_embeddings") or 4096)


def chat_loop(loaded, lines, out=None, err=None, system: str | None = None,
              max_tokens: int = 512, temperature: float = 0.0, prompt: str = "") -> list[dict]:
    """Answer each line of `lines` as a user turn, streaming the reply to `out` (stdout), keeping
    the conversation; notes go to `err` (stderr). `/reset` forgets the conversation, `/quit` ends
    it. With `prompt`, lines are read with input(prompt) instead. Returns the final history."""
    from .generation import generate

    out, err = out or sys.stdout, err or sys.stderr
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    budget = max(1, context_length(loaded) - max_tokens)
    for line in _prompted(lines, prompt, out):
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = list(start)
            print("(conversation reset)", file=err, flush=True)
            continue
        if text.startswith("/"):
            print("commands: /reset forgets the conversation, /quit ends the chat", file=err, flush=True)
            continue
        history, dropped = fit_history(loaded.tokenizer, history + [{"role": "user", "content": text}],
                                       budget)
        if dropped:
            print(f"(dropped the {dropped} oldest messages to fit the context)", file=err, flush=True)
        pieces = []
        try:
            for piece in generate(loaded, history, max_tokens, temperature, stream=True):
                pieces.append(piece)
                print(piece, end="", file=out, flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print(" (stopped)", end="", file=err, flush=True)
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": "".join(pieces)})
    return history


def _prompted(lines, prompt: str, out):
    if not prompt:
        yield from lines
        return
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return


def chat_command(args) -> int:
    from .generation import load_tuned

    _check_sampling(args)
    loaded = load_tuned(args.run, args.model)
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("chatting with the tuned model; /reset forgets the conversation, /quit ends it",
              file=sys.stderr)
    chat_loop(loaded, sys.stdin, system=args.system, max_tokens=args.max_tokens,
              temperature=args.temperature, prompt="> " if tty else "")
    return 0


def _check_sampling(args) -> None:
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 or more (got {args.temperature})")


# --- serve ---------------------------------------------------------------------------------------

def add_serve_arguments(p) -> None:
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


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback one."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise UserError(f"--host {host}: cannot resolve this name; pass an IP address such as "
                        "127.0.0.1") from None
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_exposure(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise UserError(f"--host {host}: serving beyond this machine needs an API key; pass "
                        f"--api-key KEY (or set {API_KEY_ENV}), or bind to 127.0.0.1")


def server_args(max_tokens: int = 512, temperature: float = 0.0, allowed_origins=()) -> argparse.Namespace:
    """The settings mlx-lm's server reads from its command line, at its defaults."""
    from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

    return argparse.Namespace(
        model=None, adapter_path=None, draft_model=None, num_draft_tokens=3, trust_remote_code=False,
        chat_template="", use_default_chat_template=False, chat_template_args={}, pipeline=False,
        temp=temperature, top_p=1.0, top_k=0, min_p=0.0, max_tokens=max_tokens,
        allowed_origins=list(allowed_origins), decode_concurrency=32, prompt_concurrency=8,
        prefill_step_size=2048, prompt_cache_size=10, prompt_cache_bytes=None, kv_bits=None,
        kv_group_size=64, quantized_kv_start=DEFAULT_QUANTIZED_KV_START)


def _provider_class():
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.server import ModelProvider

    class LoadedModelProvider(ModelProvider):
        """Serves one model that is already in memory; requests cannot make it load another
        model or adapters from a path (mlx-lm's provider would)."""

        def __init__(self, cli_args, loaded):
            super().__init__(cli_args)
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
            self.model_key = ("steadytune", None, None)
            self.is_batchable = all(hasattr(c, "merge") for c in make_prompt_cache(loaded.model))

        def load(self, model_path=None, adapter_path=None, draft_model_path=None):
            return self.model, self.tokenizer

        def load_default(self):
            pass

        def reset(self):
            pass

    return LoadedModelProvider


def _handler_class():
    from mlx_lm.server import APIHandler, _image_parts

    class Handler(APIHandler):
        """mlx-lm's handler behind an API key, an origin check and a body size limit."""

        def __init__(self, request, client_address, server):
            # mlx-lm's handler takes the generator first; ours finds it on the server
            super().__init__(server.generator, request, client_address, server)

        def _refuse(self, code: int, message: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            if code == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="steadytune"')
            self.end_headers()
            self.wfile.write(json.dumps({"error": {"message": message, "code": code}}).encode())

        def _admitted(self) -> bool:
            origin = self.headers.get("Origin")
            if origin and origin not in self.server.allowed_origins:
                self._refuse(403, f"origin {origin} is not allowed (see serve --allowed-origins)")
                return False
            key = self.server.api_key
            if key and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                               f"Bearer {key}".encode()):
                self._refuse(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
                return False
            return True

        def do_POST(self):
            if not self._admitted():
                return
            try:
                size = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                size = 0
            if size > MAX_BODY_BYTES:
                self._refuse(413, f"request body over {MAX_BODY_BYTES} bytes")
                return
            super().do_POST()

        def do_GET(self):
            if self._admitted():
                super().do_GET()

        def do_OPTIONS(self):
            # A browser's preflight carries no credentials: answer it for allowed origins only.
            if self.headers.get("Origin") in self.server.allowed_origins:
                super().do_OPTIONS()
            else:
                self._refuse(403, "preflight from an origin that is not allowed")

        def validate_model_parameters(self):
            super().validate_model_parameters()
            limit = self.response_generator.cli_args.max_tokens
            self.max_tokens = min(self.max_tokens, limit)  # the server's cap, whatever is asked

        def handle_chat_completions(self):
            if any(_image_parts(self.body.get("messages") or [])):
                raise ValueError("this model reads text only; remove the image parts")
            return super().handle_chat_completions()

        def handle_models_request(self):
            self._set_completion_headers(200)
            self.end_headers()
            models = [{"id": self.server.model_name, "object": "model", "created": self.created,
                       "owned_by": "steadytune"}]
            self.wfile.write(json.dumps({"object": "list", "data": models}).encode())

        def log_message(self, fmt, *args):
            if self.server.verbose:
                super().log_message(fmt, *args)

    return Handler


class Server:
    """A running server: `url`, `wait()` (until Ctrl-C), `shutdown()`. Built by `start_server`."""

    def __init__(self, httpd, generator):
        self.httpd, self.generator = httpd, generator
        host, port = httpd.server_address[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.thread = threading.Thread(target=httpd.serve_forever, name="steadytune-http", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Block until the server stops; Ctrl-C stops it. (A timed join lets the signal in.)"""
        try:
            while self.thread.is_alive():
                self.thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop accepting, stop generating, wait for the request threads, then for the OS to
        finish those threads: `join` returns before a thread's native teardown (MLX's per-thread
        streams) has run, and if Python exits in between, the process aborts ("terminate called
        without an active exception")."""
        self.httpd.shutdown()
        self.generator.stop_and_join()
        self.httpd.server_close()
        _await_os_exit(self.httpd.thread_ids | {self.thread.native_id,
                                                self.generator._generation_thread.native_id})


def _await_os_exit(native_ids, timeout: float = 2.0) -> None:
    import time

    if not os.path.isdir("/proc/self/task"):  # not Linux: no way to look; a short grace period
        time.sleep(0.1)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/self/task/{i}") for i in native_ids):
        time.sleep(0.002)


def _server_class(family: int):
    from http.server import ThreadingHTTPServer

    class HTTPServer(ThreadingHTTPServer):
        address_family = family
        daemon_threads, block_on_close = False, True  # server_close() joins the request threads

        def process_request_thread(self, request, client_address):
            self.thread_ids.add(threading.get_native_id())
            super().process_request_thread(request, client_address)

    return HTTPServer


def start_server(loaded, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                 max_tokens: int = 512, temperature: float = 0.0, allowed_origins=(),
                 model_name: str = "steadytune", verbose: bool = False) -> Server:
    """Serve `loaded` (a LoadedModel) on host:port from a background thread."""
    from mlx_lm.models.cache import LRUPromptCache
    from mlx_lm.server import ResponseGenerator

    import mlx.core as mx

    check_exposure(host, api_key)
    # Arrays still lazy here (adapters just loaded) would be computed on this thread's stream,
    # which the generation thread cannot use (MLX streams are per thread): compute them now.
    mx.eval(loaded.model.parameters())
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    try:
        httpd = _server_class(family)((host, port), _handler_class())
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); pick "
                        "another --port (0 = any free one)") from None
    httpd.api_key, httpd.allowed_origins = api_key or None, set(allowed_origins)
    httpd.model_name, httpd.verbose, httpd.thread_ids = model_name, verbose, set()
    cli_args = server_args(max_tokens, temperature, allowed_origins)
    provider = _provider_class()(cli_args, loaded)
    httpd.generator = ResponseGenerator(provider, LRUPromptCache(cli_args.prompt_cache_size))
    return Server(httpd, httpd.generator)


def serve_command(args) -> int:
    from pathlib import Path

    from .generation import load_tuned

    _check_sampling(args)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: a port is 0-65535 (0 = any free port)")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(args.host, api_key)  # before the model loads: a refusal costs nothing
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
    loaded = load_tuned(args.run, args.model)
    name = args.model_name or Path(args.run).resolve().name
    server = start_server(loaded, args.host, args.port, api_key, args.max_tokens, args.temperature,
                          origins, name, verbose=True)
    print(f"serving {name} on {server.url}/v1/chat/completions"
          + (" (API key required)" if api_key else "") + "; Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as cleanly as on Ctrl-C
    server.wait()
    return 0
