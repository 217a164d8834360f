"""The DDT report: how on-policy each corpus is for a model, and how well CLL tells corpora apart.

Input: scored corpora (`opsft score` files, or the part folders of `opsft score --ray`).
Output: summary.json and PNG plots:
  cll_hist.png        per-example CLL (mean phi) distribution of each input
  token_phi_hist.png  per-token phi distribution of each input that has `token_phi`
  roc_<A>__<B>.png    ROC of CLL and of mean log-probability separating input A from input B
The AUROC is P(score of a row of A > score of a row of B), ties counting one half
(the Mann-Whitney statistic); `separability` = max(AUROC, 1 - AUROC). The paper's claim is
that CLL separates on-policy from off-policy text better than plain mean log-probability.
Ray-free; matplotlib with the Agg backend.

    opsft report --input original=scored.parquet --input own=own_scored.parquet --output report/
"""

from __future__ import annotations

import json
import math
import re
from itertools import combinations
from pathlib import Path

import numpy as np

from opsft.data.corpus import atomic_path, write_text_atomic
from opsft.jobs.files import read_output

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def auroc(pos, neg) -> float:
    """P(x > y) + 0.5 P(x == y) for x from pos, y from neg, via average ranks (O(n log n))."""
    pos, neg = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one value on each side")
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # average rank (1-based) over each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(both)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def roc_curve(pos, neg) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over all thresholds, 'positive' = higher score."""
    scores = np.concatenate([pos, neg])
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[scores[1:] != scores[:-1], True]  # one point per distinct threshold
    tps, fps = np.cumsum(labels)[last], np.cumsum(1 - labels)[last]
    return np.r_[0.0, fps / max(len(neg), 1)], np.r_[0.0, tps / max(len(pos), 1)]


def parse_input(spec: str) -> tuple[str, str]:
    """'label=path' or 'path' (label = file name without extension)."""
    label, sep, path = spec.partition("=")
    if not sep or "/" in label or not label:
        path = spec
        label = Path(spec.rstrip("/")).name.split(".")[0]
    return label, path


def _stats(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"n": 0}
    qs = np.quantile(values, QUANTILES)
    return {"n": int(len(values)), "mean": float(values.mean()), "std": float(values.std()),
            **{f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs, strict=True)}}


def source_summary(rows: list[dict]) -> dict:
    ok = _ok(rows)
    out = {"rows": len(rows), "error_rows": len(rows) - len(ok),
           "tokens": int(sum(r.get("n_tokens") or 0 for r in ok)),
           "cll": _stats(np.array([r["cll"] for r in ok], dtype=float)),
           "logprob_mean": _stats(np.array([r["logprob_mean"] for r in ok], dtype=float)),
           "cll_frac_pos": _stats(np.array([r["cll_frac_pos"] for r in ok], dtype=float))}
    phi = token_phis(ok)
    if phi is not None:
        out["token_phi"] = {**_stats(phi), "frac_pos": float((phi > 0).mean()),
                            "frac_gt_m1": float((phi > -1).mean()), "frac_gt_m5": float((phi > -5).mean())}
    return out


def token_phis(rows: list[dict]) -> np.ndarray | None:
    lists = [r["token_phi"] for r in rows if _numbers(r.get("token_phi"))]
    if not lists:
        return None
    return np.concatenate([np.asarray(x, dtype=float) for x in lists])


def _number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def _numbers(values) -> bool:
    return isinstance(values, list | tuple | np.ndarray) and len(values) > 0 and all(_number(v) for v in values)


def _ok(rows):
    """The scored rows: no error, and finite numbers where the report reads them (anything else in
    a hostile input counts as an error row)."""
    return [r for r in rows if not r.get("error") and all(_number(r.get(k)) for k in ("cll", "logprob_mean",
                                                                                      "cll_frac_pos"))]


def separation(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """AUROC of per-example CLL and of mean log-probability for telling A from B."""
    a, b = _ok(rows_a), _ok(rows_b)
    out = {}
    for key in ("cll", "logprob_mean"):
        auc = auroc([r[key] for r in a], [r[key] for r in b])
        out[key] = {"auroc": auc, "separability": max(auc, 1 - auc)}
    return out


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def save_figure(fig, path: Path) -> None:
    """A PNG written through atomic_path (matplotlib picks the format from the suffix)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def build_report(inputs: list[tuple[str, list[dict]]], output: str | Path) -> dict:
    """Write summary.json and the plots for labelled scored corpora; returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in inputs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"input labels must be distinct, got {labels} (use --input LABEL=PATH)")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"sources": {label: source_summary(rows) for label, rows in inputs}, "pairs": {}, "plots": []}
    for label, rows in inputs:
        if not _ok(rows):
            raise ValueError(f"input {label!r} has no scored rows (score it first with `opsft score`)")

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in inputs:
        ax.hist([r["cll"] for r in _ok(rows)], bins=40, alpha=0.5, density=True, label=label)
    ax.set(xlabel="per-example CLL (mean phi)", ylabel="density", title="CLL by source")
    ax.legend()
    save_figure(fig, out / "cll_hist.png")
    plt.close(fig)
    summary["plots"].append("cll_hist.png")

    with_tokens = [(label, token_phis(_ok(rows))) for label, rows in inputs]
    with_tokens = [(label, phi) for label, phi in with_tokens if phi is not None]
    if with_tokens:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, phi in with_tokens:
            ax.hist(np.clip(phi, -15, 5), bins=80, alpha=0.5, density=True, label=label)
        ax.set(xlabel="per-token phi = log p + H (clipped to [-15, 5])", ylabel="density", title="token phi")
        ax.legend()
        save_figure(fig, out / "token_phi_hist.png")
        plt.close(fig)
        summary["plots"].append("token_phi_hist.png")

    for (la, ra), (lb, rb) in combinations(inputs, 2):
        key = f"{la}__{lb}"
        summary["pairs"][key] = separation(ra, rb)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        a, b = _ok(ra), _ok(rb)
        for field, name in (("cll", "CLL"), ("logprob_mean", "mean log p")):
            fpr, tpr = roc_curve(np.array([r[field] for r in a]), np.array([r[field] for r in b]))
            ax.plot(fpr, tpr, label=f"{name} (AUROC {summary['pairs'][key][field]['auroc']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel=f"false positive rate ({lb})", ylabel=f"true positive rate ({la})", title=f"{la} vs {lb}")
        ax.legend(loc="lower right")
        name = f"roc_{_safe(la)}__{_safe(lb)}.png"
        save_figure(fig, out / name)
        plt.close(fig)
        summary["plots"].append(name)

    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def report_from_paths(specs: list[str], output: str | Path) -> dict:
    return build_report([(label, read_output(path)) for label, path in map(parse_input, specs)], output)
