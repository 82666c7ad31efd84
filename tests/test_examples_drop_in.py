"""examples/drop_in.py: the script runs end to end, and every PML comparison it prints shows
PML's numbers (same batch, miner idiom, batch without positives, CrossBatchMemory,
DistributedLossWrapper through ``losses.to_pml``, and a mined training run step by step)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "drop_in.py"


def _floats(pattern, text):
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return [float(v) for v in m.groups()]


@pytest.fixture(scope="module")
def output():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--batch-size", "64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_training_runs_print_loss_and_recall(output):
    for tag in ("plain/infonce", "plain/triplet-semihard", "pml/ours+miner",
                "pml/pml-supcon+miner"):
        first, last, before, after = _floats(
            rf"\[{re.escape(tag)}\] loss (\S+) -> (\S+); test Recall@1 (\S+) -> (\S+)", output)
        assert all(0.0 <= r <= 1.0 for r in (before, after)), tag
    assert re.search(r"^done in [\d.]+ s$", output, re.M)


def test_same_numbers_as_pml(output):
    for name in ("NTXentLoss", "SupConLoss", "TripletMarginLoss", "ContrastiveLoss",
                 "NPairsLoss"):
        ours, theirs, diff = _floats(
            rf"\[pml\] same batch, {name}\(.*\): ours (\S+)  pml (\S+)  \|diff\| (\S+)", output)
        assert abs(ours - theirs) < 1e-5 and diff < 1e-5 and ours > 0, name
    ours, theirs = _floats(r"miner\(emb, labels\)\): ours (\S+)  pml (\S+)", output)
    # printed to 6 decimals: float32 rounding (~1e-7 relative) can move the last digit
    assert ours == pytest.approx(theirs, abs=2e-6)
    ours, grad, n_warn, theirs = _floats(
        r"batch without positives: ours (\S+) \(grad norm (\S+), (\d+) warning\)  pml (\S+)",
        output)
    assert ours == theirs == grad == 0.0 and n_warn == 1
    m = re.search(r"CrossBatchMemory\(NTXentLoss.*3 steps: ours (.*)  pml (.*)$", output, re.M)
    assert m, output
    ours = [float(v) for v in m.group(1).split()]
    theirs = [float(v) for v in m.group(2).split()]
    assert len(ours) == 3 and ours == pytest.approx(theirs, abs=1e-6)


def test_distributed_loss_wrapper_through_to_pml(output):
    assert ("DistributedLossWrapper(ours) -> TypeError: The input loss must extend "
            "BaseMetricLossFunction") in output
    wrapped, plain = _floats(
        r"DistributedLossWrapper\(losses.to_pml\(ours\)\) with mined pairs: (\S+) "
        r"\(unwrapped (\S+)\)", output)
    assert wrapped == plain


def test_mined_training_run_equals_pml_step_by_step(output):
    ours = [float(v) for v in re.findall(r"\[pml/ours\+miner\] step\s+\d+\s+loss (\S+)", output)]
    theirs = [float(v) for v in
              re.findall(r"\[pml/pml-supcon\+miner\] step\s+\d+\s+loss (\S+)", output)]
    assert len(ours) == 3 and ours == pytest.approx(theirs, rel=1e-4)
