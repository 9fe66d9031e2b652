"""`Recognizer`, `clip4str read` and `clip4str test` on a tiny model trained in the test."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clip4str.cli import main
from clip4str.data.lmdb import write_lmdb
from clip4str.inference import Recognizer
from clip4str.metrics import edit_distance
from clip4str.reading import overlap_length, split_long
from conftest import OVERFIT_WORDS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(overfit_checkpoint, tmp_path_factory):
    folder, rendered, _ = overfit_checkpoint
    root = tmp_path_factory.mktemp("images")
    paths = []
    for word, img in zip(OVERFIT_WORDS, rendered, strict=True):
        paths.append(root / f"{word}.png")
        img.save(paths[-1])
    return folder, root, paths, rendered


def test_recognizer_reads_any_mix_and_reports_bad_images(images):
    ckpt, root, paths, rendered = images
    rec = Recognizer.from_pretrained(ckpt)
    mixed = [paths[0], str(paths[1]), paths[2].read_bytes(), rendered[3], np.asarray(rendered[4]), b"junk"]
    results = rec.read(mixed, batch_size=4)
    assert [r.text for r in results[:5]] == OVERFIT_WORDS[:5]
    assert results[5].error and "could not be decoded" in results[5].error and results[5].text == ""
    r = results[0]
    assert len(r.char_probs) == len("hello") + 1 and 0 < r.confidence <= 1
    assert r.confidence == pytest.approx(float(np.prod(r.char_probs)))


def test_long_crops_are_split_and_merged():
    from PIL import Image
    wide = Image.new("RGB", (800, 40))
    windows = split_long(wide, 8.0)
    assert len(windows) > 2 and all(w.size == (320, 40) for w in windows)
    assert split_long(Image.new("RGB", (300, 40)), 8.0)[0].size == (300, 40)
    assert overlap_length("helloworl", "worldwide") == 4
    assert overlap_length("abc", "xyz") == 0


def test_read_command_files_dir_stdin_and_a_corrupt_file(images, capsys, monkeypatch):
    ckpt, root, paths, _ = images
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    code = main(["read", str(paths[0]), str(paths[1]), "--model", str(ckpt)])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in out] == [[str(paths[0]), "hello"], [str(paths[1]), "World"]]
    code = main(["read", str(root), "--model", str(ckpt), "--format", "json"])
    captured = capsys.readouterr()
    assert code == 1 and "broken.png" in captured.err and "1 of 9 images failed" in captured.err
    rows = [json.loads(line) for line in captured.out.splitlines()]
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["cafe.png"]["text"] == "cafe" and by_name["broken.png"]["error"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{paths[2]}\n{paths[3]}\n"))
    assert main(["read", "-", "--model", str(ckpt), "--format", "text"]) == 0
    assert capsys.readouterr().out.split() == ["42", "STREET"]


def test_test_command_accuracy_matches_hand_computed_values(images, tmp_path, capsys):
    ckpt, root, paths, _ = images
    # Two labels right, one wrong by one letter, one wrong entirely; the 36-class protocol folds case.
    labels = ["HELLO", "world", "hellp", "zzzz"]
    lines = [f"{paths[i].name}\t{labels[i]}" for i in range(2)] + [f"{paths[0].name}\t{labels[2]}",
                                                                  f"{paths[4].name}\t{labels[3]}"]
    (root / "labels.tsv").write_text("\n".join(lines) + "\n")
    write_lmdb([(str(p), str(p), w) for p, w in zip(paths[:4], ["hello", "World", "43", "STREET"], strict=True)],
               tmp_path / "lmdb" / "bench")
    code = main(["test", str(root), str(tmp_path / "lmdb"), "--model", str(ckpt), "--format", "json",
                 "--csv", str(tmp_path / "pred.csv"), "--quiet"])
    assert code == 0
    rows = {r["dataset"]: r for r in json.loads(capsys.readouterr().out)}
    folder = rows[root.name]
    assert folder["samples"] == 4 and folder["accuracy"] == 50.0
    ned = (0 + 0 + edit_distance("hello", "hellp") / 5 + edit_distance("cafe", "zzzz") / 4) / 4
    assert folder["one_minus_ned"] == pytest.approx(round(100 * (1 - ned), 2))
    assert folder["label_length"] == pytest.approx((5 + 5 + 5 + 4) / 4)
    assert rows["bench"]["accuracy"] == 75.0  # 43 vs 42 is the only miss
    assert rows["Combined"]["samples"] == 8 and rows["Combined"]["accuracy"] == 62.5
    assert (tmp_path / "pred.csv").read_text().count("\n") == 9
    sources = [(r["dataset"], r["source"]) for r in csv.DictReader((tmp_path / "pred.csv").open())]
    assert sources == [(root.name, paths[0].name), (root.name, paths[1].name), (root.name, paths[0].name),
                       (root.name, paths[4].name)] + [("bench", f"image-{i:09d}") for i in range(1, 5)]


def test_console_script_runs(images):
    ckpt, _, paths, _ = images
    out = subprocess.run([sys.executable, "-m", "clip4str.cli", "read", str(paths[5]), "--model", str(ckpt)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split("\t")[1] == "x7Q"


def test_attention_strip_has_one_panel_per_character(images, tmp_path, capsys):
    from PIL import Image

    from clip4str.visualize import PANEL_HEIGHT, character_attention
    ckpt, _, paths, _ = images
    out = tmp_path / "att.png"
    assert main(["attention", str(paths[6]), "--out", str(out), "--model", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert "Parking" in printed and "(7 panels per decoder)" in printed
    sheet = Image.open(out)
    rec = Recognizer.from_pretrained(ckpt)
    text, maps = character_attention(rec, paths[6])
    assert text == "Parking" and set(maps) == {"image decoder", "cross decoder"}
    assert all(m.shape == (7, *rec.model.clip.visual.grid_size) for m in maps.values())
    assert all(np.isclose(m.reshape(7, -1).max(-1), 1).all() for m in maps.values())
    panel_w = round(Image.open(paths[6]).width * PANEL_HEIGHT / Image.open(paths[6]).height)
    assert sheet.width == 120 + 7 * (panel_w + 4) and sheet.height == 2 * (PANEL_HEIGHT + 24) + 4
    text, maps = character_attention(Recognizer.from_pretrained(ckpt, precision="bf16"), paths[6])
    assert text == "Parking" and all(m.shape[0] == 7 for m in maps.values())
    # the strip of a text read elsewhere (the server's reading): that text, unless the decoders cannot take it
    text, maps = character_attention(rec, paths[6], "Park")
    assert text == "Park" and all(m.shape[0] == 4 for m in maps.values())
    for unfit in ("P" * 40, "Park\u00e9"):  # a long crop's reading merged from windows; outside the charset
        assert character_attention(rec, paths[6], unfit)[0] == "Parking"


def test_an_unreadable_image_counts_as_wrong(images, tmp_path, capsys):
    ckpt, root, paths, _ = images
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in paths[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (20000, 20), "white").save(folder / "wide.png")  # loads, but is more windows than read takes
    (folder / "labels.tsv").write_text(f"{paths[0].name}\thello\n{paths[1].name}\tworld\nbroken.png\tsomething\n"
                                       "wide.png\tstrip\n")
    with pytest.warns(UserWarning, match="broken.png"):
        assert main(["test", str(folder), "--model", str(ckpt), "--format", "json", "--quiet",
                     "--csv", str(tmp_path / "p.csv")]) == 0
    out, err = capsys.readouterr()
    assert "2 of 4 images could not be loaded or read (mixed/broken.png; mixed/wide.png: image of 20000x20 pixels" \
        in err and "counted as wrong readings" in err
    rows = {r["dataset"]: r for r in json.loads(out)}
    assert rows["mixed"]["samples"] == 4 and rows["mixed"]["accuracy"] == pytest.approx(50.0, abs=0.01)
    broken = list(csv.DictReader((tmp_path / "p.csv").open()))[2]  # the row names the file and says what it means
    assert (broken["source"], broken["correct"], broken["error"]) == ("broken.png", "0", "the image could not be "
                                                                      "loaded from the dataset; counted as wrong")


def test_window_merge_without_eos_keeps_every_character_probability():
    from clip4str.reading import ReadResult, merge_windows
    merged = merge_windows([ReadResult("hello", 0.0, [0.9] * 5), ReadResult("llo world", 0.0, [0.8] * 9 + [0.5])])
    assert merged.text == "hello world"
    assert len(merged.char_probs) == len("hello world") + 1 and merged.char_probs[-1] == 0.5


def test_bench_on_a_trained_checkpoint_counts_flops_and_times_both_precisions(overfit_checkpoint, capsys):
    assert main(["bench", "--model", str(overfit_checkpoint[0]), "--precision", "fp32", "bf16", "--repeats", "2",
                 "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if "| torch " in line]
    assert [(r[2].strip(), r[3].strip()) for r in rows] == [
        ("torch fp32", "eager"), ("torch fp32", "compiled"), ("torch bf16", "eager"), ("torch bf16", "compiled")]
    assert all(float(r[6]) > 0 and float(r[7]) > 0 for r in rows)  # GFLOPs counted, latency measured


def test_bf16_reading_stores_weights_once_and_computes_what_autocast_computes(images):
    import torch

    from clip4str.weights import load_model
    ckpt, _, _, rendered = images
    rec = Recognizer.from_pretrained(ckpt, precision="bf16")
    assert rec.model.image_decoder.head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in rec.model.named_parameters() if "ln" in n or "norm" in n)
    reference = load_model(ckpt).eval()
    x = rec.preprocess(rendered)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference.decode(x).logits
        got = rec.model.decode(x).logits
    assert torch.equal(got, expected)
    assert [r.text for r in rec.read(rendered)] == OVERFIT_WORDS


def test_a_whole_photo_gets_a_note_and_crops_do_not(images, capsys):
    from clip4str.reading import photo_note

    ckpt, root, paths, _ = images
    assert photo_note(599, 900) is None and photo_note(1500, 600) is None and "600x600" in photo_note(600, 600)
    photo = root / "street.jpg"
    Image.new("RGB", (1200, 900), "gray").save(photo)
    rec = Recognizer.from_pretrained(ckpt)
    results = rec.read([photo, Image.new("RGB", (1600, 500)), paths[0]])
    assert "whole photo" in results[0].note and results[1].note is None and results[2].note is None
    assert results[2].text == OVERFIT_WORDS[0]
    code = main(["read", str(photo), str(paths[0]), "--model", str(ckpt), "--format", "json"])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and "1200x900" in lines[0]["note"] and lines[1]["note"] is None
    assert f"note: {photo}: a 1200x900 image looks like a whole photo" in err
