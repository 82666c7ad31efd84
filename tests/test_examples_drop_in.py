"""examples/drop_in.py: the script runs end to end, and its PML adapter gives PML's numbers."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

import losses

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "drop_in.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("drop_in_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example():
    return _load_example()


def _batch(seed=0, n_cls=6, per=5, dim=12):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_cls * per, dim, generator=g, dtype=torch.float64)
    y = torch.arange(n_cls).repeat_interleave(per)
    return emb, y


@pytest.mark.parametrize("miner", ["pairs", "triplets", None])
def test_mined_pairs_adapter_equals_pml_supcon_with_the_same_miner(example, miner):
    emb, y = _batch()
    if miner == "pairs":
        idx = pml_miners.MultiSimilarityMiner(epsilon=0.05)(emb, y)
    elif miner == "triplets":
        idx = pml_miners.TripletMarginMiner(margin=0.5, type_of_triplets="semihard")(emb, y)
    else:
        idx = None
    e1 = emb.clone().requires_grad_(True)
    e2 = emb.clone().requires_grad_(True)
    ours = example.MinedPairs(losses.InfoNCE(temperature=0.1))(e1, y, idx)
    ref = pml_losses.SupConLoss(temperature=0.1)(e2, y, idx)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-8, atol=1e-12)


def test_mined_pairs_adapter_with_a_reference_set(example):
    emb, y = _batch(1)
    ref, ref_y = _batch(2)
    ours = example.MinedPairs(losses.InfoNCE(temperature=0.2))(emb, y, None, ref, ref_y)
    theirs = pml_losses.SupConLoss(temperature=0.2)(emb, y, ref_emb=ref, ref_labels=ref_y)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_mined_pairs_adapter_with_no_mined_positive_gives_a_zero_loss_with_a_graph(example):
    emb, y = _batch()
    emb.requires_grad_(True)
    empty = torch.empty(0, dtype=torch.long)
    loss = example.MinedPairs(losses.InfoNCE())(emb, y, (empty, empty, empty, empty))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(emb.grad) == 0


def test_mined_pairs_adapter_refuses_a_loss_that_repairs_the_batch(example):
    emb, y = _batch()
    with pytest.raises(TypeError, match="batch x reference"):
        example.MinedPairs(losses.MultiClassNPair())(emb, y)


def _floats(pattern, text):
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return [float(v) for v in m.groups()]


def test_script_runs_and_prints_the_expected_lines():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--batch-size", "64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    for tag in ("plain/infonce", "plain/triplet-semihard", "pml/ours+miner",
                "pml/pml-supcon+miner"):
        first, last, before, after = _floats(
            rf"\[{re.escape(tag)}\] loss (\S+) -> (\S+); test Recall@1 (\S+) -> (\S+)", out)
        assert all(0.0 <= r <= 1.0 for r in (before, after)), tag
    # Our losses give PML's numbers on the same batch.
    for name in ("SupConLoss", "NTXentLoss", "TripletMarginLoss"):
        ours, theirs, diff = _floats(
            rf"\[pml\] same batch, .*{name}.*: ours (\S+)  pml (\S+)  \|diff\| (\S+)", out)
        assert abs(ours - theirs) < 1e-5 and diff < 1e-5, name
    mined_ours, mined_pml = _floats(
        r"indices_tuple=mined\) vs SupConLoss\(emb, labels, mined\): (\S+) vs (\S+)", out)
    assert abs(mined_ours - mined_pml) < 1e-5
    assert "DistributedLossWrapper(ours) -> TypeError" in out
    assert "The input loss must extend BaseMetricLossFunction" in out
    assert "MinedPairs(ours) without a miner equals ours: True" in out
    wrapped, plain = _floats(
        r"DistributedLossWrapper\(MinedPairs\(ours\)\) with MultiSimilarityMiner pairs: "
        r"(\S+) \(unwrapped (\S+);", out)
    assert wrapped == plain
    # The adapter + miner trains exactly like PML's SupConLoss + the same miner.
    a = _floats(r"\[pml/ours\+miner\] loss (\S+) -> (\S+);", out)
    b = _floats(r"\[pml/pml-supcon\+miner\] loss (\S+) -> (\S+);", out)
    assert a == pytest.approx(b, rel=1e-4)
    assert re.search(r"^done in [\d.]+ s$", out, re.M)

