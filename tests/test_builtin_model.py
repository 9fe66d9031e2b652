"""The model shipped inside the package: small enough, loads with no path, reads the README's example."""

from pathlib import Path

from clip4str.inference import Recognizer, default_model_path

EXAMPLE = Path(__file__).parents[1] / "examples" / "hello.png"


def test_builtin_weights_are_small_and_say_how_they_were_trained():
    from clip4str.weights import read_checkpoint_config

    doc, weights = read_checkpoint_config(default_model_path())
    assert weights.stat().st_size <= 40 * 2**20
    assert doc["provenance"]["steps"] > 0 and doc["provenance"]["images_seen"] > 0


def test_builtin_model_reads_the_readme_example():
    result = Recognizer.from_pretrained().read([EXAMPLE])[0]
    assert result.text == "hello" and result.confidence > 0.5
