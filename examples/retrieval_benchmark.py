"""The standard deep-metric-learning retrieval benchmark, from a local data path.

    # CUB-200-2011 (classes 1-100 train, 101-200 test), ImageNet-pretrained ResNet-50 weights
    # from a local file, three losses, two seeds:
    python examples/retrieval_benchmark.py --dataset cub200 --data-dir ~/data \
        --backbone resnet50 --weights ~/weights/resnet50.pth --losses infonce,triplet,npair

    # without a data path it runs the embedded default (digits, MLP) in about a minute
    python examples/retrieval_benchmark.py --steps 200 --seeds 0

Each (loss, seed) cell is trained under the same protocol (batches of P classes x m images,
AdamW, cosine schedule) and evaluated with Recall@K, P@1, R-Precision, MAP@R on the test split
(query = reference, self excluded; the held-out classes of the image benchmarks, held-out
images of every class for digits), NMI/AMI, a linear probe and weighted k-NN; the table
is printed and written with results.json/.csv and plots under --output. Re-running the same
command skips the cells already finished with the same settings (see contrastive.app.compare).

The batch, m, learning rate and embedding size default to the usual values for the image
benchmarks (128 = 32 classes x 4, lr 1e-4, 128-d) and to the digits defaults (64 = 8 classes x 8,
lr 1e-3, 64-d) for digits, whose 10 classes cannot fill a batch of 32 classes.

Exit status: 0 done, 2 a mistake in the arguments or the data path (one ``error:`` line), 3 some
cell failed (its reason on stderr and in results.md).
"""

from __future__ import annotations

import argparse
import sys

from contrastive.app.compare import DEFAULT_LOSSES, CompareConfig, compare
from contrastive.app.config import UserError

#: (batch_size, m_per_class, lr, dim) per kind of data set.
DEFAULTS = {"digits": (64, 8, 1e-3, 64), "images": (128, 4, 1e-4, 128)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits",
                   help="digits, cub200, cars196, sop, inshop, folder, mnist, cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--backbone", default=None, help="timm name (default: mlp for digits, "
                   "resnet50 otherwise)")
    p.add_argument("--weights", default=None, help="local checkpoint for the backbone")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--losses", default=",".join(DEFAULT_LOSSES))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=None, help="default 64 digits, 128 images")
    p.add_argument("--m-per-class", type=int, default=None, help="default 8 digits, 4 images")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 digits, 1e-4 images")
    p.add_argument("--dim", type=int, default=None, help="default 64 digits, 128 images")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--output", default="runs/retrieval_benchmark")
    args = p.parse_args(argv)

    digits = args.dataset == "digits"
    batch, m, lr, dim = DEFAULTS["digits" if digits else "images"]
    backbone = args.backbone or ("mlp" if digits else "resnet50")
    train: dict = {"m_per_class": args.m_per_class or m, "lr": args.lr or lr,
                   "dim": args.dim or dim, "weights": args.weights}
    if not digits:
        train.update(augment=True, normalize=True, eval_every=max(args.steps // 10, 1),
                     backbone_kwargs={"img_size": args.image_size}
                     if backbone.startswith("vit") else {})
    try:
        cfg = CompareConfig.from_dict(dict(
            dataset=args.dataset, data_dir=args.data_dir, backbone=backbone,
            losses=args.losses, steps=args.steps, batch_size=args.batch_size or batch,
            seeds=args.seeds, output=args.output, train=train,
        ))
        res = compare(cfg)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(res["table"])
    files = ", ".join(str(f) for f in res["files"].values())
    print(f"wall time {res['wall_time_s']:.0f} s; files: {files}")
    if res["failed"]:
        for loss, seed, error in res["failed"]:
            print(f"failed: {loss} seed {seed}: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
