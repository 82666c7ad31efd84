"""Distributed helpers: two real ``gloo`` processes under DDP against the single-process run.

The same launch checks distributed evaluation: ``embed_distributed`` (each rank embeds its
share of the data set, the shares are gathered) and ``train.evaluate_embedder`` under two ranks
give the single process's embeddings and metrics, with each rank running the model on half of
the rows only.

The module-scoped fixture starts this very file twice as a script, with the environment
variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so
``contrastive.distributed.setup`` is exercised as under ``torchrun``. Each rank writes what it
computed to a file; the tests compare it with the same computation done in one process on the
whole global batch (the reference). One launch serves all tests (a few seconds).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from two_ranks import free_port, launch_ranks  # noqa: E402 - tests/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as a worker script
    sys.path.insert(0, str(ROOT))

from contrastive import distributed as D  # noqa: E402
from losses.modules import InfoNCE, Triplet  # noqa: E402

WORLD = 2
N_GLOBAL, DIM_IN, DIM_OUT, N_CLASSES = 16, 10, 6, 4
SPLITS = {"even": (8, 8), "uneven": (9, 7)}
LOSS_NAMES = ("infonce", "triplet", "paired")
TOL = 1e-5


# --------------------------------------------------------------------------------------------
# the problem, shared by the workers and the reference
# --------------------------------------------------------------------------------------------
def make_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Module]:
    """A fixed global batch (inputs, a second view of them, labels) and a small linear model."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_GLOBAL, DIM_IN, generator=g)
    x2 = x + 0.3 * torch.randn(N_GLOBAL, DIM_IN, generator=g)
    labels = torch.arange(N_CLASSES).repeat_interleave(N_GLOBAL // N_CLASSES)
    labels = labels[torch.randperm(N_GLOBAL, generator=g)]
    model = nn.Linear(DIM_IN, DIM_OUT)
    with torch.no_grad():
        model.weight.copy_(0.5 * torch.randn(DIM_OUT, DIM_IN, generator=g))
        model.bias.copy_(0.1 * torch.randn(DIM_OUT, generator=g))
    return x, x2, labels, model


def loss_value(name: str, model: nn.Module, emb, emb2, labels) -> torch.Tensor:
    """The three global-batch losses under test; ``emb2`` is the second view's embeddings."""
    if name == "infonce":
        return InfoNCE(temperature=0.1)(emb, labels)
    if name == "triplet":
        return Triplet()(emb, labels)
    if name == "paired":  # paired views, positives on the diagonal: needs aligned gathers
        return InfoNCE(temperature=0.1)(emb, ref_emb=emb2, paired=True)
    raise ValueError(name)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def reference(name: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Single process, whole global batch."""
    x, x2, labels, model = make_problem()
    loss = loss_value(name, model, model(x), model(x2), labels)
    loss.backward()
    return loss.item(), grads(model)


N_EVAL, N_EVAL_TRAIN = 61, 40  # odd: the two shards differ in size (32 and 29 rows)


class PlainPairs(torch.utils.data.Dataset):
    """A map-style data set without the TensorDataset fast path (the Subset/DataLoader path)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make_eval_problem():
    """A small embedder, a test set and a train set with 5 classes, for the evaluation."""
    from torch.utils.data import TensorDataset

    from contrastive.embedders import Embedder

    g = torch.Generator().manual_seed(1)
    centers = 2.0 * torch.randn(5, DIM_IN, generator=g)
    y_te, y_tr = torch.arange(N_EVAL) % 5, torch.arange(N_EVAL_TRAIN) % 5
    x_te = centers[y_te] + torch.randn(N_EVAL, DIM_IN, generator=g)
    x_tr = centers[y_tr] + torch.randn(N_EVAL_TRAIN, DIM_IN, generator=g)
    torch.manual_seed(2)
    model = Embedder("mlp", in_dim=DIM_IN, hidden_dim=16, layers=1, dim=8)
    return model, TensorDataset(x_te, y_te), PlainPairs(x_te, y_te), TensorDataset(x_tr, y_tr)


class RowCounter:
    """A forward pre-hook counting the rows the model runs on (the cost share of a rank)."""

    def __init__(self, model):
        self.rows = 0
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.rows += int(args[0].shape[0])


def evaluation_results(model, test, plain, train, counter=None) -> dict:
    """What both the workers and the single-process reference compute."""
    from torch.utils.data import DataLoader, TensorDataset

    from contrastive.app.protocol import evaluate_embedder
    from contrastive.inference import embed_distributed

    out: dict = {}
    z, y = embed_distributed(model, test, batch_size=8, device="cpu", progress=False)
    out["tensor"] = (z, y, counter.rows if counter else None)
    z, y = embed_distributed(model, plain, batch_size=8, device="cpu", progress=False)
    out["plain"] = (z, y)
    loader = DataLoader(plain, batch_size=8)
    z, y = embed_distributed(model, loader, device="cpu", progress=False)
    out["loader"] = (z, y)
    one = TensorDataset(*(t[:1] for t in test.tensors))  # fewer rows than ranks
    z, y = embed_distributed(model, one, device="cpu", progress=False)
    out["one"] = (z, y)
    out["metrics"] = evaluate_embedder(model, test, train, probe=True, device="cpu")
    return out


def gather_without_grad(emb: torch.Tensor) -> torch.Tensor:
    """The gradient-free gather (as in pytorch-metric-learning's wrapper, but in rank order and
    without its loss rescaling): other ranks' rows are constants, only the own slice has a
    gradient."""
    others = D.all_gather_nograd(emb)
    sizes = D.all_gather_nograd(torch.tensor([emb.shape[0]])).tolist()
    start = sum(sizes[: D.get_rank()])
    return torch.cat([others[:start], emb, others[start + emb.shape[0] :]])


# --------------------------------------------------------------------------------------------
# the worker (this file run as a script)
# --------------------------------------------------------------------------------------------
def _worker(out_dir: Path) -> None:
    import torch.distributed as dist
    from pytorch_metric_learning.losses import NTXentLoss
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    rank, world, local_rank, device = D.setup()
    res: dict = {
        "setup": [rank, world, local_rank, str(device)],
        "again": [str(v) for v in D.setup()],
        "backend": str(dist.get_backend()),
        "is_main": D.is_main_process(),
        "is_distributed": D.is_distributed(),
    }
    x, x2, labels, model0 = make_problem()

    model = copy.deepcopy(model0)
    ddp = DDP(model)  # one wrapper for every case: no optimizer step, so the weights stay put
    for split, sizes in SPLITS.items():
        start, n = sum(sizes[:rank]), sizes[rank]
        xs, x2s, ys = x[start : start + n], x2[start : start + n], labels[start : start + n]
        for mode in ("grad", "nograd"):
            for name in LOSS_NAMES:
                model.zero_grad(set_to_none=True)
                emb, emb2 = ddp(torch.cat([xs, x2s])).split(n)
                emb2 = emb2 if name == "paired" else None
                if mode == "grad":
                    all_emb, all_labels = D.gather_embeddings(emb, ys)
                    all_emb2 = D.all_gather_with_grad(emb2) if emb2 is not None else None
                else:
                    all_emb, all_labels = gather_without_grad(emb), D.all_gather_nograd(ys)
                    all_emb2 = gather_without_grad(emb2) if emb2 is not None else None
                loss = loss_value(name, model, all_emb, all_emb2, all_labels)
                loss.backward()
                res[f"{split}/{mode}/{name}"] = {
                    "loss": loss.item(),
                    "grads": grads(model),
                    "emb": all_emb.detach(),
                    "labels": all_labels,
                }

    # pytorch-metric-learning's wrapper, for the docstring's comparison
    xs, ys = x[rank * 8 : rank * 8 + 8], labels[rank * 8 : rank * 8 + 8]
    for efficient in (False, True):
        model.zero_grad(set_to_none=True)
        loss = DistributedLossWrapper(NTXentLoss(temperature=0.1), efficient=efficient)(ddp(xs), ys)
        loss.backward()
        res[f"pml/efficient={efficient}"] = {"loss": loss.item(), "grads": grads(model)}

    # distributed evaluation
    eval_model, test, plain, train = make_eval_problem()
    counter = RowCounter(eval_model)
    res["eval"] = evaluation_results(eval_model, test, plain, train, counter)
    shuffled = torch.utils.data.DataLoader(plain, batch_size=8, shuffle=True)
    try:
        from contrastive.inference import embed_distributed

        embed_distributed(eval_model, shuffled, progress=False)
        res["shuffled_error"] = None
    except ValueError as exc:
        res["shuffled_error"] = str(exc)

    # rank 0's metrics raise: every rank raises instead of waiting in the broadcast
    import evaluation

    real_metrics = evaluation.retrieval_metrics
    if rank == 0:
        def failing(*args, **kwargs):
            raise ValueError("metrics broke on purpose")

        evaluation.retrieval_metrics = failing
    try:
        from contrastive.app.protocol import evaluate_embedder

        t0 = time.perf_counter()
        evaluate_embedder(eval_model, test, device="cpu")
        res["main_failed"] = None
    except (ValueError, RuntimeError) as exc:
        res["main_failed"] = f"{type(exc).__name__}: {exc}"
        res["main_failed_s"] = time.perf_counter() - t0
    finally:
        evaluation.retrieval_metrics = real_metrics

    # gradients of parameters outside DDP (a loss's temperature, a critic)
    p = nn.Parameter(torch.zeros(3))
    q = nn.Parameter(torch.zeros(2))  # no gradient: skipped
    p.grad = torch.tensor([float(rank), 2.0 * rank, 1.0])
    D.average_gradients([p, q])
    res["avg_grad"] = p.grad.tolist()
    res["avg_grad_none"] = q.grad is None

    # other helpers
    flags = torch.tensor([True, False, rank == 1][: 2 + rank])
    res["bool"] = D.all_gather_nograd(flags)
    res["int"] = D.all_gather_nograd(torch.arange(3 + rank, dtype=torch.int32) + 10 * rank)
    res["mean"] = D.reduce_mean(float(rank)).item()
    res["mean_tensor"] = D.reduce_mean(torch.tensor([rank, 2 * rank])).tolist()
    res["broadcast"] = D.broadcast_object({"from": rank, "dir": f"run{rank}"})
    for key, bad in (
        ("shape_error", torch.zeros(3, 6 - rank)),
        ("dtype_error", torch.zeros(3, 6, dtype=torch.float64 if rank else torch.float32)),
    ):
        try:
            D.all_gather_with_grad(bad)
            res[key] = None
        except ValueError as exc:
            res[key] = str(exc)
    D.barrier()
    D.cleanup()
    res["after_cleanup"] = [D.is_distributed(), D.get_world_size()]
    torch.save(res, out_dir / f"rank{rank}.pt")


# --------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------
def _run_workers(out_dir: Path) -> None:
    launch_ranks(__file__, out_dir, WORLD, timeout=120)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> list[dict]:
    """The workers' results. Under pytest-xdist the xdist workers share one launch (the first
    one to get here runs it under a file lock, the others read its files)."""
    from filelock import FileLock  # a dependency of torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        out_dir = tmp_path_factory.getbasetemp().parent / "ddp_workers"  # this session's root
    else:
        out_dir = tmp_path_factory.mktemp("ddp")
    files = [out_dir / f"rank{r}.pt" for r in range(WORLD)]
    out_dir.mkdir(exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if not all(f.is_file() for f in files):
            _run_workers(out_dir)
    return [torch.load(f, weights_only=True) for f in files]


# --------------------------------------------------------------------------------------------
# tests: two processes
# --------------------------------------------------------------------------------------------
def test_setup_reads_torchrun_environment(ddp):
    for rank, res in enumerate(ddp):
        assert res["setup"] == [rank, WORLD, rank, "cpu"]
        assert res["again"] == [str(rank), str(WORLD), str(rank), "cpu"]
        assert res["backend"] == "gloo"
        assert res["is_main"] == (rank == 0)
        assert res["is_distributed"] is True
        assert res["after_cleanup"] == [False, 1]


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gather_with_grad_equals_single_process(ddp, split, name):
    ref_loss, ref_grads = reference(name)
    x, _, labels, model = make_problem()
    for res in ddp:
        r = res[f"{split}/grad/{name}"]
        torch.testing.assert_close(r["emb"], model(x).detach(), rtol=0, atol=1e-6)
        assert torch.equal(r["labels"], labels)
        assert abs(r["loss"] - ref_loss) <= TOL * max(1.0, abs(ref_loss))
        for key, g in ref_grads.items():
            assert g.abs().max() > 1e-3  # the comparison is not between zeros
            torch.testing.assert_close(r["grads"][key], g, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gather_without_grad_gives_wrong_gradients(ddp, name):
    """The control: the same run with a gradient-free gather fails the comparison above --
    the loss is right but DDP's average leaves 1/world of the gradient."""
    ref_loss, ref_grads = reference(name)
    for res in ddp:
        r = res[f"even/nograd/{name}"]
        assert abs(r["loss"] - ref_loss) <= TOL * max(1.0, abs(ref_loss))
        for key, g in ref_grads.items():
            assert not torch.allclose(r["grads"][key], g, rtol=TOL, atol=TOL)
            torch.testing.assert_close(r["grads"][key], g / WORLD, rtol=TOL, atol=TOL)


def test_pml_wrapper_rescales_loss_and_loses_terms_when_efficient(ddp):
    """What docs/architecture.md (Distributed training) and the ``all_gather_with_grad`` docstring
    say about
    pytorch-metric-learning's DistributedLossWrapper: its default mode reports world * loss (to
    fix the gradient scale), its efficient mode gets the gradient direction wrong."""
    from pytorch_metric_learning.losses import NTXentLoss

    x, _, labels, model = make_problem()
    loss = NTXentLoss(temperature=0.1)(model(x), labels)
    loss.backward()
    ref_grads = grads(model)
    for res in ddp:
        full, eff = res["pml/efficient=False"], res["pml/efficient=True"]
        assert full["loss"] == pytest.approx(WORLD * loss.item(), rel=1e-5)
        for key, g in ref_grads.items():
            torch.testing.assert_close(full["grads"][key], g, rtol=TOL, atol=TOL)
        w = eff["grads"]["weight"].flatten()
        cos = torch.nn.functional.cosine_similarity(w, ref_grads["weight"].flatten(), dim=0)
        assert cos < 0.99  # measured 0.953: the direction changes, not only the scale


def test_ranks_agree_and_gather_in_rank_order(ddp):
    for key in ddp[0]:
        if key.startswith(("even/", "uneven/")):
            for k, g in ddp[0][key]["grads"].items():
                torch.testing.assert_close(ddp[1][key]["grads"][k], g, rtol=0, atol=0)
    for res in ddp:
        assert res["bool"].dtype == torch.bool
        assert res["bool"].tolist() == [True, False, True, False, True]
        assert res["int"].dtype == torch.int32
        assert res["int"].tolist() == [0, 1, 2, 10, 11, 12, 13]
        assert res["mean"] == pytest.approx(0.5)
        assert res["mean_tensor"] == pytest.approx([0.5, 1.0])
        assert res["broadcast"] == {"from": 0, "dir": "run0"}


def test_mismatched_shapes_raise_on_every_rank(ddp):
    for res in ddp:
        assert res["shape_error"] is not None
        assert "rank 0: [3, 6]" in res["shape_error"] and "rank 1: [3, 5]" in res["shape_error"]
        assert res["dtype_error"] is not None and "dtype" in res["dtype_error"]
        assert "torch.float64" in res["dtype_error"]


def test_a_failure_in_rank_0s_metrics_stops_every_rank(ddp):
    """Rank 0 computes the metrics while the others wait in a broadcast: when it raises, it
    tells them, and they raise at once (instead of waiting for the collective's timeout, an
    hour under NCCL) with its error."""
    assert ddp[0]["main_failed"] == "ValueError: metrics broke on purpose"
    assert ddp[1]["main_failed"] == ("RuntimeError: evaluation failed on rank 0: ValueError: "
                                     "metrics broke on purpose")
    assert ddp[1]["main_failed_s"] < 30


def test_distributed_evaluation_equals_single_process(ddp):
    """Two ranks, each embedding its half in whole batches, give the single process's
    embeddings bit for bit (rows in the data set's order) and the same metrics; in batches of
    8, rank 0 runs the model on 4 batches (32 rows), rank 1 on the other 3 and a partial one
    (29 rows)."""
    model, test, plain, train = make_eval_problem()
    ref = evaluation_results(model, test, plain, train)
    z_ref, y_ref, _ = ref["tensor"]
    assert z_ref.shape == (N_EVAL, 8)
    for rank, res in enumerate(ddp):
        got = res["eval"]
        z, y, rows = got["tensor"]
        # the model saw this rank's shard once for the TensorDataset call, not the whole set
        assert rows == (32, 29)[rank]
        for key in ("tensor", "plain", "loader", "one"):
            torch.testing.assert_close(got[key][0], ref[key][0], rtol=0, atol=0)
            assert torch.equal(got[key][1], ref[key][1])
        assert got["one"][0].shape == (1, 8)
        assert got["metrics"].keys() == ref["metrics"].keys()
        assert {"map_at_r", "linear_probe", "knn_top1", "nmi"} <= set(ref["metrics"])
        for key, value in ref["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, abs=1e-6), key
        assert "shuffle=False" in res["shuffled_error"]


def test_shard_bounds_cover_the_rows_once():
    from contrastive.inference import shard_bounds

    for n in (1, 2, 5, 61, 100):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_average_gradients_is_the_mean_over_ranks(ddp):
    for res in ddp:
        assert res["avg_grad"] == pytest.approx([0.5, 1.0, 1.0])
        assert res["avg_grad_none"] is True


# --------------------------------------------------------------------------------------------
# tests: one process (no process group)
# --------------------------------------------------------------------------------------------
def test_single_process_helpers_are_identity():
    assert not D.is_distributed()
    assert (D.get_rank(), D.get_world_size(), D.is_main_process()) == (0, 1, True)
    D.barrier()
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1])
    assert D.all_gather_with_grad(x) is x
    assert D.all_gather_nograd(y) is y
    e, lab = D.gather_embeddings(x, y)
    assert e is x and lab is y
    assert D.gather_embeddings(x) == (x, None)
    obj = {"a": 1}
    assert D.broadcast_object(obj) is obj
    assert D.reduce_mean(3.0).item() == 3.0
    assert D.reduce_mean(torch.tensor([1, 2])).tolist() == [1.0, 2.0]


def test_single_process_bad_input():
    with pytest.raises(ValueError, match="labels must have one entry per embedding row"):
        D.gather_embeddings(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        D.all_gather_with_grad([1.0, 2.0])
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        D.gather_embeddings([1.0, 2.0])


_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_setup_without_torchrun_is_single_process(clean_env):
    expected = (0, 1, 0, D.best_device())
    assert D.setup() == expected
    clean_env.setenv("WORLD_SIZE", "1")
    assert D.setup() == expected
    assert not D.is_distributed()
    D.cleanup()  # safe without a group


@pytest.mark.parametrize(
    "env, match",
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK must be in \[0, 2\)"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ],
)
def test_setup_bad_environment(clean_env, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        D.setup()
    assert not D.is_distributed()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_setup_nccl_without_cuda(clean_env):
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        clean_env.setenv(k, v)
    clean_env.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(ValueError, match="'nccl' needs CUDA"):
        D.setup(backend="nccl")
    with pytest.raises(TypeError, match="backend must be a string"):
        D.setup(backend=3)
    assert not D.is_distributed()


def test_setup_on_cuda_machines_picks_nccl_and_the_local_gpu(clean_env):
    """The CUDA branch of setup, with CUDA and init_process_group mocked (CPU-only tests)."""
    calls = {}
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_env.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("device", i))
    clean_env.setattr(D.dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    env = {"WORLD_SIZE": "4", "RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert D.setup() == (3, 4, 1, torch.device("cuda", 1))  # LOCAL_RANK unset: RANK % 2 GPUs
    assert calls["device"] == 1
    timeout = calls["init"].pop("timeout")
    assert timeout.total_seconds() == D.DEFAULT_TIMEOUT_S  # not NCCL's 10 minutes
    assert calls["init"] == {"backend": "nccl", "init_method": "env://", "rank": 3, "world_size": 4}
    clean_env.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but only 2 CUDA device"):
        D.setup()


def _mock_cuda_machine(env, n_gpu: int = 2) -> dict:
    calls: dict = {}
    env.setattr(torch.cuda, "is_available", lambda: True)
    env.setattr(torch.cuda, "device_count", lambda: n_gpu)
    env.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("device", i))
    env.setattr(D.dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                 "MASTER_PORT": "1"}.items():
        env.setenv(k, v)
    return calls


def test_setup_device_cpu_on_a_gpu_machine_uses_gloo(clean_env):
    calls = _mock_cuda_machine(clean_env)
    assert D.setup(device="cpu") == (1, 2, 1, torch.device("cpu"))
    assert calls["init"]["backend"] == "gloo"  # NCCL cannot carry CPU tensors
    assert "device" not in calls  # no GPU claimed
    with pytest.raises(ValueError, match="device='cpu' was asked for"):
        D.setup(device="cpu", backend="nccl")


def test_setup_device_cuda_gives_each_rank_its_own_gpu(clean_env):
    calls = _mock_cuda_machine(clean_env)
    assert D.setup(device="cuda") == (1, 2, 1, torch.device("cuda", 1))
    assert calls["device"] == 1 and calls["init"]["backend"] == "nccl"
    with pytest.raises(ValueError, match="every rank on the same GPU|instead of its own GPU 1"):
        D.setup(device="cuda:0")  # rank 1 on GPU 0: refused, with the fix
    assert D.setup(device="cuda:1")[3] == torch.device("cuda", 1)


def test_setup_timeout_argument_and_environment(clean_env):
    calls = _mock_cuda_machine(clean_env)
    D.setup(timeout_s=90)
    assert calls.pop("init")["timeout"].total_seconds() == 90
    clean_env.setenv("CONTRASTIVE_DIST_TIMEOUT_S", "7200")
    D.setup()
    assert calls.pop("init")["timeout"].total_seconds() == 7200
    clean_env.setenv("CONTRASTIVE_DIST_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="CONTRASTIVE_DIST_TIMEOUT_S must be a number"):
        D.setup()
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        D.setup(timeout_s=0)
    with pytest.raises(ValueError, match="device must be"):
        D.setup(device="tpu")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
