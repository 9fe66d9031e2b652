"""Load test of `clip4str serve` on loopback: requests/s and latency at several concurrencies, memory growth.

    python benchmarks/load_test.py [--model DIR] [--concurrency 1 8 32] [--requests 2000] [--max-seconds 600]

Starts the server on 127.0.0.1 (a free port), sends one rendered word per request from N client threads,
bounded in request count and time, and reports requests/s, p50/p99 latency and failures per concurrency,
plus the server's resident memory before and after. Traffic stays on this machine.
"""

from __future__ import annotations

import argparse
import http.client
import io
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from clip4str.bench import word_image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _body() -> tuple[bytes, str]:
    buf = io.BytesIO()
    word_image().save(buf, "PNG")
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"w.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def run_level(port: int, clients: int, requests: int, deadline: float) -> dict:
    """`requests` POSTs from `clients` threads; returns counts and latencies."""
    body, content_type = _body()
    latencies: list[float] = []
    failures = [0]
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                if next(counter, None) is None:
                    break
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/read", body, {"Content-Type": content_type})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                latencies.append(time.perf_counter() - t0)
                failures[0] += not ok

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "failed": failures[0], "rps": len(lat) / wall,
            "p50": 1000 * statistics.median(lat), "p99": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    ap.add_argument("--max-seconds", type=float, default=600, help="time limit per level")
    args = ap.parse_args()
    port = _free_port()
    cmd = [sys.executable, "-m", "clip4str.cli", "serve", "--port", str(port)] + \
        (["--model", args.model] if args.model else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"server failed to start: {server.stderr.read().decode()[-1000:]}")
                time.sleep(0.2)
        for clients in args.concurrency:  # warm-up: every batch size the levels will produce
            run_level(port, clients, 4 * clients, time.monotonic() + 60)
        before = _rss_mb(server.pid)
        print("| clients | requests | failed | requests/s | p50 ms | p99 ms | server memory after (MB) |\n"
              "|--:|--:|--:|--:|--:|--:|--:|")
        for clients in args.concurrency:
            r = run_level(port, clients, args.requests, time.monotonic() + args.max_seconds)
            print(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['rps']:.1f} | {r['p50']:.0f} | "
                  f"{r['p99']:.0f} | {_rss_mb(server.pid):.0f} |", flush=True)
        after = _rss_mb(server.pid)
        print(f"\nserver resident memory: {before:.0f} MB after warm-up, {after:.0f} MB at the end "
              f"({after - before:+.0f} MB)")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
