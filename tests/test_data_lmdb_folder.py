import io
import subprocess
import sys
import warnings

import lmdb
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from clip4str.charset import CHARSETS, LabelNormalizer
from clip4str.data.datamodule import collate
from clip4str.data.folder import FolderDataset
from clip4str.data.lmdb import LmdbDataset, lmdb_dataset, write_lmdb
from conftest import SHARED, render_word


def _png(text: str) -> bytes:
    buf = io.BytesIO()
    render_word(text).save(buf, "PNG")
    return buf.getvalue()


def _folder(tmp_path, words, header=True):
    root = tmp_path / "crops"
    (root / "sub").mkdir(parents=True)
    lines = ["path\tlabel"] if header else []
    for i, w in enumerate(words):
        (root / "sub" / f"{i}.png").write_bytes(_png(w))
        lines.append(f"sub/{i}.png\t{w}\textra-column")
    (root / "labels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_writer_and_reader_round_trip(tmp_path):
    root = _folder(tmp_path, ["hello", "World", "x7#Q"])
    samples = [(str(p), str(p), w) for p, w in zip(sorted((root / "sub").iterdir()), ["hello", "World", "x7#Q"],
                                                    strict=True)]
    report = write_lmdb(samples, tmp_path / "db")
    assert report.written == 3 and not report.skipped
    ds = LmdbDataset(tmp_path / "db")
    assert ds.labels == ["hello", "World", "x7#Q"]
    for i, (path, _, _) in enumerate(samples):
        assert ds.read_bytes(i) == open(path, "rb").read()
    image, label = ds[1]
    assert isinstance(image, Image.Image) and label == "World"


def test_writer_validates_refuses_overwrite_and_never_leaves_half_a_database(tmp_path):
    good = _png("ok")
    report = write_lmdb([("a", good, "ok"), ("b", b"not an image", "bad"), ("c", good, ""),
                         ("d", good, "two\nlines")], tmp_path / "db")
    assert report.written == 1
    assert [name for name, _ in report.skipped] == ["b", "c", "d"]
    assert "not a decodable image" in report.skipped[0][1]
    with pytest.raises(FileExistsError, match="--force"):
        write_lmdb([("a", good, "ok")], tmp_path / "db")

    def failing():
        yield "a", good, "ok"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_lmdb(failing(), tmp_path / "db", force=True)
    assert LmdbDataset(tmp_path / "db").labels == ["ok"]  # the old database is untouched
    with pytest.raises(RuntimeError):
        write_lmdb(failing(), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_label_filtering_counts_in_reference_order(tmp_path):
    labels = ["hello", "Ca fé", "a" * 26, "¡¡!!", "a-b-c-d-e-f-g-h-i-j-k-l-m-n", "OK"]
    write_lmdb([(str(i), _png("x"), t) for i, t in enumerate(labels)], tmp_path / "db")
    norm = LabelNormalizer(CHARSETS["36"], max_length=25)
    ds = LmdbDataset(tmp_path / "db", norm)
    assert ds.labels == ["hello", "cafe", "ok"]
    # 27 characters before filtering is too long even though 14 remain after: the limit comes first.
    assert (norm.stats.kept, norm.stats.too_long, norm.stats.empty) == (3, 2, 1)
    assert ds.raw_count == 6


def test_corrupt_image_is_skipped_with_a_warning_and_the_epoch_goes_on(tmp_path):
    write_lmdb([("a", _png("one"), "one"), ("b", _png("two"), "two")], tmp_path / "db")
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(b"image-000000001", b"\x89PNG garbage")
    env.close()
    ds = LmdbDataset(tmp_path / "db")
    with pytest.warns(UserWarning, match="image-000000001"):
        assert ds[0] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(DataLoader(ds, batch_size=2, collate_fn=lambda b: [x for x in b if x is not None]))
    assert [label for _, label in batches[0]] == ["two"]


def test_truncated_database_gives_a_clear_error(tmp_path):
    write_lmdb([(str(i), _png("w"), f"w{i}") for i in range(50)], tmp_path / "db")
    data = (tmp_path / "db" / "data.mdb").read_bytes()
    (tmp_path / "db" / "data.mdb").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="damaged|truncated"):
        lmdb_dataset(tmp_path / "db")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.mdb").write_bytes(b"")
    with pytest.raises(ValueError, match="damaged|truncated|num-samples"):
        lmdb_dataset(tmp_path / "empty")
    for bad in (b"abc", b"-5", b"1.5"):
        write_lmdb([("a", _png("w"), "w")], tmp_path / "counted", force=True)
        env = lmdb.open(str(tmp_path / "counted"))
        with env.begin(write=True) as txn:
            txn.put(b"num-samples", bad)
        env.close()
        with pytest.raises(ValueError, match="counted.*num-samples"):
            lmdb_dataset(tmp_path / "counted")
    with pytest.raises(FileNotFoundError, match="no LMDB"):
        (tmp_path / "nothing").mkdir()
        lmdb_dataset(tmp_path / "nothing")


def test_a_database_cut_after_its_header_is_refused_not_a_bus_error(tmp_path):
    # Reading a page past the end of a memory-mapped file kills the process (SIGBUS): run it in a child.
    write_lmdb([(str(i), _png("w"), f"w{i}") for i in range(50)], tmp_path / "db")
    data = (tmp_path / "db" / "data.mdb").read_bytes()
    (tmp_path / "db" / "data.mdb").write_bytes(data[:8192])  # the two header pages
    code = "import sys; from clip4str.data.lmdb import lmdb_dataset; lmdb_dataset(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "db")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr[-500:]
    assert "ValueError" in done.stderr and "truncated" in done.stderr


def test_force_replaces_only_an_lmdb_folder(tmp_path):
    src = _folder(tmp_path, ["one", "two"])
    samples = [(str(p), str(p), "w") for p in sorted((src / "sub").iterdir())]
    with pytest.raises(FileExistsError, match="not an LMDB folder"):
        write_lmdb(samples, src, force=True)  # the source itself
    assert sorted(p.name for p in src.iterdir()) == ["labels.tsv", "sub"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        write_lmdb(samples, tmp_path / "file", force=True)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="symbolic link"):
        write_lmdb(samples, tmp_path / "link", force=True)
    write_lmdb(samples, tmp_path / "db")
    assert write_lmdb(samples[:1], tmp_path / "db", force=True).written == 1
    assert LmdbDataset(tmp_path / "db").labels == ["w"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_many_lmdbs_under_one_root(tmp_path):
    for name in ("a", "b/c"):
        write_lmdb([("x", _png("x"), name)], tmp_path / "root" / name)
    data = lmdb_dataset(tmp_path / "root")
    assert len(data) == 2 and sorted(data[i][1] for i in range(2)) == ["a", "b/c"]


def test_folder_dataset_with_and_without_header(tmp_path):
    root = _folder(tmp_path, ["hello", "World"])
    ds = FolderDataset(root)
    assert ds.labels == ["hello", "World"] and ds.group(0) == "sub"
    (root / "labels.tsv").write_text("sub/0.png\thello\n", encoding="utf-8")
    assert FolderDataset(root).labels == ["hello"]


def test_folder_dataset_names_a_missing_file(tmp_path):
    root = _folder(tmp_path, ["hello", "World"])
    (root / "sub" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"sub/1\.png"):
        FolderDataset(root)
    with pytest.raises(FileNotFoundError, match="labels.tsv"):
        FolderDataset(tmp_path)


def test_shared_sets_load_as_is():
    if not (SHARED / "realdata" / "labels.tsv").is_file() or not (SHARED / "realtrain" / "lmdb").is_dir():
        pytest.skip(f"../shared data not found at {SHARED}")
    assert len(FolderDataset(SHARED / "realdata")) == 2553
    real = lmdb_dataset(SHARED / "realtrain" / "lmdb")
    assert len(real) == 6725
    image, label = real[0]
    assert image.mode == "RGB" and label


def test_collate_drops_failed_samples():
    import torch
    images, labels = collate([None, (torch.zeros(3, 2, 2), "a"), None])
    assert images.shape == (1, 3, 2, 2) and labels == ["a"]


def test_nothing_to_write_is_an_error_not_an_empty_database(tmp_path):
    with pytest.raises(ValueError, match="no sample to write.*1 skipped: a: not a decodable image"):
        write_lmdb([("a", b"junk", "x")], tmp_path / "db")
    with pytest.raises(ValueError, match="none were given"):
        write_lmdb([], tmp_path / "db")
    assert not (tmp_path / "db").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_by_folder_names_every_sub_folder_apart(tmp_path):
    """Rows of `clip4str test --by-folder`: the path below the folders all share, never two rows of one name."""
    from PIL import Image

    from clip4str.charset import CHARSETS
    from clip4str.evaluate import collect_benchmarks

    def layout(root, folders):
        lines = []
        for i, folder in enumerate(folders):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 12), "white").save(root / folder / f"{i}.png")
            lines.append(f"{folder}/{i}.png\tword\n")
        (root / "labels.tsv").write_text("".join(lines))
        return [b.name for b in collect_benchmarks([root], CHARSETS["36"], by_folder=True)]

    assert layout(tmp_path / "bf", [".", "a/x", "b/x"]) == ["bf", "a/x", "b/x"]
    assert layout(tmp_path / "real", ["images/cute80", "images/svt"]) == ["cute80", "svt"]
    assert layout(tmp_path / "nest", ["a/x", "a/x/x"]) == ["a/x", "a/x/x"]
