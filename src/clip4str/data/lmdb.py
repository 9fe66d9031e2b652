"""LMDB datasets in the clovaai / PARSeq format (read lazily per worker) and a safe LMDB writer."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
from PIL import Image

from clip4str.charset import LabelNormalizer
from clip4str.data.compat import ConcatDataset, Dataset
from clip4str.data.transforms import ImageDecodeError, load_image, open_image

MAP_SIZE = 1 << 40  # address space only; the file grows with the data


def image_key(i: int) -> bytes:
    """The clovaai key of sample i (1-based)."""
    return b"image-%09d" % i


def _label_key(i: int) -> bytes:
    return b"label-%09d" % i


def find_lmdbs(root: str | Path) -> list[Path]:
    """Every folder at or under `root` that holds a data.mdb, sorted."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"LMDB path {str(root)!r} does not exist")
    found = sorted({p.parent for p in root.rglob("data.mdb")} | ({root} if (root / "data.mdb").is_file() else set()))
    if not found:
        raise FileNotFoundError(f"no LMDB (folder with data.mdb) found under {str(root)!r}, and no labels.tsv "
                                "in it (a folder of images with a labels.tsv of path<TAB>label lines is read too)")
    return found


_ENVIRONMENTS: dict[str, lmdb.Environment] = {}
_ENVIRONMENTS_LOCK = threading.Lock()


def open_lmdb(path: Path) -> lmdb.Environment:
    """The process's one read-only environment of an LMDB folder (no lock file: shared, read-only data folders).

    py-lmdb refuses to open one database twice in a process, so every dataset reading a path shares this handle
    (a test set named twice, a training source that is also a validation set).
    """
    key = str(Path(path).resolve())
    with _ENVIRONMENTS_LOCK:
        env = _ENVIRONMENTS.get(key)
        if env is None:
            try:
                env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                                max_readers=126)
            except lmdb.Error as e:
                raise ValueError(f"LMDB {str(path)!r} cannot be opened ({e}); the data.mdb is damaged or "
                                 "truncated: rebuild it with `clip4str data lmdb`") from e
            _check_length(env, Path(path))
            _ENVIRONMENTS[key] = env
        return env


def _check_length(env: lmdb.Environment, path: Path) -> None:
    """Refuse a data.mdb shorter than the pages its header says it holds: reading a page past the end of a
    memory-mapped file kills the process with SIGBUS instead of raising."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = (path / "data.mdb").stat().st_size
    if size < needed:
        env.close()
        raise ValueError(f"LMDB {str(path)!r} is truncated (data.mdb has {size} bytes, its header needs "
                         f"{needed}); copy it again or rebuild it with `clip4str data lmdb`")


def forget_lmdb(path: Path | None = None) -> None:
    """Close the process's handle of `path` (all handles if None): a rewritten database is opened anew."""
    with _ENVIRONMENTS_LOCK:
        for key in [str(Path(path).resolve())] if path is not None else list(_ENVIRONMENTS):
            env = _ENVIRONMENTS.pop(key, None)
            if env is not None:
                env.close()


# A forked data-loader worker must not use its parent's handles (LMDB forbids it), and py-lmdb would refuse to
# open the same databases again while they are registered: each child closes what it inherited.
os.register_at_fork(after_in_child=forget_lmdb)


class LmdbDataset(Dataset):
    """One LMDB: labels normalised and filtered up front (reference order), images decoded on access.

    Items are (image, label); an image that cannot be read yields None, with a warning naming its key, so
    that the epoch goes on (`collate_skip_none` drops it from the batch).
    """

    def __init__(self, path: str | Path, normalizer: LabelNormalizer | None = None,
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.path = Path(path)
        self.transform = transform
        self.raw_count = 0
        self.keys: list[int] = []
        self.labels: list[str] = []
        env = open_lmdb(self.path)
        try:
            with env.begin() as txn:
                raw = txn.get(b"num-samples")
                if raw is None:
                    raise ValueError(f"LMDB {str(self.path)!r} has no 'num-samples' key; not a clovaai-format LMDB")
                try:
                    self.raw_count = int(raw)
                except ValueError:
                    self.raw_count = -1
                if self.raw_count < 0:
                    raise ValueError(f"LMDB {str(self.path)!r} has num-samples {raw[:40]!r}, not a count; "
                                     "rebuild it with `clip4str data lmdb`")
                for i in range(1, self.raw_count + 1):
                    label = txn.get(_label_key(i))
                    if label is None:
                        raise ValueError(f"LMDB {str(self.path)!r} lacks label-{i:09d} (of {self.raw_count}); "
                                         "the database is truncated: rebuild it")
                    text = label.decode("utf-8", errors="replace")
                    if normalizer is not None:
                        text = normalizer(text)
                        if text is None:
                            continue
                    self.keys.append(i)
                    self.labels.append(text)
        except lmdb.Error as e:
            raise ValueError(f"LMDB {str(self.path)!r} is damaged ({e}); rebuild it with `clip4str data lmdb`") from e

    def __len__(self) -> int:
        return len(self.keys)

    def read_bytes(self, index: int) -> bytes | None:
        """Encoded image bytes of sample `index`, or None (with a warning) if the entry cannot be read."""
        key = image_key(self.keys[index])
        try:
            with open_lmdb(self.path).begin() as txn:
                data = txn.get(key)
        except lmdb.Error as e:
            warnings.warn(f"{self.path}: {key.decode()} unreadable ({e}); not loaded", stacklevel=2)
            return None
        if data is None:
            warnings.warn(f"{self.path}: {key.decode()} missing; not loaded", stacklevel=2)
        return data

    def __getitem__(self, index: int) -> tuple[Any, str] | None:
        data = self.read_bytes(index)
        if data is None:
            return None
        try:
            image = load_image(data)  # the one decoding path: EXIF rotation, transparency on white, 16-bit
        except ImageDecodeError as e:
            warnings.warn(f"{self.path}: {image_key(self.keys[index]).decode()} is not a decodable image ({e}); "
                          "skipped", stacklevel=2)
            return None
        return (self.transform(image) if self.transform else image), self.labels[index]


def lmdb_dataset(root: str | Path, normalizer: LabelNormalizer | None = None,
                 transform: Callable[[Image.Image], Any] | None = None, report: bool = True) -> ConcatDataset:
    """All LMDBs under `root` as one dataset; prints once what the label filter dropped and why."""
    parts = [LmdbDataset(p, normalizer, transform) for p in find_lmdbs(root)]
    if report and normalizer is not None:
        raw = sum(p.raw_count for p in parts)
        print(f"{root}: {len(parts)} LMDB(s), {raw} samples; labels: {normalizer.stats.summary()}", file=sys.stderr)
    return ConcatDataset(parts)


@dataclass
class WriteReport:
    """What the writer stored and what it skipped, with reasons."""

    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def write_lmdb(samples: Iterable[tuple[str | bytes, str, str]], out: str | Path, force: bool = False) -> WriteReport:
    """Write (name, image path or bytes, label) samples to a new LMDB at `out`, validating every image.

    Writes into a temporary folder beside `out` and renames it at the end, so a failure never leaves a
    half-written database; an existing `out` is replaced only with `force`.
    """
    out = Path(out)
    _check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    report = WriteReport()
    env = lmdb.open(str(tmp), map_size=MAP_SIZE, subdir=True)
    try:
        txn = env.begin(write=True)
        for name, source, label in samples:
            reason = _invalid_reason(source, label)
            if reason:
                report.skipped.append((name, reason))
                continue
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            report.written += 1
            txn.put(image_key(report.written), data)
            txn.put(_label_key(report.written), label.encode("utf-8"))
            if report.written % 1000 == 0:
                txn.commit()
                txn = env.begin(write=True)
        if not report.written:
            reasons = "; ".join(f"{name}: {why}" for name, why in report.skipped[:3]) or "none were given"
            raise ValueError(f"no sample to write to {str(out)!r} ({len(report.skipped)} skipped: {reasons})")
        txn.put(b"num-samples", str(report.written).encode())
        txn.commit()
    except BaseException:
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    env.close()
    if out.exists():
        shutil.rmtree(out)
    forget_lmdb(out)  # a handle of the database this replaces must not serve reads of the new one
    tmp.rename(out)
    return report


LMDB_FILES = {"data.mdb", "lock.mdb"}


def _check_replaceable(out: Path, force: bool) -> None:
    """Refuse, before any work, an output that is not a new path or (with force) an LMDB folder and nothing else:
    --force must never delete a folder of images (such as the source itself) or a file."""
    if out.is_symlink():
        raise FileExistsError(f"{str(out)!r} is a symbolic link; give the LMDB folder's real path")
    if not out.exists():
        return
    if not force:
        raise FileExistsError(f"{str(out)!r} already exists; pass --force to replace it")
    if not out.is_dir():
        raise FileExistsError(f"{str(out)!r} is a file, not an LMDB folder; --force replaces only an LMDB folder: "
                              "choose another output path")
    others = sorted(p.name for p in out.iterdir() if p.name not in LMDB_FILES)
    if others or not (out / "data.mdb").is_file():
        what = f"holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}" if others else "has no data.mdb"
        raise FileExistsError(f"{str(out)!r} {what}: not an LMDB folder, so --force does not replace it; choose "
                              "another output path")


def _invalid_reason(source: str | bytes, label: str) -> str | None:
    if not label:
        return "empty label"
    if "\n" in label or "\r" in label:
        return "label contains a newline"
    if not isinstance(source, bytes) and not Path(source).is_file():  # a FIFO or device would block the read
        return "not a regular file" if Path(source).exists() else "file does not exist"
    try:
        with open_image(source) as img:
            img.load()
            if min(img.size) < 1:
                return "empty image"
    except FileNotFoundError:
        return "file does not exist"
    except Exception as e:  # Pillow raises many types for damaged data
        return f"not a decodable image ({type(e).__name__}: {e})"
    return None
