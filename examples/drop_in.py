"""Drop one of our losses into a training loop you already have.

(a) A plain PyTorch loop: a small MLP on scikit-learn's digits (8x8 images as 64-d vectors),
    trained with ``losses.InfoNCE`` on the class labels and with
    ``losses.get("triplet", mining="semihard")``; the loss goes down and Recall@1 on held-out
    digits goes up (``evaluation.retrieval.retrieval_metrics``).

(b) A pytorch-metric-learning (PML) setup, unchanged except for one import:
    ``from losses import drop_in as losses`` gives 16 of PML's class names (the README lists
    them) with PML's constructor arguments and defaults; this script uses ``NTXentLoss``,
    ``SupConLoss``, ``TripletMarginLoss``, ``ContrastiveLoss`` and ``NPairsLoss``. They take
    PML's positional call,
    ``loss_func(embeddings, labels, miner(embeddings, labels))``, give PML's numbers on the same
    batch, return PML's zero (in the graph) on a batch without a positive pair, and work inside
    PML's ``CrossBatchMemory``. PML's ``DistributedLossWrapper`` insists on its own base class:
    ``losses.to_pml(loss)`` is the bridge (or gather with ``contrastive.distributed``).

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
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import losses
from evaluation.retrieval import retrieval_metrics
from losses import drop_in


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
    loss is called PML's way, ``loss_fn(emb, labels, miner(emb, labels))``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    log_at = {round(i * (steps - 1) / 4) for i in range(5)}
    first = last = float("nan")
    for step in range(steps):
        idx = torch.randperm(len(y), generator=g)[:batch_size]
        emb, labels = model(x[idx]), y[idx]
        # the miner's tuple goes to the loss, which owns what it means (contrastive.pairs)
        loss = loss_fn(emb, labels, None if miner is None else miner(emb, labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = loss.item()
        first = last if step == 0 else first
        if step in log_at:
            print(f"[{tag}] step {step:4d}  loss {last:.4f}")
    return first, last


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
    pairs = [
        ("NTXentLoss(temperature=0.1)", drop_in.NTXentLoss(temperature=0.1),
         pml_losses.NTXentLoss(temperature=0.1)),
        ("SupConLoss(temperature=0.1)", drop_in.SupConLoss(temperature=0.1),
         pml_losses.SupConLoss(temperature=0.1)),
        ("TripletMarginLoss(margin=0.05)", drop_in.TripletMarginLoss(margin=0.05),
         pml_losses.TripletMarginLoss(margin=0.05)),
        ("ContrastiveLoss()", drop_in.ContrastiveLoss(), pml_losses.ContrastiveLoss()),
        ("NPairsLoss()", drop_in.NPairsLoss(), pml_losses.NPairsLoss()),
    ]
    for name, ours, theirs in pairs:
        a, b = float(ours(emb, y)), float(theirs(emb, y))
        print(f"[pml] same batch, {name}: ours {a:.6f}  pml {b:.6f}  |diff| {abs(a - b):.1e}")

    # PML's idiom, three positional arguments: loss_func(embeddings, labels, indices_tuple)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    mined = miner(emb, y)
    ours, theirs = drop_in.SupConLoss(temperature=0.1), pml_losses.SupConLoss(temperature=0.1)
    print(f"[pml] loss_func(emb, labels, miner(emb, labels)): ours {float(ours(emb, y, mined)):.6f}"
          f"  pml {float(theirs(emb, y, mined)):.6f}")

    # a batch without a positive pair: PML's zero loss, still in the graph
    leaf = emb.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zero = drop_in.NTXentLoss()(leaf, torch.arange(64))
    zero.backward()
    zero = zero.detach()
    print(f"[pml] batch without positives: ours {zero.item():.1f} (grad norm "
          f"{float(leaf.grad.norm()):.1f}, {len(caught)} warning)  pml "
          f"{float(pml_losses.NTXentLoss()(emb, torch.arange(64))):.1f}")

    # CrossBatchMemory checks the class name and calls loss(emb, labels, idx, mem_emb, mem_lab)
    values = []
    for loss in (drop_in.NTXentLoss(temperature=0.1), pml_losses.NTXentLoss(temperature=0.1)):
        xbm = pml_losses.CrossBatchMemory(loss, embedding_size=16, memory_size=96)
        values.append([float(xbm(emb[i:i + 32], y[i:i + 32])) for i in (0, 32, 0)])
    print("[pml] CrossBatchMemory(NTXentLoss, 16, memory_size=96), 3 steps: ours "
          + " ".join(f"{v:.6f}" for v in values[0]) + "  pml "
          + " ".join(f"{v:.6f}" for v in values[1]))

    try:
        DistributedLossWrapper(drop_in.SupConLoss())
        print("[pml] DistributedLossWrapper(ours) -> accepted")
    except TypeError as exc:
        print(f"[pml] DistributedLossWrapper(ours) -> TypeError: {exc}")
    wrapped = DistributedLossWrapper(losses.to_pml(drop_in.SupConLoss(temperature=0.1)))
    with warnings.catch_warnings():  # PML warns that it is not running distributed
        warnings.simplefilter("ignore", UserWarning)
        w = float(wrapped(emb, y, mined))
    print(f"[pml] DistributedLossWrapper(losses.to_pml(ours)) with mined pairs: {w:.6f} "
          f"(unwrapped {float(ours(emb, y, mined)):.6f})")


def pml_training(data, args) -> None:
    x_tr, y_tr, x_te, y_te = data
    for tag, make_loss in (
        ("ours+miner", lambda: drop_in.SupConLoss(temperature=0.1)),
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
