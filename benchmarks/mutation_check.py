"""Mutation check: does the test suite notice when the loss and metric cores are broken?

Each mutation below is a small, plausible bug in ``losses/functional.py``, ``losses/kernels.py``,
``losses/native.py``, ``contrastive/critics.py`` or ``evaluation/``: a flipped sign, a dropped
term, a detached gradient, an off-by-one. For each one the script copies the repository into a
temporary folder, applies the mutation to the copy (the working tree is never touched), runs the
tests that cover that file and records whether they failed ("caught") or passed ("survived"). The
caught fraction is the suite's mutation score on these cores; a surviving mutation names a promise
no test checks.

    python benchmarks/mutation_check.py                 # all mutations (make mutation)
    python benchmarks/mutation_check.py --only nwj,map  # those whose id contains a word
    python benchmarks/mutation_check.py --list          # the mutations, nothing run
    python benchmarks/mutation_check.py --min-caught 0.9   # exit 1 below 90 % caught

Before any mutation the same test groups run on the unmutated copy: they must pass, or the
check stops (a red suite would make every mutation look caught). A mutation whose anchor text
is no longer in the source (the code changed) is reported as "stale" and left out of the
fraction; update its anchor. A run that exceeds ``--timeout`` counts as caught (the mutant hangs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# tests/test_native.py compares each fused torch kernel with its C form (losses.native): on a
# CPU with the extension built the losses take the C kernels, so that comparison is what sees
# a broken torch kernel (the one a GPU runs)
LOSS_TESTS = ("tests/test_losses_reference.py", "tests/test_losses_properties.py",
              "tests/test_losses_errors.py", "tests/test_reductions.py",
              "tests/test_fused_core.py", "tests/test_mined.py", "tests/test_sparse_lane.py",
              "tests/test_native.py")
TESTS = {
    "losses/functional.py": LOSS_TESTS,
    # the kernels' pieces also serve the pair and proxy losses (multi-similarity, Circle,
    # lifted structure, NCA and Proxy-Anchor take kernels.stacked_lse)
    "losses/kernels.py": (*LOSS_TESTS, "tests/test_pair_based.py", "tests/test_overhead_paths.py"),
    "contrastive/critics.py": ("tests/test_critics.py", "tests/test_fused_core.py",
                               "tests/test_large_batch_paths.py", "tests/test_fewer_operations.py",
                               "tests/test_sparse_lane.py"),
    "losses/pair_based.py": ("tests/test_pair_based.py", "tests/test_large_batch_paths.py",
                             "tests/test_overhead_paths.py", "tests/test_native.py"),
    "losses/lane.py": ("tests/test_lane.py", "tests/test_native.py"),
    "losses/native.py": ("tests/test_native.py",),
    "evaluation/retrieval.py": ("tests/test_retrieval.py",),
    "evaluation/clustering.py": ("tests/test_clustering.py",),
    "evaluation/weighted_knn.py": ("tests/test_knn_classifier.py",),
    "evaluation/probe.py": ("tests/test_linear_probe.py",),
    "evaluation/known_mi.py": ("tests/test_mi_benchmark.py",),
}


@dataclass(frozen=True)
class Mutation:
    """Replace the one occurrence of ``old`` in ``path`` by ``new``."""

    id: str
    path: str
    kind: str  # sign | term | detach | off-by-one | index
    old: str
    new: str

    @property
    def tests(self) -> tuple[str, ...]:
        return TESTS[self.path]


F, K, R = "losses/functional.py", "losses/kernels.py", "evaluation/retrieval.py"
C, PB = "contrastive/critics.py", "losses/pair_based.py"
MUTATIONS: tuple[Mutation, ...] = (
    # ---------------------------------------------------------------- losses.functional
    Mutation("infonce-sign", F, "sign", "lse - psum / n_pos", "lse + psum / n_pos"),
    Mutation("infonce-mean-over-positives", F, "term", "lse - psum / n_pos", "lse - psum"),
    Mutation("positive-sum-index", K, "index",
             "index_add(0, pi.rows, scores[pi.rows, pi.cols])",
             "index_add(0, pi.cols % scores.shape[0], scores[pi.rows, pi.cols])"),
    Mutation("lse-backward-detached", K, "detach",
             "return ctx.w * coef, None, None", "return ctx.w * coef * 0.0, None, None"),
    Mutation("lse-max-shift-dropped", K, "term",
             "out = m + z.log()", "out = z.log()"),
    Mutation("logmeanexp-count-off-by-one", F, "off-by-one",
             "K.masked_lse(x, mask, None) - math.log(int(K.count(mask)))",
             "K.masked_lse(x, mask, None) - math.log(int(K.count(mask)) + 1)"),
    Mutation("infonce-bound-log-k-off-by-one", F, "off-by-one",
             "log_k = K.count_rows(valid).clamp_min(1)",
             "log_k = (K.count_rows(valid) - 1).clamp_min(1)"),
    Mutation("supcon-mean-over-all-anchors", F, "term",
             "return K.reduce_terms(rows, reduction, used.sum())",
             "return K.reduce_terms(rows, reduction, rows.numel())"),
    Mutation("ntxent-positive-detached", F, "detach",
             "z = lse_neg[pi.rows] - scores[pi.rows, pi.cols]",
             "z = lse_neg[pi.rows] - scores.detach()[pi.rows, pi.cols]"),
    Mutation("nwj-minus-one-dropped", F, "term",
             "_logmeanexp_negatives(scores, negatives, what, check) - 1.0)",
             "_logmeanexp_negatives(scores, negatives, what, check))"),
    Mutation("dv-sign", F, "sign",
             "value = pos - _logmeanexp_negatives(scores, negatives, what, check)",
             "value = pos + _logmeanexp_negatives(scores, negatives, what, check)"),
    Mutation("js-negative-count-off-by-one", F, "off-by-one",
             "neg_term = K.masked_softplus_sum(scores, negatives) / n",
             "neg_term = K.masked_softplus_sum(scores, negatives) / (n + 1)"),
    Mutation("softplus-backward-sign", K, "sign",
             "return torch.sigmoid(x).masked_fill_(~keep, 0.0).mul_(grad), None",
             "return torch.sigmoid(-x).masked_fill_(~keep, 0.0).mul_(grad), None"),
    Mutation("triplet-dense-margin-sign", F, "sign",
             "thr = (s_ap - margin).masked_fill(~valid, K.POS_INF)",
             "thr = (s_ap + margin).masked_fill(~valid, K.POS_INF)"),
    Mutation("triplet-sorted-prefix-off-by-one", F, "off-by-one",
             "top = prefix.gather(1, count)", "top = prefix.gather(1, (count - 1).clamp_min(0))"),
    Mutation("triplet-hard-negative-is-easiest", F, "sign",
             "    x[1].add_(sd)\n", "    x[1].sub_(sd)\n"),
    Mutation("triplet-nonzero-reducer-counts-all", K, "term",
             "return total / (terms.detach() > 0).sum().clamp_min(1)",
             "return total / terms.numel()"),
    # the mask path (check=False: static shapes, for torch.compile) and the reductions
    Mutation("masked-positive-sum-over-all-pairs", F, "term",
             "psum = K.masked_row_sum(scores, positives)",
             "psum = K.masked_row_sum(scores, valid)"),
    Mutation("masked-ntxent-anchor-without-negative-counts", F, "term",
             "torch.where(positives & has_neg[:, None], terms,",
             "torch.where(positives, terms,"),
    Mutation("masked-triplet-slots-not-positives", F, "index",
             "_triplet_all_sorted(scores, negatives, None, positives, margin)",
             "_triplet_all_sorted(scores, negatives, None, positives | negatives, margin)"),
    Mutation("no-term-gate-dropped", K, "term",
             "return torch.where(ok, x, torch.zeros_like(x))", "return x"),
    Mutation("reduction-sum-is-mean", K, "term",
             'if reduction == "sum":\n        return total\n    if reduction == "nonzero"',
             'if reduction == "sum":\n        return terms.mean()\n    if reduction == "nonzero"'),
    Mutation("bound-terms-not-scaled-by-anchors", F, "term",
             "K.masked_row_sum(f_pos, positives) * (n / n_p)",
             "K.masked_row_sum(f_pos, positives)"),
    Mutation("contrastive-negative-threshold-dropped", F, "term",
             "- neg_threshold * n_active", ""),
    Mutation("contrastive-positive-hinge-sign", F, "sign",
             "h = F.relu(pos_threshold - scores[pi])", "h = F.relu(scores[pi] - pos_threshold)"),
    # the fused small-batch kernels (value and dL/dS in one pass) and the one-node critic
    Mutation("fused-supcon-pull-sign", F, "sign", "addcmul_(pf, inv_count, value=-1.0)",
             "addcmul_(pf, inv_count, value=1.0)"),
    Mutation("fused-ntxent-shift-dropped", F, "term",
             "ez.log().sub_(scores).add_(m)", "ez.log().sub_(scores)"),
    Mutation("fused-js-positive-sigmoid-side", F, "sign",
             "mul_(coef).addcmul_(pf, inv_p, value=-1.0)",
             "mul_(coef).addcmul_(pf, inv_p, value=1.0)"),
    Mutation("fused-nwj-minus-one-dropped", F, "term",
             "c = (m - n_q.log()).sub_(1.0).exp_()", "c = (m - n_q.log()).exp_()"),
    Mutation("fused-dv-count-dropped", F, "term",
             "value = (z / n_q).log_().add_(m).sub_(pos)", "value = z.log().add_(m).sub_(pos)"),
    Mutation("triplet-large-counts-slot-dropped", F, "term",
             "c_an += act.view(torch.uint8)", "c_an += act.view(torch.uint8) * 0"),
    Mutation("semihard-negative-above-the-positive", F, "sign",
             "below = (s_ap[:, j:j + step, None] - sd[:, None, :]).gt_(0.0)",
             "below = (sd[:, None, :] - s_ap[:, j:j + step, None]).gt_(0.0)"),
    Mutation("semihard-large-negative-above-the-positive", F, "sign",
             "torch.lt(sd, s_ap[:, j, None], out=below)",
             "torch.gt(sd, s_ap[:, j, None], out=below)"),
    Mutation("fused-semihard-positive-gradient-dropped", F, "term",
             "return value, grad.scatter_add_(1, idx, coef.neg_())",
             "return value, grad"),
    Mutation("semihard-one-pass-negative-above-the-positive", F, "sign",
             "below = (s_ap[:, :, None] - sd[:, None, :]).gt_(0.0)",
             "below = (sd[:, None, :] - s_ap[:, :, None]).gt_(0.0)"),
    Mutation("fused-triplet-all-margin-term-dropped", F, "term",
             "total = torch.dot(g.view(-1), scores.reshape(-1)).add_(active * margin)",
             "total = torch.dot(g.view(-1), scores.reshape(-1))"),
    Mutation("fused-triplet-all-positive-gradient-dropped", F, "term",
             "g = c_an.scatter_add_(1, idx, c_ap.neg_())", "g = c_an"),
    Mutation("semihard-one-pass-fallback-is-the-hardest", F, "sign",
             "above_val = (flip - sd).mul_(qf)", "above_val = (flip + sd).mul_(qf)"),
    Mutation("first-argmax-is-the-minimum", F, "sign",
             "return x.max(-1).indices", "return x.min(-1).indices"),
    Mutation("hardest-by-index-largest-positive", F, "sign",
             "return idx.gather(1, sp.argmin(1, keepdim=True)), n_col",
             "return idx.gather(1, sp.argmax(1, keepdim=True)), n_col"),
    Mutation("fused-contrastive-weights-swapped", F, "index",
             "an.mul_(wn).addcmul_(ap, wp, value=-1.0)",
             "an.mul_(wp).addcmul_(ap, wn, value=-1.0)"),
    Mutation("stacked-lse-shift-dropped", K, "term",
             "return m + z.log(), e.mul_(keep), m, z", "return z.log(), e.mul_(keep), m, z"),
    Mutation("unit-gram-one-sided", C, "term",
             "return torch.mm(h + h.T, y)", "return torch.mm(h, y)"),
    Mutation("unit-gram-one-sided-large", C, "term",
             "out = torch.addmm(torch.mm(h, y), h.T, y)", "out = torch.mm(h, y)"),
    Mutation("unit-gram-distance-gradient-scale", C, "term",
             "gy = symmetric_product(g * inv, y)", "gy = symmetric_product(g * inv * 0.5, y)"),
    Mutation("unit-gram-scale-in-product-dropped", C, "term",
             "gy = symmetric_product(g, y, 1.0 if scale is None else alpha)",
             "gy = symmetric_product(g, y)"),
    Mutation("native-margin-distance-sign", "losses/native.py", "sign",
             "-b if distance else b", "b if distance else -b"),
    Mutation("native-reduction-codes-swapped", "losses/native.py", "term",
             '_REDUCTION = {"mean": 0, "sum": 1, "nonzero": 2}',
             '_REDUCTION = {"mean": 1, "sum": 0, "nonzero": 2}'),
    Mutation("native-lane-check-skipped", "losses/lane.py", "term",
             "out = N.run(kernel, s, positives, negatives, args, True, terms)",
             'out = N.run(kernel, s, positives, negatives, args, True, "skip")'),
    Mutation("lane-upstream-gradient-ignored", "losses/lane.py", "term",
             "return gx * g, None, None, None, None, None",
             "return gx, None, None, None, None, None"),
    Mutation("cosine-lane-second-set-gradient-halved", "losses/lane.py", "term",
             "gb = _unit_rows_backward(ds.T @ scaled,",
             "gb = _unit_rows_backward(0.5 * ds.T @ scaled,"),
    Mutation("unit-l2-zero-distance-gradient-kept", C, "term",
             "return _infinities_to_zero_(torch.rsqrt(sq))", "return torch.rsqrt(sq)"),
    Mutation("sparse-backward-transposed-entries-dropped", C, "term",
             "gy.index_add_(0, cols.reshape(-1), (c.unsqueeze(2) * y.unsqueeze(1))",
             "gy.index_add_(0, cols.reshape(-1), (c.unsqueeze(2) * 0.0 * y.unsqueeze(1))"),
    Mutation("sparse-backward-l2-derivative-sign", C, "sign",
             "c = vals * _infinities_to_zero_(torch.reciprocal(s.gather(1, cols).neg_()))",
             "c = vals * _infinities_to_zero_(torch.reciprocal(s.gather(1, cols)))"),
    # ---------------------------------------------------------------- losses.pair_based
    Mutation("ms-sparse-negative-mining-epsilon-sign", PB, "sign",
             "t.masked_fill_(torch.le(t + epsilon, easiest), _NEG_INF)",
             "t.masked_fill_(torch.le(t - epsilon, easiest), _NEG_INF)"),
    Mutation("ms-sparse-positive-weight-sign", PB, "sign",
             "gp.mul_(torch.sigmoid(lse_p).mul_(-w))", "gp.mul_(torch.sigmoid(lse_p).mul_(w))"),
    # ---------------------------------------------------------------- evaluation
    Mutation("relevance-counts-self", R, "off-by-one",
             "return r - 1 if same_set else r", "return r"),
    Mutation("map-at-r-window-off-by-one", R, "off-by-one",
             "torch.arange(width, device=dev)[None, :] < r[:, None]",
             "torch.arange(width, device=dev)[None, :] <= r[:, None]"),
    Mutation("map-at-r-rank-off-by-one", R, "off-by-one",
             "cum / (cols + 1).to(torch.float64)", "cum / (cols + 2).to(torch.float64)"),
    Mutation("map-at-r-precision-dropped", R, "term",
             "cum / (cols + 1).to(torch.float64) * inv_r[rows]", "inv_r[rows]"),
    Mutation("r-precision-divisor", R, "term",
             "\"r_precision\": (counts * inv_r).sum()",
             "\"r_precision\": (counts * inv_r[0]).sum()"),
    Mutation("recall-at-k-off-by-one", R, "off-by-one",
             "match[:, :k].any(dim=1).sum()", "match[:, : max(k - 1, 1)].any(dim=1).sum()"),
    Mutation("triplet-one-pass-counts-any-column", F, "term",
             "act = (sd - thr).gt_(0.0).mul_(qf)", "act = (sd - thr).gt_(0.0)"),
    Mutation("triplet-counted-repeats-ignored", F, "term",
             "w = wp[:, j:j + step, None] * wq[:, None, :]",
             "w = wp[:, j:j + step, None].clamp(max=1) * wq[:, None, :]"),
    Mutation("knn-vote-temperature-inverted", "evaluation/weighted_knn.py", "sign",
             "z = key.double() / temperature", "z = key.double() * temperature"),
    Mutation("clustering-k-off-by-one", "evaluation/clustering.py", "off-by-one",
             "n_clusters = int(np.unique(y).size)", "n_clusters = int(np.unique(y).size) + 1"),
    Mutation("clustering-cosine-not-normalised", "evaluation/clustering.py", "term",
             "    if metric == \"cosine\":\n        x = normalize_rows(x)\n    faiss",
             "    faiss"),
    Mutation("probe-l2-half-dropped", "evaluation/probe.py", "term",
             "loss = loss + 0.5 * weight_decay * (w * w).sum()",
             "loss = loss + weight_decay * (w * w).sum()"),
    Mutation("probe-l2-gradient-doubled", "evaluation/probe.py", "term",
             "gw.add_(w, alpha=weight_decay)", "gw.add_(w, alpha=2 * weight_decay)"),
    Mutation("probe-std-ddof", "evaluation/probe.py", "off-by-one",
             "torch.std_mean(x, dim=0, correction=0)", "torch.std_mean(x, dim=0, correction=1)"),
    Mutation("mi-from-rho-sign", "evaluation/known_mi.py", "sign",
             "math.log1p(-rho * rho)", "math.log1p(rho * rho)"),
    Mutation("optimal-critic-variance-sign", "evaluation/known_mi.py", "sign",
             "var = 1.0 - rho * rho", "var = 1.0 + rho * rho"),
)

IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache",
                                ".hypothesis", "*.egg-info", ".ruff_cache", "docs", "build")


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """``(outcome, seconds, last line)``: outcome "passed", "failed" or "timeout"."""
    env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, f"no result within {timeout:.0f} s"
    lines = [s for s in (r.stdout + r.stderr).strip().splitlines() if s.strip()]
    return ("passed" if r.returncode == 0 else "failed"), time.perf_counter() - t0, \
        (lines[-1] if lines else f"exit {r.returncode}")


def apply(copy: Path, m: Mutation) -> str | None:
    """Mutate the copy; the original text, or None when the anchor is missing or not unique."""
    path = copy / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        return None
    mutated = text.replace(m.old, m.new)
    compile(mutated, str(path), "exec")  # every mutation must stay valid Python
    path.write_text(mutated)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated words; run the mutations whose id has one")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    p.add_argument("--min-caught", type=float, default=None,
                   help="exit 1 when the caught fraction is below this (0..1)")
    p.add_argument("--output", help="also write the results as JSON to this file")
    args = p.parse_args(argv)

    chosen = list(MUTATIONS)
    if args.only:
        words = [w.strip() for w in args.only.split(",") if w.strip()]
        chosen = [m for m in chosen if any(w in m.id for w in words)]
        if not chosen:
            p.error(f"--only {args.only!r} matches no mutation id")
    if args.list:
        for m in chosen:
            print(f"{m.id:<40} {m.kind:<11} {m.path}")
        return 0

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE)
        for group in sorted({m.tests for m in chosen}):
            outcome, secs, last = run_tests(copy, group, args.timeout)
            print(f"baseline {' '.join(group)}: {outcome} in {secs:.0f} s", flush=True)
            if outcome != "passed":
                print(f"the unmutated tests do not pass ({last}); fix them first",
                      file=sys.stderr)
                return 2
        for m in chosen:
            original = apply(copy, m)
            if original is None:
                rows.append(dict(id=m.id, kind=m.kind, path=m.path, outcome="stale",
                                 seconds=0.0, detail="anchor not found once in the source"))
                print(f"{m.id:<40} stale (anchor not found once)", flush=True)
                continue
            try:
                outcome, secs, last = run_tests(copy, m.tests, args.timeout)
            finally:
                (copy / m.path).write_text(original)
            verdict = {"failed": "caught", "timeout": "caught (timeout)",
                       "passed": "SURVIVED"}[outcome]
            rows.append(dict(id=m.id, kind=m.kind, path=m.path, outcome=verdict,
                             seconds=round(secs, 1), detail=last))
            print(f"{m.id:<40} {verdict:<16} {secs:6.1f} s  {last[:70]}", flush=True)

    judged = [r for r in rows if r["outcome"] != "stale"]
    caught = [r for r in judged if r["outcome"].startswith("caught")]
    frac = len(caught) / len(judged) if judged else float("nan")
    print()
    print("| mutation | kind | file | result | s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['id']} | {r['kind']} | {r['path']} | {r['outcome']} | {r['seconds']:.0f} |")
    print()
    print(f"caught {len(caught)} of {len(judged)} mutations ({100 * frac:.0f} %)"
          + (f"; {len(rows) - len(judged)} stale" if len(rows) > len(judged) else ""))
    survivors = [r["id"] for r in judged if r["outcome"] == "SURVIVED"]
    if survivors:
        print("survived: " + ", ".join(survivors))
    if args.output:
        Path(args.output).write_text(json.dumps(
            {"caught": len(caught), "judged": len(judged), "fraction": frac, "rows": rows},
            indent=1))
    if args.min_caught is not None and not frac >= args.min_caught:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
