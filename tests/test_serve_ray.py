"""The Ray Serve deployment (legion_rt/serve/ray_app.py): a local Ray instance on the loopback address serves
the tiny model through Ray's HTTP proxy with the same routes and JSON as uvicorn."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray deployment needs the ray extra (pip install '.[ray]')")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

DEMO = Path(__file__).resolve().parents[1] / "legion_rt" / "assets" / "demo.jpg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_serve_replicas_serve_the_same_json(tiny_artifacts):
    from legion_rt.engine import Engine
    from legion_rt.result import result_schema
    from legion_rt.serve.ray_app import build_app

    expected = Engine(tiny_artifacts, threads=1, verify="size").analyze(DEMO, max_new_tokens=12)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "artifacts": str(tiny_artifacts),
                "replicas": "2",
                "threads": "1",
                "verify": "size",
                "max_queue": "2",
            }
        )
        serve.run(app, name="legion_rt", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while httpx.get(base + "/health/ready", timeout=30).status_code != 200:
            assert time.monotonic() - t0 < 120
            time.sleep(0.5)
        picture = DEMO.read_bytes()
        r = httpx.post(base + "/v1/analyze?max_new_tokens=12", content=picture, timeout=120)
        assert r.status_code == 200, r.text
        doc = r.json()
        jsonschema.Draft202012Validator(result_schema()).validate(doc)
        assert doc["token_ids"] == expected.token_ids and doc["verdict"] == expected.verdict
        r = httpx.post(base + "/v1/analyze?max_new_tokens=12&stream=true", content=picture, timeout=120)
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [b.split("\n") for b in r.text.strip().split("\n\n") if not b.startswith(":")]
        tokens = [json.loads(d[len("data: ") :])["token_id"] for e, d in events if e == "event: token"]
        assert tokens == expected.token_ids and events[-1][0] == "event: done"
        assert httpx.post(base + "/v1/analyze?max_new_tokens=0", content=picture).status_code == 422
        assert "legion_requests_total" in httpx.get(base + "/metrics").text
    finally:
        serve.shutdown()
        ray.shutdown()
