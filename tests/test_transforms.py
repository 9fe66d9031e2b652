import io

import numpy as np
import pytest
import torch
from PIL import Image

from clip4str.data.transforms import ImageDecodeError, load_image, preprocess

SIZE, MEAN, STD = (32, 128), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _white_left_black_right(mode: str) -> Image.Image:
    img = Image.new("RGB", (64, 16), "black")
    img.paste((255, 255, 255), (0, 0, 32, 16))
    if mode in ("RGB",):
        return img
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        return Image.fromarray(arr)  # uint16 gives mode I;16
    if mode == "I":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.int32) * 257)
    if mode == "F":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
    if mode == "RGBA":
        rgba = img.convert("RGBA")
        rgba.putalpha(255)
        return rgba
    return img.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "YCbCr"])
def test_every_pil_mode_gives_the_same_normalised_tensor(mode):
    x = preprocess(_white_left_black_right(mode), SIZE, MEAN, STD)
    assert x.shape == (1, 3, 32, 128) and x.dtype == torch.float32
    assert x[0, :, :, :50].mean() > 0.9 and x[0, :, :, 78:].mean() < -0.9, mode


def test_transparency_is_laid_on_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert load_image(img).getpixel((5, 5)) == (255, 255, 255)
    pal = Image.new("P", (10, 10), 0)
    pal.info["transparency"] = 0
    assert load_image(pal).getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("arr", [
    np.full((16, 64), 255, np.uint8), np.full((16, 64, 3), 255, np.uint8), np.full((16, 64, 4), 255, np.uint8),
    np.full((16, 64, 1), 255, np.uint8), np.ones((16, 64, 3), np.float32), np.ones((16, 64), np.float64),
    np.full((16, 64), 65535, np.uint16)])
def test_numpy_arrays(arr):
    x = preprocess(arr, SIZE, MEAN, STD)
    assert x.shape == (1, 3, 32, 128)
    torch.testing.assert_close(x, torch.ones_like(x))


def test_float_arrays_in_0_255_read_as_their_uint8_and_pil_mode_f_twins():
    grey = np.random.default_rng(0).integers(0, 256, (16, 64)).astype(np.uint8)
    grey[0, 0] = 255
    want = preprocess(grey, SIZE, MEAN, STD)
    overshoot = grey.astype(np.float32) / 255.0
    overshoot[0, 0] = 1.0001  # a resize of a 0..1 image overshoots a little: still 0..1
    for arr in (grey.astype(np.float32), grey.astype(np.float64), grey.astype(np.float32) / 255.0, overshoot):
        torch.testing.assert_close(preprocess(arr, SIZE, MEAN, STD), want, atol=1 / 127.5, rtol=0)
    torch.testing.assert_close(preprocess(Image.fromarray(grey.astype(np.float32), "F"), SIZE, MEAN, STD), want)


def test_paths_bytes_and_model_statistics(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.save(tmp_path / "r.png")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    a = preprocess([tmp_path / "r.png", str(tmp_path / "r.png"), buf.getvalue()], SIZE, (0.0, 0.0, 0.0),
                   (1.0, 2.0, 4.0))
    assert a.shape == (3, 3, 32, 128)
    assert torch.allclose(a[:, 0], torch.ones(1)) and torch.allclose(a[:, 1:], torch.zeros(1))
    b = preprocess(img, SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(b[0, 0], torch.full((32, 128), 2.0))


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ImageDecodeError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageDecodeError, match="bad.png.*could not be decoded"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ImageDecodeError, match="shape"):
        load_image(np.zeros((4, 4, 7), np.uint8))
    with pytest.raises(ImageDecodeError, match="cannot read an image"):
        load_image(42)
    with pytest.raises(ValueError, match="no images"):
        preprocess([], SIZE, MEAN, STD)
