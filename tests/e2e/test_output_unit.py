"""`autoprec tune`'s output folder is a unit: killed while writing it, the older folder is intact,
and the next run cleans what the killed one left; two runs into one folder do not interleave."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from autoprec.core.io import OutputFolder

ROOT = Path(__file__).resolve().parents[2]
MODEL = str(ROOT / "models" / "cancer_mlp.py")


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def _tune(tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "autoprec", "tune", MODEL, "--out", "out"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _writing(tmp_path: Path) -> bool:
    """Whether a run has begun writing its files (into its staging folder)."""
    return any(any(s.iterdir()) for s in tmp_path.glob(".out.staging-*"))


def test_a_tune_killed_while_writing_leaves_the_old_folder_intact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("the older run's plan")
    (out / "report.md").write_text("the older run's report")
    before = _listing(tmp_path)
    for _ in range(3):  # the writing takes about a second; catch it
        proc = _tune(tmp_path)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not _writing(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed while writing"
    assert {k: v for k, v in _listing(tmp_path).items() if not k.startswith(".out.")} == before
    assert list(tmp_path.glob(".out.staging-*"))  # what the killed run left
    done = _tune(tmp_path)
    assert done.wait(timeout=600) == 0, done.stderr.read().decode() if done.stderr else ""
    after = _listing(tmp_path)
    assert not [k for k in after if k.startswith(".")], after.keys()  # leftovers and lock gone
    assert after["out/plan.json"] != before["out/plan.json"] and "out/report.md" in after


def test_two_runs_into_one_folder_do_not_interleave(tmp_path: Path) -> None:
    with OutputFolder(tmp_path / "out").locked():  # a run writing out/ (this test process)
        second = subprocess.run([sys.executable, "-m", "autoprec", "tune", MODEL, "--out", "out"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"error: another autoprec run (pid {os.getpid()}) is writing out: wait for it "
                                     "to finish or choose another --out folder")
    assert _listing(tmp_path) == {}  # the lock is gone with the first run, and the second wrote nothing
