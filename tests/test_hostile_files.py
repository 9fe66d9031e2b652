"""Odd and hostile files given to the command line: one-line errors naming the thing, no hang, no traceback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clip4str.cli import expand_inputs, main
from clip4str.data.folder import read_label_file
from clip4str.inference import default_model_path
from clip4str.onnx_backend import OnnxRecognizer, default_onnx_model_path
from clip4str.weights import load_model, save_checkpoint
from conftest import render_word

HELLO = Path(__file__).resolve().parents[1] / "examples" / "hello.png"
CLI = [sys.executable, "-c", "import sys; from clip4str.cli import main; sys.exit(main())"]


def test_an_existing_file_name_with_glob_characters_is_that_file(tmp_path):
    render_word("hello").save(tmp_path / "word[1].png")
    assert expand_inputs([str(tmp_path / "word[1].png")]) == [str(tmp_path / "word[1].png")]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_inputs([str(tmp_path / "other[1].png")])


def test_a_recursive_glob_does_not_follow_link_loops(tmp_path):
    (tmp_path / "a").mkdir()
    render_word("hi").save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "up").symlink_to("..")
    (tmp_path / "a" / "up2").symlink_to("../..")
    code = "import sys; from clip4str.cli import expand_inputs; print(expand_inputs([sys.argv[1]]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "**" / "*.png")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-300:]
    assert done.stdout.strip() == repr([str(tmp_path / "a" / "x.png")])


def test_a_file_name_that_is_not_utf8_is_read_and_printed_as_it_is(tmp_path):
    folder = tmp_path / "crops"
    folder.mkdir()
    odd = os.fsencode(folder) + b"/bad\xff.png"
    render_word("hello").save(os.fsdecode(odd))
    render_word("world").save(folder / "z.png")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # what a UTF-8 locale gives a terminal
    done = subprocess.run([*CLI, "read", str(folder), "--backend", "onnx"], capture_output=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    lines = done.stdout.splitlines()
    assert [line.split(b"\t")[0] for line in lines] == [odd, os.fsencode(folder / "z.png")]
    render_word("hello").save(folder / "tab\tand\nbreak.png")
    done = subprocess.run([*CLI, "read", str(folder), "--backend", "onnx", "--format", "json"], capture_output=True,
                          env=env, timeout=300)
    docs = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]  # valid UTF-8 JSON lines
    assert [os.fsencode(d["path"]) for d in docs] == [odd, os.fsencode(folder / "tab\tand\nbreak.png"),
                                                      os.fsencode(folder / "z.png")]
    done = subprocess.run([*CLI, "read", str(folder), "--backend", "onnx"], capture_output=True, env=env,
                          timeout=300)  # tsv: one line of three fields per image, the name's tab and break escaped
    assert [line.split(b"\t")[:2] for line in done.stdout.splitlines()][1] == \
        [os.fsencode(folder) + b"/tab\\tand\\nbreak.png", b"hello"]


def test_an_image_of_thousands_of_windows_is_refused_not_read_for_minutes(tmp_path, capsys):
    Image.new("L", (20000, 1)).save(tmp_path / "wide.png")  # about 100 bytes
    render_word("hello").save(tmp_path / "ok.png")
    args = ["read", str(tmp_path / "wide.png"), str(tmp_path / "ok.png"), "--backend", "onnx"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "wide.png: image of 20000x1 pixels is" in err and "--max-windows" in err
    assert out.splitlines()[1].startswith(f"{tmp_path / 'ok.png'}\t")
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--max-windows", "0"])
    assert exit_.value.code == 2


def test_test_refuses_a_csv_folder_and_a_set_with_nothing_to_score(tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    render_word("hello").save(folder / "a.png")
    (folder / "labels.tsv").write_text("a.png\t###\n", encoding="utf-8")  # empty in the 36-character charset
    assert main(["test", str(folder), "--backend", "onnx", "--quiet"]) == 2
    assert "nothing to score" in capsys.readouterr().err
    (folder / "labels.tsv").write_text("a.png\thello\n", encoding="utf-8")
    assert main(["test", str(folder), "--backend", "onnx", "--csv", str(tmp_path), "--quiet"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_labels_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    (tmp_path / "labels.tsv").write_bytes(b"a.png\thello\nb.png\tcaf\xe9\n")
    with pytest.raises(ValueError, match=r"labels.tsv:2: not UTF-8"):
        read_label_file(tmp_path / "labels.tsv")


@pytest.mark.parametrize(("config", "message"), [
    ([1, 2], "not a clip4str checkpoint config"),
    ({"format": "clip4str-checkpoint-v1", "model": None}, "not a clip4str checkpoint config"),
    ("max_label_length", "model settings are invalid"),
])
def test_a_damaged_checkpoint_config_is_named(tmp_path, config, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(default_model_path(), folder)
    if config == "max_label_length":
        doc = json.loads((folder / "config.json").read_text())
        doc["model"]["max_label_length"] = "25"
        config = doc
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as err:
        load_model(folder)
    assert "config.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["truncated graph", "missing graph", "no charset", "bad json", "other size",
                                    "other charset"])
def test_a_damaged_onnx_export_is_named(tmp_path, damage):
    folder = tmp_path / "export"
    shutil.copytree(default_onnx_model_path(), folder)
    if damage == "truncated graph":
        graph = folder / "image_decoder.onnx"
        graph.write_bytes(graph.read_bytes()[:1000])
    elif damage == "missing graph":
        (folder / "image_decoder.onnx").unlink()
    elif damage == "no charset":
        (folder / "config.json").write_text(json.dumps({"model": {}}))
    elif damage == "bad json":
        (folder / "config.json").write_text("{ not json")
    elif damage == "other size":  # config.json of a model with another input size beside these graphs
        doc = json.loads((folder / "config.json").read_text())
        doc["model"]["clip"]["vision_cfg"]["image_size"] = [32, 128]
        (folder / "config.json").write_text(json.dumps(doc))
    else:  # ... or with another charset (was an IndexError at the first reading)
        doc = json.loads((folder / "config.json").read_text())
        doc["model"]["charset"] = "abc"
        (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="is not a readable ONNX export") as err:
        OnnxRecognizer(folder)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_writing_a_model_never_mixes_kinds_or_replaces_one_without_force(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(default_model_path(), ckpt)
    before = (ckpt / "config.json").read_bytes()
    # export onnx into the checkpoint it reads: refused before any work, the checkpoint untouched
    assert main(["export", "onnx", "--model", str(ckpt), "--out", str(ckpt), "--force"]) == 2
    assert "another kind of model" in capsys.readouterr().err
    assert (ckpt / "config.json").read_bytes() == before and not list(ckpt.glob("*.onnx"))
    export = tmp_path / "export"
    shutil.copytree(default_onnx_model_path(), export)
    assert main(["export", "onnx", "--out", str(export)]) == 2
    assert "--force" in capsys.readouterr().err
    (export / "rec.onnx").write_bytes(b"another program's model")  # --force deleted every *.onnx of the folder
    assert main(["export", "onnx", "--out", str(export), "--force"]) == 2
    assert "holds rec.onnx, which is not a graph of a clip4str export" in capsys.readouterr().err
    assert (export / "rec.onnx").read_bytes() == b"another program's model"
    (export / "rec.onnx").unlink()
    assert main(["export", "onnx", "--out", str(export), "--force"]) == 0
    assert OnnxRecognizer(export).read(HELLO)[0].text == "hello"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": 1}')  # the user's own file, not an export: named as what is in the way
    assert main(["export", "onnx", "--out", str(mine)]) == 2
    assert f"{str(mine)!r} already holds config.json, which writing the ONNX export would replace; pass --force" \
        in capsys.readouterr().err
    model = load_model(ckpt)
    with pytest.raises(FileExistsError, match="another kind of model"):
        save_checkpoint(model, export, force=True)
    with pytest.raises(FileExistsError, match="--force"):
        save_checkpoint(model, ckpt)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_checkpoint(model, tmp_path / "file")
    assert save_checkpoint(model, ckpt, force=True) == ckpt
    load_model(ckpt)


def test_data_commands_refuse_counts_below_one_and_a_grid_without_an_image_suffix(tmp_path, capsys):
    for args in (["data", "synth", str(tmp_path / "s"), "--count", "0"],
                 ["data", "inspect", str(tmp_path), "--samples", "0"],
                 ["data", "inspect", str(tmp_path), "--grid-count", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path), "--grid", str(tmp_path / "sheet")]) == 2
    assert "give a .png" in capsys.readouterr().err


def test_globs_match_as_glob_does_without_following_links(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("imgs/a.png", "imgs/sub/b.png", "imgs/._a.png", "imgs/.hidden.png"):
        render_word("x").save(tmp_path / name)
    found = [os.path.relpath(p, tmp_path) for p in expand_inputs([str(tmp_path / "imgs" / "**")])]
    assert found == ["imgs/a.png", "imgs/sub/b.png"]
    assert [os.path.relpath(p, tmp_path) for p in expand_inputs([str(tmp_path / "imgs" / "*.png")])] == ["imgs/a.png"]
    assert [os.path.relpath(p, tmp_path) for p in expand_inputs([str(tmp_path / "imgs" / ".h*")])] == \
        ["imgs/.hidden.png"]


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 16\n%%EndComments\n"
       b"newpath 0 0 moveto 64 16 lineto stroke\nshowpage\n%%EOF\n")


def test_an_eps_file_never_runs_ghostscript(tmp_path, monkeypatch):
    """Pillow opens EPS by running `gs` on it (a PostScript program from outside): every reader refuses it in one
    line instead, whether or not Ghostscript is installed. A fake `gs` on PATH records any call."""
    from PIL import EpsImagePlugin

    from clip4str.data.lmdb import write_lmdb
    from clip4str.data.transforms import ImageDecodeError, load_image
    from clip4str.serve.uploads import decode_upload

    ran = tmp_path / "gs-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {ran}\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches the lookup: look again, find the fake
    (tmp_path / "word.eps").write_bytes(EPS)

    for source in (EPS, tmp_path / "word.eps"):
        with pytest.raises(ImageDecodeError, match="could not be decoded: not a file of a format read here"):
            load_image(source)
    with pytest.raises(ImageDecodeError, match="word.eps: could not be decoded"):
        decode_upload("word.eps", EPS, [10**8], [10, 10], 6.0, 10)
    with pytest.raises(ValueError, match="no sample to write.*word.eps: not a decodable image"):
        write_lmdb([("word.eps", EPS, "word")], tmp_path / "out")
    assert main(["read", str(tmp_path / "word.eps"), "--backend", "onnx"]) != 0
    assert not ran.exists(), f"gs was run: {ran.read_text()}"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA"])
def test_the_usual_raster_formats_still_read(fmt):
    import io

    from clip4str.data.transforms import load_image

    buf = io.BytesIO()
    Image.new("RGB", (40, 12), (200, 30, 30)).save(buf, fmt)
    image = load_image(buf.getvalue())
    assert image.size == (40, 12) and image.mode == "RGB"


# A checkpoint from elsewhere asking for unbounded memory or loops, or values that break reading later.
HOSTILE_SETTINGS = [
    ({"refine_iters": 10_000_000}, "refine_iters must be an integer in"),
    ({"max_label_length": 10_000_000}, "max_label_length must be an integer in"),
    ({"clip": {"vision_cfg": {"layers": 100_000}}}, "clip.vision_cfg.layers"),
    ({"clip": {"vision_cfg": {"width": 16384, "layers": 256}}}, "more than this library builds"),
    ({"clip": {"vision_cfg": {"image_size": [32, 10**9]}}}, "image_size must be one or two integers"),
    ({"image_std": [0, 0, 0]}, "image_std must be 3 finite numbers > 0"),
    ({"image_mean": [1, 2]}, "image_mean must be 3 finite numbers"),
    ({"second_look_confidence": "x"}, "second_look_confidence must be in"),
    ({"decoder_mlp_ratio": float("inf")}, "decoder_mlp_ratio must be a number"),
    ({"decode_mode": "zz"}, "decode_mode must be one of"),
]


@pytest.mark.parametrize(("change", "message"), HOSTILE_SETTINGS)
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_checkpoint_asking_for_unbounded_work_or_broken_settings_is_refused(tmp_path, backend, change, message):
    from clip4str.model_config import merge

    source = default_model_path() if backend == "torch" else default_onnx_model_path()
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    doc = json.loads((folder / "config.json").read_text())
    doc["model"] = merge(doc["model"], change)
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as err:
        load_model(folder) if backend == "torch" else OnnxRecognizer(folder)
    assert "\n" not in str(err.value)


def test_a_gzip_bomb_for_a_vocabulary_is_read_only_as_far_as_it_is_used(tmp_path):
    import gzip

    from clip4str.bpe import MAX_VOCAB_BYTES, BPETokenizer

    folder = tmp_path / "export"
    shutil.copytree(default_onnx_model_path(), folder)
    vocab = folder / "bpe_simple_vocab_16e6.txt.gz"
    bomb = gzip.compress(b"\n" * (64 << 20))  # 64 MiB of line breaks in 64 kB
    with open(vocab, "ab") as f:
        for _ in range(4):  # a member appended to a gzip file is read as more of it
            f.write(bomb)
    inflated = []
    real_open = gzip.open

    def spy(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        read = handle.read
        handle.read = lambda *a: inflated.append(len(data := read(*a))) or data
        return handle

    import clip4str.bpe
    clip4str.bpe.gzip.open, before = spy, clip4str.bpe.gzip.open
    try:
        tokenizer = BPETokenizer(vocab)
    finally:
        clip4str.bpe.gzip.open = before
    assert inflated and sum(inflated) <= MAX_VOCAB_BYTES  # not the 256 MiB it inflates to
    assert tokenizer.encode("hello") == BPETokenizer(default_onnx_model_path() / vocab.name).encode("hello")
    assert OnnxRecognizer(folder).read([HELLO])[0].text == "hello"


def test_a_fifo_listed_as_an_image_is_skipped_not_waited_on(tmp_path):
    import threading

    from clip4str.data.lmdb import write_lmdb

    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer forever
    shutil.copy(HELLO, tmp_path / "hello.png")
    report = []
    worker = threading.Thread(target=lambda: report.append(write_lmdb(
        [("pipe.png", str(tmp_path / "pipe.png"), "pipe"), ("hello.png", str(tmp_path / "hello.png"), "hello")],
        tmp_path / "out")), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "write_lmdb blocked on a FIFO"
    assert report[0].written == 1 and report[0].skipped == [("pipe.png", "not a regular file")]


def test_a_config_that_does_not_describe_its_weights_is_refused_before_allocating(tmp_path):
    """config.json asks for a 2-layer tower of width 8192 (6 GB of fp32) beside the tiny weights: the safetensors
    header is compared with the config's shapes (built on the meta device) before any parameter is allocated."""
    import resource

    folder = tmp_path / "model"
    shutil.copytree(default_model_path(), folder)
    doc = json.loads((folder / "config.json").read_text())
    doc["model"]["clip"]["vision_cfg"].update(width=8192, layers=2, head_width=64)
    (folder / "config.json").write_text(json.dumps(doc))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="does not fit this model") as err:
        load_model(folder)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 1000, f"peak memory grew by {grown_mb:.0f} MB"
    assert "\n" not in str(err.value)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(default_model_path(), folder)
    state = load_file(folder / "model.safetensors")
    state["image_decoder.head.weight"][0, 0] = float("nan")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match="image_decoder.head.weight holds NaN or infinite values"):
        load_model(folder)
    assert torch.isnan(load_file(folder / "model.safetensors")["image_decoder.head.weight"]).any()


def test_attention_of_a_reading_that_never_ends(tmp_path):
    """An early checkpoint (here: random weights) never emits end-of-text: its reading has one character more than
    the decoders take, which was an IndexError in `clip4str attention`."""
    import torch

    from clip4str.factory import create_model
    from clip4str.inference import Recognizer
    from clip4str.visualize import attention_strip

    torch.manual_seed(0)
    rec = Recognizer(create_model("tiny"))
    text, panels = attention_strip(rec, HELLO, tmp_path / "strip.png")
    assert 0 < len(text) <= rec.model.config.max_label_length and panels == len(text)
    assert Image.open(tmp_path / "strip.png").width > 0


def test_an_empty_crop_or_a_folder_is_an_error_not_a_reading():
    """A detector's degenerate box (img.crop((10, 0, 10, h))) was read as a confident word ('SALE', 0.6)."""
    from clip4str.data.transforms import ImageDecodeError, load_image

    image = Image.open(HELLO)
    for empty in (image.crop((10, 0, 10, image.height)), image.crop((0, 5, image.width, 5))):
        with pytest.raises(ImageDecodeError, match="holds nothing to read"):
            load_image(empty)
    with pytest.raises(ImageDecodeError, match="is a folder, not an image file"):
        load_image(HELLO.parent)
    results = OnnxRecognizer().read([image.crop((10, 0, 10, image.height)), HELLO])
    assert results[0].text == "" and "nothing to read" in results[0].error and results[1].text == "hello"


def test_a_patch_larger_than_the_image_is_refused():
    from clip4str.factory import create_model

    with pytest.raises(ValueError, match="patch_size .* is larger than the image"):
        create_model("tiny", clip={"vision_cfg": {"patch_size": [64, 64]}})
