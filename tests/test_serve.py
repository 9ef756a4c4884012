"""`steadytune chat` and `steadytune serve` on a tiny model with adapters trained in the test.

Greedy decoding makes every answer exact, so the chat and the HTTP server are checked against
generation.generate on the same messages: same text, same history handling."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
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
    assert status == 400 and "text only" in body["error"]
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


def test_serve_command_answers_and_stops_on_ctrl_c(run_dir, tuned):
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
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=60)
    assert rc == 0, p.stderr.read()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)
