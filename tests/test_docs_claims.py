"""What README.md, docs/losses.md and docs/mi_estimators.md state, checked against the code: the
README's Python snippet run as written, the defaults and ranges the docs give (against the
registry and the constructors), the names they cite (tests, functions, modules, registry
entries, files and links), and the settings stated next to measured results. Fast (tiny sizes,
no training beyond the snippet's two steps, no network)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
import tomllib
from pathlib import Path

import pytest
import torch

import losses
from losses import drop_in

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LOSSES_MD = (ROOT / "docs/losses.md").read_text()
MI_MD = (ROOT / "docs/mi_estimators.md").read_text()
DOCS = {"README.md": README, "docs/losses.md": LOSSES_MD, "docs/mi_estimators.md": MI_MD}


# ------------------------------------------------------------------ the README's Python snippet


def _readme_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == 1, "the README has one Python snippet (Drop-in use)"
    return blocks[0]


def test_readme_drop_in_snippet_runs_as_written():
    """The 'Drop-in use' block, executed verbatim; the names it leaves to the reader (model,
    loader, optimiser, miner, memory bank, paired views) are given tiny stand-ins."""
    from pytorch_metric_learning import miners

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 128)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(4)
    ns = {
        "model": model,
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
        "loader": [(torch.randn(32, 16, generator=g), labels) for _ in range(2)],
        "miner": miners.MultiSimilarityMiner(),
        "mem": torch.randn(20, 128, generator=g),
        "mem_y": torch.randint(0, 8, (20,), generator=g),
        "x_emb": torch.randn(24, 128, generator=g),
        "y_emb": torch.randn(24, 128, generator=g),
        "out0": torch.randn(16, 128, generator=g),
        "out1": torch.randn(16, 128, generator=g),
    }
    exec(compile(_readme_snippet(), "README.md (Drop-in use)", "exec"), ns)
    emb, y, loss_fn = ns["emb"].detach(), ns["y"], ns["loss_fn"]
    # the comments' claims
    torch.testing.assert_close(loss_fn(emb, y), losses.get("infonce", temperature=0.1)(emb, y))
    assert set(loss_fn.readout(emb, y)) == {"infonce", "nwj"}
    terms = losses.InfoNCE(reduction="none")(emb, y)
    assert terms.shape == (emb.shape[0],)
    torch.testing.assert_close(terms.mean(), losses.InfoNCE()(emb, y))


# ------------------------------------------------------------------ stated defaults (README)


def test_readme_stated_defaults():
    nce = losses.InfoNCE()  # "defaults to the SupCon form (positives="all", temperature 0.1)"
    assert nce.positives == "all" and nce.critic.temperature == pytest.approx(0.1)
    ntx = losses.get("ntxent")  # positives="pair", temperature 0.07
    assert ntx.positives == "pair" and ntx.critic.temperature == pytest.approx(0.07)
    assert drop_in.NTXentLoss().critic.temperature == pytest.approx(0.07)
    sup = losses.get("supcon")
    assert sup.positives == "all" and sup.critic.temperature == pytest.approx(0.1)
    assert drop_in.SupConLoss().critic.temperature == pytest.approx(0.1)
    # registry: triplet margin 0.2 with all triplets, N-pair l2_reg=0.002; class: margin 0.05
    t = losses.get("triplet")
    assert (t.margin, t.mining) == (0.2, "all")
    assert losses.get("npair").l2_reg == 0.002
    assert losses.Triplet().margin == 0.05 and losses.Triplet().mining == "all"
    # Triplet: Euclidean distances of normalised embeddings, mean over non-zero terms
    crit = losses.Triplet().critic
    assert type(crit).__name__ == "NegativeL2" and crit.normalize and not crit.squared
    assert losses.Triplet().reduction is None  # None: "nonzero" for mining="all"
    from losses.functional import _check_triplet_args
    assert _check_triplet_args("all", None) == "nonzero"
    assert _check_triplet_args("hard", None) == "mean"  # averages over anchors
    # MultiClassNPair: a plain dot product; PML's NPairsLoss normalises (Cosine(1))
    assert type(losses.MultiClassNPair().critic).__name__ == "Dot"
    c = drop_in.NPairsLoss().critic
    assert type(c).__name__ == "Cosine" and c.temperature == pytest.approx(1.0)
    # proxies get 100 x the learning rate unless proxy_lr is set
    src = inspect.getsource(importlib.import_module("contrastive.app.factory"))
    assert "100.0 * cfg.lr" in src


def test_readme_names_exist():
    avail = set(losses.available())
    for name in ("multi_similarity", "circle", "lifted_structure", "margin", "nca", "proxy_nca",
                 "proxy_anchor", "normalized_softmax", "cosface", "arcface", "simclr", "dcl",
                 "dclw", "xbm", "moco_queue", "infonce", "supcon", "ntxent", "nwj", "js", "dv",
                 "npair", "triplet", "contrastive"):
        assert name in avail or losses.canonical(name) in avail, name
    from losses import functional as F
    for name in ("infonce", "supcon", "ntxent", "nwj", "js", "dv", "multiclass_npair", "triplet",
                 "contrastive", "infonce_bound", "nwj_bound", "js_bound", "dv_bound"):
        fn = getattr(F, name)
        params = inspect.signature(fn).parameters
        assert "reduction" in params and "check" in params, name  # every core function
    from contrastive import critics
    for name in ("Dot", "Cosine", "NegativeL2", "Bilinear", "Separable", "Concat"):
        assert isinstance(getattr(critics, name), type)
    for name in ("NoPairsWarning", "NoPairsError", "to_pml", "simclr", "CrossBatchMemory",
                 "ProxyAnchor"):
        assert hasattr(losses, name), name
    assert issubclass(losses.NoPairsError, ValueError)


PML_NAMED = ("NTXentLoss", "SupConLoss", "TripletMarginLoss", "ContrastiveLoss", "NPairsLoss",
             "MultiSimilarityLoss", "CircleLoss", "GeneralizedLiftedStructureLoss", "MarginLoss",
             "NCALoss", "ProxyNCALoss", "ProxyAnchorLoss", "NormalizedSoftmaxLoss", "CosFaceLoss",
             "ArcFaceLoss", "CrossBatchMemory")


@pytest.mark.parametrize("name", PML_NAMED)
def test_readme_pml_named_classes_take_pmls_arguments_and_defaults(name):
    """"... take PML's constructor arguments (positional order included) and defaults"."""
    from pytorch_metric_learning import losses as pml

    assert f"`{name}`" in README
    ours = getattr(drop_in, name)
    assert getattr(losses, name) is ours  # also `losses.NTXentLoss`, ...
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    mine = [(p.name, p.default) for p in inspect.signature(ours).parameters.values()
            if p.kind in plain]
    # PML's required arguments: ours has the name (CrossBatchMemory's embedding_size may be
    # left out, None: sized from the first batch)
    empty = inspect.Parameter.empty
    theirs = [(p.name, p.default) for p in inspect.signature(getattr(pml, name)).parameters.values()
              if p.kind in plain]
    if any(p.kind == p.VAR_POSITIONAL
           for p in inspect.signature(getattr(pml, name)).parameters.values()):
        # CosFaceLoss(*args, margin, scale): the positional part is LargeMarginSoftmaxLoss's
        base = inspect.signature(pml.LargeMarginSoftmaxLoss).parameters
        head = [(p.name, p.default) for p in base.values() if p.kind in plain][:2]
        theirs = head + theirs
    assert [n for n, _ in mine[:len(theirs)]] == [n for n, _ in theirs]
    assert [d for (_, d), (_, e) in zip(mine, theirs) if e is not empty] == [
        e for _, e in theirs if e is not empty]


def test_readme_drop_in_refusals_say_what_to_use():
    from pytorch_metric_learning import distances, reducers

    for kw, says in ((dict(distance=distances.CosineSimilarity()), "critic="),
                     (dict(reducer=reducers.MeanReducer()), "reduction="),
                     (dict(triplets_per_anchor=5), "miner"),
                     (dict(swap=True), "not supported")):
        with pytest.raises((TypeError, ValueError), match=re.escape(says)):
            drop_in.TripletMarginLoss(**kw)


def test_readme_softmax_proxy_losses_read_pml_state_dicts_as_W():
    from pytorch_metric_learning import losses as pml

    for name in ("NormalizedSoftmaxLoss", "CosFaceLoss", "ArcFaceLoss"):
        theirs, ours = getattr(pml, name)(10, 4), getattr(drop_in, name)(10, 4)
        assert tuple(ours.W.shape) == (4, 10)  # [d, C]
        ours.load_state_dict(theirs.state_dict())
        assert torch.equal(ours.W, theirs.W)


# ------------------------------------------------------------------ the command line and make


def test_make_demo_and_test_targets_are_what_the_readme_says():
    make = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n\t(.*)$", make, re.M).group(1)
    assert demo.split() == ["$(VENV)/bin/contrastive", "compare", "--output", "runs/demo"]
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", make, re.M).group(1)
    assert "ruff check" in lint and "lint-imports" in lint
    assert re.search(r"^test: venv lint\n\t.*pytest", make, re.M)
    assert "--no-deps 'lightly==1.6.0'" in make


def test_make_demo_settings():
    """"7 losses x 3 seeds (an MLP encoder on digits, batches of 8 classes x 8 images, AdamW,
    1,000 steps each)", "the 540 held-out digits", "weighted k-NN (k = 200, t = 0.07)"."""
    from contrastive.app.compare import DEFAULT_LOSSES, CompareConfig
    from contrastive.app.config import TrainConfig
    from contrastive.datasets import DATASETS
    from evaluation.weighted_knn import knn_classifier

    c, t = CompareConfig(), TrainConfig()
    assert len(DEFAULT_LOSSES) == 7 and tuple(c.losses) == DEFAULT_LOSSES
    assert (c.dataset, c.backbone, c.steps, tuple(c.seeds)) == ("digits", "mlp", 1000, (0, 1, 2))
    assert (c.batch_size, t.m_per_class, t.optimizer) == (64, 8, "adamw")
    assert len(DATASETS.get("digits").factory(split="test")) == 540
    params = inspect.signature(knn_classifier).parameters
    assert (params["k"].default, params["temperature"].default) == (200, 0.07)
    # the table's critics
    assert repr(losses.get("infonce").critic) == "Cosine(temperature=0.1)"
    assert type(losses.get("npair").critic).__name__ == "Dot"
    for name in ("triplet", "contrastive"):
        crit = losses.get(name).critic
        assert type(crit).__name__ == "NegativeL2" and crit.normalize


def test_compare_tune_defaults():
    """"The default (7 losses, 10 trials x 2 folds x 400 steps of batch 64 = 16 classes x 4,
    then 3 seeds)", on latent_classes (200 classes, 8-d signal in 64 dimensions, nuisance twice
    as large), study in <output>/tuning.db."""
    from contrastive.app.compare import DEFAULT_LOSSES
    from contrastive.app.tuning import TuneConfig
    from contrastive.datasets.latent import generate_latent_classes

    cfg = TuneConfig()
    assert (cfg.dataset, tuple(cfg.losses), cfg.trials, cfg.folds, cfg.steps) == (
        "latent_classes", DEFAULT_LOSSES, 10, 2, 400)
    assert (cfg.batch_size, cfg.m_per_class, len(cfg.seeds)) == (64, 4, 3)
    assert cfg.output == "runs/compare-tuned"
    p = inspect.signature(generate_latent_classes).parameters
    assert (p["n_classes"].default, p["signal_dim"].default, p["dim"].default) == (200, 8, 64)
    assert p["nuisance"].default == 2.0  # the class centres are N(0, I): twice as large


def test_threads_default_is_the_usable_cores_less_one(monkeypatch):
    import os

    from contrastive import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert cli.default_threads() == min(torch.get_num_threads(), 3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cli.default_threads() == 1


def test_readme_install_extras_exist():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"dev", "gpu", "gpu-cu12", "gpu-cu13"} <= set(extras)
    assert extras["gpu"] == extras["gpu-cu12"]
    assert any(d.startswith("faiss-gpu-cu13-cuvs") for d in extras["gpu-cu13"])
    assert project["requires-python"] == ">=3.11"
    assert any(d.startswith("torch>=2.2") for d in project["dependencies"])


def test_readme_evaluation_defaults():
    import evaluation
    from evaluation import ann

    assert ann.ANN_MIN_N == 250_000
    for fn in (evaluation.retrieval_metrics, evaluation.knn):
        assert inspect.signature(fn).parameters["index"].default == "auto"
    assert set(ann.INDEXES) == {"auto", "exact", "ivf", "ivfpq", "hnsw"}
    # the settings printed next to the measured table: nlist = round(4 sqrt(N)) -> 1265, 4000
    assert round(4 * math.sqrt(100_000)) == 1265 and round(4 * math.sqrt(1_000_000)) == 4000
    params = inspect.signature(evaluation.AccuracyCalculator).parameters
    for name in ("include", "exclude", "avg_of_avgs", "return_per_class", "k"):
        assert name in params
    assert params["metric"].default == "l2"


def test_readme_accuracy_calculator_keys():
    import numpy as np

    import evaluation

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 4)).astype("float32"), np.repeat(np.arange(4), 10)
    keys = evaluation.AccuracyCalculator().get_accuracy(x, y, x, y, True)
    assert set(keys) == {"precision_at_1", "r_precision", "mean_average_precision_at_r",
                         "mean_average_precision", "mean_reciprocal_rank", "NMI", "AMI"}


# ------------------------------------------------------------------ docs/losses.md


def test_losses_md_has_one_row_per_registered_loss():
    first_cells = [line.split("|")[1] for line in LOSSES_MD.splitlines()
                   if line.startswith("| ")]
    for name in losses.available():
        assert any(f"`{name}`" in cell for cell in first_cells), name


#: docs/losses.md's "defaults; range" column: registry defaults and search spaces.
STATED = {
    "infonce": ({"temperature": 0.1}, {"temperature": (0.02, 1.0, True)}),
    "ntxent": ({"temperature": 0.07}, {"temperature": (0.02, 1.0, True)}),
    "nwj": ({"temperature": 0.1}, {"temperature": (0.02, 1.0, True)}),
    "js": ({"temperature": 0.1}, {"temperature": (0.02, 1.0, True)}),
    "dv": ({"temperature": 0.1}, {"temperature": (0.02, 1.0, True)}),
    "npair": ({"l2_reg": 0.002}, {"l2_reg": (1e-4, 0.1, True)}),
    "triplet": ({"margin": 0.2, "mining": "all"},
                {"margin": (0.01, 1.0, True), "mining": ["all", "semihard", "hard"]}),
    "contrastive": ({"pos_margin": 0.0, "neg_margin": 1.0},
                    {"pos_margin": (0.0, 0.5, False), "neg_margin": (0.2, 1.5, False)}),
    "multi_similarity": ({"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1},
                         {"alpha": (0.5, 10.0, True), "beta": (10.0, 100.0, True),
                          "base": (0.0, 0.8, False), "epsilon": (0.01, 0.5, True)}),
    "circle": ({"m": 0.4, "gamma": 80.0}, {"m": (0.1, 0.5, False), "gamma": (16.0, 512.0, True)}),
    "lifted_structure": ({"neg_margin": 1.0, "pos_margin": 0.0},
                         {"neg_margin": (0.2, 1.5, False), "pos_margin": (0.0, 0.5, False)}),
    "margin": ({"margin": 0.2, "beta": 1.2, "nu": 0.0, "learn_beta": True},
               {"margin": (0.01, 0.5, True), "beta": (0.5, 1.6, False)}),
    "nca": ({"softmax_scale": 1.0}, {"softmax_scale": (1.0, 64.0, True)}),
    "proxy_nca": ({"softmax_scale": 1.0}, {"softmax_scale": (1.0, 64.0, True)}),
    "proxy_anchor": ({"margin": 0.1, "alpha": 32.0},
                     {"margin": (0.0, 0.3, False), "alpha": (8.0, 64.0, True)}),
    "normalized_softmax": ({"temperature": 0.05}, {"temperature": (0.01, 0.5, True)}),
    "cosface": ({"margin": 0.35, "scale": 64.0},
                {"margin": (0.1, 0.5, False), "scale": (16.0, 64.0, True)}),
    "arcface": ({"margin": 28.6, "scale": 64.0},
                {"margin": (10.0, 45.0, False), "scale": (16.0, 64.0, True)}),
    "simclr": ({"temperature": 0.5}, {"temperature": (0.02, 1.0, True)}),
    "dcl": ({"temperature": 0.1}, {"temperature": (0.02, 1.0, True)}),
    "dclw": ({"temperature": 0.1, "sigma": 0.5},
             {"temperature": (0.02, 1.0, True), "sigma": (0.1, 1.0, True)}),
    "xbm": ({"loss": "supcon", "memory_size": 4096}, {"memory_size": [1024, 4096, 16384]}),
    "moco_queue": ({"loss": "simclr", "size": 4096}, {"size": [4096, 16384, 65536]}),
    "tuba": ({"temperature": 0.1, "log_baseline": 0.0},
             {"temperature": (0.02, 1.0, True), "log_baseline": (-2.0, 2.0, False)}),
    "mine_ma": ({"temperature": 0.1, "momentum": 0.01},
                {"temperature": (0.02, 1.0, True), "momentum": (1e-3, 0.5, True)}),
    "smile": ({"temperature": 0.1, "tau": 5.0},
              {"temperature": (0.02, 1.0, True), "tau": (0.5, 20.0, True)}),
    "alpha_infonce": ({"temperature": 0.1, "alpha": 0.5},
                      {"temperature": (0.02, 1.0, True), "alpha": (0.0, 1.0, False)}),
    "flo": ({"temperature": 0.1},
            {"temperature": (0.02, 1.0, True), "shadow_hidden": [32, 64, 128]}),
    "l1out": ({"hidden_dim": 128, "layers": 1},
              {"hidden_dim": [64, 128, 256], "layers": [1, 2]}),
    "club": ({"hidden_dim": 128, "layers": 1},
             {"hidden_dim": [64, 128, 256], "layers": [1, 2]}),
}


@pytest.mark.parametrize("name", sorted(STATED))
def test_losses_md_defaults_and_ranges_are_the_registrys(name):
    from losses.registry import LOSSES

    entry = LOSSES.get(name)
    defaults, space = STATED[name]
    assert dict(entry.defaults) == defaults
    got = {}
    for key, spec in (entry.meta.get("search_space") or {}).items():
        got[key] = (list(spec["choices"]) if "choices" in spec
                    else (spec["low"], spec["high"], bool(spec.get("log", False))))
    assert got == space


def test_losses_md_critics_and_class_defaults():
    from contrastive.critics import Cosine, Dot, NegativeL2

    def is_l2(c, squared=False):
        return isinstance(c, NegativeL2) and c.normalize and c.squared == squared

    def is_cos(c, t):
        return isinstance(c, Cosine) and c.temperature == pytest.approx(t)

    assert is_cos(losses.get("infonce").critic, 0.1)
    assert isinstance(losses.get("npair").critic, Dot)
    for name in ("triplet", "contrastive", "lifted_structure", "margin"):
        assert is_l2(losses.get(name).critic), name  # "L2 of normalised rows"
    for name in ("nca", "proxy_nca"):  # "-squared L2 of normalised rows"
        kw = {"num_classes": 3, "embedding_size": 4} if name == "proxy_nca" else {}
        assert is_l2(losses.get(name, **kw).critic, squared=True), name
    for name in ("multi_similarity", "circle"):
        assert is_cos(losses.get(name).critic, 1.0), name
    assert is_cos(losses.get("proxy_anchor", num_classes=3, embedding_size=4).critic, 1.0)
    # classes: eps None (PML's loss alone), learn_beta False
    assert losses.MultiSimilarity().epsilon is None
    assert inspect.signature(losses.Margin).parameters["learn_beta"].default is False
    assert math.degrees(0.5) == pytest.approx(28.6, abs=0.1)  # ArcFace m 28.6 deg (0.5 rad)
    from losses import kernels

    assert kernels.FUSED_MAX_ENTRIES == 65_536 == 256 * 256
    assert inspect.signature(losses.proxies.param_groups).parameters.keys() >= {
        "params", "loss", "lr", "proxy_lr"}


# ------------------------------------------------------------------ docs/mi_estimators.md


def test_mi_estimators_md_registry_claims():
    mi = set(losses.available({"family": "mi"}))
    assert {"tuba", "mine_ma", "smile", "alpha_infonce", "flo", "l1out", "club"} <= mi
    from losses.registry import ESTIMATORS, LOSSES

    for name in ("tuba", "flo", "l1out", "club"):
        assert "embedding_size" in LOSSES.get(name).meta["needs"]
    assert "flo" not in ESTIMATORS.available()  # "FLO is not in ESTIMATORS"
    assert losses.canonical("mine") == "dv"  # "the library's "mine" name stays an alias of DV"
    assert ESTIMATORS.canonical("mine") == "dv"


def test_mi_estimators_md_benchmark_settings():
    """d = 20, batch 64, MI 2..10; default budget: critics 128 wide with two hidden layers, 400
    steps per level, lr 1e-3; quick: 64 wide, 100 steps, lr 2e-3; FLO among the estimators."""
    from contrastive.app import mi_family

    p = inspect.signature(mi_family.run_family).parameters
    assert (p["dim"].default, p["batch_size"].default) == (20, 64)
    assert tuple(p["levels"].default) == (2, 4, 6, 8, 10)
    assert "flo" in p["estimators"].default
    b = mi_family.FAMILY_BUDGETS
    assert (b["default"]["steps_per_level"], b["default"]["lr"]) == (400, 1e-3)
    assert (b["quick"]["steps_per_level"], b["quick"]["lr"]) == (100, 2e-3)
    for kind in ("separable", "concat"):
        assert b["default"]["critic_kwargs"][kind]["hidden_dim"] == 128
        assert b["default"]["critic_kwargs"][kind]["layers"] == 2
        assert b["quick"]["critic_kwargs"][kind]["hidden_dim"] == 64
    # "at lr 1e-3 (the command line's default)"
    from contrastive.app.config import TrainConfig

    assert TrainConfig().lr == 1e-3


def test_mi_estimators_md_club_closed_form_numbers():
    """"e.g. 4.43 nats at I = 2 and 34.4 at I = 10 for d = 20"."""
    from evaluation import known_mi as K

    def club(mi, d=20):
        rho2 = K.rho_from_mi(mi, d) ** 2
        return d * rho2 / (1 - rho2)

    assert club(2.0) == pytest.approx(4.43, abs=0.005)
    assert club(10.0) == pytest.approx(34.4, abs=0.05)
    assert callable(K.club_at_truth)


# ------------------------------------------------------------------ names, tests and links cited


def _defined_tests() -> set[str]:
    names = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        names |= set(re.findall(r"^def (test_\w+)", f.read_text(), re.M))
    return names


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_cited_tests_exist(doc):
    text, defined = DOCS[doc], _defined_tests()
    for path, name in re.findall(r"tests/(test_\w+)\.py::(test_\w+)", text):
        assert name in (ROOT / f"tests/{path}.py").read_text(), (doc, path, name)
    for token in set(re.findall(r"\b(test_\w+)", text)):
        assert token in defined or (ROOT / f"tests/{token}.py").is_file(), (doc, token)


#: Short names the docs use for modules.
PREFIXES = {"kernels": "losses.kernels", "functional": "losses.functional",
            "bounds": "losses.bounds", "estimator_modules": "losses.estimator_modules",
            "critics": "contrastive.critics", "PairLoss": "losses.modules.PairLoss",
            "Critic": "contrastive.critics.Critic"}


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_cited_api_names_resolve(doc):
    roots = ("losses", "contrastive", "evaluation", *PREFIXES)
    seen = 0
    for name in set(re.findall(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)", DOCS[doc])):
        head = name.split(".")[0]
        if head not in roots or name.rsplit(".", 1)[-1] in ("py", "c", "md"):
            continue
        full = PREFIXES[head] + name[len(head):] if head in PREFIXES else name
        _resolve(full)
        seen += 1
    assert seen >= 10


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_links_and_paths_exist(doc):
    base = (ROOT / doc).parent
    text = DOCS[doc]
    headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", text, re.M)}
    for target in re.findall(r"\]\(([^)]+)\)", text):
        path, _, anchor = target.partition("#")
        if path:
            assert (base / path).exists(), (doc, target)
        elif anchor:
            assert anchor in headings, (doc, target)
    for path in set(re.findall(r"`((?:benchmarks|contrastive|evaluation|losses|examples|docs|"
                               r"tests)/[\w./]+\.(?:py|c|md|yaml))`", text)):
        if path == "docs/gpu.md":  # what `make gpu-check` writes, on a CUDA machine
            continue
        assert (ROOT / path).is_file(), (doc, path)


def test_examples_stated_defaults():
    """examples/retrieval_benchmark.py: "128 = 32 classes x 4, lr 1e-4, 128-d" and "64 = 8
    classes x 8, lr 1e-3, 64-d"; examples/drop_in.py: 150 steps per run."""
    spec = importlib.util.spec_from_file_location("rb", ROOT / "examples/retrieval_benchmark.py")
    rb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rb)
    assert rb.DEFAULTS == {"digits": (64, 8, 1e-3, 64), "images": (128, 4, 1e-4, 128)}
    src = (ROOT / "examples/drop_in.py").read_text()
    assert re.search(r'"--steps", type=int, default=150', src)
    assert "150 steps per run" in src


def test_config_dataclasses_have_the_fields_the_docs_set():
    """The README's `--set train.lr=...`, `proxy_lr=`, `checkpoint_every`."""
    from contrastive.app.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"lr", "proxy_lr", "checkpoint_every", "m_per_class", "final_probe"} <= fields
