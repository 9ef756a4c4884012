"""`steadytune serve` against hostile clients: each case is followed by a normal request that must
be answered, on the same server (one server for the module: a case that broke it breaks the rest).

The model is the tiny one with its base weights (no training needed), behind a switch that makes
its forward pass raise: a failure inside generation, which no request field can cause any more."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import mlx.nn as nn
import pytest

from steadytune.cli import main as cli_main
from steadytune.serve_request import ModelLimits, RequestError, check_request, parse_body

HELLO = [{"role": "user", "content": "hello"}]
HEAD_TIMEOUT = 1.0  # the server's deadline for a request head, short for the test (10 s by default)


class Breakable(nn.Module):
    """A model whose forward pass raises while `broken` is set, and takes `delay` seconds more."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.broken, self.delay = model, False, 0.0

    @property
    def layers(self):
        return self.inner.layers

    def __call__(self, *args, **kwargs):
        if self.broken:
            raise RuntimeError("injected failure in the forward pass")
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def model(tiny_model):
    from steadytune.config import ModelConfig
    from steadytune.model import load_base

    loaded = load_base(ModelConfig(path=str(tiny_model)))
    loaded.model = Breakable(loaded.model)
    return loaded


@pytest.fixture(scope="module")
def server(model):
    from steadytune.serve import start_server

    # caps reached with two sockets: two requests with a thread (both may generate), two heads
    srv = start_server(model, "127.0.0.1", 0, max_tokens=16, concurrency=2, connections=2, heads=2,
                       head_timeout=HEAD_TIMEOUT)
    yield srv
    srv.shutdown()


def send(url, body: bytes, path="/v1/chat/completions", timeout=30) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def post(url, fields: dict) -> tuple[int, dict]:
    return send(url, json.dumps({"messages": HELLO, "max_tokens": 2, **fields}).encode())


def assert_still_serves(url):
    status, body = post(url, {})
    assert status == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant"


# --- 1. fields checked against the model: 400 naming the field --------------------------------

HOSTILE = {  # each of the first five stopped the server for good, or crashed it, before
    "top_k at the vocabulary size": ({"top_k": 384, "temperature": 0.7}, "top_k"),
    "NaN min_p": ({"min_p": float("nan"), "temperature": 0.7}, "min_p"),
    "a number as stop": ({"stop": 5}, "stop"),
    "logit_bias id past the vocabulary": ({"logit_bias": {"999999999": 100}}, "logit_bias"),
    "seed over 64 bits": ({"seed": 2 ** 80}, "seed"),
    "negative temperature": ({"temperature": -1}, "temperature"),
    "infinite temperature": ({"temperature": float("inf")}, "temperature"),
    "top_p over 1": ({"top_p": 1.5}, "top_p"),
    "NaN logit bias": ({"logit_bias": {"3": float("nan")}}, "logit_bias"),
    "zero max_tokens": ({"max_tokens": 0}, "max_tokens"),
    "boolean max_tokens": ({"max_tokens": True}, "max_tokens"),
    "several answers": ({"n": 3}, "n"),
    "a template keyword": ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
    "content that is a number": ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "stream as a string": ({"stream": "yes"}, "stream"),
}


@pytest.mark.parametrize("fields, field", HOSTILE.values(), ids=HOSTILE.keys())
def test_out_of_range_field_gets_400_naming_it_and_the_next_request_is_served(server, fields, field):
    status, body = post(server.url, fields)
    assert status == 400, body
    assert body["error"]["param"] == field
    assert body["error"]["message"].startswith(f"{field}: ")
    assert_still_serves(server.url)


@pytest.mark.parametrize("depth", [100_000, 65])
def test_deeply_nested_json_gets_400(server, depth):
    status, body = send(server.url, b'{"messages": ' + b"[" * depth + b"]" * depth + b"}")
    assert status == 400 and "nests deeper than 64 levels" in body["error"]["message"], body
    assert_still_serves(server.url)


def test_every_field_at_its_limit_is_accepted(server):
    """The checks refuse exactly what is out of range: each field at its edge is answered."""
    status, body = post(server.url, {"top_k": 383, "min_p": 1, "top_p": 0, "temperature": 100,
                                     "seed": 2 ** 64 - 1, "logit_bias": {"383": 100, "0": -100},
                                     "stop": ["a", "b"], "n": 1, "top_logprobs": 20, "logprobs": True,
                                     "presence_penalty": -2, "frequency_penalty": 2,
                                     "repetition_penalty": 10, "max_tokens": 10 ** 9})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] <= 16  # max_tokens: the server's cap


def test_limits_come_from_the_model():
    limits = ModelLimits(vocab=100, context=64, max_tokens=8, temperature=0.0)
    body = {"messages": HELLO, "top_k": 99, "logit_bias": {"99": 1}, "max_tokens": 50,
            "repetition_context_size": 64}
    got = check_request(body, True, limits)
    assert (got["top_k"], got["logit_bias"], got["max_tokens"]) == (99, {99: 1.0}, 8)
    for field, value in [("top_k", 100), ("logit_bias", {"100": 1}), ("repetition_context_size", 65),
                         ("top_logprobs", 21)]:
        with pytest.raises(RequestError) as e:
            check_request({**body, field: value}, True, limits)
        assert e.value.field == field
    with pytest.raises(RequestError, match="nests deeper"):
        parse_body(b"[" * 2000 + b"]" * 2000)


# --- 2. a failure inside generation: 500 for that request, the next one is served ---------------

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_failure_inside_generation_answers_500_and_the_next_request_is_served(server, model, stream):
    model.model.broken = True
    try:
        status, data = post_raw(server.url, {"messages": HELLO, "max_tokens": 2, "stream": stream})
    finally:
        model.model.broken = False
    if stream:  # the 200 went out with the headers: the stream ends with an error event
        assert status == 200 and b'"code": 500' in data and b"generation failed" in data, data
    else:
        assert status == 500 and b"generation failed" in data, data
    assert_still_serves(server.url)


def post_raw(url, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --- 3. slow clients and too many connections ----------------------------------------------------

def connect(url) -> socket.socket:
    host, port = url.split("//")[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def test_slowloris_head_is_cut_at_the_deadline_though_never_silent(server):
    """One byte every 0.2 s never trips an idle timeout; the total deadline closes it."""
    s = connect(server.url)
    t, closed = time.monotonic(), False
    try:
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            s.send(bytes([byte]))
            time.sleep(0.2)
            if time.monotonic() - t > HEAD_TIMEOUT + 0.5:
                s.settimeout(2)
                closed = s.recv(100) == b""
                break
    except OSError:  # reset while sending: closed too
        closed = True
    finally:
        s.close()
    assert closed and time.monotonic() - t < HEAD_TIMEOUT + 3
    assert_still_serves(server.url)


def test_at_the_cap_of_waiting_heads_the_oldest_makes_room(server):
    idle = [connect(server.url) for _ in range(2)]  # the cap: both send nothing
    try:
        time.sleep(0.1)
        assert_still_serves(server.url)  # admitted: the oldest idle one was dropped
        idle[0].settimeout(2)
        assert idle[0].recv(100) == b""
    finally:
        for s in idle:
            s.close()


def test_at_the_cap_with_every_request_generating_a_new_one_gets_503_at_once(server, model):
    eos = {str(i): -100 for i in model.tokenizer.eos_token_ids}
    streams = []
    model.model.delay = 0.25  # 16 tokens: 4 s per answer
    try:
        for _ in range(2):  # both connections generating
            req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(
                {"messages": HELLO, "max_tokens": 16, "stream": True, "logit_bias": eos}).encode())
            streams.append(urllib.request.urlopen(req, timeout=30))
            assert streams[-1].readline()  # generating
        t = time.monotonic()
        status, body = post(server.url, {})
        assert status == 503 and "too many connections" in body["error"]["message"], body
        assert time.monotonic() - t < 1.0
    finally:
        model.model.delay = 0.0
        for r in streams:
            r.close()
    for _ in range(100):  # the closed streams' threads notice at their next token
        status, body = post(server.url, {})
        if status != 503:
            break
        time.sleep(0.05)
    assert status == 200, body


# --- 4. sampling flags -------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_non_finite_or_negative_temperature_flag_is_refused_in_one_line(command, value, tiny_model,
                                                                        capsys):
    target = ["--prompt", "hi", "--model", str(tiny_model)] if command == "generate" else [str(tiny_model)]
    assert cli_main([command, *target, f"--temperature={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --temperature must be ") and err.count("\n") == 1, err
