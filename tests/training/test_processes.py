"""`autoprec train` as separate processes: killed mid-epoch and resumed, and run on 2 processes
with torchrun (gloo on the CPU)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "models" / "digits_cnn.py")


def _env() -> dict[str, str]:
    # one thread everywhere: CPU kernels then sum in the same order in every process
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autoprec", "train", DIGITS, "--formats", "fp16", "--epochs", "2",
                           "--checkpoint-every", "10", "--out", str(out), *extra],
                          capture_output=True, text=True, env=_env(), timeout=600)


def _losses(path: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(open(path))]


def test_a_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = _train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "autoprec", "train", DIGITS, "--formats", "fp16", "--epochs", "2",
                             "--checkpoint-every", "10", "--out", str(killed_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    ckpt = killed_dir / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step < 45, f"the kill came at step {step}, not mid-way through the first epoch"
    assert not (killed_dir / "weights.pt").exists()
    again = _train(killed_dir)  # without --resume: refused, the checkpoint is kept
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _train(killed_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "whole" / "weights.pt")
    b = torch.load(killed_dir / "weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "train.csv").read_text() == (killed_dir / "train.csv").read_text()


#: digits_cnn trained with SGD: a model file's optimizer(), as `autoprec train` takes it
DIGITS_SGD = f"""import sys
sys.path.insert(0, {str(ROOT / "models")!r})
import torch
from digits_cnn import *


def optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
"""


def test_two_processes_agree_and_follow_the_one_process_loss_curve(tmp_path: Path) -> None:
    def run(out: Path, fmt: str, nproc: int, model: str = DIGITS) -> list[float]:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
            if nproc > 1 else [sys.executable]
        res = subprocess.run([*head, "-m", "autoprec", "train", model, "--formats", fmt, "--epochs", "1",
                              "--out", str(out)], capture_output=True, text=True, env=_env(), timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        if nproc > 1:
            assert f"on {nproc} process(es) (weights identical on all {nproc})" in res.stdout
        return _losses(out / "train.csv")

    # fp32: the same global batch of 32 as two halves of 16 gives the same curve up to float sums.
    # With SGD: AdamW divides each gradient by its running rms, so a weight whose gradient is ~0
    # moves by ~lr whichever sign the sum's last bit gives it (seen on an Intel Xeon: the curves
    # agree to 2e-7 for 12 steps, then 4e-4 apart at step 13; with SGD to 1e-7 over all 45 steps)
    sgd = tmp_path / "digits_sgd.py"
    sgd.write_text(DIGITS_SGD)
    one, two = run(tmp_path / "fp32_1", "fp32", 1, str(sgd)), run(tmp_path / "fp32_2", "fp32", 2, str(sgd))
    assert len(one) == len(two) == 45
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, two)), max(abs(a - b) / a for a, b in zip(one, two))
    # bf16: the ranks agree bit for bit (checked by the run itself) and start from the same loss;
    # later steps drift by bf16 roundings that float sums flip, as any change of batch split does
    one, two = run(tmp_path / "bf16_1", "bf16", 1), run(tmp_path / "bf16_2", "bf16", 2)
    assert abs(one[0] - two[0]) <= 1e-5 * one[0]
    assert abs(sum(one[-10:]) - sum(two[-10:])) <= 0.05 * sum(one[-10:])
