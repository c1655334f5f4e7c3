"""An OpenAI client that goes away in the middle of a streamed completion frees its row on the real server.

The OpenAI app (lsgpt/serving/openai_api.py, uvicorn in a thread) in front of test_cancellation's server: one
decoupled model that, left running, generates exactly MAX_NEW tokens and runs one row at a time. The HTTP client
reads two events of a `stream: true` completion and closes the connection. Oracle: the server's own metrics
(generated tokens, requests, running rows) and a following request, which can only run once the row is free.
Without the cancellation on disconnect, the server generates all MAX_NEW tokens (tens of seconds here) before
the row frees. No wall-clock assertions: deadlines are hang guards only."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
from test_cancellation import LABELS, MAX_NEW, long_served, settled  # noqa: E402, F401  (fixture)

from lsgpt.serving.launcher import free_port  # noqa: E402


@pytest.fixture(scope="module")
def app_url(long_served, tiny_models):  # noqa: F811 (the fixture imported above)
    from lsgpt.serving.openai_api import create_app

    server, _ = long_served
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(server.grpc_url, str(tiny_models.tokenizer)), host="127.0.0.1",
                                        port=port, log_level="warning"))
    t = threading.Thread(target=web.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not web.started:
        assert time.monotonic() < deadline, "the OpenAI app did not start"  # hang guard
        time.sleep(0.05)
    yield port
    web.should_exit = True
    t.join(10)


def events(port: int, body: dict, stop_after: int | None = None) -> list[dict]:
    """POST a streamed completion; read `stop_after` data events, then close the connection (None: to the end)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        got = []
        while line := r.readline():
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            got.append(json.loads(line[6:]))
            if stop_after is not None and len(got) >= stop_after:
                break
        return got
    finally:
        conn.close()  # mid-stream when stop_after is reached: the client goes away


def test_disconnected_stream_is_cancelled_on_the_server(long_served, app_url):  # noqa: F811
    server, engine = long_served
    gen, req = f"lsgpt_generated_tokens_total{LABELS}", f"lsgpt_requests_total{LABELS}"
    body = {"model": "gpt2", "prompt": "我今天", "max_tokens": MAX_NEW, "temperature": 0, "stream": True}
    before = settled(server)
    first = events(app_url, body, stop_after=2)
    assert "".join(e["choices"][0]["text"] for e in first).startswith("我")  # TOKEN is 我 (test_cancellation)
    after = settled(server)  # waits for running rows 0: with the cancellation lost, MAX_NEW tokens first
    generated = after[gen] - before[gen]
    print(f"client left after 2 events: the server generated {generated:.0f} of {MAX_NEW} tokens")
    assert after[req] - before[req] == 1
    assert generated < MAX_NEW // 2  # left running it generates exactly MAX_NEW (the model never ends)

    # the single row is free: a short streamed completion runs to its end
    short = events(app_url, dict(body, max_tokens=5))
    assert "".join(e["choices"][0]["text"] for e in short) == "我" * 5 and short[-1]["choices"][0]["finish_reason"] == "length"
