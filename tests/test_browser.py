"""The web page in a real headless Chromium against a server on 127.0.0.1: upload two crops, check the texts."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import OVERFIT_WORDS

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(overfit_checkpoint, tmp_path_factory):
    ckpt, rendered, _ = overfit_checkpoint
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "clip4str.cli", "serve", "--model", str(ckpt), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    folder = tmp_path_factory.mktemp("upload")
    paths = []
    for word, img in zip(OVERFIT_WORDS[:2], rendered, strict=False):
        paths.append(folder / f"{word}.png")
        img.save(paths[-1])
    yield url, paths
    proc.terminate()
    proc.wait(timeout=30)


def test_page_reads_two_uploaded_images(server, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    url, paths = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.goto(url + "/")
        page.set_input_files("#files", [str(p) for p in paths])
        page.wait_for_selector("text=read 2 image(s)", timeout=60_000)
        texts = sorted(page.locator(".text").all_inner_texts())
        screenshot = tmp_path / "serve-page.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert texts == sorted(OVERFIT_WORDS[:2])
    assert screenshot.stat().st_size > 1000
