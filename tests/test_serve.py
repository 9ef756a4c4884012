"""`steadytune chat` and `steadytune serve` on a tiny model with adapters trained in the test.

Greedy decoding makes every answer exact, so the chat and the HTTP server are checked against
generation.generate on the same messages: same text, same history handling."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import cli_env, run_cli

from steadytune.errors import UserError
from steadytune.generation import generate, load_tuned
from steadytune.serve import chat_loop, check_exposure, fit_history, is_loopback, start_server

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    import steadytune
    from conftest import chat_records, write_jsonl

    d = tmp_path_factory.mktemp("serve")
    write_jsonl(d / "train.jsonl", chat_records(12))
    write_jsonl(d / "valid.jsonl", chat_records(4, seed=1))
    return steadytune.train({"model": {"path": str(tiny_model)}, "data": {"path": str(d)},
                             "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2},
                             "output": {"dir": str(d / "run"), "progress": "none"}}).run_dir


@pytest.fixture(scope="module")
def tuned(run_dir):
    return load_tuned(run_dir)


@pytest.fixture
def server(tuned):
    srv = start_server(tuned, "127.0.0.1", 0, max_tokens=16)
    yield srv
    srv.shutdown()


def post(url, body, headers=None, path="/v1/chat/completions"):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    return urllib.request.urlopen(req, timeout=60)


def status_of(fn) -> tuple[int, dict]:
    try:
        r = fn()
        return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# --- chat --------------------------------------------------------------------------------------

def test_chat_keeps_history_and_reset_forgets_it(tuned):
    out, err = io.StringIO(), io.StringIO()
    lines = ["hello\n", "and then?\n", "/reset\n", "hello\n", "/quit\n", "never answered\n"]
    history = chat_loop(tuned, lines, out, err, max_tokens=6)
    a1 = generate(tuned, HELLO, 6)
    a2 = generate(tuned, HELLO + [{"role": "assistant", "content": a1},
                                  {"role": "user", "content": "and then?"}], 6)
    assert a1 != a2  # the second answer saw the first exchange
    assert out.getvalue() == f"{a1}\n{a2}\n{a1}\n"  # after /reset, "hello" is answered afresh
    assert history == HELLO + [{"role": "assistant", "content": a1}]
    assert err.getvalue() == "(conversation reset)\n"


def test_chat_command_reads_piped_stdin(run_dir, tuned):
    r = subprocess.run([sys.executable, "-m", "steadytune.cli", "chat", str(run_dir), "--max-tokens", "6",
                        "--system", "be brief"], input="hello\n/quit\n", env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == generate(tuned, [{"role": "system", "content": "be brief"}] + HELLO, 6) + "\n"


def test_long_history_drops_oldest_exchanges_but_keeps_system_and_newest(tuned):
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " * 10},
                 {"role": "assistant", "content": f"answer {i} " * 10}]
    msgs.append({"role": "user", "content": "last"})
    from steadytune.generation import render_prompt

    full = len(render_prompt(tuned.tokenizer, msgs))
    kept, dropped = fit_history(tuned.tokenizer, msgs, full - 1)
    assert dropped == 2 and kept == msgs[:1] + msgs[3:]
    kept, dropped = fit_history(tuned.tokenizer, msgs, 1)
    assert dropped == 12 and kept == [msgs[0], msgs[-1]]


# --- serve -------------------------------------------------------------------------------------

def test_chat_completion_answers_like_generate(server, tuned):
    status, body = status_of(lambda: post(server.url, {"model": "any", "messages": HELLO, "max_tokens": 8}))
    assert status == 200
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": generate(tuned, HELLO, 8)}
    assert choice["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] <= 8 and body["usage"]["prompt_tokens"] > 0


def test_streamed_answer_equals_the_whole_answer(server, tuned):
    r = post(server.url, {"messages": HELLO, "max_tokens": 8, "stream": True})
    assert r.headers["Content-Type"] == "text/event-stream"
    text = ""
    for line in r.read().decode().splitlines():
        if line.startswith("data: {"):
            text += json.loads(line[6:])["choices"][0].get("delta", {}).get("content", "")
    assert text == generate(tuned, HELLO, 8)


def test_server_caps_max_tokens_and_lists_one_model(server):
    status, body = status_of(lambda: post(server.url, {"messages": HELLO, "max_tokens": 100000}))
    assert status == 200 and body["usage"]["completion_tokens"] <= 16  # the server's --max-tokens
    status, models = status_of(lambda: urllib.request.urlopen(server.url + "/v1/models", timeout=30))
    assert status == 200 and [m["id"] for m in models["data"]] == ["steadytune"]


def test_refuses_images_other_origins_and_huge_bodies(server):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]
    status, body = status_of(lambda: post(server.url, {"messages": image}))
    assert status == 400 and "text only" in body["error"]["message"]
    status, body = status_of(lambda: post(server.url, {"messages": HELLO}, {"Origin": "http://evil.example"}))
    assert status == 403
    import http.client

    host, port = server.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(5 << 20))  # announced, never sent: refused unread
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


def test_api_key_is_enforced_on_every_request(tuned):
    srv = start_server(tuned, "127.0.0.1", 0, api_key="s3cret", max_tokens=4)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, body = status_of(lambda: post(srv.url, {"messages": HELLO}, headers))
            assert status == 401, headers
            assert "API key" in body["error"]["message"]
        status, _ = status_of(lambda: urllib.request.urlopen(srv.url + "/health", timeout=30))
        assert status == 401
        status, body = status_of(lambda: post(srv.url, {"messages": HELLO}, {"Authorization": "Bearer s3cret"}))
        assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    finally:
        srv.shutdown()


def test_only_loopback_may_go_without_a_key():
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "key")
    with pytest.raises(UserError, match=r"--host 0.0.0.0: serving beyond this machine needs an API key"):
        check_exposure("0.0.0.0", None)


def test_serve_command_refuses_public_bind_before_loading(tmp_path):
    r = run_cli("serve", tmp_path / "no-such-run", "--host", "0.0.0.0")
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: --host 0.0.0.0: serving beyond this machine needs an API key; "
                                "pass --api-key KEY (or set STEADYTUNE_API_KEY), or bind to 127.0.0.1")


def test_serve_command_answers_and_stops_on_sigterm_within_a_second_while_generating(run_dir, tuned):
    env = dict(cli_env(), STEADYTUNE_API_KEY="k1")
    p = subprocess.Popen([sys.executable, "-m", "steadytune.cli", "serve", str(run_dir), "--port", "0",
                          "--max-tokens", "8"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith(f"serving {run_dir.name} on http://127.0.0.1:"), (line, p.stderr.read())
        assert line.rstrip().endswith("/v1/chat/completions (API key required); Ctrl-C stops")
        url = line.split(" on ")[1].split("/v1/")[0]
        status, body = status_of(lambda: post(url, {"messages": HELLO, "max_tokens": 8},
                                              {"Authorization": "Bearer k1"}))
        assert status == 200 and body["choices"][0]["message"]["content"] == generate(tuned, HELLO, 8)
        stream = open_long_stream(url, tuned, {"Authorization": "Bearer k1"})  # generating now
    finally:
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
        took = time.monotonic() - t
    assert rc == 0, p.stderr.read()
    # the promise is one second; serve exits from the signal handler, measured at 0.04-0.17 s on
    # 2 cores with a load average of 22, so a slow exit is a regression, not noise
    assert took < 1.0, took
    stream.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)


# --- hostile clients (issue: a server one client could stall, flood or keep from stopping) ----

def raw_post(url: str, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, bytes]:
    """Send a hand-made request head (and body); (status, response) as soon as the server answers."""
    host, port = url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize("head, code", [
    ("Content-Length: -1\r\n", 400),
    ("Content-Length: 12abc\r\n", 400),
    ("Content-Length: 5\r\nContent-Length: 6\r\n", 400),
    ("", 411),
    ("Transfer-Encoding: chunked\r\n", 411),
    (f"Content-Length: {(4 << 20) + 1}\r\n", 413),
])
def test_negative_missing_or_huge_content_length_is_refused_before_the_body(server, head, code):
    status, data = raw_post(server.url, head)  # no body sent: the answer cannot have waited for one
    assert status == code, data
    assert b"Connection: close" in data


def test_negative_content_length_then_50_mb_does_not_make_the_server_read_on(server):
    host, port = server.url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.0 400")
        sent = 0
        with pytest.raises(OSError):  # the server hung up: sending fails long before 50 MB
            for _ in range(50 * 16):  # 50 MB in 64 KiB pieces, at most
                sent += s.send(b"x" * 65536)
                time.sleep(0.001)
    assert sent < 50 << 20
    status, _ = status_of(lambda: post(server.url, {"messages": HELLO, "max_tokens": 2}))
    assert status == 200  # and it still serves


def test_prompt_over_the_context_gets_413_naming_the_limit(server):
    for words in (600, 100_000):  # over the tiny model's 512; the second is refused untokenized
        t = time.monotonic()
        status, body = status_of(lambda: post(server.url, {"messages": [
            {"role": "user", "content": "count " * words}]}))
        assert status == 413, body
        assert "this model's context is 512 tokens" in body["error"]["message"]
        assert time.monotonic() - t < 5  # refused, not prefilled (the 100k case took minutes)
    status, _ = status_of(lambda: post(server.url, {"messages": HELLO, "max_tokens": 2}))
    assert status == 200


@pytest.fixture(scope="module")
def long_tuned(tmp_path_factory):
    """A tuned tiny model with an 8k context: its long answers take seconds (the 512-token
    context of `tiny_model` ends an answer in well under a second, too soon to test what happens
    while one is being written)."""
    import steadytune
    from conftest import build_model, chat_records, write_jsonl

    d = tmp_path_factory.mktemp("serve-long")
    model = build_model(d / "model", max_position_embeddings=8192)
    write_jsonl(d / "train.jsonl", chat_records(8))
    run = steadytune.train({"model": {"path": str(model)}, "data": {"path": str(d), "valid_fraction": 0},
                            "training": {"max_steps": 1, "batch_size": 4, "eval_every": 0},
                            "output": {"dir": str(d / "run"), "progress": "none"}}).run_dir
    return load_tuned(run)


def open_long_stream(url, tuned, headers=None):
    """A streamed request that keeps generating (its end-of-sequence token suppressed) for up to
    4,000 tokens; returns the response after its first token has arrived."""
    eos = {str(i): -100.0 for i in tuned.tokenizer.eos_token_ids}  # the most a bias may be
    r = post(url, {"messages": HELLO, "max_tokens": 4000, "stream": True, "logit_bias": eos}, headers)
    for _ in range(100):  # keep-alive comments may come first
        line = r.readline()
        if line.startswith(b"data: {"):
            return r
        assert line, "the stream ended before its first token"
    raise AssertionError("no token in the first 100 lines of the stream")


@pytest.fixture
def long_server(long_tuned):
    srv = start_server(long_tuned, "127.0.0.1", 0, max_tokens=4000, concurrency=2)
    yield srv
    srv.shutdown()


def test_other_clients_are_answered_while_one_long_answer_generates(long_server, long_tuned):
    stream = open_long_stream(long_server.url, long_tuned)  # 4,000 tokens to go
    try:
        status, body = status_of(lambda: post(long_server.url, {"messages": HELLO, "max_tokens": 2}))
        assert status == 200 and body["usage"]["completion_tokens"] <= 2
        line = stream.readline().strip() or stream.readline().strip()  # events end in a blank line
        assert line.startswith(b"data: {"), line  # the long answer is still being written
    finally:
        stream.close()


def test_requests_beyond_the_concurrency_get_503_with_retry_after(long_server, long_tuned):
    streams = [open_long_stream(long_server.url, long_tuned) for _ in range(2)]  # both slots busy
    try:
        post(long_server.url, {"messages": HELLO, "max_tokens": 2})
        raise AssertionError("a third request was admitted")
    except urllib.error.HTTPError as e:
        assert e.code == 503 and e.headers["Retry-After"] == "1"
        assert "busy: 2 requests" in json.loads(e.read())["error"]["message"]
    finally:
        for r in streams:
            r.close()


def test_fifty_concurrent_connections_get_an_answer_or_503_never_a_reset(tuned):
    srv = start_server(tuned, "127.0.0.1", 0, max_tokens=1, concurrency=4)
    results = []

    def one():
        try:
            results.append(status_of(lambda: post(srv.url, {"messages": HELLO, "max_tokens": 1}))[0])
        except OSError as e:  # a reset or refused connection
            results.append(type(e).__name__)

    try:
        threads = [threading.Thread(target=one) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        srv.shutdown()
    assert len(results) == 50 and set(results) <= {200, 503}, results
    assert 200 in results


# --- fast generation (what generate, chat, serve and the demo answer with) ----------------------

@pytest.mark.parametrize("decoder", ["1", "0"], ids=["compiled decoder", "float32 copy"])
def test_fast_path_answers_exactly_like_a_plain_greedy_loop(run_dir, tuned, decoder, monkeypatch):
    import mlx.core as mx
    import mlx.nn as nn

    from steadytune.cpu_decode import CpuDecoder
    from steadytune.generation import render_prompt

    monkeypatch.setenv("STEADYTUNE_CPU_DECODER", decoder)
    fast = load_tuned(run_dir, inference=True)
    if decoder == "1":  # the C forward pass over the quantized weights, LoRA as low-rank products
        assert isinstance(fast.model, CpuDecoder) and "low-rank" in fast.model.describe()
    else:  # the fallback: float layers with the adapters fused in
        kinds = {type(m).__name__ for _, m in fast.model.named_modules()}
        assert not kinds & {"QuantizedLinear", "QuantizedEmbedding", "LoRALinear"}, kinds
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in tuned.model.named_modules())
    # the reference: the quantized model with its LoRA layers, no KV cache, argmax of a full forward
    tokens = render_prompt(tuned.tokenizer, HELLO)
    ref, eos = [], set(tuned.tokenizer.eos_token_ids)
    for _ in range(24):
        nxt = mx.argmax(tuned.model(mx.array([tokens + ref]))[0, -1]).item()
        if nxt in eos:
            break
        ref.append(nxt)
    assert len(ref) >= 8  # enough tokens for the comparison to mean something
    from mlx_lm.generate import stream_generate

    from steadytune.generation import one_blas_thread

    with one_blas_thread():  # what generation.stream_text runs
        got = [r.token for r in stream_generate(fast.model, fast.tokenizer, tokens, max_tokens=24)]
    assert got[:len(ref)] == ref and (len(got) == len(ref) or got[len(ref)] in eos)
    assert generate(fast, HELLO, 24) == generate(tuned, HELLO, 24)  # the same text as before


@pytest.mark.parametrize("decoder", ["1", "0"], ids=["compiled decoder", "float32 copy"])
def test_answers_in_a_batch_equal_answers_one_by_one(run_dir, decoder, monkeypatch):
    """answer_all (the demo's before/after answers): on the float copy, prompts of different
    lengths share decode steps (left-padded rows); the compiled decoder answers them in turn.
    Greedy, each answer is the one generate() gives alone."""
    from steadytune.generation import answer_all

    monkeypatch.setenv("STEADYTUNE_CPU_DECODER", decoder)
    fast = load_tuned(run_dir, inference=True)
    chats = [HELLO, [{"role": "user", "content": "Which plots are free this spring, and who do I ask?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    alone = [generate(fast, c, 16).strip() for c in chats]  # batch_generate's decode may lead with a space
    assert [a.strip() for a in answer_all(fast, chats, 16)] == alone and len(set(alone)) == 3


def test_float_copy_only_where_memory_allows(tiny_model):
    from steadytune.config import ModelConfig
    from steadytune.generation import inference_copy
    from steadytune.model import load_base

    loaded = load_base(ModelConfig(path=str(tiny_model)))
    mode = inference_copy(loaded.model, available_bytes=1000)  # the copy needs far more
    assert mode.startswith("quantized weights (a float32 copy needs")
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in loaded.model.named_modules())
    assert inference_copy(loaded.model).startswith("a float32 copy of the weights")


def test_on_cuda_the_served_model_decodes_a_batch_as_one_matrix_of_rows(tiny_model, monkeypatch):
    """On CUDA the answering model keeps its quantized weights, its layers given the row-matrix
    layout (qlora.RowsQuantizedLinear: mlx-lm's server decodes (requests, 1, width) batches,
    which MLX's CUDA kernel would run as one-row products); the logits of a batch are the same."""
    import mlx.core as mx

    import steadytune.backend as backend
    from steadytune.config import ModelConfig
    from steadytune.generation import inference_copy
    from steadytune.model import load_base
    loaded = load_base(ModelConfig(path=str(tiny_model)))
    tokens = mx.array([[5], [9], [3]])
    want = loaded.model(tokens)
    monkeypatch.setattr(backend, "device_kind", lambda: "cuda")
    assert inference_copy(loaded.model).startswith("quantized weights (GPU")
    kinds = {type(m).__name__ for _, m in loaded.model.named_modules()}
    assert "QuantizedLinear" not in kinds and "RowsQuantizedLinear" in kinds
    got = loaded.model(tokens)
    assert got.shape == want.shape
    assert mx.abs(got - want).max().item() <= 1e-5 * mx.abs(want).max().item()


def test_server_on_the_compiled_decoder_answers_like_generate_with_its_prompt_cache(run_dir, tuned, monkeypatch):
    """`steadytune serve` on the CPU answers through the compiled decoder; mlx-lm's server keeps
    its caches (copied, trimmed) between requests, so a follow-up reuses the first answer's."""
    from steadytune.cpu_decode import CpuDecoder

    monkeypatch.setenv("STEADYTUNE_CPU_DECODER", "1")
    fast = load_tuned(run_dir, inference=True)
    assert isinstance(fast.model, CpuDecoder)
    srv = start_server(fast, "127.0.0.1", 0, max_tokens=16)
    try:
        first = json.load(post(srv.url, {"messages": HELLO, "max_tokens": 8}))["choices"][0]["message"]["content"]
        assert first == generate(tuned, HELLO, 8)
        follow = HELLO + [{"role": "assistant", "content": first}, {"role": "user", "content": "and the city"}]
        for _ in range(2):  # the second time from a cached prefix
            got = json.load(post(srv.url, {"messages": follow, "max_tokens": 8}))["choices"][0]["message"]["content"]
            assert got == generate(tuned, follow, 8)
    finally:
        srv.shutdown()


def test_a_family_mlx_lm_cannot_decode_in_a_batch_is_served_one_request_at_a_time(tmp_path, capsys):
    """gemma2 in mlx-lm 0.32: a batch of 2 requests would decode with each one's padding on the
    other's rows, 4 fail. The server answers one at a time and says why; requests are answered."""
    import arch_models

    loaded = load_tuned(None, model=str(arch_models.build(tmp_path / "gemma2", "gemma2")))
    # the demo's answer_all takes them one by one too: each answer is the one generate() gives alone
    from steadytune.generation import answer_all

    chats = [HELLO, [{"role": "user", "content": "Which plots are free this spring, and who do I ask?"}]]
    assert [a.strip() for a in answer_all(loaded, chats, 8)] == [generate(loaded, c, 8).strip() for c in chats]
    srv = start_server(loaded, "127.0.0.1", 0, max_tokens=4)
    try:
        assert srv.generator is not None and "answering one request at a time (--concurrency 1): mlx-lm's " \
            "batched generation fails on model type gemma2" in capsys.readouterr().out
        body = json.loads(post(srv.url, {"messages": [{"role": "user", "content": "hello"}]}).read())
        assert body["choices"][0]["message"]["content"] is not None
    finally:
        srv.shutdown()
