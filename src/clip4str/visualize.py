"""Attention maps: for each decoded character, where the decoders looked in the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from clip4str.data.fonts import label_font
from clip4str.data.transforms import ImageInput, load_image
from clip4str.inference import Recognizer
from clip4str.model.decoder import Decoder
from clip4str.model.permutations import causal_masks

PANEL_HEIGHT = 64
# Each character's panel is the crop at PANEL_HEIGHT, at most this wide: a thin 4000x1 crop would otherwise be
# 256,000 px wide per panel (gigabytes for one request).
MAX_PANEL_WIDTH = 512


def _heat(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 with a blue-green-yellow-red ramp."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 128], [0, 160, 255], [0, 220, 120], [255, 230, 0], [230, 30, 0]], dtype=np.float32)
    pos = v * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    t = pos - lo
    return (stops[lo[..., 0]] * (1 - t) + stops[lo[..., 0] + 1] * t).astype(np.uint8)


@torch.inference_mode()
def character_attention(rec: Recognizer, image: ImageInput, text: str | None = None
                        ) -> tuple[str, dict[str, np.ndarray]]:
    """(text, {decoder name: (characters, grid_h, grid_w) cross-attention over image patches}) for `text`, or for
    the model's reading of the image (default decoding) if none is given."""
    with rec.autocast():  # bf16/fp16 recognizers keep their matmul weights in that dtype
        return _attention(rec, image, text)


def _attention(rec: Recognizer, image: ImageInput, text: str | None) -> tuple[str, dict[str, np.ndarray]]:
    model = rec.model
    x = rec.preprocess([image]).to(rec.device)
    memory = model.encode_image(x)
    out = model.decode(x)  # the cross decoder's memory holds the caption of the image branch's reading
    # A given text the decoders cannot take as it is (a long crop's reading merged from windows, characters outside
    # the charset) is replaced by the model's reading of the whole image.
    if text is None or not set(text) <= set(model.config.charset) or len(text) > model.config.max_label_length:
        text = model.tokenizer.decode(out.logits.float().softmax(-1), out.lengths.tolist())[0].text
        text = text[: model.config.max_label_length]  # a reading that never ended holds one character more
    ids = model.tokenizer.encode([text]).to(rec.device)[:, :-1]  # [B] + characters
    length = ids.shape[1]
    grid = model.clip.visual.grid_size
    patches = slice(1, 1 + grid[0] * grid[1])  # image tokens after the class token
    mask, _ = causal_masks(length, rec.device)
    decoders: list[tuple[str, Decoder, torch.Tensor]] = [("image decoder", model.image_decoder, memory)]
    if model.cross_decoder is not None:
        img_logits = out.image_logits
        caption = model.captions(img_logits, out.image_lengths)
        decoders.append(("cross decoder", model.cross_decoder, model.cross_memories(memory, [caption])[0]))
    maps = {}
    for name, decoder, mem in decoders:
        layer = decoder.layers[-1].cross_attn
        layer.record = True
        try:  # teacher-forced on the reading: the same attention as the greedy steps that produced it
            decoder(ids, mem, mask, query_len=length, query_mask=mask)
        finally:
            layer.record = False
        weights = layer.weights[0, : len(text), patches].float()
        weights = weights / weights.amax(-1, keepdim=True).clamp_min(1e-12)
        maps[name] = weights.reshape(len(text), *grid).cpu().numpy()
    return text, maps


def attention_strip(rec: Recognizer, image: ImageInput, out: str | Path, text: str | None = None) -> tuple[str, int]:
    """Draw each character's attention over the image (one row per decoder) for `text` (default: the model's
    reading); returns (text, panels per row)."""
    img = load_image(image)
    text, maps = character_attention(rec, img, text)
    w = min(max(32, round(img.width * PANEL_HEIGHT / img.height)), MAX_PANEL_WIDTH)
    base = np.asarray(img.resize((w, PANEL_HEIGHT), Image.Resampling.BICUBIC), dtype=np.float32)
    font = label_font(text + "".join(maps), 16)  # the charset may go past what Pillow's own font draws
    panels = max(1, len(text))
    label_w, pad, cap = 120, 4, 20
    sheet = Image.new("RGB", (label_w + panels * (w + pad), len(maps) * (PANEL_HEIGHT + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (name, grid_maps) in enumerate(maps.items()):
        y = pad + row * (PANEL_HEIGHT + cap + pad)
        draw.text((4, y + PANEL_HEIGHT // 2 - 8), name, fill="black", font=font)
        for k, char in enumerate(text):
            heat = Image.fromarray((grid_maps[k] * 255).astype(np.uint8)).resize((w, PANEL_HEIGHT),
                                                                                 Image.Resampling.BILINEAR)
            overlay = 0.45 * base + 0.55 * _heat(np.asarray(heat, dtype=np.float32) / 255.0)
            x = label_w + k * (w + pad)
            sheet.paste(Image.fromarray(overlay.astype(np.uint8)), (x, y))
            draw.text((x + w // 2 - 5, y + PANEL_HEIGHT + 1), char, fill="black", font=font)
    sheet.save(out, format="PNG")
    return text, len(text)
