"""Our module against outputs of the authors' code on the same tiny random weights (../shared fixture)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from clip4str.convert import load_authors_checkpoint
from clip4str.data.transforms import preprocess
from clip4str.model.towers import clip_bpe_tokenizer, encode_text_tokens

ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    """The fixture's weights through our converter (architecture inferred from shapes alone)."""
    from conftest import PARITY
    if not (PARITY / "weights.safetensors").is_file():
        pytest.skip(f"parity fixture not found at {PARITY} (../shared beside the clone)")
    model, report = load_authors_checkpoint(PARITY / "weights.safetensors")
    return (model, load_file(str(PARITY / "inputs.safetensors")), load_file(str(PARITY / "outputs.safetensors")),
            json.loads((PARITY / "expected.json").read_text()), report)


def test_converter_maps_every_key_and_infers_the_architecture(fixture):
    model, _, _, _, report = fixture
    assert report["unused"] == []
    cfg = model.config
    assert cfg.clip["vision_cfg"]["width"] == 192 and cfg.clip["vision_cfg"]["layers"] == 2
    assert model.clip.visual.transformer.resblocks[0].attn.num_heads == 3 and cfg.clip["quick_gelu"] is True
    assert cfg.embed_dim == 64 and cfg.max_label_length == 25 and len(cfg.charset) == 94 and cfg.cross_branch
    # Converted models read with the normalisation they were trained with (not the 0.5/0.5 test-time bug).
    assert cfg.image_mean == (0.48145466, 0.4578275, 0.40821073)


def test_preprocessing_matches(fixture):
    model, inputs, _, expected, _ = fixture
    from conftest import PARITY
    paths = [PARITY / "images" / name for name in expected["images"]]
    x = preprocess(paths, (224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    torch.testing.assert_close(x, inputs["pixel_values"], atol=1e-6, rtol=0)


def test_image_tokens_and_image_branch_ar(fixture):
    model, inputs, out, expected, _ = fixture
    with torch.inference_mode():
        tokens = model.encode_image(inputs["pixel_values"])
        torch.testing.assert_close(tokens, out["image_tokens"], atol=ATOL, rtol=0)
        logits, _, _ = model._first_pass(model.image_decoder, tokens, 26, "ar", True, None)
    assert logits.shape[1] == expected["ar_steps_taken"]
    torch.testing.assert_close(logits, out["visual_ar_logits"], atol=ATOL, rtol=0)


def test_clip_tokenizer_and_text_features(fixture):
    model, _, out, expected, _ = fixture
    tokenizer = clip_bpe_tokenizer(16)
    for case in expected["clip_tokenize_cases"]:
        assert tokenizer([case["text"]])[0].tolist() == case["ids"], case["text"]
    assert model.captions(out["visual_ar_logits"]) == expected["cross_captions_ar"]
    ids = tokenizer(expected["cross_captions_ar"])
    assert torch.equal(ids, out["cross_text_ids_ar"].long())
    with torch.inference_mode():
        torch.testing.assert_close(encode_text_tokens(model.clip, ids), out["cross_text_features_ar"],
                                   atol=ATOL, rtol=0)


def test_final_logits_each_image_alone_and_batched(fixture):
    """The final logits up to each reading's end (refinement skips the queries past every reading's EOS; the
    full-width logits are compared in the fixed-length test below)."""
    from conftest import reading_stops

    model, inputs, out, expected, _ = fixture
    x, theirs = inputs["pixel_values"], out["final_logits_bs1"]
    stops = reading_stops(theirs, torch.full((len(x),), theirs.shape[1]), model.tokenizer.eos_id)
    with torch.inference_mode():
        batch = model.decode(x)
        assert reading_stops(batch.logits, batch.lengths, model.tokenizer.eos_id) == stops
        for i, stop in enumerate(stops):
            alone = model.decode(x[i:i + 1])
            assert reading_stops(alone.logits, alone.lengths, model.tokenizer.eos_id) == [stop]
            torch.testing.assert_close(alone.logits[0, :stop], theirs[i, :stop], atol=ATOL, rtol=0)
            torch.testing.assert_close(batch.logits[i, :stop], theirs[i, :stop], atol=ATOL, rtol=0)
        texts = [r.text for r in model.read(x)]
    assert texts == expected["final_strings_bs1"]


def test_fixed_length_validation_path(fixture):
    model, inputs, out, expected, _ = fixture
    with torch.inference_mode():
        result = model.decode(inputs["pixel_values"], max_length=25, early_exit=False)
        texts = [r.text for r in model.read(inputs["pixel_values"], max_length=25, early_exit=False)]
    torch.testing.assert_close(result.logits, out["final_logits_max_length25"], atol=ATOL, rtol=0)
    assert texts == expected["final_strings_max_length25"]


def test_training_loss_for_recorded_and_seeded_permutations(fixture):
    model, inputs, out, expected, _ = fixture
    labels = expected["train"]["labels"]
    with torch.no_grad():
        loss = model(inputs["train_pixel_values"], labels, perms=out["train_perms"]).loss
        torch.manual_seed(expected["train"]["torch_seed_before_training_step"])
        seeded = model(inputs["train_pixel_values"], labels).loss
    assert loss.item() == pytest.approx(expected["train"]["loss"], abs=1e-5)
    assert seeded.item() == pytest.approx(expected["train"]["loss"], abs=1e-5)
