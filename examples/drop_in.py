"""Drop one of our losses into a training loop you already have.

(a) A plain PyTorch loop: a small MLP on scikit-learn's digits (8x8 images as 64-d vectors),
    trained with ``losses.InfoNCE`` on the class labels and with
    ``losses.get("triplet", mining="semihard")``; the loss goes down and Recall@1 on held-out
    digits goes up (``evaluation.retrieval.retrieval_metrics``).

(b) A pytorch-metric-learning (PML) setup. Our losses take PML's call shape
    ``loss(embeddings, labels, ref_emb=..., ref_labels=...)`` and give the same number as the
    matching PML loss on the same batch (InfoNCE = ``SupConLoss``; with two items per class also
    ``NTXentLoss``; ``Triplet`` = ``TripletMarginLoss``). A PML miner's output goes in by
    keyword, ``loss(emb, labels, indices_tuple=miner(emb, labels))`` (their third positional
    argument is ``ref_emb``). They are not ``BaseMetricLossFunction`` subclasses, so PML's
    ``DistributedLossWrapper`` needs a small adapter (or use our own gather,
    ``contrastive.distributed.all_gather_with_grad``). :class:`MinedPairs` below is that
    adapter, written against public APIs only:
    it keeps our critic and loss (``loss.scores`` / ``loss.compute``) and restricts the
    positive and negative masks to the pairs a PML miner returns.

Run::

    python examples/drop_in.py             # 150 steps per run, about 10 s on a laptop CPU
    python examples/drop_in.py --steps 20  # a quick smoke run
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import losses
from evaluation.retrieval import retrieval_metrics


# --------------------------------------------------------------------------- data and model
def load_data(seed: int):
    """Digits as float32 vectors in [0, 1]; a stratified 70/30 train/test split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x / 16.0, y, test_size=0.3, stratify=y, random_state=seed
    )
    t = lambda a, dt: torch.as_tensor(a, dtype=dt)
    return (t(x_tr, torch.float32), t(y_tr, torch.long), t(x_te, torch.float32),
            t(y_te, torch.long))


def make_encoder(seed: int, dim: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, dim))


@torch.no_grad()
def recall_at_1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Recall@1 of the test set against itself (each query's own row left out)."""
    model.eval()
    emb = model(x)
    model.train()
    return retrieval_metrics(emb, y, ks=(1,), metric="cosine")["recall_at_1"]


def train(model, loss_fn, x, y, *, steps, batch_size, seed, tag, miner=None, lr=1e-3):
    """The loop you already have: sample a batch, embed, loss, step. With a PML ``miner`` the
    loss is called PML's way, ``loss_fn(emb, labels, indices_tuple)``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    log_at = {round(i * (steps - 1) / 4) for i in range(5)}
    first = last = float("nan")
    for step in range(steps):
        idx = torch.randperm(len(y), generator=g)[:batch_size]
        emb, labels = model(x[idx]), y[idx]
        if miner is None:
            loss = loss_fn(emb, labels)
        else:
            loss = loss_fn(emb, labels, miner(emb, labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = loss.item()
        first = last if step == 0 else first
        if step in log_at:
            print(f"[{tag}] step {step:4d}  loss {last:.4f}")
    return first, last


# --------------------------------------------------------------------------- the PML adapter
class MinedPairs(BaseMetricLossFunction):
    """Use one of our losses where PML expects a ``BaseMetricLossFunction``.

    ``MinedPairs(losses.InfoNCE())(emb, labels, indices_tuple)``: our critic scores the batch
    against the reference set (the batch itself unless ``ref_emb`` is given), and our loss runs
    on the positive / negative masks intersected with the pairs in ``indices_tuple`` (any PML
    tuple: pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``). Without ``indices_tuple`` it
    equals our loss. Needs a loss whose score matrix is batch x reference (not
    ``MultiClassNPair``, which re-pairs the batch).
    """

    def __init__(self, loss: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.loss = loss

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self_ref = ref_emb is embeddings  # PML substitutes the batch when ref_emb is None
        if self_ref:
            s, pos, neg = self.loss.scores(embeddings, labels)
        else:
            s, pos, neg = self.loss.scores(embeddings, labels, ref_emb, ref_labels)
        if s.shape != (embeddings.shape[0], ref_emb.shape[0]):
            raise TypeError(
                f"MinedPairs needs a loss scoring batch x reference; {type(self.loss).__name__} "
                f"gave scores of shape {tuple(s.shape)}"
            )
        if indices_tuple is not None:
            a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
            mined_pos = torch.zeros_like(pos)
            mined_neg = torch.zeros_like(neg)
            mined_pos[a1, p] = True
            mined_neg[a2, n] = True
            pos, neg = pos & mined_pos, neg & mined_neg
        if not bool(pos.any()):  # the miner kept no positive pair: nothing to learn here
            value = embeddings.sum() * 0.0
        else:
            value = self.loss.compute(s, pos, neg)
        return {"loss": {"losses": value, "indices": None, "reduction_type": "already_reduced"}}


# --------------------------------------------------------------------------- the demo
def plain_pytorch(data, args) -> None:
    x_tr, y_tr, x_te, y_te = data
    print("== (a) a plain PyTorch training loop ==")
    for tag, make_loss in (
        ("infonce", lambda: losses.InfoNCE(temperature=0.1)),
        ("triplet-semihard", lambda: losses.get("triplet", mining="semihard")),
    ):
        model, loss_fn = make_encoder(args.seed), make_loss()
        before = recall_at_1(model, x_te, y_te)
        first, last = train(model, loss_fn, x_tr, y_tr, steps=args.steps,
                            batch_size=args.batch_size, seed=args.seed, tag=f"plain/{tag}")
        after = recall_at_1(model, x_te, y_te)
        print(f"[plain/{tag}] loss {first:.4f} -> {last:.4f}; "
              f"test Recall@1 {before:.3f} -> {after:.3f}")
    with torch.no_grad():  # the MI readout of the last InfoNCE-style critic, in nats
        r = losses.InfoNCE(temperature=0.1).readout(model(x_tr[: args.batch_size]),
                                                     y_tr[: args.batch_size])
    print(f"[plain] I_NCE readout on a training batch: {r['infonce']:.3f} nats "
          f"(at most log(batch - 1) = {np.log(args.batch_size - 1):.3f})")


def same_numbers_as_pml(args) -> None:
    print("== (b) inside a pytorch-metric-learning setup ==")
    g = torch.Generator().manual_seed(args.seed)
    emb = torch.randn(64, 16, generator=g)
    y = torch.arange(8).repeat_interleave(8)  # 8 classes x 8 per class
    y2 = torch.arange(32).repeat_interleave(2)  # 32 classes x 2 per class
    checks = [
        ("InfoNCE(t=0.1) vs SupConLoss(t=0.1), 8 per class",
         losses.InfoNCE(temperature=0.1)(emb, y), pml_losses.SupConLoss(temperature=0.1)(emb, y)),
        ("InfoNCE(t=0.1) vs NTXentLoss(t=0.1), 2 per class",
         losses.InfoNCE(temperature=0.1)(emb, y2),
         pml_losses.NTXentLoss(temperature=0.1)(emb, y2)),
        ("Triplet(margin=0.05) vs TripletMarginLoss(margin=0.05)",
         losses.Triplet(margin=0.05)(emb, y), pml_losses.TripletMarginLoss(margin=0.05)(emb, y)),
    ]
    for name, ours, theirs in checks:
        print(f"[pml] same batch, {name}: ours {float(ours):.6f}  pml {float(theirs):.6f}  "
              f"|diff| {abs(float(ours) - float(theirs)):.1e}")
    print("[pml] NTXentLoss differs from ours with more than 2 per class by design: PML averages "
          "over positive pairs with only that pair in the denominator; ours (= SupCon) averages "
          "over anchors with all positives in the denominator")

    # PML miners: pass the mined pairs/triplets by keyword (our third positional is ref_emb).
    ours = losses.InfoNCE(temperature=0.1)
    pairs = pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, y)
    mined_ours = float(ours(emb, y, indices_tuple=pairs))
    mined_pml = float(pml_losses.SupConLoss(temperature=0.1)(emb, y, pairs))
    print(f"[pml] ours(emb, labels, indices_tuple=mined) vs SupConLoss(emb, labels, mined): "
          f"{mined_ours:.6f} vs {mined_pml:.6f}")
    try:
        DistributedLossWrapper(ours)
        print("[pml] DistributedLossWrapper(ours) -> accepted")
    except TypeError as exc:
        print(f"[pml] DistributedLossWrapper(ours) -> TypeError (it needs a PML "
              f"BaseMetricLossFunction; use contrastive.distributed.all_gather_with_grad or "
              f"the adapter below): {exc}")

    # The adapter: equal to ours without a miner; accepted by PML's wrappers.
    adapted = MinedPairs(ours)
    plain, via = float(ours(emb, y)), float(adapted(emb, y))
    print(f"[pml] MinedPairs(ours) without a miner equals ours: {abs(plain - via) < 1e-6} "
          f"({via:.6f} vs {plain:.6f})")
    wrapped = DistributedLossWrapper(MinedPairs(ours))
    with warnings.catch_warnings():  # PML warns that it is not running distributed
        warnings.simplefilter("ignore", UserWarning)
        w = float(wrapped(emb, y, pairs))
    m = float(adapted(emb, y, pairs))
    print(f"[pml] DistributedLossWrapper(MinedPairs(ours)) with MultiSimilarityMiner pairs: "
          f"{w:.6f} (unwrapped {m:.6f}; {len(pairs[0])} positive and {len(pairs[2])} negative "
          f"pairs mined)")


def pml_training(data, args) -> None:
    x_tr, y_tr, x_te, y_te = data
    for tag, make_loss in (
        ("ours+miner", lambda: MinedPairs(losses.InfoNCE(temperature=0.1))),
        ("pml-supcon+miner", lambda: pml_losses.SupConLoss(temperature=0.1)),
    ):
        model, loss_fn = make_encoder(args.seed), make_loss()
        miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
        before = recall_at_1(model, x_te, y_te)
        first, last = train(model, loss_fn, x_tr, y_tr, steps=args.steps, miner=miner,
                            batch_size=args.batch_size, seed=args.seed, tag=f"pml/{tag}")
        after = recall_at_1(model, x_te, y_te)
        print(f"[pml/{tag}] loss {first:.4f} -> {last:.4f}; "
              f"test Recall@1 {before:.3f} -> {after:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python examples/drop_in.py --steps 50",
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (150)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.batch_size < 4:
        parser.error("--batch-size must be >= 4 (a batch needs positives and negatives)")
    t0 = time.perf_counter()
    data = load_data(args.seed)
    plain_pytorch(data, args)
    same_numbers_as_pml(args)
    pml_training(data, args)
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
