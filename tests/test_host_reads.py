"""Host reads (device syncs) per loss call, and the equivalence they rest on.

A checked loss call reads tensor values on the host to validate its input: finite embeddings,
finite scores, and whether the masks give the loss a term. Each read is a device sync on a GPU,
so a call reads once where it can: ``kernels.prepare`` reads the scores' sum and the term flag
together, and that read also stands for the embeddings' finiteness when the critic carries a
NaN or Inf into the scores (``Critic.propagates_nonfinite``; the error still names the
embeddings). The loss modules with
``core_checks_terms`` let the core's no-term check stand for their own ``has_terms``; the first
test proves, for every such registered loss, that the two agree on every small mask pattern,
which is what makes that safe.
"""

import importlib.util
import itertools
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

import losses
from contrastive.pairs import (
    TERMS,
    NoPairsError,
    NoPairsWarning,
    label_masks,
    require_terms,
    terms_flag,
)
from losses import functional as LF
from losses import kernels as K
from losses import proxies as PX
from losses.modules import PairLoss

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str) -> PairLoss:
    if name == "triplet_semihard":  # the semi-hard search takes no read of its own
        return losses.get("triplet", mining="semihard")
    for kwargs in ({}, {"num_classes": 3, "embedding_size": 4}, {"embedding_size": 4}):
        try:
            return losses.get(name, **kwargs)
        except (TypeError, ValueError):
            continue
    raise AssertionError(f"cannot build {name}")


PROXY = ("arcface", "cosface", "normalized_softmax", "proxy_anchor", "proxy_nca")
CORE_CHECKED = [n for n in losses.available()
                if getattr(_module(n), "core_checks_terms", False)]


def test_the_shipped_pair_and_proxy_losses_let_the_core_check_their_terms():
    expected = {"arcface", "circle", "contrastive", "cosface", "dcl", "dclw", "dv", "infonce",
                "js", "lifted_structure", "margin", "multi_similarity", "nca",
                "normalized_softmax", "npair", "ntxent", "nwj", "proxy_anchor", "proxy_nca",
                "simclr", "supcon", "triplet"}
    assert set(CORE_CHECKED) == expected
    # the MI estimators' compute returns a zero instead of raising: they keep reading first
    assert not _module("tuba").core_checks_terms
    assert not PairLoss.core_checks_terms  # a user's subclass keeps the old, safe order


def _label_patterns(n: int = 4, classes: int = 3):
    """Every labelling of n items with at most ``classes`` classes, up to renaming."""
    seen = set()
    for ys in itertools.product(range(classes), repeat=n):
        first = {}
        canon = tuple(first.setdefault(y, len(first)) for y in ys)
        if canon not in seen:
            seen.add(canon)
            yield torch.tensor(canon)


def _mask_cases():
    """Batch masks (every labelling of 4 items, the batch against itself, against a separate
    reference set and as paired views) plus hand-made edge cases: all-False masks, a
    positive without any negative, negatives without any positive, and a positive and a
    negative that never share an anchor (no triplet)."""
    for y in _label_patterns():
        yield label_masks(y)
        yield label_masks(y, torch.tensor([0, 5]))
    eye = torch.eye(3, dtype=torch.bool)
    yield eye, ~eye
    f = torch.zeros(3, 3, dtype=torch.bool)
    p = f.clone()
    p[0, 1] = True
    q = f.clone()
    q[1, 2] = True
    yield f, f.clone()
    yield p, f.clone()
    yield f.clone(), q
    yield p, q  # a positive and a negative, but never for the same anchor


@pytest.mark.parametrize("name", CORE_CHECKED)
def test_core_check_raises_exactly_when_the_module_has_no_term(name):
    loss = _module(name)
    g = torch.Generator().manual_seed(0)
    n_cases = 0
    for pos, neg in _mask_cases():
        if name in PROXY:
            # proxy losses: one positive per row, from labels checked in [0, C)
            y = torch.arange(pos.shape[0]) % 3
            pos = torch.nn.functional.one_hot(y, 3).bool()
            neg = ~pos
        s = torch.rand(pos.shape, generator=g, dtype=torch.float64) * 2 - 1
        has = loss.has_terms(pos, neg)
        try:
            value = loss.compute(s, pos, neg, check=True)
            raised = False
        except NoPairsError:
            raised = True
        except ValueError:  # another input error (N-pair: two positives in a row), which the
            assert has, (name, pos, neg)  # old order raised too; never one without a term
            continue
        assert raised == (not has), (name, pos, neg)
        if not raised:
            assert math.isfinite(float(value))
        n_cases += 1
    assert n_cases > 20


def _bench():
    """``benchmarks/losses.py``, whose :class:`HostReads` counts the reads (the benchmark
    prints the same count per loss)."""
    spec = importlib.util.spec_from_file_location("bench_losses_reads",
                                                  ROOT / "benchmarks/losses.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


def _reads(fn) -> int:
    with BENCH.HostReads() as c:
        fn()
    return c.reads


@pytest.mark.parametrize("name, most", [
    ("infonce", 1), ("supcon", 1), ("simclr", 1), ("nwj", 1), ("js", 1), ("dv", 1),
    ("contrastive", 1), ("multi_similarity", 1), ("circle", 1), ("lifted_structure", 1),
    ("margin", 1), ("nca", 1),
    # the proxy losses' fast lanes: the value (finite) with the labels' range
    ("proxy_nca", 1), ("normalized_softmax", 1), ("cosface", 1), ("arcface", 1),
    ("proxy_anchor", 1),
    # + the positives' index (nonzero), which their gather needs, and for the triplet loss
    # the index's width
    ("dcl", 2), ("triplet", 3), ("triplet_semihard", 3),
])
def test_a_checked_module_call_reads_the_host_at_most(name, most):
    """One read for the scores (finite) and the terms together, which also stands for the
    embeddings' finiteness (their critic turns a NaN or Inf into a non-finite score): the
    module's own no-term check, its embeddings read and the core's separate checks are gone
    (before: 6 reads for InfoNCE / NWJ / JS / DV, 4 for the pair losses, 7 for the triplet
    loss)."""
    loss = _module(name)
    x = torch.randn(16, 4 if name in PROXY else 8, requires_grad=True)
    y = torch.arange(16) // 4 % 3
    loss(x, y).backward()  # lazy initialisation out of the count
    assert _reads(lambda: loss(x, y).backward()) <= most


@pytest.mark.parametrize("terms", TERMS)
def test_prepare_reads_scores_and_terms_once_and_raises_the_same_errors(terms):
    s = torch.randn(4, 4)
    y = torch.tensor([0, 0, 1, 1])
    pos, neg = label_masks(y)
    assert _reads(lambda: K.prepare(s, pos, neg, True, terms, "the loss")) == 1
    # nothing the loss needs: the NoPairsError of require_terms, word for word
    none = torch.zeros(4, 4, dtype=torch.bool)
    for p, q in ((none, neg), (pos, none), (none, none)):
        if bool(terms_flag(terms, p, q)):
            continue
        with pytest.raises(NoPairsError) as got:
            K.prepare(s, p, q, True, terms, "the loss")
        with pytest.raises(NoPairsError) as want:
            require_terms(terms, p, q, "the loss")
        assert str(got.value) == str(want.value)
    # non-finite scores are reported first, as before
    bad = s.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="scores contain NaN or Inf"):
        K.prepare(bad, none, none, True, terms, "the loss")
    # an overflowing sum of finite scores is not mistaken for a non-finite one
    big = torch.full((4, 4), 3e38)
    K.prepare(big, pos, neg, True, terms, "the loss")


def test_terms_flag_and_require_terms_reject_an_unknown_name():
    m = torch.zeros(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="terms must be one of"):
        terms_flag("pairs", m, m)
    with pytest.raises(ValueError, match="terms must be one of"):
        require_terms("pairs", m, m, "x")


def test_no_term_warns_once_and_strict_raises_the_modules_message():
    """The module's no-term behaviour is PML's, now that the core's check decides it: a zero
    loss in the graph and one warning per instance, or the module's own message in strict
    mode."""
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.arange(4)  # every label once: no positive pair
    for name in ("infonce", "triplet", "nca", "npair"):
        loss = _module(name)
        with pytest.warns(NoPairsWarning):
            out = loss(x, y)
        assert float(out) == 0.0 and out.requires_grad
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss(x, y)  # warned once per instance
        strict = type(loss)(strict=True)
        with pytest.raises(NoPairsError) as got:
            strict(x, y)
        with pytest.raises(NoPairsError) as want:
            strict.require_terms(*label_masks(y))
        assert str(got.value) == str(want.value)


def test_given_triplets_need_no_triplet_in_the_masks():
    """``triplets=`` (a miner's) skips the mask check: an empty tuple is PML's zero."""
    s = torch.randn(4, 4, requires_grad=True)
    none = torch.zeros(4, 4, dtype=torch.bool)
    empty = torch.zeros(0, dtype=torch.long)
    out = LF.triplet(s, none, none, triplets=(empty, empty, empty))
    assert float(out) == 0.0
    from losses.pair_based import margin
    out = margin(s, none, none, triplets=(empty, empty, empty))
    assert float(out) == 0.0


def test_the_counter_sees_item_tolist_and_nonzero():
    t = torch.tensor([0.0, 2.0])
    assert _reads(lambda: (float(t.sum()), t.tolist(), t.nonzero(), bool(t.any()))) == 4
    assert _reads(lambda: t * 2 + 1) == 0
    assert torch.Tensor.tolist(t) == [0.0, 2.0]  # restored on exit


@pytest.mark.parametrize("name", PROXY)
def test_proxy_losses_one_read_keeps_every_input_error(name):
    """The proxy losses read the embeddings' sum and the labels' range together: each bad
    input still gets its own message, and a finite sum that overflows is no error."""
    loss = _module(name)  # 3 classes, embedding size 4
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.randn(6, 4)
    for bad in (math.nan, math.inf):
        xb = x.clone()
        xb[3, 1] = bad
        with pytest.raises(ValueError, match=r"embeddings contains NaN or Inf in 1 row\(s\) "
                                             r"\(first: \[3\]"):
            loss(xb, y)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
        loss(x, torch.tensor([0, 1, 2, 0, 1, 3]))
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
        loss(x, torch.tensor([0, 1, 2, 0, 1, -1]))
    with pytest.raises(ValueError, match="integer class ids"):
        loss(x, torch.tensor([0, 1, 2, 0, 1, 1.5]))
    assert math.isfinite(float(loss(x, y.double())))  # integral float labels are fine
    big = torch.full((6, 4), 3e38)
    big[:, 1] = -3e38  # distinct directions, each row finite; their float32 sum overflows
    assert math.isfinite(float(loss(big, y)))


DEFERRING = [n for n in losses.available()
             if n not in PROXY and getattr(_module(n), "core_checks_terms", False)]


@pytest.mark.parametrize("name", DEFERRING)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_scores_read_still_names_non_finite_embeddings(name, bad):
    """The losses whose one read of the scores stands for the embeddings' own: a NaN or Inf in
    the embeddings or in the reference set is still reported as theirs, with its row, through
    the loss call, through ``scores()`` and with the critic's fused and plain paths (with and
    without a gradient)."""
    loss = _module(name)
    n = 16
    y = torch.arange(n) // 2  # two views / items per class: every loss has a term
    for grad in (True, False):
        x = torch.randn(n, 8)
        x[5, 2] = bad
        x.requires_grad_(grad)
        with pytest.raises(ValueError, match=r"^embeddings contains NaN or Inf in 1 row\(s\) "
                                             r"\(first: \[5\]\)"):
            loss(x, y)
        with pytest.raises(ValueError, match=r"^embeddings contains NaN or Inf"):
            loss.scores(x, y)
        ref = torch.randn(n, 8)
        ref[7, 0] = bad
        with pytest.raises(ValueError, match=r"^ref_emb contains NaN or Inf in 1 row\(s\) "
                                             r"\(first: \[7\]\)"):
            loss(torch.randn(n, 8, requires_grad=grad), y, None, ref, y)


def test_a_critic_that_may_hide_a_non_finite_input_keeps_the_embeddings_read():
    """A user's critic (no ``propagates_nonfinite``) may map an Inf to a finite score: the
    embeddings are then read on their own, before the scores, as before."""

    class Squashed(torch.nn.Module):
        def forward(self, a, b):
            return torch.tanh(a) @ torch.tanh(b).T

    loss = losses.get("infonce", critic=Squashed())
    x = torch.randn(16, 8, requires_grad=True)
    y = torch.arange(16) // 2
    loss(x, y).backward()
    assert _reads(lambda: loss(x, y).backward()) == 2
    bad = x.detach().clone()
    bad[3, 1] = math.inf  # tanh(inf) = 1: the scores stay finite
    assert bool(torch.isfinite(Squashed()(bad, bad)).all())
    with pytest.raises(ValueError, match=r"^embeddings contains NaN or Inf in 1 row"):
        loss(bad, y)


@pytest.mark.parametrize("name", ["proxy_nca", "normalized_softmax", "cosface", "arcface",
                                  "proxy_anchor"])
def test_the_proxy_fast_lane_reads_once_and_never_indexes_with_a_bad_label(name):
    """The softmax proxy losses' fast lane computes with the labels clamped into [0, C) and
    reads the value with the labels' range: one read, the same value as the checked general
    path, and a label outside [0, C) is still an error (never an out-of-range index, which on
    a GPU is a device-side assert that kills the process)."""
    loss = _module(name)
    x = torch.randn(16, 4, requires_grad=True)
    y = torch.arange(16) % 3
    loss(x, y).backward()
    assert _reads(lambda: loss(x, y).backward()) == 1
    general = loss.compute(*loss.scores(x, y))
    assert torch.allclose(loss(x, y), general, rtol=1e-5, atol=1e-6)
    for bad in (3, -1, 1000):
        yb = y.clone()
        yb[7] = bad
        with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
            loss(x, yb)


@pytest.mark.parametrize("b", [16, 700])  # the fused kernel, and the autograd form above it
def test_proxy_anchor_one_read_lane_equals_the_general_path(b):
    """Proxy-Anchor's one-read lane against the checked general path (its functional core on
    the module's own scores and masks): the same value and gradients, to the embeddings and
    to the proxies; a NaN embedding still raises the embeddings' error, naming the row, and
    NaN proxies the scores' error, both from the general path the lane falls back to."""
    torch.manual_seed(b)
    loss = losses.get("proxy_anchor", num_classes=100, embedding_size=8)
    x = torch.randn(b, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 100, (b,))
    loss = loss.double()
    v = loss(x, y)
    gx, gp = torch.autograd.grad(v, (x, loss.proxies))
    s, pos, neg = loss.scores(x, y)
    w = PX.proxy_anchor(s, pos, neg, loss.alpha, loss.margin, loss.reduction)
    wx, wp = torch.autograd.grad(w, (x, loss.proxies))
    torch.testing.assert_close(v, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, wx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gp, wp, rtol=1e-9, atol=1e-12)
    bad = x.detach().clone()
    bad[5, 2] = math.nan
    with pytest.raises(ValueError, match=r"^embeddings contains NaN or Inf in 1 row"):
        loss(bad, y)
    with torch.no_grad():
        loss.proxies[3, 0] = math.inf
    with pytest.raises(ValueError, match="scores contain NaN or Inf"):
        loss(x, y)
