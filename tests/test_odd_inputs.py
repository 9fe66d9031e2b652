"""Odd inputs that used to go wrong: one LMDB read by two datasets, EXIF orientation of PIL images, labels with
Unicode line separators, error bodies and statuses of the server."""

import base64
import io

import pytest
from PIL import Image

from clip4str.charset import LabelNormalizer
from clip4str.cli import main
from clip4str.data.folder import read_label_file
from clip4str.data.lmdb import LmdbDataset, write_lmdb
from clip4str.data.transforms import load_image
from conftest import render_word


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_one_lmdb_read_by_several_datasets_in_one_process(tmp_path, capsys):
    write_lmdb([(str(i), _png(render_word(w)), w) for i, w in enumerate(["cat", "dog"])], tmp_path / "root" / "a")
    a, b = LmdbDataset(tmp_path / "root" / "a"), LmdbDataset(tmp_path / "root" / "a", LabelNormalizer("abcdgot"))
    assert a[0][1] == "cat" and b[1][1] == "dog" and a[1] is not None
    # the same path twice, and a root together with the LMDB inside it
    assert main(["test", str(tmp_path / "root" / "a"), str(tmp_path / "root" / "a")]) == 0
    assert main(["test", str(tmp_path / "root"), str(tmp_path / "root" / "a")]) == 0
    assert "damaged" not in capsys.readouterr().err
    # forked data-loader workers read it too, although the parent holds it open
    from torch.utils.data import DataLoader
    unread = LmdbDataset(tmp_path / "root" / "a")  # opened by the parent, never read by it
    loader = DataLoader(unread, batch_size=2, num_workers=2, collate_fn=lambda items: [item[1] for item in items])
    assert sorted(label for batch in loader for label in batch) == ["cat", "dog"]
    # rewritten at the same path: the next dataset reads the new database, not a stale handle
    write_lmdb([("0", _png(render_word("sun")), "sun")], tmp_path / "root" / "a", force=True)
    assert len(LmdbDataset(tmp_path / "root" / "a")) == 1 and LmdbDataset(tmp_path / "root" / "a")[0][1] == "sun"


def test_exif_orientation_applies_to_pil_images_as_to_files_and_bytes(tmp_path):
    upright = render_word("hello")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a camera stores it; orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as opened:
        from_pil = load_image(opened)
    assert from_pil.size == load_image(path).size == load_image(path.read_bytes()).size == upright.size


def test_labels_split_at_newlines_only(tmp_path):
    render_word("ab").save(tmp_path / "a.png")
    render_word("cd").save(tmp_path / "b.png")
    (tmp_path / "labels.tsv").write_text("a.png\ta\u2028b\\x\r\nb.png\tc\x85d\x0ce\x1cf\n", encoding="utf-8")
    assert [label for _, label in read_label_file(tmp_path / "labels.tsv")] == ["a\u2028b\\x", "c\x85d\x0ce\x1cf"]


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from clip4str.inference import Recognizer
    from clip4str.serve.app import create_app

    with TestClient(create_app(Recognizer.from_pretrained(), max_images=4)) as c:
        yield c


def test_server_errors_are_error_bodies_with_the_status_of_their_kind(client):
    png = _png(render_word("hi"))
    many = client.post("/v1/read", files=[("files", (f"{i}.png", png, "image/png")) for i in range(1001)])
    assert many.status_code == 413 and "at most 4 images" in many.json()["error"]
    wording = client.post("/v1/read", json={"images": "content type"})  # the words do not pick the status
    assert wording.status_code == 400 and "error" in wording.json()
    other = client.post("/v1/read", content=png, headers={"content-type": "image/png"})
    assert other.status_code == 415 and "unsupported content type" in other.json()["error"]
    ok = client.post("/v1/read", json={"images": [base64.b64encode(png).decode()]})
    assert ok.status_code == 200 and ok.json()["results"][0]["text"]


@pytest.mark.parametrize(("left", "right", "merged"), [
    ("counterrevolutilt", "revolutionaries", "counterrevolutionaries"),  # the windows disagree at the seam
    ("hello", "llo world", "hello world"),
    ("thequickbro", "ckbrownfox", "thequickbrownfox"),
    ("abc", "xyz", "abcxyz"),                                           # nothing shared: both kept
])
def test_windows_join_where_their_texts_agree_best(left, right, merged):
    from clip4str.reading import seam

    keep, start = seam(left, right)
    assert left[:keep] + right[start:] == merged


@pytest.mark.parametrize(("text", "max_length"), [
    ("the quick brown fox jumps over the lazy dog", 41),  # an exact-overlap merge read 52 characters
    ("PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS", 37),       # ... and 44
])
def test_a_rendered_sentence_read_in_windows_is_not_duplicated_at_the_seams(text, max_length):
    from clip4str.inference import Recognizer
    from clip4str.metrics import edit_distance

    image = render_word(text, size=32)
    rec = Recognizer.from_pretrained()
    from clip4str.reading import window_count
    assert window_count(*image.size, rec.window_aspect) >= 3
    reading = rec.read([image])[0].text.lower()
    truth = text.replace(" ", "").lower()
    assert len(reading) <= max_length, reading
    assert 1 - edit_distance(reading, truth) / max(len(reading), len(truth)) >= 0.7, reading


def test_a_new_users_wrong_turns_get_messages_that_say_what_to_do(tmp_path, capsys):
    from clip4str.data.folder import FolderDataset

    write_lmdb([("0", _png(render_word("cat")), "cat")], tmp_path / "db")
    assert main(["read", str(tmp_path / "db")]) == 2  # a dataset given to `read`
    assert f"'{tmp_path / 'db'}' is a labelled dataset; score it with `clip4str test" in capsys.readouterr().err
    plain = tmp_path / "plain"
    plain.mkdir()
    render_word("cat").save(plain / "cat.png")
    assert main(["test", str(plain)]) == 2  # images without labels given to `test`
    assert "and no labels.tsv in it (a folder of images with a labels.tsv" in capsys.readouterr().err
    (plain / "labels.tsv").write_text("sub\\cat.png\tcat\n", encoding="utf-8")  # a path written on Windows
    with pytest.raises(FileNotFoundError, match="which does not exist under .*; write paths with '/'"):
        FolderDataset(plain)
