from PIL import Image

from clip4str.cli import main
from clip4str.data.lmdb import LmdbDataset
from conftest import render_word


def test_data_lmdb_inspect_and_synth(tmp_path, capsys):
    root = tmp_path / "crops"
    root.mkdir()
    for i, word in enumerate(["alpha", "Beta"]):
        render_word(word).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"nope")
    (root / "labels.tsv").write_text("0.png\talpha\n1.png\tBeta\nbroken.png\tgamma\n", encoding="utf-8")
    assert main(["data", "lmdb", str(root), str(tmp_path / "db")]) == 0
    out = capsys.readouterr()
    assert "wrote 2 samples" in out.out and "broken.png" in out.err
    assert LmdbDataset(tmp_path / "db").labels == ["alpha", "Beta"]
    assert main(["data", "lmdb", str(root), str(tmp_path / "db")]) == 2
    assert "--force" in capsys.readouterr().err

    assert main(["data", "synth", str(tmp_path / "syn"), "--count", "24", "--seed", "3"]) == 0
    assert "wrote 24 synthetic words" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "syn"), "--grid", str(tmp_path / "sheet.png")]) == 0
    out = capsys.readouterr().out
    assert "24 samples" in out and "label length histogram" in out
    assert "labels kept 24, dropped 0 longer than the limit, 0 empty after filtering" in out
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size[0] > 400 and sheet.size[1] > 200

    assert main(["data", "inspect", str(root), "--charset", "36"]) == 0
    assert "labels kept 3, dropped 0" in capsys.readouterr().out  # Beta folds to beta: the charset's rule
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inspect_and_training_count_labels_the_charset_changes_alike(tmp_path, capsys):
    from clip4str.charset import CHARSETS
    from clip4str.data.sources import open_labelled

    root = tmp_path / "crops"
    root.mkdir()
    words = ["café", "5€", "€", "two words", "x" * 30, "Plain"]
    for i, _ in enumerate(words):
        render_word("ab").save(root / f"{i}.png")
    (root / "labels.tsv").write_text("".join(f"{i}.png\t{w}\n" for i, w in enumerate(words)), encoding="utf-8")
    summary = ("kept 4 (2 with characters outside the charset dropped or folded to ASCII, e.g. 'café' -> "
               "'cafe', '5€' -> '5'), dropped 1 longer than the limit, 1 empty after filtering")
    assert main(["data", "inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert summary in out and "characters dropped: '€'x2" in out
    from clip4str.charset import LabelNormalizer
    open_labelled(str(root), LabelNormalizer(CHARSETS["94"], 25))  # what training and `clip4str test` print
    err = capsys.readouterr().err
    assert summary in err, err
