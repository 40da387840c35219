"""The suite's cross-process twin: the line protocol, the client's errors, and JAX/twin window alternation.

No torch here (CI has none): a stand-in handler plays the twin, in this process and in a subprocess.
"""

import io
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import suite  # noqa: E402
import twin_process  # noqa: E402

# A stand-in twin server: `sleep` is a timed window in its own process, `die` ends it without a reply.
FAKE_SERVER = f"""
import os, sys, time
sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
import suite, twin_process

class Handler:
    def op_window(self, seconds):
        return suite.window(lambda: time.sleep(seconds))
    def op_pid(self):
        return os.getpid()
    def op_fail(self):
        raise ValueError("no such\\nweights")
    def op_die(self):
        print("dying now", file=sys.stderr, flush=True)
        os._exit(3)

twin_process.serve(Handler(), sys.stdin, sys.stdout)
"""


class Echo:
    def op_add(self, a, b):
        return a + b

    def op_fail(self):
        raise ValueError("missing\nkey")


def _serve(*requests):
    replies = io.StringIO()
    twin_process.serve(Echo(), io.StringIO("".join(r + "\n" for r in requests)), replies)
    return [json.loads(x) for x in replies.getvalue().splitlines()]


def test_serve_answers_each_request_with_a_result_or_a_one_line_error():
    replies = _serve(
        json.dumps({"op": "add", "a": 2, "b": 3}),
        "",  # blank lines are skipped
        json.dumps({"op": "nope"}),
        json.dumps({"op": "fail"}),
        "{not json",
        json.dumps({"no": "op"}),
        json.dumps({"op": "exit"}),
        json.dumps({"op": "add", "a": 1, "b": 1}),  # after exit: never answered
    )
    assert replies[0] == {"result": 5}
    assert replies[1] == {"error": "unknown op 'nope'"}
    assert replies[2]["error"] == "fail: ValueError: missing key"  # the message's newline folded
    assert replies[3]["error"].startswith("bad request '{not json'")
    assert replies[4]["error"].startswith("bad request")
    assert len(replies) == 5


def test_client_times_windows_in_the_servers_process_and_reports_its_errors():
    with twin_process.TwinProcess([sys.executable, "-c", FAKE_SERVER]) as twin:
        assert twin.call("pid") not in (None, os.getpid())
        w = twin.call("window", seconds=0.2)
        assert set(w) == {"sec", "user", "system"} and 0.2 <= w["sec"] < 1.0 and w["user"] < 0.1
        with pytest.raises(RuntimeError, match=r"^twin process: fail: ValueError: no such weights$"):
            twin.call("fail")
        assert twin.call("pid") > 0  # an error reply leaves the server running
        with pytest.raises(RuntimeError, match=r"^twin process exited \(3\): dying now$"):
            twin.call("die")
    assert twin.proc.returncode == 3


def test_a_server_that_does_not_answer_in_time_is_killed():
    twin = twin_process.TwinProcess([sys.executable, "-c", FAKE_SERVER], timeout=1.0)
    with pytest.raises(RuntimeError, match=r"^twin process did not answer 'window' within 1 s; killed it$"):
        twin.call("window", seconds=30)
    assert twin.proc.returncode is not None
    twin.close()  # nothing left to end


def test_close_ends_the_server():
    twin = twin_process.TwinProcess([sys.executable, "-c", FAKE_SERVER])
    twin.call("pid")
    twin.close()
    assert twin.proc.returncode == 0


def test_alternate_interleaves_the_two_sides_and_drops_the_warmup():
    calls = []

    def jax_fn(key):
        def run():
            calls.append(("jax", key))
            time.sleep(0.01)

        return run

    def twin_fn(key):
        def run():
            calls.append(("twin", key))
            return {"sec": 0.5, "user": 0.4, "system": 0.1}

        return run

    pairs = {k: (jax_fn(k), twin_fn(k), 4) for k in ("a", "b")}
    windows = suite.alternate(pairs, repeats=2, warmup=1)
    per_round = [("jax", "a"), ("twin", "a"), ("jax", "b"), ("twin", "b")]
    assert calls == per_round * 3
    jax_windows, twin_windows = windows["a"]
    assert len(jax_windows) == len(twin_windows) == 2
    assert all(0.01 <= w["sec"] < 0.5 for w in jax_windows)
    assert suite.rates(twin_windows, 4) == [8.0, 8.0]
    assert suite.cpu_per_window(twin_windows) == {"user": 0.4, "system": 0.1}
    # Without a twin, only JAX's windows.
    alone = suite.alternate({"a": (jax_fn("a"), None, 4)}, repeats=2, warmup=0)
    assert len(alone["a"][0]) == 2 and alone["a"][1] == []


def test_a_twin_that_computes_something_else_is_refused():
    suite.check_parity(1.2e-6)
    for bad in (3e-3, float("nan")):
        with pytest.raises(RuntimeError, match=r"differs from JAX's by .* no longer matches the JAX UNet"):
            suite.check_parity(bad)
