"""The evaluation protocol of a trained embedder: which sets are queried against which
(In-Shop's query set against its gallery; a split against itself otherwise), whether two splits
are class-disjoint, and :func:`evaluate_embedder`, which embeds them (on every rank under
``torchrun``) and asks :mod:`evaluation` for retrieval, clustering, probe and k-NN numbers."""

from __future__ import annotations

from torch import nn

from .. import distributed as dist_utils

__all__ = ["eval_sets", "class_disjoint", "evaluate_embedder"]


def eval_sets(name: str, root, split: str, transform=None):
    """The query set and the reference set (``None``: query = reference) of an evaluation
    split. In-Shop's ``"test"`` is its query set against its gallery, as in the benchmark."""
    from ..datasets import DATASETS, get_dataset

    if name in DATASETS and DATASETS.canonical(name) == "inshop" and split == "test":
        return (get_dataset(name, root=root, split="query", transform=transform),
                get_dataset(name, root=root, split="gallery", transform=transform))
    return get_dataset(name, root=root, split=split, transform=transform), None


def class_disjoint(train, test) -> bool:
    """Whether two splits share no class (the DML benchmarks' protocol), judged by the data
    sets' original class ids (``.classes``)."""
    a, b = getattr(train, "classes", None), getattr(test, "classes", None)
    if a is None or b is None:
        return False
    return not ({str(c) for c in a} & {str(c) for c in b})


def evaluate_embedder(model: nn.Module, test, train=None, *, reference=None,
                      probe: bool = False, device=None, batch_size: int = 256,
                      progress: bool = False, seed: int = 0,
                      num_workers: int = 0, return_backend: bool = False):
    """Evaluate an embedder on held-out data: a plain dict of numbers, or with
    ``return_backend=True`` ``(metrics, backend)`` where ``backend`` names the k-NN search that
    produced the retrieval metrics (exact or approximate FAISS, torch); ``fit`` and
    ``contrastive eval`` write it next to the metrics.

    * Retrieval (Recall@1/2/4/8, P@1, R-Precision, MAP@R): ``test`` against ``reference``, or
      against itself with each query's own row excluded when ``reference`` is ``None``.
    * With ``probe``: NMI/AMI of k-means on ``test``; a linear probe and a weighted k-NN
      classifier (k = 200, t = 0.07) trained on ``train`` and scored on ``test``. When the
      splits are class-disjoint (CUB, Cars, SOP) a classifier trained on ``train`` cannot
      score ``test``, so both are trained on a stratified half of ``test`` and scored on the
      other half (``probe_protocol`` says which was used).

    The searches run on ``device`` too (``None``: the search's own choice), so
    ``contrastive eval --device cpu`` on a GPU machine searches on the CPU.

    Under ``torchrun`` it is a collective that every rank calls: each rank embeds its share of
    every set (:func:`~contrastive.inference.embed_distributed`), rank 0 computes the metrics
    on the gathered embeddings and every rank returns them.
    """
    from ..inference import embed_distributed

    def run(ds):
        return embed_distributed(model, ds, batch_size=batch_size, device=device,
                                 num_workers=num_workers, progress=progress)

    x_te, y_te = run(test)  # every embedding first: it takes every rank
    x_ref = y_ref = train_emb = None
    if reference is not None:
        x_ref, y_ref = run(reference)
    if probe and train is not None and not class_disjoint(train, test):
        train_emb = run(train)
    if not dist_utils.is_main_process():
        got = dist_utils.broadcast_object(None)
        if isinstance(got, _MainFailed):  # rank 0 raised: every rank raises, none waits
            raise RuntimeError(f"evaluation failed on rank 0: {got.error}")
        return got if return_backend else got[0]
    try:
        out, backend = _metrics(x_te, y_te, x_ref, y_ref, train_emb,
                                probe and train is not None, reference, probe, device, seed)
    except BaseException as exc:
        # the other ranks wait in the broadcast below: tell them, or they wait for the
        # collective's timeout (an hour under NCCL by default) instead of stopping now
        dist_utils.broadcast_object(_MainFailed(f"{type(exc).__name__}: {exc}"))
        raise
    got = dist_utils.broadcast_object((out, backend))
    return got if return_backend else got[0]


class _MainFailed:
    """What rank 0 broadcasts when its part of :func:`evaluate_embedder` raised."""

    def __init__(self, error: str):
        self.error = error


def _metrics(x_te, y_te, x_ref, y_ref, train_emb, with_train, reference, probe, device, seed):
    """Rank 0's part of :func:`evaluate_embedder`: the metrics of the gathered embeddings and
    the name of the search behind the retrieval ones (``train_emb`` None with ``with_train``:
    the training set shares no class with the test set, the probes use halves of the test)."""
    from evaluation import clustering_metrics, knn_classifier, linear_probe, retrieval_metrics
    from evaluation.probe import stratified_split

    out: dict[str, float] = {}
    if reference is None:
        ks = tuple(k for k in (1, 2, 4, 8) if k < len(y_te)) or (1,)
        r = retrieval_metrics(x_te, y_te, ks=ks, device=device)
    else:
        ks = tuple(k for k in (1, 2, 4, 8) if k <= len(y_ref)) or (1,)
        r = retrieval_metrics(x_te, y_te, x_ref, y_ref, ks=ks, device=device)
    out.update({k: float(v) for k, v in r.items()})
    if probe:
        out.update({k: float(v) for k, v in clustering_metrics(x_te, y_te, seed=seed).items()})
        if with_train:
            if train_emb is None:
                a, b = stratified_split(y_te.numpy(), 0.5, seed)
                x_tr, y_tr, x_ev, y_ev = x_te[a], y_te[a], x_te[b], y_te[b]
                out["probe_on_test_halves"] = 1.0
            else:
                (x_tr, y_tr), x_ev, y_ev = train_emb, x_te, y_te
            lp = linear_probe(x_tr, y_tr, x_ev, y_ev, seed=seed, device=device)
            out["linear_probe"] = float(lp["accuracy"])
            kc = knn_classifier(x_tr, y_tr, x_ev, y_ev, k=min(200, len(y_tr)), temperature=0.07,
                                device=device)
            out["knn_top1"] = float(kc["top1"])
            out["knn_top5"] = float(kc["top5"])
    return out, getattr(r, "backend", "unknown")
