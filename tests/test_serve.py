"""The HTTP service (legion_rt/serve/): each test starts a server on a free loopback port. The HTTP mechanics
run against tests/serve_fake.py's FakeEngine (the Engine interface with controllable timing); the end-to-end
tests at the bottom run the real Engine on the tiny model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the HTTP service needs the serve extra")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from legion_rt import rle  # noqa: E402
from legion_rt.result import result_schema  # noqa: E402
from legion_rt.serve.app import create_app  # noqa: E402
from legion_rt.serve.runner import bind  # noqa: E402
from legion_rt.serve.service import ServeConfig, Service  # noqa: E402
from tests.serve_fake import IDENTITY, FakeEngine, fake_masks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "legion_rt" / "assets" / "demo.jpg"
PICTURE = DEMO.read_bytes()


def _validate(doc):
    jsonschema.Draft202012Validator(result_schema()).validate(doc)


@contextlib.contextmanager
def serving(engine=None, *, service=None, **config):
    """A uvicorn server in a thread on 127.0.0.1 (a free port); yields (base URL, service)."""
    config.setdefault("port", 0)
    service = service or Service(ServeConfig(**config), engine=engine)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), lifespan="on", log_config=None, timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive()


def _wait(pred, timeout=20.0, what="condition"):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _ready(base, timeout=30.0):
    _wait(lambda: httpx.get(base + "/health/ready").status_code == 200, timeout, "ready")


def _one_line_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    doc = r.json()
    assert list(doc) == ["error"] and isinstance(doc["error"], str), doc
    assert doc["error"] and "\n" not in doc["error"], doc
    return doc["error"]


def _sse(text: str) -> list[tuple[str, str]]:
    """Raw SSE text -> [(event, data)] with ("comment", text) for comment lines; checks the framing strictly."""
    out = []
    assert text.endswith("\n\n"), text[-50:]
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        if lines[0].startswith(":"):
            assert len(lines) == 1, block
            out.append(("comment", lines[0][1:].strip()))
            continue
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        out.append((lines[0][len("event: ") :], lines[1][len("data: ") :]))
    return out


def _metrics(base) -> dict[str, float]:
    text = httpx.get(base + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else ""
            )
            out[key] = s.value
    return out


# ----------------------------------------------------------------------------------------- health, JSON
def test_ready_only_after_warmup_and_live_always():
    gate = threading.Event()
    eng = FakeEngine(warmup_gate=gate)
    with serving(eng) as (base, service):
        assert httpx.get(base + "/health/live").json() == {"status": "live"}
        assert "warming up" in _one_line_error(httpx.get(base + "/health/ready"), 503)
        assert "warming up" in _one_line_error(httpx.get(base + "/health"), 503)
        assert "warming up" in _one_line_error(httpx.post(base + "/v1/analyze", content=PICTURE), 503)
        gate.set()
        _ready(base)
        doc = httpx.get(base + "/health").json()
        assert doc["status"] == "ok" and doc["backend"] == "fake" and doc["max_concurrency"] == 1
        assert eng.requests >= 1  # the warm-up ran a request on the bundled picture
        assert httpx.get(base + "/metrics").text.count("legion_ready 1.0") == 1


def test_failed_warmup_keeps_not_ready():
    class Broken(FakeEngine):
        def stream(self, image, **kw):
            raise RuntimeError("the model exploded")

    with serving(Broken()) as (base, service):
        _wait(lambda: service.state == "failed", what="failure")
        assert "the model exploded" in _one_line_error(httpx.get(base + "/health/ready"), 503)
        assert httpx.get(base + "/health/live").status_code == 200


def test_analyze_json_raw_multipart_and_alias():
    eng = FakeEngine(tokens=8, seg_at=(2, 5))
    with serving(eng) as (base, _):
        _ready(base)
        docs = [
            httpx.post(base + "/v1/analyze?max_new_tokens=8", content=PICTURE),
            httpx.post(
                base + "/v1/analyze?max_new_tokens=8", files={"file": ("demo.jpg", PICTURE, "image/jpeg")}
            ),
            httpx.post(base + "/analyze?max_new_tokens=8", content=PICTURE),
        ]
        for r in docs:
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "application/json"
            doc = r.json()
            _validate(doc)
            assert doc["model"] == IDENTITY and doc["token_ids"] == [100, 101, 7, 103, 104, 7, 106, 107]
            h, w = doc["image_size"]
            expect = fake_masks(h, w, 2)
            assert [
                np.array_equal(rle.decode(a["mask_rle"]), m)
                for a, m in zip(doc["artifacts"], expect, strict=True)
            ] == [True, True]
            assert np.array_equal(rle.decode(doc["mask_rle"]), expect[0] | expect[1])
        r = httpx.post(base + "/v1/analyze?max_new_tokens=3&masks=png", content=PICTURE)
        assert r.json()["mask_png"]  # the old option still works


def test_status_codes_and_error_bodies():
    with serving(FakeEngine(), max_body_bytes=len(PICTURE) + 10, max_new_tokens_limit=64) as (base, _):
        _ready(base)
        post = lambda path, data=PICTURE, **kw: httpx.post(base + path, content=data, **kw)  # noqa: E731
        assert "cannot decode image" in _one_line_error(post("/v1/analyze", b"not a picture"), 400)
        assert "empty body" in _one_line_error(post("/v1/analyze", b""), 400)
        assert "without a file field" in _one_line_error(
            httpx.post(base + "/v1/analyze", files={"other": ("a", b"x")}), 400
        )
        bad_multipart = {"content-type": "multipart/form-data"}  # no boundary
        assert "bad multipart body" in _one_line_error(
            post("/v1/analyze", b"abc", headers=bad_multipart), 400
        )
        assert "over the limit" in _one_line_error(post("/v1/analyze", PICTURE + b"x" * 100), 413)

        def chunked():
            for _ in range(4):
                yield PICTURE[: len(PICTURE) // 2]

        assert "over the limit" in _one_line_error(post("/v1/analyze", chunked()), 413)  # no Content-Length
        for q, words in [
            ("max_new_tokens=0", "max_new_tokens"),
            ("max_new_tokens=x", "not an integer"),
            ("max_new_tokens=65", "over this server's limit of 64"),
            ("temperature=-1", "temperature"),
            ("temperature=nan", "finite"),
            ("timeout_s=0", "timeout_s"),
            ("stream=maybe", "stream"),
            ("bogus=1", "unknown option"),
        ]:
            assert words in _one_line_error(post(f"/v1/analyze?{q}"), 422), q
        assert "no such endpoint" in _one_line_error(httpx.get(base + "/nowhere"), 404)
        _one_line_error(httpx.get(base + "/v1/analyze"), 405)


def test_api_key(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("first-key\n\nsecond-key\n")
    config = ServeConfig(port=0, api_key_file=str(keys))
    config.load_keys()
    with serving(service=Service(config, engine=FakeEngine())) as (base, _):
        _ready(base)  # health stays open for probes
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic first-key"},
            {"Authorization": "Bearer first-ke"},
        ):
            r = httpx.post(base + "/v1/analyze", content=PICTURE, headers=headers)
            assert "API key" in _one_line_error(r, 401) and r.headers["www-authenticate"] == "Bearer"
        for key in ("first-key", "second-key"):
            r = httpx.post(base + "/v1/analyze", content=PICTURE, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        assert _metrics(base)["legion_requests_total{outcome=unauthorized}"] == 4


def test_openapi_docs():
    with serving(FakeEngine()) as (base, _):
        spec = httpx.get(base + "/openapi.json").json()
        names = {p["name"] for p in spec["paths"]["/v1/analyze"]["post"]["parameters"]}
        assert {
            "max_new_tokens",
            "temperature",
            "top_p",
            "seed",
            "skip_if_real",
            "timeout_s",
            "stream",
        } <= names
        assert {"/health/live", "/health/ready", "/metrics", "/analyze"} <= set(spec["paths"])
        assert httpx.get(base + "/docs").status_code == 200


# ----------------------------------------------------------------------------------------------- streaming
def test_sse_framing_keepalive_and_done():
    eng = FakeEngine(tokens=6, seg_at=(1, 4), first_delay_s=0.6)
    with serving(eng, keepalive=0.1) as (base, _):
        _ready(base)
        for kw in ({"params": {"stream": "true"}}, {"headers": {"Accept": "text/event-stream"}}):
            r = httpx.post(base + "/v1/analyze", content=PICTURE, timeout=30, **kw)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in r.headers
            frames = _sse(r.text)
            kinds = [k for k, _ in frames]
            first_token = kinds.index("token")
            assert kinds[:first_token].count("comment") >= 2  # keep-alives while the "prefill" runs
            assert all(k == "comment" for k in kinds[:first_token])
            events = [(k, json.loads(d)) for k, d in frames if k != "comment"]
            assert [k for k, _ in events] == [
                "token",
                "token",
                "mask",
                "token",
                "token",
                "token",
                "mask",
                "token",
                "done",
            ]
            assert events[0][1] == {"token_id": 100, "text": " t0"}
            mask = events[2][1]
            assert (
                mask["index"] == 0 and mask["phrase"] == "p0" and set(mask["mask_rle"]) == {"size", "counts"}
            )
            done = events[-1][1]
            _validate(done)
            assert done["token_ids"] == [e["token_id"] for k, e in events if k == "token"]
            assert np.array_equal(rle.decode(mask["mask_rle"]), rle.decode(done["artifacts"][0]["mask_rle"]))


def test_sse_error_event_on_deadline():
    eng = FakeEngine(tokens=100, step_s=0.02)
    with serving(eng) as (base, _):
        _ready(base)
        r = httpx.post(base + "/v1/analyze?stream=true&timeout_s=0.3", content=PICTURE, timeout=30)
        assert r.status_code == 200
        events = [(k, json.loads(d)) for k, d in _sse(r.text) if k != "comment"]
        assert (
            events[-1][0] == "error"
            and "deadline" in events[-1][1]["error"]
            and list(events[-1][1]) == ["error"]
        )
        assert 3 <= sum(k == "token" for k, _ in events) < 100
        assert _metrics(base)["legion_requests_total{outcome=deadline}"] == 1


def test_ndjson_stream():
    with serving(FakeEngine(tokens=4, seg_at=(2,))) as (base, _):
        _ready(base)
        r = httpx.post(base + "/v1/analyze", content=PICTURE, headers={"Accept": "application/x-ndjson"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(ln) for ln in r.text.splitlines()]
        assert [x["event"] for x in lines] == ["token", "token", "token", "mask", "token", "done"]
        assert lines[0] == {"event": "token", "token_id": 100, "text": " t0"}
        assert lines[3]["artifact"]["index"] == 0 and "mask_rle" in lines[3]["artifact"]
        _validate(lines[-1]["result"])


# ----------------------------------------------------------------------------- admission, deadline, metrics
def test_queue_full_is_429_with_retry_after_and_metrics():
    hold = threading.Event()
    eng = FakeEngine(tokens=3, max_concurrency=1, max_queue=1)
    with serving(eng, max_concurrency=1, max_queue=1) as (base, _):
        _ready(base)
        eng.hold = hold
        results = {}

        def client(i):
            results[i] = httpx.post(base + "/v1/analyze", content=PICTURE, timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        _wait(lambda: eng.running_requests == 1 and eng.queued_requests == 1, what="1 running + 1 queued")
        m = _metrics(base)
        assert m["legion_inflight_requests"] == 1 and m["legion_queued_requests"] == 1
        r = httpx.post(base + "/v1/analyze", content=PICTURE)
        assert "busy" in _one_line_error(r, 429)
        assert int(r.headers["retry-after"]) >= 1
        hold.set()
        for t in threads:
            t.join(30)
        assert [results[i].status_code for i in range(2)] == [200, 200]
        m = _metrics(base)
        assert m["legion_rejected_requests_total"] == 1 and m["legion_requests_total{outcome=rejected}"] == 1
        assert m["legion_requests_total{outcome=ok}"] == 2 and m["legion_inflight_requests"] == 0


def test_deadline_is_504_running_and_queued():
    hold = threading.Event()
    eng = FakeEngine(tokens=200, step_s=0.02, max_concurrency=1, max_queue=2)
    with serving(eng, timeout=0.5) as (base, _):
        _ready(base)
        t0 = time.monotonic()
        r = httpx.post(base + "/v1/analyze?timeout_s=100", content=PICTURE, timeout=30)  # capped by --timeout
        assert "deadline" in _one_line_error(r, 504) and time.monotonic() - t0 < 3
        rec = eng.records[-1]  # stopped at the deadline, its slot freed
        assert not rec["done"] and rec["steps"] < 100 and eng.running_requests == 0
        eng.hold = hold  # one request holds the only slot: the next waits in the queue past its deadline
        blocker = threading.Thread(
            target=lambda: httpx.post(base + "/v1/analyze?timeout_s=5", content=PICTURE, timeout=30)
        )
        blocker.start()
        _wait(lambda: eng.running_requests == 1, what="a running request")
        r = httpx.post(base + "/v1/analyze?timeout_s=0.2", content=PICTURE, timeout=30)
        assert "deadline" in _one_line_error(r, 504)
        hold.set()
        blocker.join(30)
        assert _metrics(base)["legion_requests_total{outcome=deadline}"] >= 2


def test_metrics_names_and_gated_skips():
    with serving(FakeEngine(tokens=4, seg_at=(1,))) as (base, _):
        _ready(base)
        assert httpx.post(base + "/v1/analyze", content=PICTURE).status_code == 200
        r = httpx.post(base + "/v1/analyze?skip_if_real=0.5", content=PICTURE)
        assert r.status_code == 200 and r.json()["skipped"] is True
        httpx.post(base + "/v1/analyze", content=b"junk")
        m = _metrics(base)
        assert (
            m["legion_requests_total{outcome=ok}"] == 2
            and m["legion_requests_total{outcome=bad_request}"] == 1
        )
        assert m["legion_gated_skips_total"] == 1
        assert m["legion_request_seconds_count"] == 2 and m["legion_first_token_seconds_count"] == 1
        assert m["legion_first_mask_seconds_count"] == 1 and m["legion_generated_tokens_total"] == 4
        for name in ("legion_inflight_requests", "legion_queued_requests", "legion_rejected_requests_total"):
            assert name in m


# ------------------------------------------------------------------------------------------------ disconnect
@pytest.mark.parametrize("mode", ["sse", "json"])
def test_disconnect_cancels_within_one_step(mode, caplog):
    caplog.set_level(logging.INFO)
    step = 0.25  # long enough that scheduling noise on a busy 2-core machine stays well under one step
    eng = FakeEngine(tokens=300, step_s=step, max_concurrency=1)
    with serving(eng) as (base, _):
        _ready(base)
        n_before = len(eng.records)
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            q = "?stream=true" if mode == "sse" else ""
            s.sendall(
                f"POST /v1/analyze{q} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(PICTURE)}\r\n\r\n".encode()
                + PICTURE
            )
            _wait(lambda: len(eng.records) > n_before and eng.records[-1]["steps"] >= 3, what="3 steps")
            if mode == "sse":
                assert b"event: token" in s.recv(65536)
        closed_at = time.monotonic()
        rec = eng.records[-1]
        _wait(lambda: rec["closed_early"], timeout=5, what="the request to be cancelled")
        assert rec["closed_at"] - closed_at < 2 * step  # the step under way, then no more
        assert sum(t > closed_at for t in rec["step_times"]) <= 1
        _wait(lambda: eng.running_requests == 0, what="the slot to be released")
        assert httpx.post(base + "/v1/analyze?max_new_tokens=2", content=PICTURE).status_code == 200
        assert _metrics(base)["legion_requests_total{outcome=cancelled}"] == 1
    lines = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("close_early", [False, True])
def test_short_body_does_not_hang(close_early):
    """A body shorter than its Content-Length: 408 after the read timeout (client stalls); a client that closes
    its side gets nothing more but holds nothing: the server stays free for the next request."""
    with serving(FakeEngine(), read_timeout=0.5) as (base, service):
        _ready(base)
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            if close_early:
                s.shutdown(socket.SHUT_WR)
            t0 = time.perf_counter()
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
                if b"}" in chunk:
                    break
            reply = b"".join(chunks).decode()
            waited = time.perf_counter() - t0
        assert waited < 5, waited
        if not close_early:
            assert reply.startswith("HTTP/1.1 408"), reply
            assert '{"error":"body not received within 0.5 s"}' in reply, reply
        _wait(lambda: service.active == 0, what="no request left")
        assert httpx.post(base + "/v1/analyze", content=PICTURE).status_code == 200


# ---------------------------------------------------------------------------------------------------- SIGTERM
def _start_fake_server(tmp_path, *args):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "serve_fake.py"), str(port_file), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait(lambda: port_file.exists() or proc.poll() is not None, 60, "the server's port")
    assert proc.poll() is None, proc.communicate()
    base = f"http://127.0.0.1:{port_file.read_text()}"
    _wait(lambda: _get_ok(base + "/health/ready"), 60, "ready")
    return proc, base


def _get_ok(url):
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_drains_in_flight_then_exits_0(tmp_path):
    proc, base = _start_fake_server(tmp_path, "--step-s", "0.05", "--tokens", "40", "--drain-timeout", "20")
    try:
        out = {}

        def client():
            out["r"] = httpx.post(base + "/v1/analyze", content=PICTURE, timeout=60)

        t = threading.Thread(target=client)
        t.start()
        _wait(lambda: _metrics(base)["legion_inflight_requests"] == 1, what="a request in flight")
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: httpx.get(base + "/health/ready").status_code == 503, 5, "ready -> 503")
        assert "draining" in _one_line_error(httpx.get(base + "/health/ready"), 503)
        assert "draining" in _one_line_error(httpx.post(base + "/v1/analyze", content=PICTURE), 503)
        assert httpx.get(base + "/health/live").status_code == 200
        t.join(30)
        r = out["r"]
        assert r.status_code == 200 and len(r.json()["token_ids"]) == 40  # finished, not cut
        rc = proc.wait(30)
        _, err = proc.communicate()
        assert rc == 0, err
        assert "drained" in err and "Traceback" not in err and "engine closed=True" in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_drain_timeout_cuts_and_exits(tmp_path):
    proc, base = _start_fake_server(tmp_path, "--step-s", "0.5", "--tokens", "1000", "--drain-timeout", "0.5")
    try:
        t = threading.Thread(
            target=lambda: _swallow(lambda: httpx.post(base + "/v1/analyze", content=PICTURE, timeout=60))
        )
        t.start()
        _wait(lambda: _metrics(base)["legion_inflight_requests"] == 1, what="a request in flight")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        _, err = proc.communicate()
        assert rc == 0 and time.monotonic() - t0 < 10, err
        assert "drain timeout" in err and "Traceback" not in err, err
        t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()


def _swallow(fn):
    try:
        fn()
    except httpx.HTTPError:
        pass


# ------------------------------------------------------------------------------------------------ options
def test_options_from_environment(monkeypatch):
    from legion_rt.cli import build_parser
    from legion_rt.errors import RequestError
    from legion_rt.serve import config_from_args

    args = build_parser().parse_args(["serve", "--artifacts", "x", "--max-queue", "3"])
    monkeypatch.setenv("LEGION_RT_MAX_CONCURRENCY", "4")
    monkeypatch.setenv("LEGION_RT_MAX_QUEUE", "99")  # the option wins
    monkeypatch.setenv("LEGION_RT_TIMEOUT", "2.5")
    monkeypatch.setenv("LEGION_RT_DRAIN_TIMEOUT", "7")
    monkeypatch.setenv("LEGION_RT_MAX_NEW_TOKENS_LIMIT", "100")
    monkeypatch.setenv("LEGION_RT_MAX_BODY_BYTES", "1000")
    c = config_from_args(args)
    assert (c.max_concurrency, c.max_queue, c.timeout, c.drain_timeout) == (4, 3, 2.5, 7.0)
    assert (c.max_new_tokens_limit, c.max_body_bytes, c.host, c.port) == (100, 1000, "127.0.0.1", 8000)
    monkeypatch.setenv("LEGION_RT_MAX_CONCURRENCY", "zero")
    with pytest.raises(RequestError, match="LEGION_RT_MAX_CONCURRENCY: 'zero' is not an integer"):
        config_from_args(args)
    monkeypatch.setenv("LEGION_RT_MAX_CONCURRENCY", "0")
    with pytest.raises(RequestError, match="must be >= 1"):
        config_from_args(args)


def test_cli_bad_option_and_missing_extra(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-m", "legion_rt", "serve", "--artifacts", str(tmp_path), "--max-queue", "-1"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2 and p.stderr.splitlines() == [
        "legion-rt: error: --max-queue: '-1' must be >= 0"
    ], p.stderr
    block = (
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'uvicorn'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, B())\n"
        "from legion_rt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", block, "serve", "--artifacts", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert p.returncode == 1, p.stderr
    assert len(p.stderr.splitlines()) == 1 and "pip install 'legion_rt[serve]'" in p.stderr, p.stderr


# ------------------------------------------------------------------------------------- the real Engine (tiny)
@pytest.mark.slow
def test_real_engine_json_sse_and_busy(tiny_artifacts):
    """The tiny model end to end: the JSON and SSE answers equal Engine.analyze's; with the service's own
    admission (the Engine predates max_concurrency) a full queue is a 429."""
    from legion_rt.engine import Engine
    from legion_rt.serve import make_engine

    eng = make_engine(tiny_artifacts, {"threads": 1, "verify": "size", "max_concurrency": 1, "max_queue": 0})
    expected = Engine(tiny_artifacts, threads=1, verify="size").analyze(DEMO, max_new_tokens=20)
    with serving(eng, max_concurrency=1, max_queue=0) as (base, service):
        _ready(base, 120)
        r = httpx.post(base + "/v1/analyze?max_new_tokens=20", content=PICTURE, timeout=120)
        doc = r.json()
        _validate(doc)
        assert doc["token_ids"] == expected.token_ids and doc["verdict"] == expected.verdict
        assert doc["model"]["name"] and len(doc["model"]["manifest_sha256"]) == 64
        assert len(doc["artifacts"]) == len(expected.artifacts) >= 1
        for a, d in zip(expected.artifacts, doc["artifacts"], strict=True):
            assert np.array_equal(rle.decode(d["mask_rle"]), a.mask)
        assert np.array_equal(rle.decode(doc["mask_rle"]), expected.mask)
        r = httpx.post(base + "/v1/analyze?max_new_tokens=20&stream=true", content=PICTURE, timeout=120)
        events = [(k, json.loads(d)) for k, d in _sse(r.text) if k != "comment"]
        assert [e["token_id"] for k, e in events if k == "token"] == expected.token_ids
        assert events[-1][0] == "done" and sum(k == "mask" for k, _ in events) == len(expected.artifacts)
        # hold the only slot (admission happens at the stream() call), then one more request is refused
        held = service.engine.stream(PICTURE, max_new_tokens=4)
        assert service.running() == 1
        r = httpx.post(base + "/v1/analyze?max_new_tokens=2", content=PICTURE, timeout=60)
        assert "busy" in _one_line_error(r, 429) and int(r.headers["retry-after"]) >= 1
        held.close()  # closing before the first next() frees the slot
        assert service.running() == 0
        assert (
            httpx.post(base + "/v1/analyze?max_new_tokens=2", content=PICTURE, timeout=60).status_code == 200
        )


def test_cli_bad_artifacts_exits_1(tmp_path):
    """The port is bound first, the model loads in the background: a bad artifact directory still ends the
    process with exit 1 and the reason on the last line."""
    p = subprocess.run(
        [sys.executable, "-m", "legion_rt", "serve", "--artifacts", str(tmp_path), "--port", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert p.returncode == 1, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("legion-rt: error: ") and "manifest.json" in last, p.stderr
    assert "Traceback" not in p.stderr
