"""Write ``docs/reproduction.md`` from the results of :func:`contrastive.app.reproduce.run`.

The document is generated, not hand-written: per experiment it states the paper's claim, the
setup as run, the tables as computed from ``NAME.json``, the figure, and a verdict whose rule is
printed next to it, so re-running an experiment (on digits or MNIST) and then
``contrastive reproduce report --results DIR`` refreshes everything.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from losses.registry import ESTIMATORS as _ESTIMATORS

from ...checkpoint import atomic_write_text
from ..results import format_mean_std, markdown_table
from .data import NOISE_SIGMA

__all__ = ["write_report", "verdict", "CLAIMS", "SHORT", "ORDER"]

ORDER = ("bijective", "adversarial", "critics", "encoders", "noniid")

CLAIMS = {
    "bijective": (
        "g1 and g2 are invertible (RealNVP), so I(x; g1(x)) is maximal "
        "and constant during training; still, maximising I_NCE or I_NWJ between g1(top) and "
        "g2(bottom) with a bilinear critic raises the linear-probe accuracy of g1(top) well above "
        "the raw-pixel baseline. The improvement therefore cannot come from the MI of the "
        "representation with its input."
    ),
    "adversarial": (
        "The same kind of invertible encoder can be trained so that "
        "its output is linearly *less* useful than the raw pixels (an online linear classifier "
        "is trained on the labels, the encoder to make its predictions uniform). A global "
        "maximiser of I(x; g(x)) can thus be a bad representation."
    ),
    "critics": (
        "With MLP encoders, the high-capacity concat (\"MLP\") critic reaches "
        "the largest I_NWJ but gives worse downstream linear accuracy than the bilinear and "
        "separable critics; a looser bound can come with a better representation."
    ),
    "encoders": (
        "ConvNet and MLP encoders trained to the *same* value of the bound "
        "(loss |I_EST - t|, t = 2 or 4) give different linear-probe accuracy (the ConvNet "
        "better): the encoder's inductive bias matters more than the value of the MI estimate."
    ),
    "noniid": (
        "The bounds assume negatives drawn independently from the product of "
        "the marginals. With a component shared by every pair of a batch (true MI of each pair "
        "0.0204 nats) the estimators, trained and read out on such batches, exceed the true MI; "
        "on i.i.d. batches from the same marginal they stay below it."
    ),
}

SHORT = {
    "bijective": "bijective encoders trained with I_NCE / I_NWJ beat raw pixels",
    "adversarial": "a bijective encoder can be made worse than raw pixels",
    "critics": "the concat critic: highest I_NWJ, worse probe",
    "encoders": "same bound, ConvNet probe better than MLP",
    "noniid": "non-i.i.d. negatives: estimates above the true MI",
}

SETUP = {
    "bijective": (
        "g1, g2: additive RealNVP flows on the {dim}-pixel halves ({couplings} couplings, each an "
        "MLP {coupling_mlp} whose last layer starts at N(0, {init_std:g}^2), "
        "each followed by a fixed random permutation); bilinear critic {dim}x{dim} (Glorot init); "
        "Adam {lr:g}, batch {batch_size}, {steps} steps.{scaled}"
    ),
    "adversarial": (
        "g1: affine RealNVP ({couplings} couplings of {coupling_widths}, log-scale tanh-bounded "
        "per layer); online linear classifier Adam {lr_classifier:g}; encoder Adam {lr:g} "
        "(paper: 1e-5) minimising the cross-entropy against uniform labels; {warmup} warm-up "
        "classifier steps, then {inner_steps} classifier steps per encoder step, {steps} encoder "
        "steps, batch {batch_size}. The probe is refit from scratch (paper protocol) at every "
        "evaluation. (Our notes do not give the paper's number of encoder steps; "
        "`paper_size=True` uses 10k.)"
    ),
    "critics": (
        "g1, g2: MLPs {dim}->{encoder_hidden}->{encoder_hidden}->{out_dim} (ReLU). Critics: "
        "bilinear {out_dim}x{out_dim}; separable g(a).h(b) with g, h MLPs "
        "{separable_mlp}; concat MLP "
        "{concat_mlp}. Adam {lr:g}, batch {batch_size}, "
        "{steps} steps (the paper: Adam 1e-4 and far more steps on MNIST). The I_NWJ readout of "
        "an I_NCE-trained critic is not meaningful (I_NCE ignores a constant added to an "
        "anchor's scores, so the scores drift to values whose exp dominates I_NWJ)."
    ),
    "encoders": (
        "g1, g2 both MLP ({dim}->300->300->{out_dim}) or both the paper's ConvNet (two 5x5 "
        "stride-2 convolutions with 64 and 128 channels, LayerNorm, ReLU, global average "
        "pooling, dense {out_dim}; on the 4x8 digit halves the feature maps are 2x4 then 1x2); "
        "bilinear critic; loss |I_EST - t| on the training batch, t in {targets}; Adam {lr:g}, "
        "batch {batch_size}, {steps} steps."
    ),
    "noniid": (
        "Concat critic on (x, y) in R x R (hidden {hidden}, {layers} hidden layers), Adam "
        "{lr:g}, batch {batch_size}, {steps} steps (paper: Adam 1e-4, 20k steps); estimates are "
        "the mean over {eval_batches} fresh held-out batches of the kind the critic was trained "
        "on. Non-i.i.d. batch: one Z ~ N(0, [[1, -0.5], [-0.5, 1]]) per batch, "
        "e_i ~ N(0, [[1, 0.9], [0.9, 1]]) per pair, (X_i, Y_i) = Z + e_i; i.i.d. batch: pairs "
        "from the marginal N(0, [[2, 0.4], [0.4, 2]])."
    ),
}


#: Said of a bijective run on digits only: why its sizes are not the paper's.
_DIGITS_SCALED = (
    " Scaled from the paper's 30 couplings of [512, 512] on 392-pixel MNIST halves (21k steps, "
    "Adam 1e-4): the digits halves have 12x fewer pixels and the training split 45x fewer "
    "images, so the flow is smaller and the learning rate higher."
)


# --------------------------------------------------------------------------- helpers


def _f(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** (-nd)):
            return f"{x:.2e}"
        return f"{x:.{nd}f}"
    return str(x)


def _seeds_note(row: dict, metric: str) -> str:
    """`` (k of n seeds)`` when the summary's mean of ``metric`` is over fewer seeds than the
    variant ran (the others have no value: they diverged), else ``""`` (also for results written
    before the summary counted them)."""
    k, n = row.get(f"{metric}_n"), row.get("n")
    if k is None or n is None or k >= n:
        return ""
    return f" ({k} of {n} seeds)"


def _pm(row: dict, metric: str, nd: int = 3) -> str:
    """``mean ± std`` of ``metric`` in a summary row, and how many seeds when not all."""
    m, s = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if m is not None and abs(m) >= 1e5:
        return format_mean_std(m, s, ".2e", ".1e", missing="n/a") + _seeds_note(row, metric)
    return format_mean_std(m, s, lambda v: _f(v, nd), missing="n/a") + _seeds_note(row, metric)


def _mean(row: dict, metric: str, nd: int = 3) -> str:
    """The mean alone of ``metric`` in a summary row, and how many seeds when not all."""
    return _f(row.get(f"{metric}_mean"), nd) + _seeds_note(row, metric)


def _table(rows: list[dict], cols: list[tuple[str, Callable[[dict], str]]]) -> str:
    return markdown_table([c for c, _ in cols], [[fn(r) for _, fn in cols] for r in rows])


def _by(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _vals(rows: list[dict], metric: str) -> np.ndarray:
    """One value per row, NaN where the row has none (a diverged run's probe): arrays of the same
    rows stay paired seed by seed, and a missing value fails every comparison of a rule."""
    return np.array([math.nan if r.get(metric) is None else r[metric] for r in rows],
                    dtype=float)


def _max(values: np.ndarray) -> float:
    """The largest value, NaN when there is none or one is NaN (a flow that broke)."""
    return float(np.max(values)) if values.size else math.nan


def _raw(res: dict) -> dict:
    return res["baseline"]["raw_pixels_accuracy"]


# --------------------------------------------------------------------------- verdicts
# Each returns (word, explanation). Words: "reproduces", "partly", "does not reproduce".


def _verdict_bijective(res: dict) -> tuple[str, str]:
    parts, final_ok, peak_ok, bound_ok = [], [], [], []
    for est in res["config"]["estimators"]:
        runs = _by(res["runs"], estimator=est)
        gain = _vals(runs, "accuracy") - _vals(runs, "raw_accuracy")
        peak = _vals(runs, "max_accuracy") - _vals(runs, "raw_accuracy")
        dbound = _vals(runs, "bound") - _vals(runs, "initial_bound")
        final_ok.append(gain.mean() > 0.01 and (gain > 0).all())
        peak_ok.append(peak.mean() > 0.01 and (peak > 0).all())
        bound_ok.append((dbound > 0).all())
        parts.append(
            f"{est.upper()}: final probe minus raw pixels {gain.mean():+.3f} (per seed "
            f"{', '.join(f'{g:+.3f}' for g in gain)}), best evaluation during training "
            f"{peak.mean():+.3f}; held-out bound rose by {dbound.mean():.2f} nats"
        )
    recon = _max(_vals(res["runs"], "max_recon_error"))
    parts.append(f"largest reconstruction error max|g1^-1(g1(x)) - x| seen: {recon:.1e}")
    if all(final_ok) and all(bound_ok):
        word = "reproduces"
    elif any(final_ok) or any(peak_ok):
        word = "partly"
    else:
        word = "does not reproduce"
    rule = ("rule: reproduces if, for every estimator, the final probe beats raw pixels in every "
            "seed by > 0.01 on average and the bound rose; partly if that holds for one "
            "estimator or only at the best evaluation during training")
    return word, "; ".join(parts) + f". ({rule})"


def _verdict_adversarial(res: dict) -> tuple[str, str]:
    runs = res["runs"]
    gap = _vals(runs, "raw_accuracy") - _vals(runs, "accuracy")
    mingap = _vals(runs, "raw_accuracy") - _vals(runs, "min_accuracy")
    r32 = _max(_vals(runs, "max_recon_error"))
    r64 = _max(_vals(runs, "recon_error_f64"))
    txt = (
        f"final probe {gap.mean():.3f} below raw pixels on average (per seed "
        f"{', '.join(f'{-g:+.3f}' for g in gap)}), lowest evaluation {mingap.mean():.3f} below; "
        f"reconstruction error in float32 up to {r32:.1e}, final flow in float64 {r64:.1e}"
    )
    if (gap > 0.05).all():
        word = "reproduces"
    elif (gap > 0).any() or (mingap > 0.05).all():
        word = "partly"
    else:
        word = "does not reproduce"
    return word, txt + ". (rule: reproduces if the final probe is > 0.05 below raw pixels in " \
        "every seed; partly if below in some seed or only at the lowest evaluation)"


def _ranked(rows: list[dict], metric: str, best: Callable) -> str | None:
    """The critic of the summary ``rows`` whose mean of ``metric`` is ``best`` (``max`` or
    ``min``); ``None`` when some critic has no mean over all its seeds (a diverged run left a
    seed without the value): a mean over the other seeds is not that critic's mean, so the
    ranking is not known."""
    means = {}
    for r in rows:
        m = r.get(f"{metric}_mean")
        if m is None or not math.isfinite(m) or _seeds_note(r, metric):
            return None
        means[r["critic"]] = m
    return best(means, key=means.__getitem__) if means else None


def _verdict_critics(res: dict) -> tuple[str, str]:
    lines, word = [], "does not reproduce"
    for est in res["config"]["estimators"]:
        rows = _by(res["summary"], estimator=est)
        if not rows:
            continue
        top_bound, top_train = _ranked(rows, "bound", max), _ranked(rows, "train_bound", max)
        low_acc, top_acc = _ranked(rows, "accuracy", min), _ranked(rows, "accuracy", max)
        partial = [f"{m} of {r['critic']}{_seeds_note(r, m)}" for r in rows
                   for m in ("bound", "accuracy") if _seeds_note(r, m)]
        lines.append(f"{est.upper()}: highest held-out bound: {top_bound or 'n/a'} (on training "
                     f"batches: {top_train or 'n/a'}); best probe: {top_acc or 'n/a'}; worst "
                     f"probe: {low_acc or 'n/a'}"
                     + (f" (means over fewer seeds, not ranked: {', '.join(partial)})"
                        if partial else ""))
        if est == "nwj":
            if top_bound == "concat" and low_acc == "concat":
                word = "reproduces"
            elif (top_bound == "concat" or low_acc == "concat"
                  or (top_bound is not None and top_acc is not None and top_bound != top_acc)):
                word = "partly"
    rule = ("rule: reproduces if under I_NWJ the concat critic has both the highest bound and "
            "the worst probe (mean over seeds); partly if one of the two holds or the critic "
            "with the highest bound is not the one with the best probe")
    return word, "; ".join(lines) + f". ({rule})"


def _verdict_encoders(res: dict) -> tuple[str, str]:
    runs, lines, flags = res["runs"], [], []
    tol = 0.15
    for est in res["config"]["estimators"]:
        for t in res["config"]["targets"]:
            conv = _by(runs, estimator=est, target=float(t), encoder="conv")
            mlp = _by(runs, estimator=est, target=float(t), encoder="mlp")
            if not conv or not mlp:
                continue
            bc, bm = _vals(conv, "train_bound").mean(), _vals(mlp, "train_bound").mean()
            diff = _vals(conv, "accuracy") - _vals(mlp, "accuracy")
            matched = abs(bc - t) < tol and abs(bm - t) < tol
            better = bool((diff > 0).all())
            flags.append((matched, better, bool((diff < 0).all())))
            lines.append(
                f"{est.upper()}, t={t:g}: training bound ConvNet {bc:.2f} / MLP {bm:.2f} "
                f"({'matched' if matched else 'NOT matched'}), probe ConvNet - MLP "
                f"{diff.mean():+.3f} (per seed {', '.join(f'{d:+.3f}' for d in diff)})"
            )
    if flags and all(m and b for m, b, _ in flags):
        word = "reproduces"
    elif any(m and (b or w) for m, b, w in flags):
        word = "partly"
    else:
        word = "does not reproduce"
    rule = (f"rule: reproduces if in every (estimator, t) both encoders end within {tol} nats "
            "of t on the training batches and the ConvNet's probe is higher in every seed; "
            "partly if some setting has matched bounds and a consistent difference")
    return word, "; ".join(lines) + f". ({rule})"


def _verdict_noniid(res: dict) -> tuple[str, str]:
    true_mi, lines, ok = res["baseline"]["true_mi"], [], []
    for est in res["config"]["estimators"]:
        non_runs = _by(res["runs"], estimator=est, sampler="noniid")
        iid_runs = _by(res["runs"], estimator=est, sampler="iid")
        non, iid = _vals(non_runs, "estimate"), _vals(iid_runs, "estimate")
        non_se = _vals(non_runs, "estimate_se") if non_runs and "estimate_se" in non_runs[0] \
            else np.zeros_like(non)
        iid_se = _vals(iid_runs, "estimate_se") if iid_runs and "estimate_se" in iid_runs[0] \
            else np.zeros_like(iid)
        above = bool(non.size and (non - 2 * non_se > true_mi).all())
        below = bool(iid.size and (iid - 2 * iid_se < true_mi).all())
        ok.append((above, below))
        lines.append(
            f"{est.upper()}: non-i.i.d. {non.mean():.4f} (per seed "
            f"{', '.join(f'{v:.4f}' for v in non)}; {'above' if above else 'NOT above'} the "
            f"true {true_mi:.4f}), i.i.d. {iid.mean():.4f} (per seed "
            f"{', '.join(f'{v:.4f} ± {e:.4f}' for v, e in zip(iid, iid_se))}; "
            f"{'consistent with a lower bound' if below else 'ABOVE the true MI'})"
        )
    if ok and all(a and b for a, b in ok):
        word = "reproduces"
    elif any(a or b for a, b in ok):
        word = "partly"
    else:
        word = "does not reproduce"
    return word, "; ".join(lines) + ". (rule: reproduces if for every estimator and seed the " \
        "non-i.i.d. estimate exceeds the true MI by more than 2 standard errors of its held-out " \
        "mean, and the i.i.d. estimate is not above the true MI by more than 2 standard errors: " \
        "a lower bound holds in expectation, a mean over finitely many batches may sit slightly " \
        "above it)"


_VERDICTS = {
    "bijective": _verdict_bijective,
    "adversarial": _verdict_adversarial,
    "critics": _verdict_critics,
    "encoders": _verdict_encoders,
    "noniid": _verdict_noniid,
}


def verdict(name: str, res: dict) -> tuple[str, str]:
    """``(word, explanation)`` for experiment ``name``; the rule is part of the explanation."""
    return _VERDICTS[name](res)


# --------------------------------------------------------------------------- tables


def _tables(name: str, res: dict) -> str:
    s = res["summary"]
    raw = _raw(res) if "raw_pixels_accuracy" in res["baseline"] else None
    out = []
    if raw is not None:
        n_test = (res.get("data_shape") or {}).get("n_test")
        se = ""
        if n_test:
            se = (f"; one probe accuracy near {raw['mean']:.2f} on {n_test} held-out images has "
                  f"a binomial standard error of "
                  f"{math.sqrt(raw['mean'] * (1 - raw['mean']) / n_test):.3f}")
        out.append(f"Raw noisy top-half pixels, same probe: "
                   f"**{format_mean_std(raw['mean'], raw['std'], '.3f')}**{se}.\n")
    if name == "bijective":
        out.append(_table(s, [
            ("estimator", lambda r: r["estimator"]),
            ("held-out bound, start", lambda r: _pm(r, "initial_bound")),
            ("held-out bound, end", lambda r: _pm(r, "bound")),
            ("train-batch bound, end", lambda r: _pm(r, "train_bound")),
            ("probe acc., start", lambda r: _pm(r, "initial_accuracy")),
            ("probe acc., end", lambda r: _pm(r, "accuracy")),
            ("probe acc., best eval", lambda r: _pm(r, "max_accuracy")),
            ("max recon. error", lambda r: _mean(r, "max_recon_error", 2)),
        ]))
    elif name == "adversarial":
        out.append(_table(s, [
            ("encoder", lambda r: r["encoder"]),
            ("probe acc., start", lambda r: _pm(r, "initial_accuracy")),
            ("probe acc., end", lambda r: _pm(r, "accuracy")),
            ("probe acc., lowest eval", lambda r: _pm(r, "min_accuracy")),
            ("online adversary acc., end", lambda r: _pm(r, "adversary_accuracy")),
            ("recon. error f32, max over training", lambda r: _mean(r, "max_recon_error", 2)),
            ("recon. error f64, end", lambda r: _mean(r, "recon_error_f64", 2)),
        ]))
    elif name == "critics":
        out.append(_table(s, [
            ("critic", lambda r: r["critic"]),
            ("trained with", lambda r: r["estimator"]),
            ("held-out bound (trained estimator)", lambda r: _pm(r, "bound")),
            ("train-batch bound", lambda r: _pm(r, "train_bound")),
            ("held-out I_NCE", lambda r: _pm(r, "infonce")),
            ("held-out I_NWJ", lambda r: _pm(r, "nwj")),
            ("probe acc.", lambda r: _pm(r, "accuracy")),
        ]))
    elif name == "encoders":
        out.append(_table(s, [
            ("estimator", lambda r: r["estimator"]),
            ("t", lambda r: f"{r['target']:g}"),
            ("encoder", lambda r: r["encoder"]),
            ("train-batch bound, end", lambda r: _pm(r, "train_bound")),
            ("held-out bound, end", lambda r: _pm(r, "bound")),
            ("probe acc.", lambda r: _pm(r, "accuracy")),
        ]))
    elif name == "noniid":
        b = res["baseline"]
        out.append(
            f"True MI of a pair: {b['true_mi']:.4f} nats. Reference for I_NWJ on non-i.i.d. "
            f"batches: its optimum there is KL(positive pairs || within-batch negative pairs) = "
            f"KL(N(0, [[2, 0.4], [0.4, 2]]) || N(0, [[2, -0.5], [-0.5, 2]])) = "
            f"{b['nwj_optimum_noniid']:.4f} nats. I_NCE is capped at log "
            f"{res['config']['batch_size']} = {b['log_batch']:.2f}.\n"
        )
        out.append(_table(s, [
            ("estimator", lambda r: r["estimator"]),
            ("batches", lambda r: r["sampler"]),
            ("estimate, held-out batches of the same kind", lambda r: _pm(r, "estimate", 4)),
            ("its standard error (mean over seeds)", lambda r: _mean(r, "estimate_se", 4)),
            ("same critic on i.i.d. batches", lambda r: _pm(r, "estimate_on_iid", 4)),
            ("train-batch estimate", lambda r: _pm(r, "train_estimate", 4)),
        ]))
    diverged = _diverged_line(name, res)
    if diverged:
        out.append("\n" + diverged)
    return "\n".join(out)


#: the keys that name a variant of each experiment in its ``runs`` (the table's first columns)
_VARIANT_KEYS = {
    "bijective": ("estimator",),
    "adversarial": ("encoder",),
    "critics": ("critic", "estimator"),
    "encoders": ("estimator", "target", "encoder"),
    "noniid": ("estimator", "sampler"),
}


def _diverged_line(name: str, res: dict) -> str:
    """``Diverged: <variant>, seed s at step k; ...`` for every run that stopped on a non-finite
    value (its ``diverged_at``), so a reader sees which seed a partial mean left out and when;
    ``""`` when none did."""
    keys = _VARIANT_KEYS.get(name, ())
    parts = []
    for r in res.get("runs", []):
        step = r.get("diverged_at")
        if step is None:
            continue
        variant = ", ".join(f"{k} {r[k]}" for k in keys if r.get(k) is not None)
        parts.append(f"{variant + ', ' if variant else ''}seed {r.get('seed')} at step {step}")
    if not parts:
        return ""
    return ("**Diverged** (training stopped at a non-finite score or output; that seed's "
            "last evaluation is at that step): " + "; ".join(parts) + ".")


def _chain(first: object, width: int, layers: int, last: object) -> str:
    """``first->width->...->last`` with ``layers`` hidden layers of ``width`` (an MLP of
    :func:`contrastive.critics.mlp`)."""
    return "->".join(str(v) for v in [first, *[width] * int(layers), last])


def _setup(name: str, res: dict) -> str:
    cfg = dict(res["config"])
    dim = (res.get("data_shape") or {}).get("half")
    d = int(np.prod(dim)) if dim else 0
    cfg.update(dim=d, half=d // 2)
    try:
        if name in ("bijective", "adversarial"):
            # a coupling's MLP maps the first d // 2 coordinates to the other d - d // 2
            cfg["coupling_mlp"] = _chain(d // 2, cfg["hidden"], cfg["layers"], d - d // 2)
            cfg["coupling_widths"] = f"[{', '.join([str(cfg['hidden'])] * cfg['layers'])}]"
            cfg["scaled"] = _DIGITS_SCALED if res.get("dataset") == "digits" else ""
        if name == "critics":
            sh = cfg["separable_hidden"]
            cfg["separable_mlp"] = _chain(cfg["out_dim"], sh, cfg["separable_layers"], sh)
            # Concat: [a; b] -> hidden, then layers - 1 more hidden layers, then the score
            cfg["concat_mlp"] = _chain("[a; b]", cfg["concat_hidden"],
                                       cfg["concat_layers"], 1).replace("->", " -> ")
    except (KeyError, TypeError):
        pass
    try:
        return SETUP[name].format(**cfg)
    except (KeyError, ValueError, IndexError):
        return SETUP[name]


def _sizes_table(results: dict) -> str:
    """Configuration fields where the run differs from the paper's protocol."""
    from dataclasses import asdict

    from .experiments import PAPER

    rows = []
    for n, res in results.items():
        paper = asdict(PAPER[n])
        diffs = []
        for k, v in res["config"].items():
            pv = paper.get(k)
            if isinstance(pv, tuple):
                pv = list(pv)
            if k == "estimators":  # earlier runs wrote the alias "nce" for "infonce"
                v = [_ESTIMATORS.canonical(e) if e in _ESTIMATORS else e for e in v]
            if k in ("eval_every", "evals", "n_train", "n_test") or pv == v:
                continue
            diffs.append(f"{k}: {v} (paper {pv})")
        rows.append([n, "; ".join(diffs) or "as the paper"])
    return markdown_table(["experiment", "run vs the paper's protocol"], rows)


def _data_line(results: dict) -> str:
    for res in results.values():
        shape = res.get("data_shape")
        if shape:
            rows, cols = shape["half"]
            name = {"digits": "scikit-learn's 8x8 digits (stratified split, fixed)",
                    "mnist": "MNIST (official split)"}.get(res["dataset"], res["dataset"])
            return (f"{name}: {shape['n_train']:,} training / {shape['n_test']:,} held-out "
                    f"images, halves of {rows}x{cols} = {rows * cols} pixels.")
    return ""


def _per_experiment(results: dict, value: Callable[[dict], str]) -> str:
    """``value`` of every result: one value when they agree, else ``v (name), ...``."""
    vals = {n: value(r) for n, r in results.items()}
    if len(set(vals.values())) == 1:
        return next(iter(vals.values()))
    return ", ".join(f"{v} ({n})" for n, v in vals.items())


def _sizes(results: dict) -> str:
    """Whose sizes the runs used: the paper's (``paper_size``) or the defaults, per experiment
    when the results folder mixes both."""
    if all(r.get("paper_size") for r in results.values()):
        return "the paper's (`paper_size=True`)"
    if not any(r.get("paper_size") for r in results.values()):
        return ("the defaults of `contrastive.app.reproduce.DEFAULTS` (the paper's are "
                "`paper_size=True`)")
    which = _per_experiment(results, lambda r: "the paper's" if r.get("paper_size")
                            else "the defaults")
    return f"{which} (`contrastive.app.reproduce.DEFAULTS`, or `PAPER` with `paper_size=True`)"


def _noise(results: dict) -> str:
    """The pixel-noise std the runs used (``config.noise``)."""
    return _per_experiment(results, lambda r: f"{r['config'].get('noise', NOISE_SIGMA):g}")


def _eval_batch(results: dict) -> str:
    """Pairs per held-out readout batch: ``min(batch_size, n_test)`` (see
    ``experiments._eval_index_batches``)."""
    def size(r: dict) -> str:
        b, n_test = r["config"]["batch_size"], (r.get("data_shape") or {}).get("n_test")
        return str(min(b, n_test) if n_test else b)

    return _per_experiment(results, size)


def write_report(
    results_dir: str | Path,
    doc_path: str | Path = "docs/reproduction.md",
    figures_dir: str | Path = "docs/figures",
    notes: dict[str, str] | None = None,
) -> Path:
    """Gather ``results_dir/NAME.json`` (+ ``NAME.png``) of every experiment that was run into
    ``doc_path``; figures are copied to ``figures_dir`` as ``reproduce_NAME.png`` and linked
    relative to the document. Returns the document's path.

    ``notes`` (experiment name -> markdown; default: ``results_dir/notes.json`` if it exists)
    are printed after each verdict as "Notes", for the reading of the numbers that a rule cannot
    give; key ``"_overall"`` goes after the summary table.
    """
    results_dir, doc_path, figures_dir = Path(results_dir), Path(doc_path), Path(figures_dir)
    found = {n: results_dir / f"{n}.json" for n in ORDER if (results_dir / f"{n}.json").exists()}
    if not found:
        raise ValueError(
            f"no experiment results (NAME.json) in results_dir={str(results_dir)!r}; run "
            "contrastive.app.reproduce.run(NAME, results_dir) first"
        )
    figures_dir.mkdir(parents=True, exist_ok=True)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    results = {n: json.loads(p.read_text()) for n, p in found.items()}
    if notes is None and (results_dir / "notes.json").exists():
        notes = json.loads((results_dir / "notes.json").read_text())
    notes = notes or {}
    verdicts = {n: verdict(n, r) for n, r in results.items()}
    datasets = sorted({r["dataset"] for r in results.values() if r["dataset"] != "gaussian-2d"})
    on = ", ".join(datasets) or "gaussian-2d"
    image_runs = {n: r for n, r in results.items() if r.get("data_shape")} or results

    lines = [
        f"# Reproducing Tschannen et al. (ICLR 2020) on {on}",
        "",
        "Tschannen, Djolonga, Rubenstein, Gelly, Lucic, *On Mutual Information Maximization for "
        "Representation Learning*, ICLR 2020 (arXiv:1907.13625). This page is generated by "
        f"`contrastive reproduce report --results {results_dir.as_posix()}` from the JSON that "
        "`contrastive.app.reproduce.run(NAME, DIR)` writes (the run behind this page is kept in "
        f"`{results_dir.as_posix()}/`); numbers are as measured, whatever they are. Do not edit "
        "by hand; re-run instead.",
        "",
        "## Setup",
        "",
        f"* Data: {', '.join(datasets) or 'n/a'}; x = top half, y = bottom half of each image; "
        f"Gaussian pixel noise of std {_noise(image_runs)} (fresh per training batch, one fixed "
        "draw "
        f"per seed for evaluation). {_data_line(results)} The encoders are trained on the "
        "training split only.",
        "* Linear evaluation, the paper's protocol: MinMax scaling fitted on the training "
        "features, scikit-learn `LogisticRegression(solver='saga', C=10, tol=0.1)`, fitted on "
        "g1(top half) of the training split, accuracy on the held-out split "
        "(`evaluation.probe.linear_probe(..., protocol='tschannen2020')`). Baseline: "
        "the same probe on the raw noisy top-half pixels.",
        "* Bounds from `losses.functional` (`infonce_bound`, `nwj_bound`) on the critic's "
        "score matrix with diagonal positives (`contrastive.pairs.diagonal_masks`); critics from "
        "`contrastive.critics`. \"Held-out bound\" is the mean over fixed batches of "
        f"{_eval_batch(image_runs)} held-out pairs; \"train-batch bound\" the mean over the "
        "training batches since the previous evaluation.",
        f"* Seeds {_per_experiment(results, lambda r: str(r.get('seeds')))}; tables give "
        "mean ± sample std over seeds. Each seed "
        "changes the initialisation, the batch order and the noise, not the data split.",
        f"* Sizes: {_sizes(results)}; device "
        f"{_per_experiment(results, lambda r: str(r.get('device')))}, torch "
        f"{_per_experiment(results, lambda r: str(r.get('torch')))}, "
        f"{_per_experiment(results, lambda r: str(r.get('threads')))} torch thread(s).",
        "",
        "Sizes that differ from the paper's protocol (`PAPER` in "
        "`contrastive/app/reproduce/experiments.py`; docs/architecture.md, The paper's protocol), "
        "as run:",
        "",
        _sizes_table(results),
        "",
        "## Summary",
        "",
        markdown_table(
            ["experiment", "the paper", on, "wall time"],
            [[f"[{n}](#{n})", SHORT[n], f"**{verdicts[n][0]}**",
              f"{res['wall_time_s'] / 60:.1f} min"] for n, res in results.items()],
        ),
        "",
    ]
    if notes.get("_overall"):
        lines += [notes["_overall"], ""]
    for n in ORDER:
        lines += [f"## {n}", ""]
        if n not in results:
            lines += ["Not run yet.", ""]
            continue
        res = results[n]
        word, why = verdicts[n]
        # the figure written next to this JSON; never the path recorded at run time, which may
        # be relative to another working directory or hold a later run's figure by now
        fig_src = results_dir / f"{n}.png"
        fig_rel = None
        dst = figures_dir / f"reproduce_{n}.png"
        if not fig_src.exists():  # drawn again from the JSON (results folders keep no PNGs)
            from .plots import plot

            plot(n, res, dst)
            fig_src = dst
        if fig_src.exists():
            if fig_src.resolve() != dst.resolve():
                shutil.copyfile(fig_src, dst)
            try:
                fig_rel = dst.resolve().relative_to(doc_path.parent.resolve()).as_posix()
            except ValueError:
                fig_rel = dst.resolve().as_posix()
        lines += [
            f"**The paper.** {CLAIMS[n]}",
            "",
            f"**Setup on {res['dataset']}.** {_setup(n, res)} Wall time "
            f"{res['wall_time_s']:.0f} s for {len(res['seeds'])} seeds.",
            "",
            _tables(n, res),
            "",
        ]
        if fig_rel:
            lines += [f"![{n}]({fig_rel})", ""]
        lines += [f"**Verdict on {res['dataset']}: {word}.** {why}", ""]
        if notes.get(n):
            lines += [f"**Notes.** {notes[n]}", ""]
    atomic_write_text(doc_path, "\n".join(lines))  # a kill never leaves half a page
    return doc_path
