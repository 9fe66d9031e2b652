"""The light install: reading needs neither PyTorch nor its extra, the built-in model's ONNX graphs are those
of the shipped weights, and they read what the PyTorch model reads."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "src" / "clip4str" / "pretrained"
# Every package of the [torch] extra made unimportable, as in an environment without it.
WITHOUT_TORCH = ("import sys\nfor name in ('torch', 'torchvision', 'open_clip', 'lightning', 'safetensors', 'yaml', "
                 "'matplotlib', 'onnx'):\n    sys.modules[name] = None\n")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_reading_with_the_onnx_backend_never_imports_torch_even_where_it_is_installed():
    proc = _run("import sys\nfrom clip4str.cli import main\n"
                "code = main(['read', '--backend', 'onnx', 'examples/hello.png'])\n"
                "print('torch imported:', 'torch' in sys.modules)\nsys.exit(code)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "examples/hello.png\thello" in proc.stdout and "torch imported: False" in proc.stdout


def test_without_the_torch_extra_reading_works_and_other_commands_say_what_to_install():
    proc = _run(WITHOUT_TORCH + "from clip4str.cli import main\nsys.exit(main(['read', 'examples/hello.png']))")
    assert proc.returncode == 0 and "\thello\t" in proc.stdout, proc.stderr[-2000:]
    proc = _run(WITHOUT_TORCH + "from clip4str.cli import main\n"
                "sys.exit(main(['train', '--config', 'configs/tiny-smoke.yaml']))")
    assert proc.returncode == 2 and "pip install 'clip4str[torch]'" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _run(WITHOUT_TORCH + "from clip4str.cli import main\n"
                "sys.exit(main(['read', 'examples/hello.png', '--model', 'src/clip4str/pretrained/tiny']))")
    assert proc.returncode == 2 and "needs PyTorch" in proc.stderr and "export onnx" in proc.stderr


def test_the_builtin_onnx_graphs_are_an_export_of_the_shipped_weights():
    doc = json.loads((PRETRAINED / "tiny-onnx" / "config.json").read_text())
    shipped = hashlib.sha256((PRETRAINED / "tiny" / "model.safetensors").read_bytes()).hexdigest()
    assert doc["source_sha256"] == shipped, (
        "src/clip4str/pretrained/tiny changed without a new ONNX export: run clip4str export onnx --out "
        "src/clip4str/pretrained/tiny-onnx --fp16-weights --force")
    torch_doc = json.loads((PRETRAINED / "tiny" / "config.json").read_text())
    assert doc["model"] == torch_doc["model"], "the two copies of the built-in model decode with other settings"


def test_only_the_image_encoder_splits_its_work_across_threads():
    """Every ONNX Runtime session has its own thread pool, whose threads spin between runs: the small graphs run
    on one thread so that theirs do not take the cores from the image encoder's."""
    from clip4str.onnx_backend import OnnxRecognizer

    def threads(session):
        return session.get_session_options().intra_op_num_threads

    for asked, encoder in ((None, 0), (3, 3)):  # 0: ONNX Runtime's default, a thread per core
        rec = OnnxRecognizer(threads=asked)
        assert threads(rec.image_encoder) == encoder
        assert {threads(s) for s in (rec.image_decoder, rec.cross_decoder, rec.text_encoder, rec.ctc_head)} == {1}


@pytest.mark.slow
def test_onnx_and_pytorch_builtin_models_read_the_same_text_on_real_crops():
    data = SHARED / "realdata"
    if not (data / "labels.tsv").is_file():
        pytest.skip(f"{data} not found (../shared beside the clone)")
    from clip4str.inference import Recognizer
    from clip4str.onnx_backend import OnnxRecognizer

    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    torch_texts = [r.text for r in Recognizer.from_pretrained().read(paths, batch_size=32)]
    onnx_texts = [r.text for r in OnnxRecognizer().read(paths, batch_size=32)]
    same = sum(a == b for a, b in zip(torch_texts, onnx_texts, strict=True))
    assert len(paths) > 2000 and same / len(paths) >= 0.999, f"{same} of {len(paths)} the same"
