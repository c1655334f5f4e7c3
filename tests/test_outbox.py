"""lsgpt/serving/outbox.py's TokenStream: a stream's tokens leave in order, none lost or repeated, one a send while
the lane keeps up and gathered while a send is in flight; what is queued on the lane after the last token (the
final response) leaves after every token. The oracle is the sequence of tokens added."""

from __future__ import annotations

import random
import threading
import time

from lsgpt.serving.outbox import Outbox, TokenStream


def test_one_token_a_send_while_the_lane_keeps_up():
    box = Outbox("keeps-up", lanes=2)
    sent: list[list[int]] = []
    done = threading.Event()
    try:
        s = TokenStream(box, 1, sent.append)
        for t in range(5):
            s.add(t)
            deadline = time.monotonic() + 10
            while len(sent) <= t and time.monotonic() < deadline:  # the decode loop's next step comes later
                time.sleep(0.001)
        box.put(done.set, lane=1)
        assert done.wait(10)
        assert sent == [[0], [1], [2], [3], [4]]
    finally:
        box.close()


def test_tokens_gather_while_a_send_is_in_flight():
    box = Outbox("gather")
    sent: list[list[int]] = []
    release, first = threading.Event(), threading.Event()

    def send(toks: list[int]) -> None:
        first.set()
        release.wait(10)  # the first send's round trip is slow
        sent.append(toks)

    try:
        s = TokenStream(box, 0, send)
        s.add(1)
        assert first.wait(10)
        for t in range(2, 10):  # eight decode steps while the send is in flight
            s.add(t)
        final = threading.Event()
        box.put(final.set)  # the end of the stream, queued after the last token
        release.set()
        assert final.wait(10)
        assert sent == [[1], list(range(2, 10))]  # one send for all that gathered, before the final
    finally:
        release.set()
        box.close()


def test_many_streams_under_random_send_times_lose_nothing_and_keep_order():
    box = Outbox("stress", lanes=3)
    rng = random.Random(0)
    n_streams, n_tokens = 12, 300
    got: dict[int, list[list[int]]] = {i: [] for i in range(n_streams)}
    ended: dict[int, int] = {}  # stream -> tokens it had received when its final response left
    go = threading.Event()  # the sends wait until every token is added: the streams must gather

    def sender(i: int):
        def send(toks: list[int]) -> None:
            go.wait(30)
            time.sleep(rng.random() * 0.0005)
            got[i].append(toks)
        return send

    try:
        streams = [TokenStream(box, i, sender(i)) for i in range(n_streams)]
        for t in range(n_tokens):  # a decode step: every stream gets a token
            for s in streams:
                s.add(t)
        go.set()
        finals = []
        for i in range(n_streams):
            ev = threading.Event()

            def final(i=i, ev=ev) -> None:
                ended[i] = sum(len(x) for x in got[i])
                ev.set()
            box.put(final, lane=i)
            finals.append(ev)
        assert all(ev.wait(30) for ev in finals)
        for i in range(n_streams):
            assert [t for toks in got[i] for t in toks] == list(range(n_tokens))
            assert ended[i] == n_tokens  # the final left after every token
            assert all(got[i])  # no empty send
        assert sum(len(got[i]) for i in range(n_streams)) <= 2 * n_streams  # at most one send before the rest gathered
    finally:
        box.close()
