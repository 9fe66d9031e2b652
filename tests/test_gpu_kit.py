"""A CPU rehearsal of the GPU kit: scripts/gpu/bundle.sh packs a small bundle, scripts/gpu/train.sh trains the
built-in model for a budget of seconds from it, exports float16 weights and benches them; the weights load and
read. A hang or a missing file fails here, not on a lent GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_bundle_then_budgeted_training_exports_weights_that_read(tmp_path):
    for db in ("lmdb", "ic13-train"):
        if not (SHARED / "realtrain" / db / "data.mdb").is_file():
            pytest.skip(f"{SHARED / 'realtrain' / db} not found (../shared beside the clone)")
    if not any(p.suffix in {".ttf", ".otf"} for p in Path("/usr/share/fonts").rglob("*")):
        pytest.skip("no fonts under /usr/share/fonts to bundle (apt-get install fonts-dejavu-core)")
    env = {**os.environ, "PYTHON": sys.executable, "MAX_FONTS": "3", "MAX_BACKGROUNDS": "2", "WHEELS": "0",
           "XZ_OPT": "-0", "OUT": str(tmp_path / "out")}
    bundle = tmp_path / "bundle"
    subprocess.run(["bash", "scripts/gpu/bundle.sh", str(bundle)], cwd=ROOT, env=env, check=True, timeout=300,
                   capture_output=True)
    assert {p.name for p in bundle.iterdir()} >= {"fonts.tar.xz", "bgs.tar", "realtrain.tar.xz"}
    cpu = ["train.accelerator=cpu", "data.batch_size=8", "data.num_workers=2", "data.synth_val_size=8",
           "train.val_every_steps=100000", f"train.out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(["bash", "scripts/gpu/train.sh", "0.3", str(bundle), *cpu], cwd=ROOT, env=env,
                          timeout=480, capture_output=True, text=True)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    # The bundle's fonts, not the machine's (MAX_FONTS=3; a math or symbol font among them is left out)
    fonts = re.search(r"synthetic words: (\d+) fonts", log)
    assert "] done" in log and fonts and 1 <= int(fonts.group(1)) <= 3, log[-3000:]
    weights = tmp_path / "weights"
    weights.mkdir()
    parts = sorted((tmp_path / "out" / "w").glob("model.safetensors.part-*"))
    assert parts
    (weights / "model.safetensors").write_bytes(b"".join(p.read_bytes() for p in parts))
    (weights / "config.json").write_bytes((tmp_path / "out" / "w" / "config.json").read_bytes())
    from clip4str.inference import Recognizer
    from clip4str.weights import read_checkpoint_config
    provenance = read_checkpoint_config(weights)[0]["provenance"]
    assert provenance["config"]["train"]["max_minutes"] == 0.3 and provenance["steps"] > 0
    assert Recognizer.from_pretrained(weights).read([ROOT / "examples" / "hello.png"])[0].text
    assert (tmp_path / "out" / "metrics.csv").is_file()
    # A second call on the same host whose training fails (here: a data path that is not there) exports nothing:
    # it once exported the first call's last.ckpt and reported success.
    env["OUT"] = str(tmp_path / "out2")
    failed = subprocess.run(["bash", "scripts/gpu/train.sh", "0.3", str(bundle), *cpu,
                             f"data.train=[{{path: {tmp_path / 'absent'}}}]"], cwd=ROOT, env=env, timeout=300,
                            capture_output=True, text=True)
    log = (tmp_path / "out2" / "log.txt").read_text()
    assert failed.returncode != 0 and "nothing to export" in log, log[-3000:]
    assert not list((tmp_path / "out2" / "w").glob("model.safetensors*"))
