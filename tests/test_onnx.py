"""ONNX export: onnxruntime reads the same text as PyTorch (logits within 1e-3), and runs without PyTorch."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from clip4str.cli import main
from clip4str.inference import Recognizer
from clip4str.onnx_backend import OnnxRecognizer
from conftest import OVERFIT_WORDS, READ_MODES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(overfit_checkpoint, tmp_path_factory):
    ckpt, rendered, _ = overfit_checkpoint
    out = tmp_path_factory.mktemp("onnx") / "model"
    assert main(["export", "onnx", "--model", str(ckpt), "--out", str(out)]) == 0
    folder = tmp_path_factory.mktemp("words")
    paths = []
    for word, img in zip(OVERFIT_WORDS, rendered, strict=True):
        paths.append(folder / f"{word}.png")
        img.save(paths[-1])
    (folder / "labels.tsv").write_text("".join(f"{p.name}\t{w}\n" for p, w in zip(paths, OVERFIT_WORDS,
                                                                                   strict=True)))
    return ckpt, out, folder, paths


@pytest.mark.parametrize("mode", [*READ_MODES, "fixed-length"])
def test_same_text_and_logits_as_pytorch_in_every_mode(exported, mode):
    ckpt, out, _, paths = exported
    options = READ_MODES.get(mode, {"max_length": 25, "early_exit": False})
    torch_rec, onnx_rec = Recognizer.from_pretrained(ckpt), OnnxRecognizer(out)
    x = torch_rec.preprocess(paths)
    with torch.inference_mode():
        ref = torch_rec.model.decode(x, **options)
    logits, lengths = onnx_rec.decode(onnx_rec.preprocess(paths), **options)
    assert np.array_equal(lengths, ref.lengths.numpy())
    n = min(logits.shape[1], ref.logits.shape[1])
    assert np.abs(logits[:, :n] - ref.logits[:, :n].numpy()).max() < 1e-3
    assert [r.text for r in onnx_rec.read(paths, **options)] == OVERFIT_WORDS


def test_parity_fixture_through_onnx(exported, parity_dir, tmp_path):
    import json

    from safetensors.torch import load_file

    from clip4str.convert import load_authors_checkpoint
    from clip4str.export import export_onnx

    model, _ = load_authors_checkpoint(parity_dir / "weights.safetensors")
    export_onnx(model, tmp_path / "fixture")
    rec = OnnxRecognizer(tmp_path / "fixture")
    x = load_file(str(parity_dir / "inputs.safetensors"))["pixel_values"].numpy()
    expected = json.loads((parity_dir / "expected.json").read_text())
    out = load_file(str(parity_dir / "outputs.safetensors"))
    logits, _ = rec.decode(x, max_length=25, early_exit=False)
    assert np.abs(logits - out["final_logits_max_length25"].numpy()).max() < 1e-5
    assert [r.text for r in rec.decode_tensors(x)] == expected["final_strings_bs1"]


def test_read_test_and_bench_run_without_pytorch(exported):
    _, out, folder, paths = exported
    block = "import sys; sys.modules['torch'] = None; from clip4str.cli import main; sys.exit(main(sys.argv[1:]))"
    common = ["--backend", "onnx", "--model", str(out)]
    read = subprocess.run([sys.executable, "-c", block, "read", str(paths[0]), str(paths[3]), "--format", "text",
                           *common], capture_output=True, text=True)
    assert read.returncode == 0, read.stderr
    assert read.stdout.split() == [OVERFIT_WORDS[0], OVERFIT_WORDS[3]]
    test = subprocess.run([sys.executable, "-c", block, "test", str(folder), "--format", "json", "--quiet", *common],
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    assert '"accuracy": 100.0' in test.stdout
    bench = subprocess.run([sys.executable, "-c", block, "bench", "--repeats", "3", "--batch-size", "4", *common],
                           capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr
    assert "| onnx fp32 |" in bench.stdout
