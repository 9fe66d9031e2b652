"""The second look: crops read with low confidence are read again at two other vertical scales, the most
confident reading wins; confident crops are read once."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip4str.reading import BaseRecognizer, ReadResult, vertical_views

EXAMPLE = Path(__file__).parents[1] / "examples" / "hello.png"


class SizeReader(BaseRecognizer):
    """A recognizer whose reading of an image is its size, with a confidence looked up by size."""

    image_size = (32, 128)

    def __init__(self, confidence: dict[tuple[int, int], float], threshold: float | None = 0.8) -> None:
        self.confidence, self.second_look_confidence = confidence, threshold
        self.window_aspect = self._default_window()
        self.decoded: list[tuple[int, int]] = []

    def preprocess(self, images):  # noqa: ANN001, ANN201
        return [im.size for im in images]

    def decode_tensors(self, x, **options: object) -> list[ReadResult]:  # noqa: ANN001
        assert "second_look" not in options  # a reading option, never a decoding one
        self.decoded.extend(x)
        return [ReadResult(f"{w}x{h}", self.confidence.get((w, h), 0.5), []) for w, h in x]


def test_vertical_views_are_the_same_text_at_two_other_scales():
    pixels = np.arange(20 * 100 * 3, dtype=np.uint32).reshape(20, 100, 3).astype(np.uint8)
    image = Image.fromarray(pixels)
    padded, cut = vertical_views(image)
    assert padded.size == (100, 26) and cut.size == (100, 18)
    p = np.asarray(padded)
    assert (p[:3] == pixels[0]).all() and (p[-3:] == pixels[-1]).all() and (p[3:23] == pixels).all()
    assert (np.asarray(cut) == pixels[1:19]).all()
    assert [v.size for v in vertical_views(Image.new("RGB", (5, 10)))] == [(5, 14)]  # too short to cut
    assert vertical_views(Image.new("RGB", (5, 1))) == []  # nothing to pad or cut: no view repeats the crop
    clear = vertical_views(Image.new("RGBA", (10, 20), (0, 0, 0, 0)))  # transparency on white, as every read
    assert all(v.mode == "RGB" and np.asarray(v).min() == 255 for v in clear)


def test_only_unsure_crops_are_read_again_and_the_most_confident_reading_wins():
    reader = SizeReader({(100, 20): 0.95, (60, 20): 0.5, (60, 26): 0.9, (60, 18): 0.7})
    sure, unsure = Image.new("RGB", (100, 20)), Image.new("RGB", (60, 20))
    results = reader.read([sure, unsure])
    assert [r.text for r in results] == ["100x20", "60x26"] and results[1].confidence == 0.9
    assert reader.decoded == [(100, 20), (60, 20), (60, 26), (60, 18)]


def test_the_first_reading_wins_ties_and_a_worse_look_changes_nothing():
    reader = SizeReader({(60, 20): 0.5, (60, 26): 0.5, (60, 18): 0.4})
    assert reader.read(Image.new("RGB", (60, 20)))[0].text == "60x20"


@pytest.mark.parametrize("reader, options", [(SizeReader({}, threshold=None), {}),
                                             (SizeReader({}), {"second_look": False})])
def test_off_when_the_model_sets_no_threshold_or_the_caller_says_so(reader, options):
    results = reader.read([Image.new("RGB", (60, 20))] * 3, **options)
    assert [r.text for r in results] == ["60x20"] * 3 and len(reader.decoded) == 3


def test_each_window_of_a_long_crop_gets_its_own_second_look():
    reader = SizeReader({(120, 20): 0.95})
    long_crop = Image.new("RGB", (300, 20))  # read in windows of 120 pixels: (0, 90, 180) -> three windows
    reader.read(long_crop)
    firsts = reader.decoded[:3]
    assert firsts == [(120, 20)] * 3  # every window is sure: nothing more is read
    reader = SizeReader({})
    reader.read(long_crop)
    assert reader.decoded == [(120, 20)] * 3 + [(120, 26), (120, 18)] * 3


class ShadeReader(SizeReader):
    """Reads a letter for the image's mean shade, so the windows of a gradient read differently."""

    def preprocess(self, images):  # noqa: ANN001, ANN201
        return [(im.size, int(np.asarray(im).mean()) // 40) for im in images]

    def decode_tensors(self, x, **options: object) -> list[ReadResult]:  # noqa: ANN001
        self.decoded.extend(size for size, _ in x)
        return [ReadResult("abcdefg"[shade] + ("+" if size[1] == 26 else ""), self.confidence.get(size, 0.5),
                           [self.confidence.get(size, 0.5)] * 3) for size, shade in x]


def test_a_long_crop_merges_its_windows_best_looks_and_results_keep_their_order():
    """Sure and unsure windows in one crop, an unreadable item and views spilling over batches of two."""
    from clip4str.reading import merge_windows, split_long

    gradient = np.repeat(np.linspace(0, 255, 300).astype(np.uint8)[None, :, None], 20, 0).repeat(3, 2)
    long_crop, short = Image.fromarray(gradient), Image.new("RGB", (60, 20))
    reader = ShadeReader({(120, 20): 0.5, (120, 26): 0.9, (60, 20): 0.5, (60, 18): 0.6})
    results = reader.read([b"", long_crop, short], batch_size=2)
    assert results[0].error and not results[0].text
    windows = split_long(long_crop, reader.window_aspect)
    best = [reader.read(w)[0] for w in windows]  # each window alone, second look included
    assert [b.text for b in best] == ["b+", "d+", "f+"]
    assert (results[1].text, results[1].confidence) == (merge_windows(best).text, merge_windows(best).confidence)
    assert (results[2].text, results[2].confidence) == ("a", 0.6)
    sure = ShadeReader({(120, 20): 0.95, (60, 20): 0.5, (60, 26): 0.7})
    assert [r.text for r in sure.read([long_crop, short])] == ["bdf", "a+"]


def test_the_threshold_is_checked():
    from clip4str.model_config import ModelConfig

    clip = {"vision_cfg": {"image_size": [32, 128], "patch_size": 8}}
    with pytest.raises(ValueError, match="second_look_confidence must be in"):
        ModelConfig(clip=clip, second_look_confidence=-0.1)
    assert ModelConfig(clip=clip).second_look_confidence is None  # older checkpoints: one look


def test_builtin_model_looks_again_at_an_unsure_crop_on_both_backends():
    """A 6-pixel-high copy of the README's example: the built-in model is unsure of its first reading; the
    second look gives the most confident of the three readings, the same on PyTorch and ONNX Runtime."""
    from clip4str.inference import Recognizer
    from clip4str.onnx_backend import OnnxRecognizer

    image = Image.open(EXAMPLE).convert("RGB")
    small = image.resize((image.width * 6 // image.height, 6)).resize(image.size)
    for rec in (Recognizer.from_pretrained(), OnnxRecognizer()):
        assert rec.second_look_confidence is not None
        first = rec.read(small, second_look=False)[0]
        assert first.confidence < rec.second_look_confidence
        looks = [first, *rec.read(vertical_views(small), second_look=False)]
        best = max(looks, key=lambda r: r.confidence)
        result = rec.read(small)[0]
        assert (result.text, result.confidence) == (best.text, best.confidence)
        assert result.text == "hello" and result.confidence > first.confidence
