"""A live `clip4str serve` (loopback, built-in model) under hostile requests: tiny images that would be read in
thousands of windows, attention strips of thin images, chunked uploads past the limit. Each is refused or
bounded, normal requests keep their latency meanwhile, and the server's memory stays near its idle size."""

import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

HELLO = (Path(__file__).resolve().parents[1] / "examples" / "hello.png").read_bytes()


def _windows(width: int, height: int) -> int:
    """Windows the built-in model reads a width x height image in (its window follows its input size)."""
    from clip4str.onnx_backend import OnnxRecognizer
    from clip4str.reading import window_count
    return window_count(width, height, OnnxRecognizer().window_aspect)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 255).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _post(port: int, body, content_type: str, path: str = "/v1/read", chunked: bool = False) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": content_type}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    try:
        conn.request("POST", path, body=body, headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed while we still sent
        return 413, {"error": "connection closed by the server"}
    finally:
        conn.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _start_server(*options: str) -> tuple[int, subprocess.Popen]:
    """`clip4str serve` on a free port, once it answers /healthz."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "clip4str.cli", "serve", "--port", str(port), *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return port, proc
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    proc.terminate()
    pytest.fail("the server did not answer /healthz within a minute")


@pytest.fixture(scope="module")
def server():
    port, proc = _start_server()
    yield port, proc.pid
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.parametrize("size", [(100, 32), (193, 32), (194, 32), (500, 32), (1000, 32), (777, 13), (20000, 1)])
def test_window_count_is_what_split_long_cuts(size):
    from clip4str.reading import split_long, window_count

    assert window_count(*size, 6.0) == len(split_long(Image.new("RGB", size), 6.0))


def test_the_batcher_fills_batches_by_windows_and_bounds_its_queue_in_windows():
    import asyncio

    from clip4str.serve.batching import Batcher, QueueFull

    calls = []
    batcher = Batcher(lambda images: calls.append(len(images)) or [0] * len(images), max_batch=8,
                      max_wait_ms=50, max_queue=20)

    async def run():
        image = Image.new("RGB", (4, 4))
        first = asyncio.ensure_future(batcher.submit([image] * 3, [4, 4, 4]))  # 12 windows: batches of 2 images
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="20"):
            await batcher.submit([image] * 3, [3, 3, 3])  # 12 + 9 > 20 windows
        await first
        assert await batcher.submit([image] * 2, [1, 1]) == [0, 0]

    try:
        asyncio.run(run())
    finally:
        batcher.close()
    assert calls[:2] == [2, 1]


@pytest.mark.slow
def test_hostile_requests_are_refused_or_bounded_while_normal_ones_keep_their_latency(server):
    port, pid = server
    hello, kind = _multipart("hello.png", HELLO)
    for _ in range(5):  # warm up, then the idle memory
        assert _post(port, hello, kind)[0] == 200
    idle = _rss_mb(pid)
    limits = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model").read())["limits"]
    assert limits["windows_per_image"] == 24 and limits["windows_per_request"] == 256

    def chunks(total_mb: int):
        block = b"\0" * 2**20
        for _ in range(total_mb):
            yield block

    hostile = {
        "20000x1": lambda: _post(port, *_multipart("thin.png", _png(20000, 1))),
        "16000000x1": lambda: _post(port, *_multipart("thinner.png", _png(16_000_000, 1))),
        "attention 4000x1": lambda: _post(port, *_multipart("a.png", _png(4000, 1)), path="/v1/read?attention=1"),
        "attention 600x8": lambda: _post(port, *_multipart("b.png", _png(600, 8)), path="/v1/read?attention=1"),
        "chunked 300 MB": lambda: _post(port, chunks(300), "multipart/form-data; boundary=x", chunked=True),
    }
    answers, peak, done = {}, [idle], threading.Event()

    def attack():
        for name, send in hostile.items():
            answers[name] = send()
        done.set()

    def watch():
        while not done.is_set():
            peak.append(_rss_mb(pid))
            time.sleep(0.05)

    latencies = []
    threads = [threading.Thread(target=attack), threading.Thread(target=watch)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while not done.is_set() and time.monotonic() < deadline or len(latencies) < 20:
        start = time.monotonic()
        status, body = _post(port, hello, kind)
        latencies.append(time.monotonic() - start)
        assert status == 200 and body["results"][0]["text"] == "hello"
    for t in threads:
        t.join()
    assert answers["20000x1"][0] == 413 and f"{_windows(20000, 1)} windows" in answers["20000x1"][1]["error"]
    assert answers["16000000x1"][0] == 413 and "at most 24 per image" in answers["16000000x1"][1]["error"]
    assert answers["attention 4000x1"][0] == 413
    status, body = answers["attention 600x8"]  # a 75:1 crop in 13 windows: read, with a capped strip
    assert status == 200 and body["results"][0]["attention_png"].startswith("data:image/png;base64,")
    import base64

    from clip4str.visualize import MAX_PANEL_WIDTH
    strip = Image.open(io.BytesIO(base64.b64decode(body["results"][0]["attention_png"].split(",", 1)[1])))
    panels = max(1, len(body["results"][0]["text"]))
    assert strip.width <= 120 + panels * (MAX_PANEL_WIDTH + 4)  # 600 * 64 / 8 = 4,800 px per panel uncapped
    assert answers["chunked 300 MB"][0] == 413
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    assert p99 < 1.0, f"normal requests slowed down: p99 {p99:.2f} s over {len(latencies)} requests"
    assert max(peak) - idle < 200, f"server memory grew from {idle:.0f} MB to {max(peak):.0f} MB"


def _held(sock: socket.socket) -> bool:
    """Whether the server still holds this connection open (no EOF or reset waiting on it)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_idle_and_slow_connections_are_closed_and_json_floods_refused_cheaply():
    port, proc = _start_server("--backend", "onnx", "--max-connections", "20", "--header-timeout", "2",
                               "--body-timeout", "2")
    sockets = []
    try:
        trickle = socket.create_connection(("127.0.0.1", port))
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(b"POST /v1/read HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"images\": [")
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]  # idle: never send
        opened = time.monotonic()
        while sum(not _held(s) for s in sockets) < 12 and time.monotonic() < opened + 1.5:  # before the timeout
            time.sleep(0.05)
        assert sum(not _held(s) for s in sockets) >= 12, "connections over --max-connections were not closed at once"
        start, closed_after = time.monotonic(), None
        for _ in range(12):  # headers a byte at a time, each byte within uvicorn's keep-alive time
            try:
                trickle.sendall(b"G")
            except OSError:  # the server closed it
                closed_after = time.monotonic() - start
                break
            time.sleep(0.3)
        assert closed_after is not None and closed_after < 4, "a connection trickling its headers was kept"
        time.sleep(max(0.0, opened + 3 - time.monotonic()))
        assert not any(_held(s) for s in sockets), "idle connections still open after the header timeout"
        slow_body.settimeout(10)
        assert b" 408 " in slow_body.recv(200).split(b"\r\n")[0]
        slow_body.settimeout(2)  # under uvicorn's keep-alive time, which a trickling client would keep resetting
        try:  # the rest of the response, up to the server's close (or a timeout if it keeps the connection)
            while slow_body.recv(4096):
                pass
        except OSError:
            pass
        assert not _held(slow_body), "the connection of a timed-out upload is still open"
        hello, kind = _multipart("hello.png", HELLO)
        status, body = _post(port, hello, kind)
        assert status == 200 and body["results"][0]["text"] == "hello"
        start = time.monotonic()
        flood = json.dumps({"images": ["AAAA"] * 200_000}).encode()
        status, body = _post(port, flood, "application/json")
        assert status == 413 and "200000 images" in body["error"]
        assert time.monotonic() - start < 10
        status, body = _post(port, b"--x\r\nnot a part", "multipart/form-data")  # no boundary parameter
        assert status == 400 and "bad multipart body" in body["error"]
    finally:
        for s in sockets:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)
