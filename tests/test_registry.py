"""One registry type (contrastive.registry.Registry) behind losses, critics, data sets, MI
estimators and experiments: names and aliases, defaults that live once with the registration,
metadata the application reads, and the errors a wrong name gets."""

import pytest
import torch

import losses
from contrastive import critics
from contrastive.app.compare import CompareConfig, loss_defaults, train_config_for
from contrastive.app.factory import build_loss
from contrastive.app.mi_benchmark import resolve_estimators
from contrastive.app.reproduce.experiments import EXPERIMENTS, estimate
from contrastive.datasets import DATASETS, get_dataset
from contrastive.pairs import diagonal_masks
from contrastive.registry import Registry, normalize_name
from losses import functional as LF
from losses.registry import ESTIMATORS, LOSSES


def test_generic_registry_names_aliases_defaults_meta_and_errors():
    reg: Registry = Registry("widget")
    made = []

    def widget(size=1, colour="red"):
        made.append((size, colour))
        return (size, colour)

    assert reg.register("Big-Widget", widget, aliases=("bw", "large widget"),
                        defaults={"size": 3}, meta={"family": "a"}) is widget
    reg.register("small", lambda size=1: ("small", size), meta={"family": "b"})
    assert normalize_name("  Large-Widget ") == "large_widget"
    assert reg.canonical("BW") == reg.canonical("large widget") == "big_widget"
    assert reg.create("bw") == (3, "red")                     # the registered default
    assert reg.create("big_widget", size=5) == (5, "red")     # the caller's value wins
    assert reg.defaults("bw") == {"size": 3} and reg.meta("bw") == {"family": "a"}
    assert reg.available() == ["big_widget", "small"] and list(reg) == reg.available()
    assert reg.available({"family": "b"}) == ["small"]
    assert reg.available(lambda e: "bw" in e.aliases) == ["big_widget"]
    assert "Big Widget" in reg and "nope" not in reg and 3 not in reg
    with pytest.raises(ValueError, match=r"unknown widget 'big_widgt'; choose one of "
                       r"\['big_widget', 'small'\]; did you mean 'big_widget'\?"):
        reg.get("big_widgt")
    with pytest.raises(ValueError, match="a widget named 'bw' is already registered"):
        reg.register("bw", widget)
    with pytest.raises(TypeError, match="factory must be callable"):
        reg.register("x", 3)

    @reg.register("decorated", defaults={"k": 2})
    def decorated(k=0):
        return k

    assert reg.create("decorated") == 2
    with pytest.raises(TypeError):  # the registered defaults are read-only
        reg.get("decorated").defaults["k"] = 5


def test_loss_defaults_live_once_with_the_registration():
    # the compare cell, the trainer's builder and losses.get read the same defaults
    assert losses.get("triplet").margin == 0.2 and losses.get("triplet").mining == "all"
    assert losses.Triplet().margin == 0.05  # the class keeps pytorch-metric-learning's default
    cfg = CompareConfig(losses=("multiclass_npair", "triplet", "ntxent"), steps=1)
    # the alias finds the registration: compare no longer loses l2_reg=0.002 for it
    assert train_config_for(cfg, "multiclass_npair", 0).loss_kwargs == {"l2_reg": 0.002}
    assert train_config_for(cfg, "triplet", 0).loss_kwargs == {"margin": 0.2, "mining": "all"}
    assert build_loss("multiclass_npair").l2_reg == 0.002
    assert build_loss("n-pair", {"l2_reg": 0.0}).l2_reg == 0.0
    assert losses.get("ntxent").critic.temperature == pytest.approx(0.07)
    # a critic replaces the loss's temperature: the default is dropped, not passed twice
    assert loss_defaults("infonce", critic=True) == {}
    assert loss_defaults("pml:NTXentLoss") == {} and loss_defaults("nonsense") == {}
    loss = losses.get("infonce", critic=critics.Dot())
    assert isinstance(loss.critic, critics.Dot)


def test_every_loss_carries_the_metadata_the_application_needs():
    for name in LOSSES.available():
        meta = LOSSES.meta(name)
        assert meta["family"] in ("mi", "metric"), name
        assert set(meta["supervision"]) <= {"labels", "views"}, name
        space = meta["search_space"]
        assert space, name
        for param, spec in space.items():
            if "choices" in spec:
                assert spec["choices"], (name, param)
            else:
                assert spec["low"] < spec["high"], (name, param)
                assert not spec["log"] or spec["low"] > 0, (name, param)
            # every tunable keyword is one the loss accepts (proxy losses: with their sizes)
            sizes = {k: 4 if k == "num_classes" else 8 for k in meta.get("needs", ())}
            losses.get(name, **sizes, **{param: spec["choices"][0] if "choices" in spec
                                         else spec["high"]})
    mi = losses.available({"family": "mi"})
    assert {"dv", "infonce", "js", "ntxent", "nwj", "supcon"} <= set(mi)
    metric = losses.available({"family": "metric"})
    assert {"contrastive", "npair", "triplet", "multi_similarity", "circle", "lifted_structure",
            "margin", "nca", "proxy_nca", "proxy_anchor", "normalized_softmax", "cosface",
            "arcface"} <= set(metric)
    assert set(mi) | set(metric) == set(losses.available())
    # proxy losses (and the MI losses with networks sized to the embedding: TUBA's learned
    # baseline, FLO's shadow, the conditional of the upper bounds) say which sizes the trainer
    # fills in, and the builder fills them
    assert losses.available(lambda e: "needs" in e.meta) == [
        "arcface", "club", "cosface", "flo", "l1out", "normalized_softmax", "proxy_anchor",
        "proxy_nca", "tuba"]
    loss = build_loss("proxy_anchor", embedding_dim=16, num_classes=5)
    assert tuple(loss.proxies.shape) == (5, 16)
    with pytest.raises(ValueError, match="needs num_classes"):
        build_loss("cosface", embedding_dim=16)


def test_critics_create_fills_in_the_size_once():
    assert critics.create("bilinear", 7).weight.shape == (7, 7)
    assert critics.create("separable", 5, hidden_dim=4, out_dim=3)(
        torch.randn(2, 5), torch.randn(6, 5)).shape == (2, 6)
    assert critics.create("mlp", 5, hidden_dim=4)(torch.randn(2, 5), torch.randn(3, 5)).shape \
        == (2, 3)
    assert critics.create("bilinear", 7, dim=3).weight.shape == (3, 3)  # an explicit size wins
    assert isinstance(critics.create("cosine", 7, temperature=0.5), critics.Cosine)
    with pytest.raises(ValueError, match="critic 'bilinear' needs the embedding size"):
        critics.create("bilinear")
    with pytest.raises(ValueError, match="unknown critic 'bilnear'.*did you mean 'bilinear'"):
        critics.create("bilnear", 4)
    # the trainer's builder sizes a critic the same way
    assert build_loss("infonce", critic="bilinear", embedding_dim=6).critic.weight.shape == (6, 6)


def test_estimators_have_one_name_and_their_aliases():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 6, generator=g)
    pos, neg = diagonal_masks(6)
    assert ESTIMATORS.canonical("nce") == ESTIMATORS.canonical("cpc") == "infonce"
    assert ESTIMATORS.canonical("mine") == "dv"
    # the known-MI benchmark and the reproduction read the same table
    table = resolve_estimators(["nce", "mine"])
    assert list(table) == ["infonce", "dv"]
    assert table["infonce"] == (LF.infonce, LF.infonce_bound)
    assert float(estimate(s, "nce")) == pytest.approx(float(LF.infonce_bound(s, pos, neg)))
    assert float(estimate(s, "dv")) == pytest.approx(float(LF.dv_bound(s, pos, neg)))
    assert losses.estimator("jsd") == (LF.js, LF.js_bound)
    with pytest.raises(ValueError, match="unknown estimator 'foo'"):
        resolve_estimators(["foo"])


def test_data_sets_and_experiments_are_registered_with_their_metadata():
    assert DATASETS.canonical("CUB") == "cub200" and DATASETS.canonical("in-shop") == "inshop"
    assert DATASETS.available({"class_disjoint": True}) == ["cars196", "cub200", "inshop", "sop"]
    assert DATASETS.available({"embedded": True}) == ["digits", "digits_image", "latent_classes"]
    assert len(get_dataset("Digits", split="test")) > 0
    assert EXPERIMENTS.available() == ["adversarial", "bijective", "critics", "encoders",
                                       "noniid"]
    assert [n for n in EXPERIMENTS if not EXPERIMENTS.meta(n)["needs_data"]] == ["noniid"]
    assert "probe" in EXPERIMENTS.meta("adversarial")["description"]


def test_proxies_get_their_own_learning_rate_in_the_trainer():
    from contrastive.app.config import TrainConfig
    from contrastive.app.factory import make_optimizer

    model = torch.nn.Linear(4, 16)
    proxy = build_loss("proxy_anchor", embedding_dim=16, num_classes=5)
    opt = make_optimizer(TrainConfig(lr=1e-3), [*model.parameters(), *proxy.parameters()], proxy)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, pytest.approx(0.1)]
    assert opt.param_groups[1]["params"][0] is proxy.proxies
    assert sum(len(g["params"]) for g in opt.param_groups) == 3  # weight, bias, proxies once
    opt = make_optimizer(TrainConfig(lr=1e-3, proxy_lr=5e-3), [*proxy.parameters()], proxy)
    assert opt.param_groups[-1]["lr"] == 5e-3
    plain = losses.get("infonce")
    opt = make_optimizer(TrainConfig(lr=1e-3), [*model.parameters()], plain)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1e-3


def test_readout_reports_any_registered_lower_bound():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 8, generator=g), torch.arange(4).repeat_interleave(4)
    loss = losses.InfoNCE(temperature=0.5)
    s, pos, neg = loss.scores(x, y)
    got = loss.readout(x, y, estimators=("nce", "dv", "smile", "tuba", "alpha_infonce"))
    assert list(got) == ["infonce", "dv", "smile", "tuba", "alpha_infonce"]
    for name, value in got.items():
        _, bound = losses.estimator(name)
        assert value == pytest.approx(float(bound(s, pos, neg)), abs=1e-6), name
    assert loss.readout(x, y) == pytest.approx(
        {"infonce": got["infonce"], "nwj": float(LF.nwj_bound(s, pos, neg))})
    with pytest.raises(ValueError, match="upper bound"):
        loss.readout(x, y, estimators=("club",))
    # every lower bound of the family is registered, and the upper bounds say so
    assert {"tuba", "mine_ma", "smile", "alpha_infonce", "l1out", "club"} <= set(ESTIMATORS)
    assert ESTIMATORS.available({"kind": "upper"}) == ["club", "l1out"]
    assert {"tuba", "mine_ma", "smile", "alpha_infonce", "flo", "l1out", "club"} <= set(
        losses.available({"family": "mi"}))
