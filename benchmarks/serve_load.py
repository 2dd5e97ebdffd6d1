"""Bounded load test of ``legion-rt serve`` on the loopback address, at about 2x its measured capacity.

    python benchmarks/serve_load.py [--artifacts ART] [--requests 120] [--budget-s 90] [--factor 2.0]
                                    [--max-concurrency 1] [--max-queue 4] [--max-new-tokens 16] [--markdown]

1. Starts ``legion-rt serve`` (the real CLI, a subprocess) on 127.0.0.1 with a free port and waits for
   /health/ready (the warm-up request passed). Without --artifacts it uses the tiny random model (made and
   exported once into the cache, as ``legion-rt demo`` does; needs the export extra).
2. Capacity: ``--calibrate`` sequential requests; capacity = max_concurrency / mean latency (requests/s).
3. Load: ``--requests`` requests sent open-loop at ``--factor`` x capacity (evenly spaced arrivals) by an asyncio
   client, all within ``--budget-s`` seconds (a request still unanswered at the end of the budget counts as lost).
4. Reports admitted (200) p50/p99 latency, how many got 429 (and other statuses), whether every request got
   exactly one answer (client side: one response each, no transport error; server side: the /metrics outcome
   counters moved by exactly the number of requests sent, 200s and 429s matching), the server's RSS before and
   after the load and its peak (VmHWM). ``--rounds`` repeats the load and reports the RSS after each round (it
   should level off, not grow with the number of requests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "legion_rt" / "assets" / "demo.jpg"


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def outcomes(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=30).text
    return {
        m[1]: float(m[2])
        for m in re.finditer(r'^legion_requests_total\{outcome="(\w+)"\} (\S+)$', text, re.M)
    } | {
        "_".join(("rejected", "counter")): float(
            re.search(r"^legion_rejected_requests_total (\S+)$", text, re.M)[1]
        )
    }


def start_server(art: str, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "legion_rt", "serve", "--artifacts", art, "--verify", "size", "--port", "0"]
    cmd += ["--max-concurrency", str(args.max_concurrency), "--max-queue", str(args.max_queue)]
    cmd += ["--timeout", str(args.budget_s)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    base = None
    t0 = time.monotonic()
    while base is None:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"the server exited: rc {proc.wait()}")
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if m:
            base = m[1]
        if time.monotonic() - t0 > 120:
            raise SystemExit("the server did not start")
    # drain its stderr in the background so it never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    while True:
        try:
            if httpx.get(base + "/health/ready", timeout=10).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() - t0 > 300:
            raise SystemExit("the server did not become ready")
        time.sleep(0.2)


async def load(base: str, picture: bytes, n: int, rate: float, budget_s: float, max_new_tokens: int):
    results: list[tuple[int, str, float]] = [None] * n  # (status or -1, error, latency)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=budget_s, limits=limits) as client:
        t_start = time.perf_counter()

        async def one(i: int):
            await asyncio.sleep(max(0.0, t_start + i / rate - time.perf_counter()))
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    f"{base}/v1/analyze?max_new_tokens={max_new_tokens}&seed={i}", content=picture
                )
                ok = r.status_code != 200 or len(r.json()["token_ids"]) >= 1
                results[i] = (r.status_code, "" if ok else "bad document", time.perf_counter() - t0)
            except Exception as e:
                results[i] = (-1, type(e).__name__, time.perf_counter() - t0)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=budget_s)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t_start
    return results, wall


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default=None)
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--budget-s", type=float, default=90.0)
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--calibrate", type=int, default=8)
    p.add_argument("--max-concurrency", type=int, default=1)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--rounds", type=int, default=2, help="load rounds (RSS after each); the table is round 1's"
    )
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()

    art = args.artifacts
    if art is None:
        from legion_rt.cli import cache_dir, ensure_tiny_artifacts

        art = str(ensure_tiny_artifacts(cache_dir(), quiet=True))
    picture = DEMO.read_bytes()
    proc, base = start_server(art, args)
    try:
        mem_before = rss_kib(proc.pid)
        lat = []
        for i in range(args.calibrate):
            t0 = time.perf_counter()
            r = httpx.post(
                f"{base}/v1/analyze?max_new_tokens={args.max_new_tokens}&seed={i}",
                content=picture,
                timeout=120,
            )
            r.raise_for_status()
            lat.append(time.perf_counter() - t0)
        capacity = args.max_concurrency / statistics.mean(lat)
        rate = args.factor * capacity
        before = outcomes(base)
        results, wall = asyncio.run(
            load(base, picture, args.requests, rate, args.budget_s, args.max_new_tokens)
        )
        time.sleep(0.5)
        after = outcomes(base)
        mem_rounds = [rss_kib(proc.pid)["VmRSS"]]
        for _ in range(args.rounds - 1):  # the same load again: RSS should plateau, not grow per request
            asyncio.run(load(base, picture, args.requests, rate, args.budget_s, args.max_new_tokens))
            time.sleep(0.5)
            mem_rounds.append(rss_kib(proc.pid)["VmRSS"])
        mem_after = rss_kib(proc.pid)
    finally:
        proc.terminate()
        rc = proc.wait(60)

    lost = sum(r is None for r in results)
    answered = [r for r in results if r is not None]
    transport = sum(r[0] == -1 for r in answered)
    codes: dict[int, int] = {}
    for r in answered:
        codes[r[0]] = codes.get(r[0], 0) + 1
    admitted = [r[2] for r in answered if r[0] == 200]
    bad_docs = sum(bool(r[1]) and r[0] == 200 for r in answered)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    server_seen = sum(v for k, v in delta.items() if k != "rejected_counter")
    exactly_once = (
        lost == 0
        and transport == 0
        and bad_docs == 0
        and server_seen == args.requests
        and delta.get("ok", 0) == codes.get(200, 0)
        and delta.get("rejected", 0) == codes.get(429, 0) == delta.get("rejected_counter", 0)
    )
    rows = [
        (
            "model / picture",
            f"tiny random-weight model, {DEMO.name} (640x448), max_new_tokens={args.max_new_tokens}",
        ),
        (
            "server",
            f"max_concurrency={args.max_concurrency}, max_queue={args.max_queue}, 127.0.0.1, {os.cpu_count()} CPU cores",
        ),
        ("measured capacity", f"{capacity:.2f} req/s (sequential mean {statistics.mean(lat) * 1000:.0f} ms)"),
        (
            "offered load",
            f"{args.requests} requests at {rate:.2f} req/s ({args.factor:g}x), budget {args.budget_s:g} s, took {wall:.1f} s",
        ),
        ("200 (admitted)", f"{codes.get(200, 0)}"),
        ("429 (queue full)", f"{codes.get(429, 0)}"),
        (
            "other statuses",
            ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()) if k not in (200, 429)) or "none",
        ),
        (
            "admitted latency p50 / p99",
            f"{pct(admitted, 50) * 1000:.0f} ms / {pct(admitted, 99) * 1000:.0f} ms" if admitted else "-",
        ),
        ("throughput (200s)", f"{len(admitted) / wall:.2f} req/s"),
        (
            "every request answered exactly once",
            f"{'yes' if exactly_once else 'NO'} (lost {lost}, transport errors {transport}; server counted {server_seen:.0f} of {args.requests})",
        ),
        (
            "server RSS before / after each round / peak",
            f"{mem_before['VmRSS'] / 1024:.0f} / {' / '.join(f'{m / 1024:.0f}' for m in mem_rounds)}"
            f" / {mem_after['VmHWM'] / 1024:.0f} MiB",
        ),
        ("server exit after SIGTERM", f"rc {rc}"),
    ]
    if args.markdown:
        print("| measure | value |\n|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
    else:
        for k, v in rows:
            print(f"{k:40s} {v}")
    return 0 if exactly_once else 1


if __name__ == "__main__":
    sys.exit(main())
