"""Bad input fails loudly with a message naming the argument; mixed precision stays finite."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from contrastive import critics
from contrastive.critics import Cosine, Dot
from losses import functional as LF
from losses import registry
from losses.modules import DV, JS, NWJ, Contrastive, InfoNCE, MultiClassNPair, Triplet

ALL = {
    "infonce": lambda: InfoNCE(),
    "nwj": lambda: NWJ(),
    "js": lambda: JS(),
    "dv": lambda: DV(),
    "npair": lambda: MultiClassNPair(),
    "triplet": lambda: Triplet(),
    "triplet_hard": lambda: Triplet(mining="hard"),
    "triplet_semihard": lambda: Triplet(mining="semihard"),
    "contrastive": lambda: Contrastive(),
}
NAMES = sorted(ALL)


def batch(n=8, d=4):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=gen), torch.arange(n) // 2


@pytest.mark.parametrize("name", NAMES)
def test_embeddings_not_2d(name):
    x, y = batch()
    with pytest.raises(ValueError, match=r"embeddings must be 2-D.*flatten"):
        ALL[name]()(x[:, :, None], y)
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        ALL[name]()(x[0], y[:1])


@pytest.mark.parametrize("name", NAMES)
def test_embeddings_wrong_type(name):
    x, y = batch()
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        ALL[name]()(x.numpy(), y)
    with pytest.raises(TypeError, match=r"embeddings must be a floating tensor.*float\(\)"):
        ALL[name]()(x.long(), y)


@pytest.mark.parametrize("name", NAMES)
def test_labels_length_mismatch(name):
    x, y = batch()
    with pytest.raises(ValueError, match=r"labels has 7 entries but embeddings has 8 rows"):
        ALL[name]()(x, y[:7])
    with pytest.raises(ValueError, match=r"labels must be 1-D"):
        ALL[name]()(x, y[:, None])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_embeddings(name, bad):
    x, y = batch()
    x[3, 1] = bad
    msg = r"embeddings contains NaN or Inf in 1 row\(s\) \(first: \[3\]"
    with pytest.raises(ValueError, match=msg):
        ALL[name]()(x, y)
    with pytest.raises(ValueError, match=r"ref_emb contains NaN or Inf"):
        ALL[name]()(batch()[0], y, ref_emb=x)


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf")])
def test_temperature_must_be_positive(bad):
    for make in (
        lambda: InfoNCE(temperature=bad),
        lambda: NWJ(temperature=bad),
        lambda: Cosine(temperature=bad),
        lambda: registry.get("infonce", temperature=bad),
        lambda: critics.get("cosine", temperature=bad),
    ):
        with pytest.raises(ValueError, match=r"temperature must be > 0"):
            make()
    with pytest.raises(TypeError, match="temperature must be a positive number"):
        InfoNCE(temperature="warm")


def test_temperature_and_critic_both_given():
    with pytest.raises(ValueError, match="either critic= or temperature="):
        InfoNCE(temperature=0.1, critic=Dot())


@pytest.mark.parametrize("name", NAMES)
def test_no_labels_and_no_ref_emb(name):
    x, _ = batch()
    with pytest.raises(ValueError, match=r"no labels and no ref_emb: pass labels .* or .* ref_emb"):
        ALL[name]()(x)


def strict(name):
    loss = ALL[name]()
    loss.strict = True
    return loss


@pytest.mark.parametrize("name", [n for n in NAMES if n != "contrastive"])
def test_batch_without_positive_pair_says_so(name):
    """Every label once, strict=True: the message names the cause and the sampler fix."""
    x, _ = batch()
    with pytest.raises(ValueError, match=r"no positive pair.*every label occurs only once.*"
                       r"MPerClassSampler"):
        strict(name)(x, torch.arange(8))


@pytest.mark.parametrize("name", ["infonce", "nwj", "js", "dv", "triplet", "triplet_hard",
                                  "triplet_semihard"])
def test_batch_without_negative_pair_says_so(name):
    x, _ = batch()
    with pytest.raises(ValueError, match=r"no negative pair.*all items share one label"):
        strict(name)(x, torch.zeros(8, dtype=torch.long))


def test_triplet_without_a_valid_triplet():
    """Positives and negatives exist but never for the same anchor (reference set)."""
    s = torch.randn(2, 2)
    pos = torch.tensor([[True, True], [False, False]])
    with pytest.raises(ValueError, match="no anchor has both a positive and a negative"):
        LF.triplet(s, pos, ~pos)


def test_reference_set_arguments():
    x, y = batch()
    with pytest.raises(ValueError, match="ref_labels was given without ref_emb"):
        InfoNCE()(x, y, ref_labels=y.clone())
    with pytest.raises(ValueError, match=r"ref_emb was given without labels.*paired=True"):
        InfoNCE()(x, ref_emb=x, ref_labels=y)
    with pytest.raises(ValueError, match=r"ref_emb was given without labels.*paired=True"):
        InfoNCE()(x, ref_emb=x)  # PML raises here too (labels are required)
    with pytest.raises(ValueError, match="ref_emb has dimension 3 but embeddings have 4"):
        InfoNCE()(x, ref_emb=x[:, :3])
    with pytest.raises(ValueError, match=r"paired views need as many ref_emb rows.*ref_labels"):
        InfoNCE()(x, ref_emb=x[:5], paired=True)
    with pytest.raises(ValueError, match=r"ref_emb without ref_labels must have one row per "
                       r"embeddings row.*pass ref_labels"):
        InfoNCE()(x, y, None, x[:5])
    with pytest.raises(ValueError, match="paired=True takes no ref_labels"):
        InfoNCE()(x, y, None, x, y.clone(), paired=True)
    with pytest.raises(ValueError, match="paired=True needs the second view as ref_emb"):
        InfoNCE()(x, y, paired=True)
    with pytest.raises(ValueError, match=r"ref_labels has 7 entries but ref_emb has 8 rows"):
        InfoNCE()(x, y, ref_emb=x, ref_labels=y[:7])


def test_labels_must_be_integers():
    x, y = batch()
    with pytest.raises(ValueError, match="labels must hold integer class ids"):
        InfoNCE()(x, y.float() + 0.5)
    # integral floats and lists are accepted
    torch.testing.assert_close(InfoNCE()(x, y.float()), InfoNCE()(x, y))
    torch.testing.assert_close(InfoNCE()(x, y.tolist()), InfoNCE()(x, y))


def test_module_arguments():
    with pytest.raises(ValueError, match="mining must be 'all', 'hard' or 'semihard'"):
        Triplet(mining="easy")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        Triplet(margin=-1)
    with pytest.raises(ValueError,
                       match=r"unknown loss 'foo'; choose one of \[.*'contrastive'.*'triplet'"):
        registry.get("foo")
    with pytest.raises(ValueError, match="unknown critic 'foo'"):
        critics.get("foo")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("infonce", InfoNCE)


def test_functional_shape_checks():
    s = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"positives has shape \(4, 4\) but scores \(4, 5\)"):
        LF.infonce(s, torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"negatives has shape"):
        LF.infonce(s, torch.ones(4, 5, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores must be a 2-D tensor"):
        LF.infonce(torch.randn(4), torch.ones(4, dtype=torch.bool))
    bad = s.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="scores contain NaN or Inf"):
        LF.infonce(bad, torch.ones(4, 5, dtype=torch.bool))
    two = torch.zeros(4, 5, dtype=torch.bool)
    two[0, :2] = True
    with pytest.raises(ValueError, match="exactly one positive per anchor"):
        LF.multiclass_npair(s, two)
    with pytest.raises(ValueError, match="mining must be"):
        LF.triplet(s, two, mining="easy")


def test_huge_but_finite_scores_are_accepted():
    """The cheap finiteness check (a sum) must not reject finite scores whose sum overflows."""
    s = torch.full((4, 4), 3e38)
    assert not torch.isfinite(s.sum())
    pos = torch.eye(4, dtype=torch.bool)
    assert torch.isfinite(LF.infonce(s, pos))
    assert torch.isfinite(LF.triplet(-s, pos))


# ------------------------------------------------------------------ mixed precision


@pytest.mark.parametrize("name", NAMES)
def test_autocast_bf16_computes_in_float32(name):
    """bf16 embeddings from a Linear layer under CPU autocast, temperature 0.01: the loss is
    float32, finite, equal to the float32 computation on the same (bf16-rounded) embeddings, and
    its gradients are finite."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    inputs = torch.randn(32, 16)
    y = torch.arange(32) // 4
    make = {
        **ALL,
        "infonce": lambda: InfoNCE(temperature=0.01),
        "nwj": lambda: NWJ(temperature=0.01),
        "js": lambda: JS(temperature=0.01),
        "dv": lambda: DV(temperature=0.01),
        "npair": lambda: MultiClassNPair(critic=Cosine(0.01)),
    }[name]
    loss_fn = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = layer(inputs)
        assert emb.dtype == torch.bfloat16
        loss = loss_fn(emb, y)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    ref = loss_fn(emb.detach().float(), y)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_autocast_bf16_paired_views_and_readout():
    torch.manual_seed(1)
    f, g = nn.Linear(16, 8), nn.Linear(16, 8)
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = f(x), g(x + 0.1 * torch.randn_like(x))
        loss = InfoNCE(temperature=0.01)(a, ref_emb=b, paired=True)
        out = InfoNCE(temperature=0.01).readout(a, ref_emb=b, paired=True)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert math.isfinite(out["infonce"]) and out["infonce"] <= math.log(64) + 1e-6
    assert math.isfinite(out["nwj"])
