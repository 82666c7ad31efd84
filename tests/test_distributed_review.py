"""Review of the distributed path: two real ``gloo`` ranks against one process.

One module-scoped launch runs this file twice as a script with torchrun's environment variables
(``tests/two_ranks.py``); each rank writes what it computed and the tests compare it with the
single-process computation:

* every registered loss, built as ``fit`` builds it (ranks other than 0 then reseed their RNG,
  as ``fit`` does), on uneven shares of the global batch (9 and 7 rows) for three steps: each
  rank's loss, model gradient and loss-parameter gradient (after ``average_gradients``) equal
  the single process's, and the memories (XBM, the MoCo queue) hold the same rows;
* ``fit`` with the MoCo queue under two ranks: every rank holds the same queue and computes the
  same loss at every step;
* ``embed_distributed`` returns ``embed``'s result bit for bit (a shard boundary inside a batch
  changed the batches' composition, hence the float rounding of the rows).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from two_ranks import launch_ranks  # noqa: E402 - tests/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as a worker script
    sys.path.insert(0, str(ROOT))

from contrastive import distributed as D  # noqa: E402

WORLD = 2
DIM_IN, DIM, N_CLASSES, N = 10, 6, 4, 16
CUTS = (0, 9, 16)  # uneven shares of the global batch
STEPS = 3
MOCO_FIT = dict(dataset="digits", backbone="mlp", dim=16, views=2, loss="moco_queue",
                loss_kwargs={"size": 64}, batch_size=32, steps=3, log_every=1, eval_every=0,
                checkpoint_every=0, final_probe=False, progress=False, optimizer="sgd",
                lr=0.05, device="cpu")


# --------------------------------------------------------------------------------------------
# every registered loss
# --------------------------------------------------------------------------------------------
def loss_problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(DIM_IN, DIM)
    with torch.no_grad():
        model.weight.copy_(0.5 * torch.randn(DIM, DIM_IN, generator=g))
        model.bias.copy_(0.1 * torch.randn(DIM, generator=g))
    batches = []
    for _ in range(STEPS):
        x = torch.randn(N, DIM_IN, generator=g)
        y = torch.arange(N_CLASSES).repeat_interleave(N // N_CLASSES)
        batches.append((x, y[torch.randperm(N, generator=g)]))
    return model, batches


def views_only(name: str) -> bool:
    import losses

    return "labels" not in losses.LOSSES.meta(name)["supervision"]


def rows(name: str, x, y, lo: int, hi: int):
    """Rows ``[lo, hi)`` of a global batch as ``fit`` hands them to a rank: labelled rows, or
    for a views-only loss two views of instances ``lo..hi`` (view-major, ids repeated)."""
    if views_only(name):
        ids = torch.arange(N)
        return torch.cat([x[lo:hi], (x + 0.3 * torch.sin(x))[lo:hi]]), ids[lo:hi].repeat(2)
    return x[lo:hi], y[lo:hi]


def build(name: str) -> nn.Module:
    """The loss as ``fit`` builds it (every rank from the same seed)."""
    from contrastive.app.factory import build_loss
    from contrastive.app.train import _init_loss_state

    torch.manual_seed(3)
    kwargs = {"xbm": {"memory_size": 40}, "moco_queue": {"size": 24}}.get(name, {})
    loss_fn = build_loss(name, kwargs, None, {}, embedding_dim=DIM, num_classes=N_CLASSES)
    _init_loss_state(loss_fn, DIM, torch.device("cpu"))
    return loss_fn


def train_steps(name: str, lo: int = 0, hi: int = N, rank: int = 0) -> list[dict]:
    """Three steps of the loss ``name`` on rows ``[lo, hi)`` of each global batch (all of them
    in one process); under DDP as ``fit`` does it."""
    model, batches = loss_problem()
    loss_fn = build(name)
    distributed = D.is_distributed()
    if rank > 0:
        torch.manual_seed(1000 + rank)  # fit: ranks > 0 draw their own random numbers
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    out = []
    for x, y in batches:
        x, y = rows(name, x, y, lo, hi)
        model.zero_grad(set_to_none=True)
        loss_fn.zero_grad(set_to_none=True)
        emb, labels = D.gather_embeddings(net(x), y)
        loss = loss_fn(emb, labels)
        loss.backward()
        D.average_gradients(loss_fn.parameters())
        step = {"loss": loss.item()}
        step.update({f"model.{k}": p.grad.clone() for k, p in model.named_parameters()})
        step.update({f"loss.{k}": p.grad.clone() for k, p in loss_fn.named_parameters()
                     if p.grad is not None})
        step.update({f"buffer.{k}": b.clone() for k, b in loss_fn.named_buffers()})
        out.append(step)
    return out


# --------------------------------------------------------------------------------------------
# distributed evaluation
# --------------------------------------------------------------------------------------------
N_EVAL = 1001  # the two halves (500, 501 rows) do not start on a batch of 8


from test_distributed import PlainPairs as Pairs  # noqa: E402 - tests/ is on sys.path


def eval_problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_EVAL, 50, generator=g)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(50, 64), nn.ReLU(), nn.Linear(64, 32))
    return model, x, torch.arange(N_EVAL) % 7


def embed_cases(fn) -> dict:
    """``fn`` is ``embed`` (the reference) or ``embed_distributed`` (the workers)."""
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y = eval_problem()
    kw = dict(device="cpu", progress=False)
    return {
        "tensor": fn(model, TensorDataset(x, y), batch_size=8, **kw),
        "dataset": fn(model, Pairs(x, y), batch_size=8, **kw),
        "loader": fn(model, DataLoader(Pairs(x, y), batch_size=8), **kw),
        "three_rows_batches_of_2": fn(model, TensorDataset(x[:3], y[:3]), batch_size=2, **kw),
        "one_batch": fn(model, TensorDataset(x[:5], y[:5]), batch_size=8, **kw),
    }


# --------------------------------------------------------------------------------------------
# the worker (this file run as a script)
# --------------------------------------------------------------------------------------------
def _worker(out_dir: Path) -> None:
    import losses
    from contrastive.app.config import TrainConfig
    from contrastive.app.train import fit
    from contrastive.inference import embed_distributed

    torch.set_num_threads(1)
    rank, _, _, _ = D.setup(device="cpu")
    res: dict = {"losses": {}}
    for name in losses.available():
        try:
            res["losses"][name] = train_steps(name, CUTS[rank], CUTS[rank + 1], rank)
        except Exception as exc:  # reported by the test, with the loss's name
            res["losses"][name] = f"{type(exc).__name__}: {exc}"
    res["embed"] = embed_cases(embed_distributed)

    # fit with the MoCo queue: what each rank's loss computes at every step
    from contrastive.app import train

    real, seen = train._call_loss, []

    def spy(loss_fn, emb, labels):
        loss = real(loss_fn, emb, labels)
        seen.append((loss.item(), loss_fn.memory.embeddings.clone()))  # after this step's keys
        return loss

    train._call_loss = spy
    try:
        fit(TrainConfig.from_dict(dict(MOCO_FIT, output=str(out_dir / "moco"))))
    finally:
        train._call_loss = real
    res["moco"] = seen
    D.barrier()
    D.cleanup()
    torch.save(res, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    out_dir = tmp_path_factory.mktemp("distributed_review")
    launch_ranks(__file__, out_dir, WORLD, timeout=180)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out_dir


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def _registered() -> list[str]:
    import losses

    return losses.available()


@pytest.mark.parametrize("name", _registered())
def test_every_loss_under_ddp_equals_single_process_with_uneven_shares(ranks, name):
    ref = train_steps(name)
    for rank, res in enumerate(ranks[0]):
        got = res["losses"][name]
        assert not isinstance(got, str), f"rank {rank}: {got}"
        assert len(got) == STEPS
        for step, (a, b) in enumerate(zip(ref, got)):
            assert b.keys() == a.keys(), (rank, step)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (rank, step)
            for key, value in a.items():
                if key == "loss":
                    continue
                if key.startswith("model."):
                    assert value.abs().max() > 1e-4, key  # not a comparison between zeros
                torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6,
                                           msg=f"rank {rank}, step {step}, {key}")


def test_moco_queue_fit_under_ddp_every_rank_computes_the_same_loss(ranks):
    """The queue starts full of random rows: every rank must start from the same ones, or the
    ranks train on different losses (and rank 0 logs only its own). The multi-view batches are
    augmented, each rank its own way, so the run is not the single process's; the gathered
    batch, the loss and the queue are the same on every rank."""
    (r0, r1), _ = ranks
    assert len(r0["moco"]) == len(r1["moco"]) == MOCO_FIT["steps"]
    for step, ((loss0, queue0), (loss1, queue1)) in enumerate(zip(r0["moco"], r1["moco"])):
        assert queue0.shape == (64, 16)
        assert torch.equal(queue0, queue1), step
        assert loss0 == loss1, step


@pytest.mark.parametrize("case", ["tensor", "dataset", "loader", "three_rows_batches_of_2",
                                  "one_batch"])
def test_embed_distributed_equals_embed_bit_for_bit(ranks, case):
    from contrastive.inference import embed

    z_ref, y_ref = embed_cases(embed)[case]
    for res in ranks[0]:
        z, y = res["embed"][case]
        assert z.shape == z_ref.shape
        assert torch.equal(z, z_ref)  # bit for bit: each rank runs the single process's batches
        assert torch.equal(y, y_ref)


def test_shard_bounds_in_whole_batches():
    from contrastive.inference import shard_bounds

    for n in (1, 3, 5, 61, 1001):
        for world in (1, 2, 3, 8):
            for batch in (1, 2, 8, 256):
                bounds = [shard_bounds(n, r, world, batch) for r in range(world)]
                assert bounds[0][0] == 0 and bounds[-1][1] == n
                assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
                assert all(a % batch == 0 for a, _ in bounds if a < n)  # batches as embed's
                sizes = [b - a for a, b in bounds]
                assert max(sizes) - min(sizes) <= batch
    assert shard_bounds(1001, 1, 2, 8) == (504, 1001)  # 63 batches of 8 and 62 and 1 row
    assert shard_bounds(61, 1, 2) == (30, 61)  # one row per batch: the even split


def test_setup_device_cpu_in_an_nccl_group_is_refused(monkeypatch):
    """``fit(device="cpu")`` after the caller set up an NCCL group would fail in the first
    gather (NCCL carries CUDA tensors only): setup says so at once, with the fix."""
    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(D.dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(D.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(D.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match="initialised with the 'nccl' backend.*device='cpu'"):
        D.setup(device="cpu")
    monkeypatch.setattr(D.dist, "get_backend", lambda group=None: "gloo")
    assert D.setup(device="cpu") == (1, 2, 1, torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, fix", [("CPU", "'cpu'"), ("Cuda:0", "'cuda:0'"),
                                         (" cpu", "'cpu'")])
def test_device_names_in_other_case_are_refused_with_the_lower_case_fix(device, fix):
    from contrastive.devices import resolve_device

    with pytest.raises(ValueError, match=f"torch spells device names in lower case.*use "
                                         f"device={fix}"):
        resolve_device(device)
    with pytest.raises(ValueError, match=f"use --device={fix}"):
        resolve_device(device, name="--device")


def test_device_names_still_refused_plainly():
    from contrastive.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be like 'cpu'") as err:
        resolve_device("gpu")
    assert "lower case" not in str(err.value)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
