"""The profiling cache: a tune killed mid-profile with SIGKILL resumes from what it finished and
writes the same plan.json; the fp32 export is kept and read back; a corrupted entry (JSON or the
export's bytes) is recomputed; --no-cache bypasses it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = str(ROOT / "models" / "digits_resnet.py")


def _tune(tmp_path: Path, out: str, cache: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "AUTOPREC_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "autoprec", "tune", MODEL, "--profile-mode", "exact",
                             "--no-timing", "--formats", "bf16", "--out", out, *extra], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("exact-*.json"))


def _reused(stdout: str) -> tuple[int, int]:
    m = re.search(r"profile cache: reused (\d+) of (\d+) result", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


def test_a_tune_killed_mid_profile_resumes_and_writes_the_same_plan(tmp_path: Path) -> None:
    fresh = _tune(tmp_path, "fresh", tmp_path / "cache_fresh")
    out, err = fresh.communicate(timeout=900)
    assert fresh.returncode == 0, err
    layers = len(_entries(tmp_path / "cache_fresh"))
    # the fp32 metric, each layer, the whole profile, the fp32 export
    assert layers > 3 and _reused(out) == (0, layers + 3)
    assert len(list((tmp_path / "cache_fresh").rglob("fp32_export-*.bin"))) == 1

    cache = tmp_path / "cache"
    killed = _tune(tmp_path, "resumed", cache)
    deadline = time.monotonic() + 600
    while len(_entries(cache)) < 2 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    finished = len(_entries(cache))
    assert 2 <= finished < layers, f"killed after {finished} of {layers} layers"
    again = _tune(tmp_path, "resumed", cache)
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0, err
    hits, total = _reused(out)
    assert hits >= finished + 1 and hits < total  # the fp32 metric and the finished layers
    assert (tmp_path / "resumed" / "plan.json").read_bytes() == (tmp_path / "fresh" / "plan.json").read_bytes()

    # all cached now, the export too: it is read back and the tuned model is the same file
    fourth = _tune(tmp_path, "cached", cache)
    out, err = fourth.communicate(timeout=900)
    assert fourth.returncode == 0, err
    assert _reused(out) == (3, 3)  # the fp32 metric, the whole profile, the export: no layer re-read
    for name in ("plan.json", "digits_resnet.tuned.onnx"):
        assert (tmp_path / "cached" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name

    # a corrupted entry is found and recomputed: a JSON result and the export's bytes
    victim = next(cache.rglob("profile.json"))
    entry = json.loads(victim.read_text())
    entry["value"]["errors"] = {}
    victim.write_text(json.dumps(entry))
    blob = next(cache.rglob("fp32_export-*.bin"))
    blob.write_bytes(blob.read_bytes()[:-7])
    third = _tune(tmp_path, "third", cache)
    out, err = third.communicate(timeout=900)
    assert third.returncode == 0, err
    assert "2 corrupt entries recomputed" in out
    for name in ("plan.json", "digits_resnet.tuned.onnx"):
        assert (tmp_path / "third" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    nocache = _tune(tmp_path, "nocache", cache, "--no-cache")
    out, err = nocache.communicate(timeout=900)
    assert nocache.returncode == 0 and "profile cache" not in out
