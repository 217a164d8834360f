"""The DDT report: how on-policy each corpus is for a model, and how well CLL tells corpora apart.

Input: scored corpora (`opsft score` files, or the part folders of `opsft score --ray`; local or
s3://). Output: summary.json and PNG plots:
  cll_hist.png        per-example CLL (mean phi) distribution of each input
  token_phi_hist.png  per-token phi distribution of each input that has `token_phi`
  roc_<A>__<B>.png    ROC of CLL and of mean log-probability separating input A from input B
The AUROC is P(score of a row of A > score of a row of B), ties counting one half
(the Mann-Whitney statistic); `separability` = max(AUROC, 1 - AUROC). The paper's claim is
that CLL separates on-policy from off-policy text better than plain mean log-probability.
Ray-free; matplotlib with the Agg backend.

Streamed, exact, and flat in memory: the inputs are read a batch of columns at a time; each
column's values go to a SortedColumn, which keeps them as sorted runs of at most 2^20 values in a
temporary folder on disk. The AUROC is the exact Mann-Whitney count (integers, from binary searches
of each run of A in each run of B), quantiles are exact order statistics (numpy's linear
interpolation), mean and standard deviation are merged per batch (Chan et al.), histograms
count against fixed edges. Memory holds one batch and two runs, whatever the corpus size; the
disk holds 8 bytes a value.

    opsft report --input original=scored.parquet --input own=own_scored.parquet --output report/
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import uuid
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opsft.data import storage
from opsft.data.corpus import file_format, write_text_atomic
from opsft.data.reader import corpus_files, iter_batches, iter_rows

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
FIELDS = ("cll", "logprob_mean", "cll_frac_pos")  # per-row values the report reads (finite numbers only)
COLUMNS = ["error", *FIELDS, "n_tokens", "token_phi"]
RUN = 1 << 20  # values per sorted run on disk
HIST_BINS, TOKEN_BINS, ROC_POINTS = 40, 80, 512


# ---------------------------------------------------------------------------- in-memory references


def auroc(pos, neg) -> float:
    """P(x > y) + 0.5 P(x == y) for x from pos, y from neg, via average ranks (O(n log n)); the
    in-memory reference of streamed_auroc."""
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


# ---------------------------------------------------------------------------- a column on disk


def _key(x: float) -> int:
    """An integer of the same order as the float (for bisection over every float64 value)."""
    bits = int(np.array(x, dtype=np.float64).view(np.int64))
    return bits if bits >= 0 else -(bits & 0x7FFF_FFFF_FFFF_FFFF) - 1


def _from_key(k: int) -> float:
    bits = k if k >= 0 else (-k - 1) | (1 << 63)
    return float(np.array(bits if bits < (1 << 63) else bits - (1 << 64), dtype=np.int64).view(np.float64))


class SortedColumn:
    """Finite float64 values streamed in, kept as sorted runs on disk (module doc): exact counts,
    order statistics, histograms and mean / std, with memory for one run."""

    def __init__(self, folder: str, run: int = RUN):
        self.folder, self.run = folder, run
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.runs: list[str] = []
        self.n, self.mean_, self.m2 = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if not len(values):
            return
        n, mean, m2 = len(values), float(values.mean()), float(((values - values.mean()) ** 2).sum())
        total = self.n + n
        delta = mean - self.mean_
        self.mean_ += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total
        self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))
        self.buffer.append(values.copy())
        self.buffered += n
        if self.buffered >= self.run:
            self._spill()

    def _spill(self) -> None:
        if not self.buffer:
            return
        path = os.path.join(self.folder, f"run-{uuid.uuid4().hex}.npy")
        np.save(path, np.sort(np.concatenate(self.buffer)))
        self.runs.append(path)
        self.buffer, self.buffered = [], 0

    def arrays(self):
        self._spill()
        for path in self.runs:
            yield np.load(path, mmap_mode="r")

    def counts(self, xs: np.ndarray, side: str) -> np.ndarray:
        """For each x: how many values are < x (side 'left') or <= x (side 'right')."""
        xs = np.asarray(xs, dtype=np.float64)
        out = np.zeros(len(xs), dtype=np.int64)
        for run in self.arrays():
            out += np.searchsorted(run, xs, side=side)
        return out

    def kth(self, k: int) -> float:
        """The k-th smallest value (0-based), exactly: a bisection over the float64 order."""
        lo, hi = _key(self.lo), _key(self.hi)
        while lo < hi:
            mid = (lo + hi) // 2
            if int(self.counts(np.array([_from_key(mid)]), "right")[0]) >= k + 1:
                hi = mid
            else:
                lo = mid + 1
        return _from_key(lo)

    def quantile(self, q: float) -> float:
        """numpy.quantile(values, q) (linear interpolation between two order statistics)."""
        h = (self.n - 1) * q
        below = math.floor(h)
        a = self.kth(below)
        b = self.kth(min(below + 1, self.n - 1))
        return float(np.quantile(np.array([a, b]), h - below))

    def histogram(self, edges: np.ndarray) -> np.ndarray:
        """numpy.histogram(values, edges)[0]: bins [e_i, e_i+1), the last one closed."""
        below = self.counts(edges, "left")
        counts = np.diff(below)
        counts[-1] += int(self.counts(edges[-1:], "right")[0]) - int(below[-1])
        return counts

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")

    def stats(self) -> dict:
        if self.n == 0:
            return {"n": 0}
        return {"n": int(self.n), "mean": float(self.mean_), "std": float(self.std),
                **{f"q{int(q * 100):02d}": self.quantile(q) for q in QUANTILES}}


def streamed_auroc(a: SortedColumn, b: SortedColumn) -> float:
    """P(x > y) + 0.5 P(x == y), x from a, y from b: the exact Mann-Whitney count over runs."""
    if a.n == 0 or b.n == 0:
        raise ValueError("AUROC needs at least one value on each side")
    twice = 0
    for run_a in a.arrays():
        for run_b in b.arrays():
            left = np.searchsorted(run_b, run_a, side="left")
            right = np.searchsorted(run_b, run_a, side="right")
            twice += int(left.sum()) * 2 + int((right - left).sum())
    return twice / (2 * a.n * b.n)


# ---------------------------------------------------------------------------- one source


def _number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def _numbers(values) -> bool:
    return isinstance(values, list | tuple | np.ndarray) and len(values) > 0 and all(_number(v) for v in values)


def _row_ok(row: dict) -> bool:
    """A scored row: no error, and finite numbers where the report reads them (anything else in a
    hostile input counts as an error row)."""
    return not row.get("error") and all(_number(row.get(k)) for k in FIELDS)


class Source:
    """The streamed figures of one scored corpus (rows, error rows, tokens, each FIELD's column and
    the token phi), from Arrow tables (Parquet) or from row dicts (JSONL, or rows in memory)."""

    def __init__(self, label: str, folder: str):
        self.label = label
        self.rows = self.errors = self.tokens = 0
        self.columns = {f: SortedColumn(folder) for f in FIELDS}
        self.phi = SortedColumn(folder)

    def add_rows(self, rows: Iterable[dict], chunk: int = 8192) -> None:
        batch: list[dict] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= chunk:
                self._add_dicts(batch)
                batch = []
        if batch:
            self._add_dicts(batch)

    def _add_dicts(self, rows: list[dict]) -> None:
        ok = [r for r in rows if _row_ok(r)]
        self.rows += len(rows)
        self.errors += len(rows) - len(ok)
        self.tokens += sum(int(r["n_tokens"]) for r in ok if _number(r.get("n_tokens")))
        for f in FIELDS:
            self.columns[f].add(np.array([float(r[f]) for r in ok], dtype=np.float64))
        phis = [r["token_phi"] for r in ok if _numbers(r.get("token_phi"))]
        if phis:
            self.phi.add(np.concatenate([np.asarray(x, dtype=np.float64) for x in phis]))

    def add_table(self, table: pa.Table) -> None:
        n = table.num_rows
        ok = np.ones(n, dtype=bool)
        error = table.column("error")
        if pa.types.is_string(error.type) or pa.types.is_large_string(error.type):
            ok &= ~pc.fill_null(pc.greater(pc.utf8_length(error), 0), False).to_numpy(zero_copy_only=False)
        elif not pa.types.is_null(error.type):  # a non-string error column: any value marks an error
            ok &= ~pc.is_valid(error).to_numpy(zero_copy_only=False)
        values = {}
        for f in FIELDS:
            col = table.column(f)
            if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
                ok &= False  # text, lists, booleans: not numbers
                continue
            arr = pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)  # nulls read as NaN
            ok &= np.isfinite(arr)
            values[f] = arr
        self.rows += n
        self.errors += int(n - ok.sum())
        if not ok.any():
            return
        tokens = table.column("n_tokens")
        if pa.types.is_integer(tokens.type) or pa.types.is_floating(tokens.type):
            t = pc.cast(tokens, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
            self.tokens += int(np.nansum(np.where(ok & np.isfinite(t), t, 0)))
        for f in FIELDS:
            self.columns[f].add(values[f][ok])
        phi = table.column("token_phi")
        if pa.types.is_list(phi.type) or pa.types.is_large_list(phi.type):
            self._add_phi(phi.combine_chunks(), ok)

    def _add_phi(self, phi: pa.Array, ok: np.ndarray) -> None:
        """Token phi of the ok rows whose list is non-empty and all finite numbers."""
        if not (pa.types.is_floating(phi.type.value_type) or pa.types.is_integer(phi.type.value_type)):
            return
        lengths = pc.fill_null(pc.list_value_length(phi), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.cast(pc.list_flatten(phi), pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        finite = np.isfinite(flat)
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        good = np.zeros(len(lengths), dtype=bool)
        has = lengths > 0
        if has.any():
            bad_per_row = np.add.reduceat((~finite).astype(np.int64), starts[has]) if len(flat) else np.zeros(0)
            good[has] = bad_per_row == 0
        keep = ok & good & pc.is_valid(phi).to_numpy(zero_copy_only=False)
        if keep.any():
            self.phi.add(flat[np.repeat(keep, lengths)])

    def summary(self) -> dict:
        out = {"rows": self.rows, "error_rows": self.errors, "tokens": int(self.tokens),
               **{f: self.columns[f].stats() for f in FIELDS}}
        if self.phi.n:
            below = self.phi.counts(np.array([-5.0, -1.0, 0.0]), "right")
            out["token_phi"] = {**self.phi.stats(), "frac_pos": float(1 - below[2] / self.phi.n),
                                "frac_gt_m1": float(1 - below[1] / self.phi.n),
                                "frac_gt_m5": float(1 - below[0] / self.phi.n)}
        return out


def read_source(label: str, data, folder: str) -> Source:
    """A Source from a path (file or folder; Parquet as Arrow batches, JSONL as rows) or from rows."""
    source = Source(label, folder)
    if not isinstance(data, str | Path):
        source.add_rows(data)
        return source
    for f in corpus_files(data):
        if file_format(f) == "parquet":
            for table in iter_batches(f, COLUMNS):
                source.add_table(table)
        else:
            source.add_rows(iter_rows(f, COLUMNS))
    return source


def source_summary(rows: Iterable[dict]) -> dict:
    """The summary of one source's rows (in memory)."""
    with tempfile.TemporaryDirectory(prefix="opsft-report-") as folder:
        return read_source("rows", list(rows), folder).summary()


def separation(a: Source, b: Source) -> dict:
    """AUROC of per-example CLL and of mean log-probability for telling A from B."""
    out = {}
    for key in ("cll", "logprob_mean"):
        auc = streamed_auroc(a.columns[key], b.columns[key])
        out[key] = {"auroc": auc, "separability": max(auc, 1 - auc)}
    return out


# ---------------------------------------------------------------------------- the report


def parse_input(spec: str) -> tuple[str, str]:
    """'label=path' or 'path' (label = file name without extension)."""
    label, sep, path = spec.partition("=")
    if not sep or "/" in label or not label:
        path = spec
        label = storage.name_of(spec.rstrip("/")).split(".")[0]
    return label, path


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def save_figure(fig, path) -> None:
    """A PNG written atomically, to a local path or a URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    storage.write_bytes_atomic(path, buf.getvalue())


def _edges(columns: list[SortedColumn], bins: int, clip: tuple[float, float] | None = None) -> np.ndarray:
    lo = min(c.lo for c in columns if c.n)
    hi = max(c.hi for c in columns if c.n)
    if clip:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
        if not lo < hi:  # every value beyond one end of the clip range: show the whole range
            lo, hi = clip
    if not lo < hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def _stairs(ax, column: SortedColumn, edges: np.ndarray, label: str, clip: bool = False) -> None:
    counts = column.histogram(edges).astype(float)
    if clip:  # values beyond the edges land in the outermost bins (as np.clip would put them)
        counts[0] += int(column.counts(edges[:1], "left")[0])
        counts[-1] += column.n - int(column.counts(edges[-1:], "right")[0])
    density = counts / max(column.n, 1) / np.diff(edges)
    ax.stairs(density, edges, fill=True, alpha=0.5, label=label)


def _roc_points(a: SortedColumn, b: SortedColumn) -> tuple[np.ndarray, np.ndarray]:
    """ROC of 'a scores higher' at ROC_POINTS thresholds over both columns' range (exact there)."""
    thresholds = np.linspace(max(a.hi, b.hi), min(a.lo, b.lo), ROC_POINTS)
    tpr = (a.n - a.counts(thresholds, "left")) / a.n
    fpr = (b.n - b.counts(thresholds, "left")) / b.n
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, tpr, 1.0]


def build_report(inputs: list[tuple[str, object]], output) -> dict:
    """Write summary.json and the plots for labelled scored corpora (each a path, or rows in memory)
    into the folder `output` (local or a URI); returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in inputs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"input labels must be distinct, got {labels} (use --input LABEL=PATH)")
    output = str(output)
    if not storage.is_uri(output):
        Path(output).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="opsft-report-") as folder:
        sources = [read_source(label, data, folder) for label, data in inputs]
        for s in sources:
            if not s.columns["cll"].n:
                raise ValueError(f"input {s.label!r} has no scored rows (score it first with `opsft score`)")
        summary = {"sources": {s.label: s.summary() for s in sources}, "pairs": {}, "plots": []}

        fig, ax = plt.subplots(figsize=(7, 4))
        edges = _edges([s.columns["cll"] for s in sources], HIST_BINS)
        for s in sources:
            _stairs(ax, s.columns["cll"], edges, s.label)
        ax.set(xlabel="per-example CLL (mean phi)", ylabel="density", title="CLL by source")
        ax.legend()
        save_figure(fig, storage.join(output, "cll_hist.png"))
        plt.close(fig)
        summary["plots"].append("cll_hist.png")

        with_tokens = [s for s in sources if s.phi.n]
        if with_tokens:
            fig, ax = plt.subplots(figsize=(7, 4))
            edges = _edges([s.phi for s in with_tokens], TOKEN_BINS, clip=(-15.0, 5.0))
            for s in with_tokens:
                _stairs(ax, s.phi, edges, s.label, clip=True)
            ax.set(xlabel="per-token phi = log p + H (clipped to [-15, 5])", ylabel="density", title="token phi")
            ax.legend()
            save_figure(fig, storage.join(output, "token_phi_hist.png"))
            plt.close(fig)
            summary["plots"].append("token_phi_hist.png")

        for a, b in combinations(sources, 2):
            key = f"{a.label}__{b.label}"
            summary["pairs"][key] = separation(a, b)
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            for field, name in (("cll", "CLL"), ("logprob_mean", "mean log p")):
                fpr, tpr = _roc_points(a.columns[field], b.columns[field])
                ax.plot(fpr, tpr, label=f"{name} (AUROC {summary['pairs'][key][field]['auroc']:.3f})")
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set(xlabel=f"false positive rate ({b.label})", ylabel=f"true positive rate ({a.label})",
                   title=f"{a.label} vs {b.label}")
            ax.legend(loc="lower right")
            name = f"roc_{_safe(a.label)}__{_safe(b.label)}.png"
            save_figure(fig, storage.join(output, name))
            plt.close(fig)
            summary["plots"].append(name)

    write_text_atomic(storage.join(output, "summary.json"), json.dumps(summary, indent=2))
    return summary


def report_from_paths(specs: list[str], output) -> dict:
    return build_report([(label, path) for label, path in map(parse_input, specs)], output)
