"""Host work of the cross branch in one training step: the image branch's drafts of every permutation ->
captions -> CLIP BPE -> text encoder, for all B x P captions (before) and for the distinct ones only (what
`CLIP4STR.forward` does now), side by side, with the built-in model on rendered words.

    python benchmarks/caption_work.py [--batch-size 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from clip4str.data.words import WordSampler
from clip4str.inference import Recognizer
from clip4str.model.permutations import generate_permutations, permutation_masks


def rendered(word: str) -> Image.Image:
    font = ImageFont.load_default(size=28)
    left, top, right, bottom = font.getbbox(word)
    img = Image.new("RGB", (right - left + 12, bottom - top + 10), (235, 235, 225))
    ImageDraw.Draw(img).text((6 - left, 5 - top), word, font=font, fill=(20, 20, 20))
    return img


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rec = Recognizer.from_pretrained()
    m = rec.model.float().eval()
    words, rng = WordSampler(), np.random.default_rng(0)
    labels = [words(rng)[:12] for _ in range(args.batch_size)]
    x = rec.preprocess([rendered(w) for w in labels])
    tgt = m.tokenizer.encode(labels)
    memory = m.encode_image(x)
    perms = generate_permutations(tgt.shape[1] - 2, m.config.num_permutations, True, True, None, x.device)
    tgt_in = tgt[:, :-1]
    padding = (tgt_in == m.tokenizer.pad_id) | (tgt_in == m.tokenizer.eos_id)
    logits = m.image_decoder.forward_permutations(tgt_in, memory, *permutation_masks(perms), padding)

    def every_caption() -> torch.Tensor:
        return m.encode_text(m.captions(logits.flatten(0, 1)), x.device)

    def distinct_captions() -> torch.Tensor:
        captions = m.captions(logits.flatten(0, 1))
        distinct = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        return m.encode_text(list(distinct), x.device)[torch.tensor([distinct[c] for c in captions])]

    assert torch.allclose(every_caption(), distinct_captions(), atol=1e-5)
    n = len(set(m.captions(logits.flatten(0, 1))))
    times: dict[str, list[float]] = {"every caption (before)": [], "distinct captions (after)": []}
    for _ in range(args.repeats):  # interleaved, so that a noisy CPU affects both alike
        for name, f in zip(times, (every_caption, distinct_captions), strict=True):
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    print(f"batch {args.batch_size} x {len(perms)} permutations = {logits.shape[0] * logits.shape[1]} captions, "
          f"{n} distinct (the built-in model's drafts of rendered words); same text features: True")
    for name, values in times.items():
        print(f"  {name}: {1000 * statistics.median(values):.0f} ms (captions, BPE, text encoder)")


if __name__ == "__main__":
    main()
