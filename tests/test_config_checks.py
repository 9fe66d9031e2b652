"""Experiment configs: a wrong value is one line naming its key, before anything is built."""

import pytest

from clip4str.train.checks import matches
from clip4str.train.config import load_config


@pytest.mark.parametrize(("override", "message"), [
    ("train.max_steps=abc", "train.max_steps must be an integer, got 'abc'"),
    ("train.max_steps=-5", "train.max_steps must be > 0"),
    ("train.accumulate_grad_batches=0", "train.accumulate_grad_batches must be > 0"),
    ("train.threads=abc", "train.threads must be an integer or null"),
    ("train.compile_encoder='false'", "train.compile_encoder must be true or false"),
    ("data.batch_size=0", "data.batch_size must be > 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("data.fonts=/usr/share/fonts", "data.fonts must be a list of strings or null"),
    ("data.train=[{path: synth, weight: 0}]", "weight must be a number > 0"),
    ("data.train=[{path: synth, holdout: 1}]", "holdout must be in [0, 1)"),
    ("data.train=[{path: synth, wieght: 1}]", "unknown key(s) ['wieght']"),
    ("data.train=[{path: synth, augment: {prob: 2}}]", "data.train entry synth: augment.prob must be a number in"),
    ("data.train=[{path: synth, augment: {ops: 2}}]", "data.train entry synth: augment takes a mapping of"),
    ("model.init=5", "model.init must be a string"),
    ("model.decoder_depth=abc", "model.decoder_depth must be an integer"),
    ("model.image_mean=[1, 2, x]", "model.image_mean must be a list of numbers"),
    ("train.max_steps.x=1", "train.max_steps must be an integer, got {"),
    ("train.precision=16", "train.precision must be a string, got 16 (write it in quotes"),
    ("train.warmup_pct=1.5", "train.warmup_pct must be in [0, 1]"),
    ("model.dropout=2", "model.dropout must be in [0, 1]"),
    ("model.decoder_heads=0", "model.decoder_heads must be > 0"),
    ("train.devices=0", "train.devices must be a count >= 1"),
    ("data.batch_size=10000000000", "data.batch_size must be at most 65536"),
    ("train.threads=100000000", "train.threads must be at most 4096"),
    ("train.devices=[0,0]", "train.devices must be a count >= 1"),
    ("train.devices=[]", "train.devices must be a count >= 1"),
])
def test_a_wrong_value_is_named(override, message):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_yaml_and_sections_that_are_not_mappings(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  bad: [unclosed\n")
    with pytest.raises(ValueError, match="a.yaml is not valid YAML"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("model: [1, 2]\n")
    with pytest.raises(ValueError, match="section 'model' must be a mapping"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("train:\n")  # an empty section takes overrides
    assert load_config(tmp_path / "c.yaml", ["train.max_steps=2"]).train.max_steps == 2


def test_good_values_pass():
    cfg = load_config(None, ["train.max_minutes=1.5", "train.threads=null", "data.val=[a, b]", "train.devices=auto",
                             "model.clip={vision_cfg: {image_size: [32, 160]}}", "train.base_lr=1e-3"])
    assert cfg.train.max_minutes == 1.5 and cfg.data.val == ["a", "b"] and cfg.train.devices == "auto"
    assert cfg.train.base_lr == 1e-3  # YAML 1.1 reads 1e-3 (no dot) as a string
    assert load_config(None, ["train.devices=[0, 1]"]).train.devices == [0, 1]
    assert matches(3, float) and not matches(True, int) and matches([1, 2.5], tuple[float, ...])


@pytest.mark.parametrize("argv", [
    ["serve", "--port", "70000"], ["serve", "--port", "-1"], ["serve", "--max-upload-mb", "inf"],
    ["serve", "--max-upload-mb", "nan"], ["serve", "--max-upload-mb", "0"], ["serve", "--body-timeout", "-1"],
    ["bench", "--threads", "-1"], ["bench", "--fixed-length", "-3"], ["read", "x.png", "--device", "meta"],
    ["read", "x.png", "--device", "cuda:x"], ["zeroshot", "x.png", "--candidates", "a", "--template", "{}{x}"],
    ["zeroshot", "x.png", "--candidates", "a", "--template", "no slot"],
    ["data", "synth", "out", "--count", "2", "--seed", "-1"],
])
def test_an_option_out_of_range_is_a_usage_error_naming_it(argv, capsys):
    from clip4str.cli import main

    with pytest.raises(SystemExit) as code:
        main(argv)
    option = argv[-2]  # each case ends with the option and its value
    err = capsys.readouterr().err
    assert code.value.code == 2 and f"argument {option}" in err and "Traceback" not in err


def test_a_yaml_alias_bomb_or_an_override_that_is_not_yaml_is_one_short_line(tmp_path):
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]  # nine levels of nine: 387M strings once expanded
    levels += [f"&{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    (tmp_path / "bomb.yaml").write_text("data:\n  fonts: [" + ", ".join(levels) + "]\n")
    with pytest.raises(ValueError, match="data.fonts must be a list of strings") as err:
        load_config(tmp_path / "bomb.yaml")  # the message's repr expanded every alias (MemoryError)
    assert len(str(err.value)) < 400
    for override in ("train.out_dir=@runs/x", "data.val=[a,b", "model.charset=*#abc"):
        with pytest.raises(ValueError, match="the value is not valid YAML.*quote it") as err:
            load_config(None, [override])
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--backend", "onnx", "--preset", "tiny"], "--preset builds an untrained PyTorch model"),
    (["bench", "--backend", "onnx", "--precision", "bf16"], "--backend onnx runs fp32"),
    (["bench", "--backend", "onnx", "--fixed-length", "1000", "--repeats", "1", "--batch-size", "1"],
     "this model decodes at most 25 characters"),
])
def test_bench_refuses_what_it_would_mislabel(argv, message, capsys):
    """`bench --backend onnx` benched the built-in export under the preset's name, fp32 under a bf16 label, and
    25 characters under 'exactly 1000'."""
    from clip4str.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_charset_with_nothing_to_draw_is_named(tmp_path, capsys):
    from clip4str.cli import main

    assert main(["data", "synth", str(tmp_path / "s"), "--count", "2", "--charset", " "]) == 2
    assert "--charset ' ' holds no character to draw" in capsys.readouterr().err
