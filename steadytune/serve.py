"""Talking to a tuned model: `steadytune chat RUN` in the terminal, `steadytune serve RUN` over HTTP.

Both load the base model of the run with its adapters (generation.load_tuned), so a GGUF base works
too. `serve` is mlx-lm's OpenAI-compatible server (batching, streaming, prompt cache) with the
already-loaded model handed to it through a ModelProvider subclass: mlx-lm itself loads models by
path only, and cannot read our GGUF bases.

Security: the server binds to loopback unless told otherwise, and refuses a non-loopback address
without an API key. With a key set, every request must carry `Authorization: Bearer KEY` (401
otherwise). Requests from web pages of other origins are refused (a page you visit could otherwise
use a loopback server), and so are image inputs: mlx-lm would download their URLs from the server.

Robustness: no one client may take the server down or hold it. Every request field is checked
against the model before generation (serve_request.py: 400 naming the field); a failure inside
generation answers 500 and the generation loop restarts (Generator); slow and numerous clients
are bounded by the connection layer (serve_http.py: deadlines, caps, a head reader for all).
"""

from __future__ import annotations

import argparse
import hmac
import io
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial

from .data import prompt_ids, raw_text_ids
from .errors import UserError
from .serve_http import (CLIENT_TIMEOUT_S, HEAD_TIMEOUT_S, MAX_BODY_BYTES, REQUEST_TIMEOUT_S,
                         DeadlineReader, connection_cap, heads_cap, server_class)
from .serve_request import ModelLimits, RequestError, check_request, parse_body, temperature_problem

API_KEY_ENV = "STEADYTUNE_API_KEY"
CONCURRENCY = 32  # requests answered at once by default: mlx-lm's decode batch (decode_concurrency)
SLOT_WAIT_S = 0.05  # how long a request waits for one of the `concurrency` slots before its 503


# --- chat ----------------------------------------------------------------------------------------

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


# --- serve ---------------------------------------------------------------------------------------

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


def server_args(max_tokens: int = 512, temperature: float = 0.0, allowed_origins=(),
                concurrency: int = CONCURRENCY) -> argparse.Namespace:
    """The settings mlx-lm's server reads from its command line, at its defaults."""
    from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

    return argparse.Namespace(
        model=None, adapter_path=None, draft_model=None, num_draft_tokens=3, trust_remote_code=False,
        chat_template="", use_default_chat_template=False, chat_template_args={}, pipeline=False,
        temp=temperature, top_p=1.0, top_k=0, min_p=0.0, max_tokens=max_tokens,
        allowed_origins=list(allowed_origins), decode_concurrency=concurrency, prompt_concurrency=8,
        prefill_step_size=2048, prompt_cache_size=10, prompt_cache_bytes=None, kv_bits=None,
        kv_group_size=64, quantized_kv_start=DEFAULT_QUANTIZED_KV_START)


class GenerationFailed(BaseException):
    """Generation failed for one request. A BaseException, so that it passes mlx-lm's handler
    (which answers any Exception from the generator with a 404) up to ours, which answers 500."""


def _generator_class():
    import logging
    from queue import Empty
    from weakref import WeakSet

    from mlx_lm.models.cache import LRUPromptCache
    from mlx_lm.server import ResponseGenerator

    class Generator(ResponseGenerator):
        """mlx-lm's generation thread, restarted when a request breaks it. mlx-lm's loop ends for
        good on an exception, and every later request was answered "generation thread died"
        while the process stayed up (so no supervisor restarted it)."""

        def __init__(self, model_provider, prompt_cache):
            self.taken = WeakSet()  # the response queues of the requests the loop has taken
            super().__init__(model_provider, prompt_cache)  # starts the thread

        def _next_request(self, timeout=None):
            request = super()._next_request(timeout)
            if request is not None:
                self.taken.add(request[0])
            return request

        def _run_generate(self):
            while True:
                try:
                    self._generate()
                    return
                except Exception as e:
                    if self._stop:
                        return
                    logging.exception("generation failed; its requests get 500, the loop restarts")
                    # The loop's requests (the batch, those waiting for it) die with it: tell each.
                    for queue in list(self.taken):
                        queue.put(RuntimeError(f"generation failed ({type(e).__name__}: {e})"))
                    self.taken = WeakSet()
                    # caches the failed step may have half-written
                    self.prompt_cache = LRUPromptCache(self.prompt_cache.max_size)

        def generate(self, request, generation_args, progress_callback=None):
            try:
                return super().generate(request, generation_args, progress_callback)
            except Exception as e:
                raise GenerationFailed(str(e)) from e

        def _await_response(self, response_queue):
            # mlx-lm polls every second for a stopped generator; a request thread that waits that
            # long holds up shutdown (server_close joins it).
            while True:
                try:
                    return response_queue.get(timeout=0.05)
                except Empty:
                    if not self.generation_available():
                        raise RuntimeError("the server is stopping") from None

    return Generator


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


@dataclass
class ServeState:
    """What a request handler reads, handed to each one explicitly (start_server builds it): the
    policy (key, origins, limits) and the served model's facts."""

    api_key: str | None
    allowed_origins: set
    model_name: str
    verbose: bool
    concurrency: int
    slots: threading.BoundedSemaphore  # the requests in flight
    tokenizer: object
    limits: ModelLimits                # what a request's fields are checked against
    max_token_chars: int
    generator: object = None           # set once the socket is bound (a failed bind starts no thread)


ROUTES = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "text"}


class _Guarded:
    """mlx-lm's handler behind deadlines, an API key, an origin check, a validated body, checked
    request fields, a prompt length limit and a bound on the requests in flight; a failure in
    generation answers 500. A mixin, put before mlx-lm's APIHandler by _handler_class: mlx-lm is
    imported only when a server starts."""

    timeout = CLIENT_TIMEOUT_S  # socket timeout: a stalled client cannot hold its thread forever

    def __init__(self, state: ServeState, request, client_address, server):
        # set before the base class's __init__, which handles the request
        self.state, self.answered = state, False
        super().__init__(state.generator, request, client_address, server)

    def setup(self):
        super().setup()
        self.rfile.close()  # the plain socket file: reads go through the deadline instead
        # the head has arrived (the server's Heads read it); the body gets REQUEST_TIMEOUT_S
        self.reader = DeadlineReader(self.connection, self.server.take_head(self.connection),
                                     time.monotonic() + REQUEST_TIMEOUT_S)
        self.rfile = io.BufferedReader(self.reader)

    def end_headers(self):
        self.answered = True  # a status line has gone out: a later failure cannot change it
        super().end_headers()

    def _refuse(self, code: int, message: str, headers: dict | None = None, param: str | None = None):
        # The connection closes after a refusal: an unread body must not be parsed as a request.
        # It closes through the Closer, which reads what is still coming: a body in flight would
        # otherwise reset the connection, and the client could lose this answer.
        self.close_connection = True
        self.server.linger(self.connection)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        if code == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="steadytune"')
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        error = {"message": message, "code": code}
        if param:
            error["param"] = param
        self.wfile.write(json.dumps({"error": error}).encode())

    def _admitted(self) -> bool:
        origin = self.headers.get("Origin")
        if origin and origin not in self.state.allowed_origins:
            self._refuse(403, f"origin {origin} is not allowed (see serve --allowed-origins)")
            return False
        key = self.state.api_key
        if key and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                           f"Bearer {key}".encode()):
            self._refuse(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
            return False
        return True

    def do_POST(self):
        if not self._admitted():
            return
        kind = ROUTES.get(self.path)
        if kind is None:
            self._refuse(404, f"no endpoint {self.path[:80]!r}: POST /v1/chat/completions or /v1/completions")
            return
        size = self._body_length()
        raw = None if size is None else self._read_body(size)
        if raw is None:
            return
        # A short wait: a client that has just been answered sends its next request while the
        # thread that answered it is still releasing its slot.
        if not self.state.slots.acquire(timeout=SLOT_WAIT_S):
            self._refuse(503, f"busy: {self.state.concurrency} requests are being answered; "
                         "retry shortly", {"Retry-After": "1"})
            return
        try:
            self._answer(raw, kind == "chat")
        except OSError:  # the client went away (or stopped reading): nobody to answer
            self.close_connection = True
        except (GenerationFailed, Exception) as e:
            self._failed(e)
        finally:
            self.state.slots.release()

    def _body_length(self) -> int | None:
        """The body's length from a validated Content-Length, or None after refusing the request
        without reading its body (read(-1) would read until the client stops sending)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._refuse(411, "chunked bodies are not accepted; send Content-Length")
            return None
        values = self.headers.get_all("Content-Length") or []
        if not values:
            self._refuse(411, "Content-Length header is required")
            return None
        text = values[0].strip()
        if len(set(values)) > 1 or not text.isascii() or not text.isdigit():
            self._refuse(400, f"invalid Content-Length {text[:20]!r}: a decimal byte count")
            return None
        size = int(text)
        if size > MAX_BODY_BYTES:
            self._refuse(413, f"request body over {MAX_BODY_BYTES} bytes")
            return None
        return size

    def _read_body(self, size: int) -> bytes | None:
        """The body, read within REQUEST_TIMEOUT_S of its head; None after a refusal (too slow)
        or when the client went away."""
        try:
            raw = self.rfile.read(size)
        except TimeoutError:
            self._refuse(408, f"the request did not arrive within {REQUEST_TIMEOUT_S} s")
            return None
        if len(raw) < size:  # the client hung up
            self.close_connection = True
            return None
        self._read_done()
        return raw

    def _read_done(self):
        self.reader.deadline = None
        self.connection.settimeout(CLIENT_TIMEOUT_S)  # writes: an idle timeout is enough

    def _answer(self, raw: bytes, chat: bool) -> None:
        try:
            params = check_request(parse_body(raw), chat, self.state.limits)
        except RequestError as e:
            self._refuse(400, str(e), param=e.field)
            return
        stop_words = params.pop("stop_words")
        # what mlx-lm's handle_chat_completions / handle_text_completions read, already checked
        self.body = {k: params.pop(k) for k in ("messages", "prompt", "tools", "role_mapping")}
        for name, value in params.items():  # the attributes mlx-lm's handle_completion reads
            setattr(self, name, value)
        request = self.handle_chat_completions() if chat else self.handle_text_completions()
        self.handle_completion(request, stop_words)

    def do_GET(self):
        if self._admitted():
            self._read_done()
            super().do_GET()

    def do_OPTIONS(self):
        # A browser's preflight carries no credentials: answer it for allowed origins only.
        if self.headers.get("Origin") in self.state.allowed_origins:
            super().do_OPTIONS()
        else:
            self._refuse(403, "preflight from an origin that is not allowed")

    def handle_completion(self, request, stop_words):
        # Here, not in the generation thread: a prompt over the context would otherwise be
        # prefilled there in full while every other request waits.
        s = self.state
        try:
            tokens, exact = prompt_tokens(s.tokenizer, request, s.limits.context, s.max_token_chars,
                                          self.chat_template_kwargs)
        except RequestError as e:
            self._refuse(400, str(e), param=e.field)
            return
        if tokens >= s.limits.context:
            self._refuse(413, f"the prompt is {'' if exact else 'over '}{tokens} tokens; this model's "
                         f"context is {s.limits.context} tokens: shorten the prompt or the conversation")
            return
        self.max_tokens = min(self.max_tokens, s.limits.context - tokens)  # the answer fits too
        super().handle_completion(request, stop_words)

    def _failed(self, error: BaseException) -> None:
        """A request whose generation failed gets 500; the server goes on with the next one."""
        self.log_error("generation failed: %s", error)
        message = f"generation failed ({error}); the server is still up: retry or change the request"
        if not self.answered:
            self._headers_buffer = []  # http.server's unsent header lines: the 200 mlx-lm began
            self._refuse(500, message)
            return
        self.close_connection = True  # a stream: its 200 has gone out; end it with an error event
        event = json.dumps({"error": {"message": message, "code": 500}})
        self.wfile.write(f"data: {event}\n\n".encode())

    def handle_models_request(self):
        self._set_completion_headers(200)
        self.end_headers()
        models = [{"id": self.state.model_name, "object": "model", "created": self.created,
                   "owned_by": "steadytune"}]
        self.wfile.write(json.dumps({"object": "list", "data": models}).encode())

    def log_message(self, fmt, *args):
        if self.state.verbose:
            super().log_message(fmt, *args)


def _handler_class():
    from mlx_lm.server import APIHandler

    class Handler(_Guarded, APIHandler):
        pass

    return Handler


def prompt_tokens(tokenizer, request, context: int, max_token_chars: int,
                  template_kwargs: dict | None = None) -> tuple[int, bool]:
    """(number of prompt tokens, exact?) of an mlx-lm CompletionRequest whose messages are checked
    (serve_request.check_request). A text longer than `context * max_token_chars` characters has
    more than `context` tokens (no token is longer than the longest one in the vocabulary), so a
    huge prompt is refused without tokenizing it. A chat template that fails on the messages is
    the request's error (400), found here rather than in the generation thread."""
    chat = request.request_type == "chat"
    text = " ".join(m["content"] for m in request.messages) if chat else request.prompt
    if len(text) > context * max_token_chars:
        return len(text) // max_token_chars, False
    if not (chat and getattr(tokenizer, "chat_template", None)):
        return len(raw_text_ids(tokenizer, text)), True
    try:
        return len(prompt_ids(tokenizer, request.messages, request.tools, "messages", template_kwargs)), True
    except UserError as e:
        reason = str(e).split("failed on this conversation ", 1)[-1].split("; use roles", 1)[0]
        raise RequestError("messages", f"the model's chat template cannot render them {reason[:220]}") from None


def max_token_chars(tokenizer) -> int:
    """The most characters one token decodes to: its vocabulary entry's length bounds it (byte-level
    and sentencepiece entries are never shorter than their text)."""
    try:
        return max(1, max(len(t) for t in tokenizer.get_vocab()))
    except (AttributeError, TypeError, ValueError):
        return 64


def vocabulary_size(loaded) -> int:
    """The token ids a request may name (top_k, logit_bias): those the model scores (its config's
    vocab_size, the rows of its output) and the tokenizer can decode, whichever is fewer."""
    sizes = [int(loaded.config["vocab_size"])] if loaded.config.get("vocab_size") else []
    try:
        sizes.append(len(loaded.tokenizer.get_vocab()))
    except (AttributeError, TypeError):
        pass
    if not sizes:
        raise UserError("the model names no vocabulary size (vocab_size in its config.json)")
    return min(sizes)


class Server:
    """A running server: `url`, `wait()` (until Ctrl-C), `shutdown()`. Built by `start_server`."""

    def __init__(self, httpd, generator):
        self.httpd, self.generator = httpd, generator
        host, port = httpd.server_address[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        # a short poll interval: shutdown() waits for the accept loop to notice
        self.thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="steadytune-http", daemon=True)
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
        self.generator._stop = True  # stop generating while the accept loop winds down
        self.httpd.shutdown()
        self.generator.stop_and_join()
        self.httpd.hang_up()  # threads blocked on a slow client's socket return now
        self.httpd.server_close()
        _await_os_exit(self.httpd.thread_ids | {self.thread.native_id,
                                                self.generator._generation_thread.native_id})


def _await_os_exit(native_ids, timeout: float = 2.0) -> None:
    if not os.path.isdir("/proc/self/task"):  # not Linux: no way to look; a short grace period
        time.sleep(0.1)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/self/task/{i}") for i in native_ids):
        time.sleep(0.002)


def start_server(loaded, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                 max_tokens: int = 512, temperature: float = 0.0, allowed_origins=(),
                 model_name: str = "steadytune", verbose: bool = False,
                 concurrency: int = CONCURRENCY, connections: int | None = None,
                 heads: int | None = None, head_timeout: float = HEAD_TIMEOUT_S) -> Server:
    """Serve `loaded` (a LoadedModel) on host:port from a background thread; at most
    `concurrency` requests are answered at once, more get 503 with Retry-After. At most
    `connections` requests have a thread (default connection_cap), at most `heads` connections
    (default heads_cap) are still sending their head, each for at most `head_timeout` seconds."""
    from mlx_lm.models.cache import LRUPromptCache

    import mlx.core as mx

    check_exposure(host, api_key)
    if concurrency < 1:
        raise UserError(f"--concurrency must be at least 1 (got {concurrency})")
    if problem := temperature_problem(temperature):
        raise UserError(f"--temperature {problem}")
    # Arrays still lazy here (adapters just loaded) would be computed on this thread's stream,
    # which the generation thread cannot use (MLX streams are per thread): compute them now.
    mx.eval(loaded.model.parameters())
    if concurrency > 1:
        from .grpo import batch_problem

        tok = loaded.tokenizer
        if problem := batch_problem(loaded.model, set(getattr(tok, "eos_token_ids", None) or [tok.eos_token_id])):
            print(f"note: answering one request at a time (--concurrency 1): {problem}")
            concurrency = 1
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    limits = ModelLimits(vocabulary_size(loaded), context_length(loaded), max_tokens, temperature)
    state = ServeState(api_key or None, set(allowed_origins), model_name, verbose, concurrency,
                       threading.BoundedSemaphore(concurrency), loaded.tokenizer, limits,
                       max_token_chars(loaded.tokenizer))
    try:
        httpd = server_class(family)((host, port), partial(_handler_class(), state),
                                      connections or connection_cap(concurrency), head_timeout,
                                      heads or heads_cap())
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); pick "
                        "another --port (0 = any free one)") from None
    cli_args = server_args(max_tokens, temperature, allowed_origins, concurrency)
    provider = _provider_class()(cli_args, loaded)
    state.generator = _generator_class()(provider, LRUPromptCache(cli_args.prompt_cache_size))
    return Server(httpd, state.generator)
