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


def test_any_iterable_of_images_is_read_and_bad_options_are_refused_by_name():
    import pytest

    rec = Recognizer.from_pretrained()
    texts = [r.text for r in rec.read(p for p in [EXAMPLE, str(EXAMPLE)])]
    assert texts == ["hello", "hello"] and [r.text for r in rec.iter_read(iter([EXAMPLE]))] == ["hello"]
    assert rec.read([]) == [] and rec.read(EXAMPLE)[0].text == "hello"
    for options, message in [({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
                             ({"refine_iters": 9}, "refine_iters must be an integer from 0 to 8, got 9"),
                             ({"refine_iters": -1}, "refine_iters must be an integer from 0 to 8"),
                             ({"second_look": "no"}, "second_look must be True or False, got 'no'"),
                             ({"max_windows": 0}, "max_windows must be an integer >= 1"),
                             ({"mode": "NAR"}, "mode must be 'ar' or 'nar', got 'NAR'")]:
        with pytest.raises(ValueError, match=message):
            rec.read([EXAMPLE], **options)
    wide = rec.read([EXAMPLE], max_windows=1, second_look=False)  # one window: read as it is
    assert wide[0].text == "hello"
    import io

    import numpy as np
    assert rec.read([EXAMPLE], batch_size=np.int64(2), refine_iters=np.int32(1))[0].text == "hello"
    one = rec.read(io.BytesIO(b"line 1\nline 2\n"))  # a file object is one (unreadable) input, not its lines
    assert len(one) == 1 and one[0].error
