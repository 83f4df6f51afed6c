"""The profiling cache: a tune killed mid-profile with SIGKILL resumes from what it finished and
writes the same plan.json; a corrupted entry is recomputed; --no-cache bypasses it."""

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
    assert layers > 3 and _reused(out) == (0, layers + 2)  # the fp32 metric, each layer, the whole profile

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

    # all cached now: a rerun profiles nothing; a corrupted entry is found and recomputed
    victim = next(cache.rglob("profile.json"))
    entry = json.loads(victim.read_text())
    entry["value"]["errors"] = {}
    victim.write_text(json.dumps(entry))
    third = _tune(tmp_path, "third", cache)
    out, err = third.communicate(timeout=900)
    assert third.returncode == 0, err
    assert "1 corrupt entry recomputed" in out
    assert (tmp_path / "third" / "plan.json").read_bytes() == (tmp_path / "fresh" / "plan.json").read_bytes()
    nocache = _tune(tmp_path, "nocache", cache, "--no-cache")
    out, err = nocache.communicate(timeout=900)
    assert nocache.returncode == 0 and "profile cache" not in out
