"""The distributed path's edge cases: two real ``gloo`` ranks against one process.

One module-scoped launch runs this file twice as a script with torchrun's environment variables
(as ``tests/test_distributed.py`` does); each rank writes what it computed to a file and the
tests compare it with the single-process computation. Covered:

* ``all_gather_with_grad`` when one rank holds zero rows, in bf16 (CPU autocast under gloo), and
  with learnable loss parameters (a bilinear critic, Proxy-Anchor's proxies) all-reduced by
  ``average_gradients``: loss and gradients equal the single process's;
* ``embed_distributed`` with loader workers, a loader's ``worker_init_fn`` (and the other loader
  options its shards keep), a loader that drops its last batch (the rows ``embed`` returns:
  56 of 61), and one that drops its only batch (the error ``embed`` gives);
* ``all_gather_object``, ``any_rank`` and ``broadcast_object`` from another rank;
* ``fit`` under DDP: the ranks draw different augmentations, in the process and in loader
  workers; a run with augmentations that crashes mid-epoch and resumes ends bit for bit where
  the uninterrupted run does (across an epoch boundary), each rank restoring its own RNG state
  from the checkpoint; a signal to one rank stops every rank at the same step, with a
  checkpoint; a BatchNorm head warns on the CPU (SyncBatchNorm needs CUDA), and the CUDA
  conversion to SyncBatchNorm is checked in-process.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_distributed import PlainPairs as Pairs  # noqa: E402 - tests/ is on sys.path
from torch import nn
from two_ranks import launch_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as a worker script
    sys.path.insert(0, str(ROOT))

from contrastive import distributed as D  # noqa: E402

WORLD = 2
N, DIM_IN, DIM_OUT, N_CLASSES = 16, 10, 6, 4
N_EVAL = 61  # odd: the shards differ in size
TOL = 1e-5

FIT = dict(dataset="digits", backbone="mlp", dim=16, eval_every=0, final_probe=False,
           progress=False, optimizer="sgd", device="cpu", grad_clip=1.0)
# 1257 digits in 10 classes, m = 40: 3 batches per epoch, so 8 steps cross two epoch boundaries
# augment: the ranks draw different random numbers, so each must resume from its own RNG state
RESUME = dict(FIT, batch_size=400, m_per_class=40, steps=8, log_every=2, checkpoint_every=4,
              lr=0.5, critic="bilinear", augment=True)
FIRST_STEP = dict(FIT, batch_size=32, m_per_class=4, steps=1, log_every=1, checkpoint_every=0,
                  lr=0.05)


# --------------------------------------------------------------------------------------------
# the problems, shared by the workers and the reference
# --------------------------------------------------------------------------------------------
def make_problem() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM_IN, generator=g)
    labels = torch.arange(N_CLASSES).repeat_interleave(N // N_CLASSES)
    labels = labels[torch.randperm(N, generator=g)]
    model = nn.Linear(DIM_IN, DIM_OUT)
    with torch.no_grad():
        model.weight.copy_(0.5 * torch.randn(DIM_OUT, DIM_IN, generator=g))
        model.bias.copy_(0.1 * torch.randn(DIM_OUT, generator=g))
    return x, labels, model


def make_loss(name: str) -> nn.Module:
    """A loss with learnable parameters, initialised the same way in every process."""
    from contrastive.app.factory import build_loss

    torch.manual_seed(3)
    if name == "bilinear":
        return build_loss("infonce", {}, "bilinear", {}, embedding_dim=DIM_OUT,
                          num_classes=N_CLASSES)
    return build_loss(name, {}, None, {}, embedding_dim=DIM_OUT, num_classes=N_CLASSES)


LEARNABLE = ("bilinear", "proxy_anchor")


def grads(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.grad.detach().clone() for i, m in enumerate(modules)
            for n, p in m.named_parameters()}


# In a DataLoader worker started with ``scale_in_worker`` the inputs are tripled: a loader whose
# worker_init_fn is lost embeds different rows.
_WORKER_SCALE = 1.0


def scale_in_worker(worker_id: int) -> None:
    global _WORKER_SCALE
    _WORKER_SCALE = 3.0


class ScaledPairs(Pairs):
    def __getitem__(self, i):
        return self.x[i] * _WORKER_SCALE, int(self.y[i])


def make_eval_problem() -> tuple[nn.Module, Pairs]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_EVAL, DIM_IN, generator=g)
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(DIM_IN, 8), nn.ReLU(), nn.Linear(8, 8)), Pairs(x, torch.arange(
        N_EVAL) % 5)


def embed_cases(model: nn.Module, data: Pairs, fn) -> dict:
    """``fn`` is ``embed`` (the reference) or ``embed_distributed`` (the workers)."""
    from torch.utils.data import DataLoader

    kw = dict(device="cpu", progress=False)
    return {
        "workers": fn(model, data, batch_size=8, num_workers=2, **kw),
        "loader_workers": fn(model, DataLoader(data, batch_size=8, num_workers=2), **kw),
        "drop_last": fn(model, DataLoader(data, batch_size=8, drop_last=True), **kw),
        "worker_init_fn": fn(model, DataLoader(ScaledPairs(data.x, data.y), batch_size=8,
                                               num_workers=1, worker_init_fn=scale_in_worker),
                             **kw),
    }


# --------------------------------------------------------------------------------------------
# the worker (this file run as a script)
# --------------------------------------------------------------------------------------------
class _PlannedCrash(RuntimeError):
    pass


def _fits(out_dir: Path, rank: int, res: dict) -> None:
    from contrastive import views
    from contrastive.app.config import TrainConfig
    from contrastive.app.train import fit

    def cfg(name, base, **kw):
        return TrainConfig.from_dict(dict(base, output=str(out_dir / name), **kw))

    # an uninterrupted run, and the same run crashing at step 6 (checkpoint at 4) then resumed
    fit(cfg("full", RESUME))
    real, calls = torch.optim.SGD.step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # on every rank at the same step: no rank waits for another
            raise _PlannedCrash
        return real(self, *a, **k)

    torch.optim.SGD.step = step
    try:
        fit(cfg("crashed", RESUME))
        res["crashed"] = False
    except _PlannedCrash:
        res["crashed"] = True
    finally:
        torch.optim.SGD.step = real
    res["crash_ckpt"] = torch.load(out_dir / "crashed" / "checkpoints" / "last.pt",
                                   weights_only=False)
    fit(cfg("crashed", RESUME, resume=True))

    # SIGTERM to rank 1 alone during step 2: both ranks stop after step 2, with a checkpoint
    from contrastive.app.train import TrainingInterrupted

    calls["n"] = 0

    def signalled_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    torch.optim.SGD.step = signalled_step
    try:
        fit(cfg("signal", FIRST_STEP, steps=5))
        res["signal"] = None
    except TrainingInterrupted as exc:
        res["signal"] = (exc.step, exc.signal_name, exc.checkpoint is not None)
    finally:
        torch.optim.SGD.step = real
    if rank == 0:
        res["signal_ckpt"] = torch.load(out_dir / "signal" / "checkpoints" / "last.pt",
                                        weights_only=False)

    # the random numbers each rank's augmentation draws for its first item of the first batch
    draws, orig = [], views.VectorAugmentation.__call__

    def record(self, x):
        if not draws:
            state = torch.get_rng_state()
            probe = torch.as_tensor(x, dtype=torch.float32)
            draws.append(torch.cat([torch.rand_like(probe), torch.randn_like(probe)]))
            torch.set_rng_state(state)
        return orig(self, x)

    views.VectorAugmentation.__call__ = record
    try:
        fit(cfg("augment", FIRST_STEP, augment=True))
    finally:
        views.VectorAugmentation.__call__ = orig
    res["aug_draws"] = draws[0]

    # the same in a loader worker (its random numbers come from the loader's generator), saved
    # by the worker process itself
    worker_file = out_dir / f"aug_worker_rank{rank}.pt"

    def record_in_worker(self, x):
        if not worker_file.exists():
            state = torch.get_rng_state()
            probe = torch.as_tensor(x, dtype=torch.float32)
            torch.save(torch.cat([torch.rand_like(probe), torch.randn_like(probe)]), worker_file)
            torch.set_rng_state(state)
        return orig(self, x)

    views.VectorAugmentation.__call__ = record_in_worker
    try:
        fit(cfg("augment_workers", FIRST_STEP, augment=True, num_workers=1))
    finally:
        views.VectorAugmentation.__call__ = orig
    res["aug_worker_draws"] = torch.load(worker_file)

    # the first step's loss with a linear head and with the BatchNorm ("mlp") head
    for head in ("linear", "mlp"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fit(cfg(f"head_{head}", FIRST_STEP, head=head))
        res[f"head_{head}"] = out["history"][0]["loss"]
        res[f"warnings_{head}"] = [str(w.message) for w in caught
                                   if "BatchNorm" in str(w.message)]


def _worker(out_dir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from contrastive.inference import embed_distributed

    torch.set_num_threads(1)
    rank, world, _, _ = D.setup(device="cpu")
    res: dict = {}
    x, labels, model0 = make_problem()

    # one rank without rows
    from losses.modules import InfoNCE

    for sizes in ((N, 0), (0, N), (N - 1, 1)):
        model = copy.deepcopy(model0)
        ddp = DDP(model)
        start, n = sum(sizes[:rank]), sizes[rank]
        emb, ys = D.gather_embeddings(ddp(x[start : start + n]), labels[start : start + n])
        loss = InfoNCE(temperature=0.1)(emb, ys)
        loss.backward()
        res[f"sizes{sizes}"] = {"loss": loss.item(), "grads": grads(model), "emb": emb.detach(),
                                "labels": ys}

    # bf16 embeddings (CPU autocast) through gloo
    model = copy.deepcopy(model0)
    ddp = DDP(model)
    emb = ddp(x[rank * 8 : rank * 8 + 8]).bfloat16()
    gathered = D.all_gather_with_grad(emb)
    loss = InfoNCE(temperature=0.1)(gathered.float(), labels)
    loss.backward()
    res["bf16"] = {"loss": loss.item(), "grads": grads(model), "dtype": str(gathered.dtype)}

    # learnable loss parameters: all-reduced as fit does
    for name in LEARNABLE:
        model, loss_fn = copy.deepcopy(model0), make_loss(name)
        ddp = DDP(model)
        emb, ys = D.gather_embeddings(ddp(x[rank * 8 : rank * 8 + 8]), labels[rank * 8 :
                                                                              rank * 8 + 8])
        loss = loss_fn(emb, ys)
        loss.backward()
        D.average_gradients(loss_fn.parameters())
        res[f"learnable/{name}"] = {"loss": loss.item(), "grads": grads(model, loss_fn)}

    eval_model, data = make_eval_problem()
    res["embed"] = embed_cases(eval_model, data, embed_distributed)
    from torch.utils.data import DataLoader

    try:  # 5 rows, batches of 8, drop_last: nothing to embed (no collective is reached)
        embed_distributed(eval_model, DataLoader(Pairs(data.x[:5], data.y[:5]), batch_size=8,
                                                 drop_last=True), device="cpu", progress=False)
        res["embed_dropped_all"] = None
    except ValueError as exc:
        res["embed_dropped_all"] = str(exc)
    res["broadcast_src1"] = D.broadcast_object({"rank": rank}, src=1)
    res["all_gather_object"] = D.all_gather_object({"rank": rank})
    res["any_rank"] = (D.any_rank(rank == 1), D.any_rank(rank == 0), D.any_rank(False))

    _fits(out_dir, rank, res)
    D.barrier()
    D.cleanup()
    torch.save(res, out_dir / f"rank{rank}.pt")


# --------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("review_ddp")
    launch_ranks(__file__, out_dir, WORLD, timeout=180)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_fits(tmp_path_factory) -> dict:
    """The single-process first-step losses for the head comparison."""
    from contrastive.app.config import TrainConfig
    from contrastive.app.train import fit

    out = tmp_path_factory.mktemp("review_single")
    return {head: fit(TrainConfig.from_dict(dict(FIRST_STEP, head=head,
                                                 output=str(out / head))))["history"][0]["loss"]
            for head in ("linear", "mlp")}


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def _reference(loss_name: str | None = None, bf16: bool = False):
    from losses.modules import InfoNCE

    x, labels, model = make_problem()
    emb = model(x)
    if bf16:
        emb = emb.bfloat16().float()
    loss_fn = InfoNCE(temperature=0.1) if loss_name is None else make_loss(loss_name)
    loss = loss_fn(emb, labels)
    loss.backward()
    return loss.item(), grads(model, loss_fn) if loss_name else grads(model)


def _assert_same(got: dict, ref_loss: float, ref_grads: dict, tol: float = TOL) -> None:
    assert got["loss"] == pytest.approx(ref_loss, rel=tol, abs=tol)
    assert got["grads"].keys() == ref_grads.keys()
    for key, g in ref_grads.items():
        assert g.abs().max() > 1e-4, key  # not a comparison between zeros
        torch.testing.assert_close(got["grads"][key], g, rtol=tol, atol=tol, msg=key)


@pytest.mark.parametrize("sizes", [(N, 0), (0, N), (N - 1, 1)])
def test_gather_with_grad_with_an_empty_rank_equals_single_process(ranks, sizes):
    x, labels, model = make_problem()
    ref_loss, ref_grads = _reference()
    for res in ranks:
        got = res[f"sizes{sizes}"]
        torch.testing.assert_close(got["emb"], model(x).detach(), rtol=0, atol=1e-6)
        assert torch.equal(got["labels"], labels)
        _assert_same(got, ref_loss, ref_grads)


def test_gather_with_grad_in_bf16_under_gloo_equals_single_process(ranks):
    ref_loss, ref_grads = _reference(bf16=True)
    for res in ranks:
        assert res["bf16"]["dtype"] == "torch.bfloat16"
        _assert_same(res["bf16"], ref_loss, ref_grads)


@pytest.mark.parametrize("name", LEARNABLE)
def test_learnable_loss_parameters_get_the_single_process_gradient(ranks, name):
    ref_loss, ref_grads = _reference(name)
    assert any(k.startswith("1.") for k in ref_grads)  # the loss has parameters
    for res in ranks:
        _assert_same(res[f"learnable/{name}"], ref_loss, ref_grads)


@pytest.mark.parametrize("case", ["workers", "loader_workers", "worker_init_fn"])
def test_embed_distributed_with_loader_workers_equals_embed(ranks, case):
    from contrastive.inference import embed

    model, data = make_eval_problem()
    z_ref, y_ref = embed_cases(model, data, embed)[case]
    assert z_ref.shape == (N_EVAL, 8)
    for res in ranks:
        z, y = res["embed"][case]
        torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-6)
        assert torch.equal(y, y_ref)
    if case == "worker_init_fn":  # the loader's workers scaled the inputs: not plain rows
        plain, _ = embed_cases(model, data, embed)["loader_workers"]
        assert not torch.allclose(z_ref, plain)


def test_embed_distributed_honours_the_loaders_drop_last(ranks):
    from contrastive.inference import embed

    model, data = make_eval_problem()
    z_ref, y_ref = embed_cases(model, data, embed)["drop_last"]
    assert z_ref.shape == (56, 8)  # 7 full batches of 8
    for res in ranks:
        z, y = res["embed"]["drop_last"]
        assert z.shape == z_ref.shape
        torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-6)
        assert torch.equal(y, y_ref)


def test_embed_distributed_of_a_loader_dropping_its_only_batch_raises_as_embed_does(ranks):
    from torch.utils.data import DataLoader

    from contrastive.inference import embed

    model, data = make_eval_problem()
    with pytest.raises(ValueError, match="empty data set"):
        embed(model, DataLoader(Pairs(data.x[:5], data.y[:5]), batch_size=8, drop_last=True),
              device="cpu", progress=False)
    for res in ranks:
        assert "empty data set" in res["embed_dropped_all"]


def test_a_shards_loader_keeps_the_loaders_options():
    from torch.utils.data import DataLoader

    from contrastive.inference import _shard

    _, data = make_eval_problem()
    g = torch.Generator().manual_seed(5)
    loader = DataLoader(data, batch_size=4, num_workers=2, worker_init_fn=scale_in_worker,
                        persistent_workers=True, prefetch_factor=3, timeout=7.0,
                        multiprocessing_context="spawn", generator=g, drop_last=True)
    part = _shard(loader, 3, 9)
    assert len(part.dataset) == 6 and part.batch_size == 4 and not part.drop_last
    assert part.worker_init_fn is scale_in_worker and part.generator is g
    assert (part.num_workers, part.persistent_workers, part.prefetch_factor, part.timeout) == (
        2, True, 3, 7.0)
    assert part.multiprocessing_context is loader.multiprocessing_context is not None
    # a loader without workers: the worker options stay unset (DataLoader refuses them then)
    plain = _shard(DataLoader(data, batch_size=4), 0, 5)
    assert (plain.num_workers, plain.prefetch_factor, plain.persistent_workers) == (0, None,
                                                                                    False)


def test_broadcast_object_from_another_rank(ranks):
    assert [res["broadcast_src1"] for res in ranks] == [{"rank": 1}, {"rank": 1}]


def test_all_gather_object_and_any_rank(ranks):
    for res in ranks:
        assert res["all_gather_object"] == [{"rank": 0}, {"rank": 1}]
        assert res["any_rank"] == (True, True, False)
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]  # no process group
    assert D.any_rank(True) and not D.any_rank(False)


def test_ddp_fit_resumed_mid_epoch_ends_where_the_uninterrupted_run_ends(ranks, tmp_path):
    res = ranks[0]
    assert all(r["crashed"] for r in ranks)
    crash = res["crash_ckpt"]
    assert (crash["step"], crash["epoch"], crash["batch_in_epoch"]) == (4, 1, 1)  # mid-epoch
    out = Path(ranks[0]["crash_ckpt"]["config"]["output"]).parent
    full = torch.load(out / "full" / "checkpoints" / "last.pt", weights_only=False)
    resumed = torch.load(out / "crashed" / "checkpoints" / "last.pt", weights_only=False)
    assert full["step"] == resumed["step"] == 8
    for part in ("model", "loss"):  # the learnable critic too (all-reduced gradients)
        for k, v in full[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)
    # the run trained after the checkpoint: not a comparison of two idle models
    assert any(not torch.equal(v, crash["model"][k]) for k, v in full["model"].items())
    ra = json.loads((out / "full" / "result.json").read_text())
    rb = json.loads((out / "crashed" / "result.json").read_text())
    assert [r["loss"] for r in ra["history"]] == [r["loss"] for r in rb["history"]]
    assert [r["step"] for r in rb["history"]] == [2, 4, 6, 8]
    assert ra["metrics"] == rb["metrics"]
    # the checkpoint holds each rank's RNG state, and they differ (the ranks augment their own
    # way, so restoring rank 0's on rank 1 would not end where the uninterrupted run does)
    assert crash["config"]["augment"] is True
    states = crash["rng_ranks"]
    assert len(states) == WORLD
    assert torch.equal(states[0]["torch"], crash["rng"]["torch"])
    assert not torch.equal(states[0]["torch"], states[1]["torch"])
    assert states[0]["python"] != states[1]["python"]
    assert not torch.equal(states[0]["numpy"]["key"], states[1]["numpy"]["key"])


def test_ddp_signal_to_one_rank_stops_every_rank_at_the_same_step(ranks):
    assert ranks[0]["signal"] == (2, "a signal to another rank", True)
    assert ranks[1]["signal"] == (2, "SIGTERM", False)
    ck = ranks[0]["signal_ckpt"]
    assert ck["step"] == 2 and len(ck["rng_ranks"]) == WORLD


def test_ddp_ranks_draw_different_augmentations(ranks):
    a, b = ranks[0]["aug_draws"], ranks[1]["aug_draws"]
    assert a.shape == b.shape == (2 * 64,)
    assert not torch.equal(a, b)


def test_ddp_ranks_loader_workers_draw_different_augmentations(ranks):
    a, b = ranks[0]["aug_worker_draws"], ranks[1]["aug_worker_draws"]
    assert a.shape == b.shape == (2 * 64,)
    assert not torch.equal(a, b)


def test_each_rank_restores_its_own_rng_state():
    from contrastive import checkpoint as ckpt
    from contrastive.app.train import _restore_rng

    keep = ckpt.capture_rng_state()
    try:
        torch.manual_seed(1)
        s0 = ckpt.capture_rng_state()
        torch.manual_seed(2)
        s1 = ckpt.capture_rng_state()
        _restore_rng({"rng": s0, "rng_ranks": [s0, s1], "step": 4}, 1, seed=0)
        assert torch.equal(torch.get_rng_state(), s1["torch"])
        # a checkpoint with rank 0's state only (one process, or an older one): rank 0 takes
        # it, another rank its own numbers
        _restore_rng({"rng": s0, "step": 4}, 0, seed=0)
        assert torch.equal(torch.get_rng_state(), s0["torch"])
        _restore_rng({"rng": s0, "step": 4}, 1, seed=0)
        assert not torch.equal(torch.get_rng_state(), s0["torch"])
    finally:
        ckpt.restore_rng_state(keep)


def test_rank_seeds():
    from contrastive.app.train import _rank_seed

    assert _rank_seed(7, 0) == 7  # one process, and rank 0: the seed as before
    seeds = {_rank_seed(s, r) for s in range(4) for r in range(4)}
    assert len(seeds) == 16  # not seed + rank: (0, 1) and (1, 0) differ
    assert _rank_seed(7, 1, 4) != _rank_seed(7, 1)


def test_ddp_first_step_loss_with_linear_head_equals_single_process(ranks, single_fits):
    """The control of the BatchNorm test below: the harness reproduces the single process."""
    for res in ranks:
        assert res["head_linear"] == pytest.approx(single_fits["linear"], abs=1e-5)


def test_ddp_with_a_batchnorm_head_on_the_cpu_warns_once_on_rank_0(ranks):
    assert len(ranks[0]["warnings_mlp"]) == 1
    assert "SyncBatchNorm needs CUDA" in ranks[0]["warnings_mlp"][0]
    assert ranks[1]["warnings_mlp"] == []  # rank 0 speaks for the run
    assert ranks[0]["warnings_linear"] == ranks[1]["warnings_linear"] == []  # no BatchNorm


@pytest.mark.xfail(strict=True, reason=(
    "a known limitation, not a bug to fix here: SyncBatchNorm runs on CUDA only, so under gloo on "
    "the CPU the 'mlp' head's BatchNorm normalises each rank's half batch by its own statistics "
    "and the global-batch loss cannot equal the single process's (fit warns; on CUDA it converts "
    "to SyncBatchNorm, see test_sync_batchnorm_conversion_on_cuda)"))
def test_ddp_first_step_loss_with_batchnorm_head_equals_single_process(ranks, single_fits):
    for res in ranks:
        assert res["head_mlp"] == pytest.approx(single_fits["mlp"], abs=1e-5)


def test_sync_batchnorm_conversion_on_cuda():
    """The CUDA branch, run on the CPU with a CUDA device named (the conversion itself does not
    touch the device): BatchNorm layers become SyncBatchNorm on the same parameters and
    buffers, so the optimizer built before and the checkpoints keep them."""
    from contrastive.app.train import _sync_batchnorm

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _sync_batchnorm(model, 1, cuda, True) is model  # one process: as it is
        assert isinstance(model[1], nn.BatchNorm1d)
        synced = _sync_batchnorm(model, 2, cuda, True)
    assert isinstance(synced[1], nn.SyncBatchNorm)
    for name, p in synced.named_parameters():
        assert p is params[name], name
    for name, b in synced.named_buffers():
        assert b is buffers[name], name
    assert synced.state_dict().keys() == model.state_dict().keys()


def test_sync_batchnorm_keeps_timms_norm_activation():
    from timm.layers import BatchNormAct2d

    from contrastive.app.train import _sync_batchnorm

    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4, act_layer=nn.ReLU))
    synced = _sync_batchnorm(model, 2, torch.device("cuda", 0), True)
    assert isinstance(synced[1], nn.SyncBatchNorm)
    assert isinstance(synced[1].act, nn.ReLU)  # torch's converter would drop it


def test_batchnorm_under_ddp_on_the_cpu_warns_on_rank_0_only():
    from contrastive.app.train import _sync_batchnorm

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="BatchNorm layers normalise each rank's share"):
        assert _sync_batchnorm(model, 2, cpu, True) is model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _sync_batchnorm(model, 2, cpu, False) is model  # rank 1
        assert _sync_batchnorm(model, 1, cpu, True) is model  # one process
        linear = nn.Linear(4, 2)
        assert _sync_batchnorm(linear, 2, cpu, True) is linear  # no BatchNorm
    assert isinstance(model[1], nn.BatchNorm1d)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
