"""The authors' checkpoints: formats, the full B/16 key layout, CLI and loading, and clear failures."""

import pytest
import torch
from safetensors.torch import load_file

from clip4str.cli import main
from clip4str.convert import convert_state, load_authors_checkpoint, read_authors_state
from clip4str.inference import Recognizer


@pytest.fixture
def fixture_state(parity_dir):
    return load_file(str(parity_dir / "weights.safetensors"))


def test_lightning_ckpt_and_plain_pt_load_alike(fixture_state, tmp_path, parity_dir):
    torch.save({"epoch": 3, "global_step": 10, "state_dict": fixture_state}, tmp_path / "clip4str_base16x16.ckpt")
    torch.save(fixture_state, tmp_path / "model.pt")
    a, _ = load_authors_checkpoint(tmp_path / "clip4str_base16x16.ckpt")
    b, _ = load_authors_checkpoint(tmp_path / "model.pt")
    x = load_file(str(parity_dir / "inputs.safetensors"))["pixel_values"]
    out = load_file(str(parity_dir / "outputs.safetensors"))
    with torch.inference_mode():  # the fixed-length path: every position of the refined logits is computed
        for model in (a, b):
            logits = model.decode(x, max_length=25, early_exit=False).logits
            torch.testing.assert_close(logits, out["final_logits_max_length25"], atol=1e-5, rtol=0)


def test_convert_command_and_direct_loading(fixture_state, tmp_path, parity_dir, capsys):
    import json
    torch.save({"state_dict": fixture_state}, tmp_path / "theirs.ckpt")
    assert main(["convert", str(tmp_path / "theirs.ckpt"), str(tmp_path / "ours")]) == 0
    assert "unused source keys: none" in capsys.readouterr().out
    expected = json.loads((parity_dir / "expected.json").read_text())
    image = parity_dir / "images" / expected["images"][4]
    # Our folder and their file read the same; their file needs no conversion step first.
    converted = Recognizer.from_pretrained(tmp_path / "ours").read(image)[0].text
    direct = Recognizer.from_pretrained(tmp_path / "theirs.ckpt").read(image)[0].text
    assert converted == direct
    assert main(["read", str(image), "--model", str(tmp_path / "theirs.ckpt")]) == 0


def test_full_b16_key_layout_maps_completely(parity_dir):
    """Every key of their full-size B/16 model maps onto our b16 module with the same shape."""
    from clip4str import create_model
    rows = (parity_dir / "vl4str_b16_state_dict_keys.tsv").read_text().splitlines()[1:]
    shapes = {k: tuple(int(d) for d in s.split("x")) if s != "()" else () for k, s, _ in (r.split("\t") for r in rows)}
    state = {k: torch.empty(s) for k, s in shapes.items()}
    from clip4str.convert import authors_config
    cfg = authors_config(state)
    assert cfg.clip["vision_cfg"]["width"] == 768 and cfg.clip["vision_cfg"]["layers"] == 12
    assert cfg.embed_dim == 512 and cfg.clip["vision_cfg"]["patch_size"] == 16
    from clip4str.convert import architecture_name
    assert architecture_name(cfg) == "ViT-B/16"
    model = create_model("b16")
    ours, unused = convert_state(state, model, "b16 layout")
    assert unused == [] and set(ours) == set(model.state_dict())


def test_failures_are_clear(fixture_state, tmp_path):
    data = (tmp_path / "x.pt")
    torch.save(fixture_state, data)
    (tmp_path / "cut.pt").write_bytes(data.read_bytes()[:10000])
    with pytest.raises(ValueError, match="truncated"):
        read_authors_state(tmp_path / "cut.pt")
    clip_only = {k[len("clip_model."):]: v for k, v in fixture_state.items() if k.startswith("clip_model.")}
    torch.save(clip_only, tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="a CLIP model"):
        read_authors_state(tmp_path / "clip.pt")
    torch.save({"encoder.pos_embed": torch.zeros(1), "decoder.layers.0.norm1.weight": torch.zeros(1)},
               tmp_path / "parseq.pt")
    with pytest.raises(ValueError, match="PARSeq"):
        read_authors_state(tmp_path / "parseq.pt")
    missing = dict(fixture_state)
    del missing["cross_decoder.layers.0.norm_q.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="cross_decoder.layers.0.norm_q.weight"):
        load_authors_checkpoint(tmp_path / "missing.pt")
    no_head = {k: v for k, v in fixture_state.items() if k != "visual_decoder.head.weight"}
    torch.save(no_head, tmp_path / "nohead.pt")
    with pytest.raises(ValueError, match="visual_decoder.head.weight"):
        load_authors_checkpoint(tmp_path / "nohead.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_authors_checkpoint(tmp_path / "absent.ckpt")
