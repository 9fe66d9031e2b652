import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip4str.charset import CHARSETS, LabelNormalizer
from clip4str.data.augment import OPS, RandAugment
from clip4str.data.datamodule import Source, TrainStream
from clip4str.data.synth import WordRenderer, WordSampler


def _bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def renderer():
    return WordRenderer(CHARSETS["94"], seed=123)


def test_generator_is_deterministic_for_a_seed(renderer):
    again = WordRenderer(CHARSETS["94"], seed=123)
    other = WordRenderer(CHARSETS["94"], seed=124)
    for i in (0, 7, 1000):
        img, label = renderer[i]
        img2, label2 = again[i]
        assert label == label2 and _bytes(img) == _bytes(img2)
    assert [renderer[i][1] for i in range(10)] != [other[i][1] for i in range(10)]


def test_blur_scales_with_the_letters_not_with_a_tall_canvas():
    # A curved or turned word's canvas is several letters tall: blur sized to the canvas wiped small letters out.
    canvas = Image.new("RGB", (120, 120), "white")
    draw = __import__("PIL.ImageDraw").ImageDraw.Draw(canvas)
    for x in range(10, 110, 6):
        draw.line([(x, 50), (x, 70)], fill="black", width=2)  # strokes of letters 20 px tall
    detail = {}
    for text_height in (None, 24):
        edges = 0.0
        for seed in range(60):
            out = np.asarray(WordRenderer._degrade(canvas.copy(), np.random.default_rng(seed), 1.0, text_height),
                             dtype=np.float32).mean(-1)
            edges += float(np.abs(np.diff(out, axis=1)).sum())
        detail[text_height] = edges
    assert detail[24] > 1.2 * detail[None]


def test_hairline_strokes_get_full_ink_and_bold_ones_stay_as_drawn():
    from PIL import ImageDraw, ImageFont

    faint = Image.new("L", (60, 20), 0)
    ImageDraw.Draw(faint).line([(5, 10), (55, 10)], fill=30)  # what a sub-pixel stroke leaves after anti-aliasing
    inked = np.asarray(WordRenderer._full_ink(faint))
    assert inked.max() == 255 and (inked > 0).sum() == (np.asarray(faint) > 0).sum()  # as thin, fully opaque
    bold = Image.new("L", (60, 30), 0)
    ImageDraw.Draw(bold).text((2, 2), "Hag", fill=255, font=ImageFont.load_default(24))
    assert WordRenderer._full_ink(bold) is bold


class _FlatBackgrounds:
    """One flat colour per sample, drawn from the renderer's generator: the text's contrast is then exact."""

    def sample(self, w, h, rng, difficulty=1.0):
        return np.broadcast_to(rng.uniform(0, 255, 3), (h, w, 3)).astype(np.float32)


def test_text_keeps_its_luma_contrast_after_tinting(renderer, monkeypatch):
    from clip4str.data.synth import LUMA

    monkeypatch.setattr(renderer, "backgrounds", _FlatBackgrounds())
    mask = Image.new("L", (40, 20), 0)
    mask.paste(255, (10, 5, 30, 15))
    for seed in range(400):
        rng = np.random.default_rng(seed)
        out = np.asarray(renderer._compose(mask, rng), dtype=np.float32)
        bg = _FlatBackgrounds().sample(1, 1, np.random.default_rng(seed))[0, 0]  # the same first draw
        assert abs(float(out[10, 20] @ LUMA - bg @ LUMA)) >= 0.25 * 255 - 2, seed


@pytest.mark.parametrize("charset", [CHARSETS["36"], CHARSETS["94"], "ABC123-"])
def test_labels_always_fit_the_charset(charset):
    r = WordRenderer(charset, seed=5)
    for i in range(150):
        img, label = r[i]
        assert label and set(label) <= set(charset), label
        assert img.mode == "RGB" and min(img.size) >= 4


def test_word_sampler_mixes_kinds():
    s = WordSampler(CHARSETS["94"])
    labels = [s(np.random.default_rng([0, i])) for i in range(400)]
    assert any(t.isdigit() for t in labels) and any(t.islower() for t in labels)
    assert any(t.isupper() for t in labels) and any(not t.isalnum() for t in labels)
    assert all(0 < len(t) <= 25 for t in labels)


def test_brand_like_compounds_and_codes_are_drawn_for_the_weak_sets():
    s = WordSampler(CHARSETS["94"])
    rng = np.random.default_rng(0)
    compounds = [s._compound(rng, 25) for _ in range(200)]
    codes = [s._code(rng, 25) for _ in range(200)]
    assert sum(len(t) >= 10 for t in compounds if t) > 100  # longer than most dictionary words
    assert all(set(t) <= set(CHARSETS["94"]) and len(t) <= 25 for t in compounds + codes)
    assert all(any(c.isdigit() for c in t) and any(c.isalpha() for c in t) for t in codes)
    assert s._compound(rng, 3) == "" and s._code(rng, 1) == ""


def test_neighbouring_words_and_motion_blur(renderer):
    from PIL import ImageFont

    from clip4str.data.synth import _motion_blur

    font = ImageFont.truetype(renderer.fonts[0].path, 28)
    word = "Street"
    plain = renderer._straight(word, font, 0, np.random.default_rng(0))
    widths = [renderer._with_neighbours(word, font, np.random.default_rng(i), renderer.words).width
              for i in range(20)]
    assert max(widths) > plain.width  # parts of the neighbours are in the crop
    assert min(widths) > 0.8 * plain.width  # and the word itself is never cut
    img, _ = renderer[5]
    blurred = _motion_blur(img, np.random.default_rng(1))
    assert blurred.size == img.size and _bytes(blurred) != _bytes(img)


def test_missing_font_folder_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WordRenderer(fonts=[tmp_path / "nope"])
    with pytest.raises(FileNotFoundError, match="no usable font"):
        WordRenderer(fonts=[tmp_path])


MPL_FONTS = Path(__import__("matplotlib").get_data_path()) / "fonts" / "ttf"


@pytest.mark.skipif(not (MPL_FONTS / "LastResortHE-Regular.ttf").is_file(), reason="matplotlib's fonts not found")
def test_fonts_that_draw_other_pictures_for_letters_are_not_used_for_synthetic_words(monkeypatch):
    from clip4str.charset import CHARSETS
    from clip4str.data import fonts

    charset = CHARSETS["94"]
    # matplotlib ships them beside DejaVu: a box for every character, TeX's braces, operators and arrows
    for name in ("LastResortHE-Regular.ttf", "cmex10.ttf", "cmsy10.ttf", "cmmi10.ttf"):
        assert fonts.inspect_font(MPL_FONTS / name, charset) is None, name
    assert fonts.inspect_font(MPL_FONTS / "DejaVuSans.ttf", charset) is not None
    # TeX's text fonts draw letters, but other signs at some ASCII punctuation (OT1: < as an inverted !, { as a dash)
    for name in ("cmr10.ttf", "cmss10.ttf", "cmb10.ttf", "cmti10.ttf"):
        covered = fonts.inspect_font(MPL_FONTS / name, charset).covered
        assert set("Aa0.,-") <= covered and not set('<>{}|_"`\\') & covered, name
    assert set('<>{}|_"`\\') <= fonts.inspect_font(MPL_FONTS / "cmtt10.ttf", charset).covered  # typewriter: ASCII
    # The box font is refused for drawing one picture for every character, whatever its name.
    monkeypatch.setattr(fonts, "EXCLUDED_FAMILIES", ())
    assert fonts.inspect_font(MPL_FONTS / "LastResortHE-Regular.ttf", charset) is None


@pytest.mark.skipif(not (MPL_FONTS / "DejaVuSans.ttf").is_file(), reason="matplotlib's DejaVu Sans not found")
def test_figures_write_characters_past_latin_letters_in_a_font_that_draws_them():
    from PIL import ImageFont

    from clip4str.data.fonts import _glyph, _missing_glyphs, label_font

    default = ImageFont.load_default(16)
    assert label_font("hello", 16).getname() == default.getname()
    assert _glyph(default, "ö") == _glyph(default, "\U0010fffd")  # Pillow's own font draws a box for it
    font = label_font("Größe 5€", 16)  # matplotlib's DejaVu Sans (always found) draws both
    assert all(_glyph(font, c) not in _missing_glyphs(font) for c in "Größe5€")


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def test_augmentation_is_seeded_and_only_geometric_ops_change_the_size(renderer):
    img, _ = renderer[3]
    aug = RandAugment()
    a, b = aug(img, random.Random(9)), aug(img, random.Random(9))
    assert _bytes(a) == _bytes(b)
    for name, op in OPS.items():
        out = op(img, 0.5, random.Random(0))
        assert out.mode == "RGB" and (out.size == img.size) == (name not in GEOMETRIC), name
    assert "Sharpness" not in OPS and {"GaussianBlur", "PoissonNoise", "Rotate"} <= set(OPS)


@pytest.mark.parametrize("name", GEOMETRIC)
@pytest.mark.parametrize("seed", [0, 1])  # both signs
def test_geometric_ops_keep_every_letter_of_a_word_that_fills_its_crop(name, seed):
    wide = Image.new("RGB", (240, 40), "white")
    wide.paste((0, 0, 0), (2, 3, 238, 37))  # ink from edge to edge: in the crop's own frame, any move cuts some
    ink = (np.asarray(wide.convert("L")) < 60).sum()
    out = np.asarray(OPS[name](wide, 0.5, random.Random(seed)).convert("L"))
    assert (out < 60).sum() >= 0.98 * ink, name


def test_training_stream_is_resumable_and_mixes_by_weight(renderer, tmp_path):
    from test_data_lmdb_folder import _folder

    root = _folder(tmp_path, ["real"] * 4)
    from clip4str.data.sources import open_labelled
    sources = [(Source("synth", 3.0), renderer), (Source(str(root), 1.0), open_labelled(root, None))]
    stream = TrainStream(sources, batch_size=4, image_size=(32, 128), mean=(0.5,) * 3, std=(0.5,) * 3, seed=1)
    it = iter(stream)
    first = [next(it) for _ in range(16)]
    resumed = TrainStream(sources, 4, (32, 128), (0.5,) * 3, (0.5,) * 3, seed=1, start_batch=2)
    it2 = iter(resumed)
    again = [next(it2) for _ in range(8)]
    assert [label for _, label in first[8:16]] == [label for _, label in again]
    assert torch.equal(first[8][0], again[0][0])
    labels = [stream.sample(g)[1] for g in range(400)]
    share = labels.count("real") / len(labels)
    assert 0.15 < share < 0.35  # weight 1 of 4


def _colour_variety(img: Image.Image) -> float:
    """Distinct colours per pixel: noise, photos, blur and JPEG raise it; flat clean text keeps it low."""
    pixels = np.asarray(img).reshape(-1, 3)
    return len(np.unique(pixels, axis=0)) / len(pixels)


def test_difficulty_zero_renders_short_words_cleaner(renderer):
    easy = [renderer.render(i, 0.0) for i in range(80)]
    hard = [renderer.render(i, 1.0) for i in range(80)]
    assert [t for _, t in hard] == [renderer[i][1] for i in range(80)]
    assert all(1 <= len(t) <= 3 for _, t in easy) and max(len(t) for _, t in hard) > 8
    assert all(len(renderer.render(i, 0.25)[1]) <= 8 for i in range(40))
    assert _bytes(renderer.render(5, 0.0)[0]) == _bytes(easy[5][0])
    assert np.mean([_colour_variety(i) for i, _ in easy]) * 2 < np.mean([_colour_variety(i) for i, _ in hard])


def test_curriculum_ramps_difficulty_with_the_sample_number(renderer):
    sources = [(Source("synth", 1.0), renderer)]
    args = dict(batch_size=4, image_size=(32, 128), mean=(0.5,) * 3, std=(0.5,) * 3, seed=1)
    ramped = TrainStream(sources, curriculum_images=1000, **args)
    full = TrainStream(sources, **args)
    first, late = ramped.sample(0), ramped.sample(5000)
    assert len(first[1]) <= 3 and not torch.equal(first[0], full.sample(0)[0])
    assert torch.equal(late[0], full.sample(5000)[0])  # past the ramp: the full mix


def test_rescale_vertically_pads_with_edge_rows_or_cuts():
    from clip4str.data.augment import rescale_vertically

    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    tall, short = np.asarray(rescale_vertically(img, 0.2)), np.asarray(rescale_vertically(img, -0.1))
    assert tall.shape == (28, 30, 3) and (tall[:4] == pixels[0]).all() and (tall[4:24] == pixels).all()
    assert (short == pixels[2:18]).all()
    grey = Image.fromarray(pixels[..., 0])
    assert rescale_vertically(grey, 0.2).size == (30, 28)
    thin = Image.new("RGB", (30, 3))
    assert rescale_vertically(thin, 0.1) is thin and rescale_vertically(thin, -0.1) is thin


def test_scale_jitter_rescales_that_share_of_samples_and_leaves_other_streams_alone(renderer):
    sources = [(Source("synth", 1.0), renderer)]
    args = dict(batch_size=4, image_size=(32, 128), mean=(0.5,) * 3, std=(0.5,) * 3, seed=1, augment=False)
    plain, jittered = TrainStream(sources, **args), TrainStream(sources, scale_jitter=0.5, **args)
    same = [torch.equal(plain.sample(g)[0], jittered.sample(g)[0]) for g in range(60)]
    assert 0.3 < 1 - np.mean(same) < 0.7  # about half of the samples change
    assert [plain.sample(g)[1] for g in range(60)] == [jittered.sample(g)[1] for g in range(60)]
    assert torch.equal(jittered.sample(7)[0], TrainStream(sources, scale_jitter=0.5, **args).sample(7)[0])
    with pytest.raises(ValueError, match="scale_jitter"):
        from clip4str.train.config import DataSection
        DataSection(scale_jitter=1.5)


def test_real_holdout_is_disjoint_and_the_same_for_every_training_seed(tmp_path):
    from clip4str.data.datamodule import STRDataModule
    from test_data_lmdb_folder import _folder

    root = _folder(tmp_path, [f"w{i}" for i in range(40)])
    splits = []
    for seed in (0, 1):
        dm = STRDataModule([Source(str(root), 1.0, holdout=0.25)], [], CHARSETS["94"], (32, 128), (0.5,) * 3,
                           (0.5,) * 3, seed=seed)
        dm.setup()
        (_, train_part), = dm._train
        held = dm._val["crops-holdout"]
        assert len(held) == 10 and not set(train_part.indices) & set(held.indices)
        splits.append(sorted(held.indices))
    assert splits[0] == splits[1]


def test_a_sample_that_fails_to_render_is_skipped_with_a_warning(renderer):
    class Flaky:
        """Renders like the real renderer, except that every third index raises."""

        def render(self, index, difficulty):
            if index % 3 == 0:
                raise ZeroDivisionError("float division by zero")
            return renderer.render(index, difficulty)

    stream = TrainStream([(Source("synth", 1.0), Flaky())], batch_size=4, image_size=(32, 128), mean=(0.5,) * 3,
                         std=(0.5,) * 3, seed=1)
    with pytest.warns(UserWarning, match="skipped: ZeroDivisionError"):
        samples = [stream.sample(g) for g in range(30)]
    assert any(s is None for s in samples) and any(s is not None for s in samples)


def test_curved_text_without_glyph_width_is_an_error_not_a_division_by_zero(renderer, monkeypatch):
    class NoWidth:
        path, size = "no-width.ttf", 20

        def getmetrics(self):
            return 16, 4

    from clip4str.data import synth
    monkeypatch.setattr(synth, "_glyph", lambda path, size, c: (Image.new("L", (1, 20)), 0))
    with pytest.raises(ValueError, match="no width"):
        renderer._curved("abc", NoWidth(), np.random.default_rng(0))


def test_join_real_joins_that_share_of_real_crops_with_another_of_their_source(tmp_path):
    from clip4str.data.augment import join_horizontally
    from clip4str.data.sources import open_labelled
    from test_data_lmdb_folder import _folder

    left, right = Image.new("RGB", (40, 20), "red"), Image.new("L", (30, 10), 255)
    joined = np.asarray(join_horizontally(left, right))
    assert joined.shape == (20, 100, 3) and (joined[:, :40] == (255, 0, 0)).all() and (joined[:, 40:] == 255).all()

    root = _folder(tmp_path, ["ab", "cde", "fghij", "k" * 24])
    data = open_labelled(str(root), LabelNormalizer(CHARSETS["94"], 25))
    args = dict(batch_size=4, image_size=(32, 128), mean=(0.5,) * 3, std=(0.5,) * 3, seed=3, augment=False)
    sources = [(Source(str(root), 1.0), data)]
    plain, joining = TrainStream(sources, **args), TrainStream(sources, join_real=0.5, max_label_length=25, **args)
    labels = {data[i][1] for i in range(len(data))}
    joined_labels = []
    for g in range(80):
        (_, a), (_, b) = plain.sample(g), joining.sample(g)
        if a != b:
            assert b.startswith(a) and b[len(a):] in labels and len(b) <= 25
            assert not torch.equal(plain.sample(g)[0], joining.sample(g)[0])  # the image is the joined one
            joined_labels.append(b)
    assert 0.2 < len(joined_labels) / 80 < 0.5  # half are drawn; too long or too wide pairs stay alone
    assert not any("k" * 24 in t for t in joined_labels)  # 24 + 2 characters would pass the limit
    assert joining.sample(5)[1] == TrainStream(sources, join_real=0.5, max_label_length=25, **args).sample(5)[1]
    with pytest.raises(ValueError, match="join_real"):
        from clip4str.train.config import DataSection
        DataSection(join_real=-0.1)


def test_a_source_can_be_augmented_harder_and_other_sources_keep_their_stream(tmp_path):
    from clip4str.data.sources import open_labelled
    from test_data_lmdb_folder import _folder

    root = _folder(tmp_path, [f"w{i}" for i in range(8)])
    data = open_labelled(str(root), LabelNormalizer(CHARSETS["94"], 25))
    args = dict(batch_size=4, image_size=(32, 128), mean=(0.5,) * 3, std=(0.5,) * 3, seed=2)
    reference = TrainStream([(Source(str(root), 1.0), data)], **args)
    stated = TrainStream([(Source(str(root), 1.0, augment={"num_ops": 3, "magnitude": 5, "prob": 0.5}), data)], **args)
    harder = TrainStream([(Source(str(root), 1.0, augment={"prob": 1.0, "magnitude": 8}), data)], **args)
    off = TrainStream([(Source(str(root), 1.0, augment={"num_ops": 0}), data)], **args)
    clean = TrainStream([(Source(str(root), 1.0), data)], augment=False, **args)
    changed = {"stated": 0, "harder": 0, "off": 0}
    for g in range(40):
        ref = reference.sample(g)
        assert torch.equal(ref[0], stated.sample(g)[0])  # the reference's values written out: the same stream
        assert harder.sample(g)[1] == ref[1]
        changed["harder"] += not torch.equal(ref[0], harder.sample(g)[0])
        changed["off"] += not torch.equal(clean.sample(g)[0], off.sample(g)[0])
    assert changed["harder"] > 25 and changed["off"] == 0
    for bad in ({"prob": 1.5}, {"num_ops": 2.5}, {"strength": 1}, {"magnitude": "high"}, [3], {"prob": True}):
        with pytest.raises(ValueError, match="augment"):
            Source("x", 1.0, augment=bad)


def test_a_busy_background_is_calmed_under_the_text_and_a_plain_one_is_not():
    from clip4str.data.synth_background import LOW_CONTRAST, LUMA, MAX_LOST_INK, calmed

    def lost(bg, ink, text_luma):
        return float((ink * (np.abs(bg @ LUMA / 255 - text_luma) < LOW_CONTRAST)).sum() / ink.sum())

    rng = np.random.default_rng(0)
    busy = np.where(rng.random((32, 100, 1)) < 0.5, 230.0, 40.0) * np.ones(3)  # half of it as light as the text
    ink = np.zeros((32, 100))
    ink[8:24, 10:90] = 1.0
    assert lost(busy, ink, 0.9) > 0.4
    out = calmed(busy, ink, 0.9)
    assert lost(out, ink, 0.9) <= MAX_LOST_INK and out.shape == busy.shape
    assert 0 < out.std() < busy.std()  # the texture is still there, weaker
    plain = np.full((32, 100, 3), 40.0)
    assert calmed(plain, ink, 0.9) is plain and calmed(busy, np.zeros((32, 100)), 0.9) is busy
