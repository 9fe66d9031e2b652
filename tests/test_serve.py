"""HTTP API: every endpoint, batching across concurrent requests, and every kind of bad input."""

import base64
import io
import threading
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clip4str.inference import Recognizer
from clip4str.serve.app import create_app
from conftest import OVERFIT_WORDS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(overfit_checkpoint):
    ckpt, rendered, _ = overfit_checkpoint
    app = create_app(Recognizer.from_pretrained(ckpt), max_batch=8, max_upload_mb=1, max_images=4)
    with TestClient(app) as client:
        yield client, rendered, app


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_health_model_and_openapi(served):
    client, _, _ = served
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["decoding"] == {"mode": "ar", "refine_iters": 1, "cascade_confidence": None,
                                "second_look_confidence": None}
    assert len(info["charset"]) == 94
    assert info["provenance"] == {"test": "overfit"}
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/v1/read"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/ReadResponse")
    assert {"413", "400", "415", "503"} <= set(spec["paths"]["/v1/read"]["post"]["responses"])
    assert "422" not in spec["paths"]["/v1/read"]["post"]["responses"]  # a bad query value is a 400 here
    body = spec["paths"]["/v1/read"]["post"]["requestBody"]["content"]  # generated clients can upload
    assert body["multipart/form-data"]["schema"]["properties"]["files"]["items"]["format"] == "binary"
    assert "images" in body["application/json"]["schema"]["properties"]
    assert (info["backend"], info["device"]) == ("torch", "cpu")


def test_multipart_and_json_reads(served):
    client, rendered, _ = served
    files = [("files", (f"{w}.png", _png(img), "image/png"))
             for w, img in zip(OVERFIT_WORDS[:3], rendered, strict=False)]
    body = client.post("/v1/read", files=files).json()
    assert [r["text"] for r in body["results"]] == OVERFIT_WORDS[:3]
    assert [r["name"] for r in body["results"]] == [f"{w}.png" for w in OVERFIT_WORDS[:3]]
    r0 = body["results"][0]
    assert len(r0["char_probs"]) == len(OVERFIT_WORDS[0]) + 1 and 0 < r0["confidence"] <= 1
    payload = {"images": [base64.b64encode(_png(rendered[4])).decode()], "names": ["cafe"]}
    body = client.post("/v1/read?attention=1", json=payload).json()
    assert body["results"][0]["text"] == "cafe"
    assert body["results"][0]["attention_png"].startswith("data:image/png;base64,")
    # base64 as clients produce it: wrapped in lines (base64.encodebytes, `base64 FILE`), a data URL, URL-safe
    png = _png(rendered[4])
    forms = [base64.encodebytes(png).decode(), "data:image/png;base64," + base64.b64encode(png).decode(),
             base64.urlsafe_b64encode(png).decode().rstrip("=")]
    body = client.post("/v1/read", json={"images": forms}).json()
    assert [r["text"] for r in body["results"]] == ["cafe"] * 3


def test_a_whole_photo_is_read_with_a_note(served):
    client, rendered, _ = served
    files = [("files", ("photo.png", _png(Image.new("RGB", (800, 600), "gray")), "image/png")),
             ("files", ("crop.png", _png(rendered[0]), "image/png"))]
    photo, crop = client.post("/v1/read", files=files).json()["results"]
    assert "800x600 image looks like a whole photo" in photo["note"] and photo["error"] is None
    assert crop["note"] is None and crop["text"] == OVERFIT_WORDS[0]


def test_concurrent_requests_share_batches(served):
    client, rendered, app = served
    before = app.state.batcher.batches
    out = [None] * 8

    def call(i):
        out[i] = client.post("/v1/read", files=[("files", ("x.png", _png(rendered[i]), "image/png"))]).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o["results"][0]["text"] for o in out] == OVERFIT_WORDS
    assert app.state.batcher.batches - before < 8  # some requests were read together


def _bomb() -> bytes:
    """A tiny PNG header that claims 20000 x 20000 pixels (a decompression bomb)."""
    import struct

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("case, status, message", [
    ("not-an-image", 400, "could not be decoded"),
    ("truncated", 400, "could not be decoded"),
    ("bomb", 400, "pixels"),
    ("oversized", 413, "limit"),
    ("empty", 400, "no images"),
    ("too-many", 413, "at most 4"),
    ("content-type", 415, "unsupported content type"),
    ("bad-base64", 400, "image 1 ('b') is not valid base64"),
    ("bad-json", 400, "JSON"),
    ("names-mismatch", 400, "one name per image"),
    ("wrong-field", 400, "field(s) ['file'] but no file in a field named 'files'"),
    ("bad-query", 400, "bad request (query.attention:"),
    ("not-found", 404, "Not Found"),
    ("wrong-method", 405, "Method Not Allowed"),
])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(served, case, status, message):
    client, rendered, _ = served
    good = _png(rendered[0])
    requests = {
        "not-an-image": lambda: client.post("/v1/read", files=[("files", ("a.txt", b"hello", "text/plain"))]),
        "truncated": lambda: client.post("/v1/read", files=[("files", ("t.png", good[:60], "image/png"))]),
        "bomb": lambda: client.post("/v1/read", files=[("files", ("bomb.png", _bomb(), "image/png"))]),
        "oversized": lambda: client.post("/v1/read", files=[("files", ("big.png", b"0" * (2 * 2**20), "image/png"))]),
        "empty": lambda: client.post("/v1/read", files=[]),
        "too-many": lambda: client.post("/v1/read",
                                        files=[("files", (f"{i}.png", good, "image/png")) for i in range(5)]),
        "content-type": lambda: client.post("/v1/read", content=good, headers={"content-type": "image/png"}),
        "bad-base64": lambda: client.post("/v1/read", json={"images": [base64.b64encode(good).decode(), "!!!"],
                                                            "names": ["a", "b"]}),
        "wrong-field": lambda: client.post("/v1/read", files=[("file", ("a.png", good, "image/png"))]),
        "bad-query": lambda: client.post("/v1/read?attention=maybe", files=[("files", ("a.png", good, "image/png"))]),
        "not-found": lambda: client.get("/v2/read"),
        "wrong-method": lambda: client.get("/v1/read"),
        "bad-json": lambda: client.post("/v1/read", content=b"{nope", headers={"content-type": "application/json"}),
        "names-mismatch": lambda: client.post("/v1/read", json={"images": [base64.b64encode(good).decode()] * 2,
                                                                "names": ["one"]}),
    }
    response = requests[case]()
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    ok = client.post("/v1/read", files=[("files", ("ok.png", good, "image/png"))])
    assert ok.status_code == 200 and ok.json()["results"][0]["text"] == OVERFIT_WORDS[0]


def test_page_is_self_contained(served):
    client, _, _ = served
    html = client.get("/").text
    assert "<script>" in html and "/v1/read" in html
    assert "http://" not in html and "https://" not in html  # no CDN or other external resource


def test_the_server_reads_every_image_it_accepts_whatever_its_window_limit():
    from PIL import Image

    from clip4str.onnx_backend import OnnxRecognizer

    rec = OnnxRecognizer()
    wide = Image.new("RGB", (70 * 8 * 32, 32), "white")  # more windows than read()'s default limit of 64
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    app = create_app(rec, max_windows=1000, max_request_windows=1000, max_queue_windows=1000)
    seen = []
    read = rec.read
    rec.read = lambda images, **options: seen.append(options["max_windows"]) or read(images, **options)
    with TestClient(app) as client:
        response = client.post("/v1/read", files=[("files", ("wide.png", buf.getvalue(), "image/png"))])
    assert response.status_code == 200 and seen == [1000]


def test_attention_strips_are_bounded_across_requests(served, overfit_checkpoint):
    """A strip costs several readings and is drawn outside the batcher's queue: a request may ask for at most
    max_attention_images strips, and strips already promised to other requests count against the same bound."""
    client, rendered, app = served
    png = _png(rendered[0])
    assert client.get("/v1/model").json()["limits"]["attention_images"] == 8
    app.state.attention_in_flight = 8  # another request's eight strips are being drawn
    try:
        busy = client.post("/v1/read?attention=1", files=[("files", ("a.png", png, "image/png"))])
        assert busy.status_code == 503 and "attention strips" in busy.json()["error"]
        assert client.post("/v1/read", files=[("files", ("a.png", png, "image/png"))]).status_code == 200
    finally:
        app.state.attention_in_flight = 0
    ok = client.post("/v1/read?attention=1", files=[("files", ("a.png", png, "image/png"))])
    assert ok.status_code == 200 and ok.json()["results"][0]["attention_png"]
    assert app.state.attention_in_flight == 0  # released after the answer

    small = create_app(Recognizer.from_pretrained(overfit_checkpoint[0]), max_attention_images=1)
    with TestClient(small) as other:
        files = [("files", (f"{i}.png", png, "image/png")) for i in range(2)]
        over = other.post("/v1/read?attention=1", files=files)
        assert over.status_code == 413 and "at most 1" in over.json()["error"]
        assert other.post("/v1/read", files=files).status_code == 200


def test_windows_are_counted_upright_and_any_probe_failure_is_a_400(monkeypatch):
    """A phone JPEG stored 20x2700 with EXIF orientation 6 is read as 2700x20: its windows count as such against
    the request's limit (it passed as one window). A header Pillow's plugin fails on with another exception type
    (a damaged AVIF raised RuntimeError) is a 400 in the API's shape, not a plain-text 500."""
    from PIL import Image

    import clip4str.serve.uploads as uploads
    from clip4str.onnx_backend import OnnxRecognizer

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (20, 2700), "white").save(buf, "JPEG", exif=exif.tobytes())
    app = create_app(OnnxRecognizer(), max_request_windows=4)
    with TestClient(app) as client:
        turned = client.post("/v1/read", files=[("files", ("turned.jpg", buf.getvalue(), "image/jpeg"))])
        assert turned.status_code == 413 and "more than the 4 windows" in turned.json()["error"]

        def failing(_data):
            raise RuntimeError("Failed to decode image: Missing or empty image item")

        monkeypatch.setattr(uploads, "open_image", failing)
        broken = client.post("/v1/read", files=[("files", ("bad.avif", b"\0\0\0\x1cftypavif", "image/avif"))])
        assert broken.status_code == 400 and "bad.avif: could not be decoded" in broken.json()["error"]
