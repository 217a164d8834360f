"""The DDT report: AUROC against the brute-force pair count, the ROC curve's area, and the
files and figures `opsft report` writes for scored corpora (single files and job folders)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from opsft.data import parts
from opsft.report import auroc, build_report, parse_input, roc_curve, source_summary


def brute_auroc(pos, neg):
    return np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x in pos for y in neg])


def test_auroc_hand_value_and_brute_force_with_ties():
    assert auroc([1, 2, 3], [0, 2]) == pytest.approx(4.5 / 6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos, neg = rng.integers(0, 6, rng.integers(1, 30)), rng.integers(0, 6, rng.integers(1, 30))
        assert auroc(pos, neg) == pytest.approx(brute_auroc(pos, neg), abs=1e-12)
        fpr, tpr = roc_curve(pos.astype(float), neg.astype(float))
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
        assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(pos, neg), abs=1e-12)  # ties = diagonal steps
    with pytest.raises(ValueError):
        auroc([], [1.0])


def scored(rng, n, cll_shift, lp_shift, tokens=True):
    rows = []
    for i in range(n):
        phi = rng.normal(cll_shift, 1.0, size=5)
        rows.append({"id": str(i), "cll": float(phi.mean()), "logprob_mean": float(rng.normal(lp_shift, 1.0)),
                     "cll_frac_pos": float((phi > 0).mean()), "n_tokens": 5, "error": None,
                     "token_phi": phi.tolist() if tokens else None})
    rows.append({"id": "bad", "cll": None, "logprob_mean": None, "cll_frac_pos": None, "n_tokens": None,
                 "error": "'prompt' is empty", "token_phi": None})
    return rows


def test_report_files_and_figures(tmp_path):
    rng = np.random.default_rng(1)
    own, corpus = scored(rng, 60, 0.0, -1.0), scored(rng, 50, -1.5, -1.2, tokens=False)
    summary = build_report([("own", own), ("corpus", corpus)], tmp_path / "rep")
    on_disk = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for name in ("cll_hist.png", "token_phi_hist.png", "roc_own__corpus.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    src = summary["sources"]["own"]
    assert src["rows"] == 61 and src["error_rows"] == 1 and src["tokens"] == 300
    phi = np.concatenate([r["token_phi"] for r in own if r["token_phi"]])
    assert src["token_phi"]["mean"] == pytest.approx(phi.mean()) and src["token_phi"]["n"] == 300
    assert src["token_phi"]["frac_pos"] == pytest.approx((phi > 0).mean())
    assert "token_phi" not in summary["sources"]["corpus"]
    ok_own, ok_corpus = own[:-1], corpus[:-1]
    pair = summary["pairs"]["own__corpus"]
    assert pair["cll"]["auroc"] == pytest.approx(brute_auroc([r["cll"] for r in ok_own], [r["cll"] for r in ok_corpus]))
    assert pair["logprob_mean"]["auroc"] == pytest.approx(
        brute_auroc([r["logprob_mean"] for r in ok_own], [r["logprob_mean"] for r in ok_corpus]))
    assert pair["cll"]["auroc"] > 0.8 and pair["cll"]["separability"] > pair["logprob_mean"]["separability"]
    with pytest.raises(ValueError, match="distinct"):
        build_report([("a", own), ("a", corpus)], tmp_path / "x")
    assert source_summary([])["cll"] == {"n": 0}


def test_cli_report_reads_files_and_job_folders(tmp_path):
    from opsft.cli import main
    from opsft.data.corpus import write_rows

    rng = np.random.default_rng(2)
    write_rows(scored(rng, 20, 0.0, 0.0), tmp_path / "own.jsonl")
    folder = str(tmp_path / "orig.parquet")
    rows = scored(rng, 20, -1.0, 0.0)
    parts.write_part(folder, rows[:10], list(range(10)), parts.SCORE_TYPES)
    parts.write_part(folder, rows[10:], list(range(10, len(rows))), parts.SCORE_TYPES)
    assert parse_input("x=/a/b.parquet") == ("x", "/a/b.parquet")
    assert parse_input("/a/b.parquet") == ("b", "/a/b.parquet")
    assert main(["report", "--input", f"mine={tmp_path / 'own.jsonl'}", "--input", folder,
                 "--output", str(tmp_path / "rep")]) == 0
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["sources"]["orig"]["rows"] == 21 and set(summary["pairs"]) == {"mine__orig"}


def test_streamed_figures_equal_numpy_and_the_brute_force_count_on_any_split(tmp_path):
    """The report's columns go to sorted runs on disk (report.SortedColumn): with runs of a few values
    (many runs, as at 10M rows), the AUROC is the exact pair count, quantiles and the histogram equal
    numpy's, mean and std equal numpy's to float64 rounding."""
    from opsft.report import SortedColumn, streamed_auroc

    rng = np.random.default_rng(3)
    for _ in range(25):
        a = rng.integers(-4, 5, rng.integers(1, 60)) * rng.choice([1.0, 0.25])
        b = np.round(rng.normal(0, 2, rng.integers(1, 60)), int(rng.integers(0, 3)))
        ca, cb = SortedColumn(str(tmp_path), run=7), SortedColumn(str(tmp_path), run=5)
        for chunk in np.array_split(a, 3):
            ca.add(chunk)
        for chunk in np.array_split(b, 4):
            cb.add(chunk)
        assert streamed_auroc(ca, cb) == pytest.approx(brute_auroc(a, b), abs=1e-12)
        for q in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0):
            assert ca.quantile(q) == np.quantile(a, q) and cb.quantile(q) == np.quantile(b, q)
        assert ca.mean_ == pytest.approx(a.mean(), abs=1e-12) and ca.std == pytest.approx(a.std(), abs=1e-9)
        edges = np.linspace(a.min() - 0.1, a.max() + 0.3, 9)
        assert (ca.histogram(edges) == np.histogram(a, edges)[0]).all()


def test_a_hostile_scored_file_and_tokens_beyond_the_plot_range(tmp_path):
    """Scores that are not finite numbers are error rows, in Parquet (vectorised) as in JSONL (row by
    row); token phi all beyond the clipped plot range still plots."""
    from opsft.data.corpus import write_rows

    rows = [{"id": str(i), "cll": 0.1 * i, "logprob_mean": -1.0, "cll_frac_pos": 0.5, "n_tokens": 3,
             "error": None, "token_phi": [9.0, 10.0, 11.0]} for i in range(6)]
    rows += [{"id": "nan", "cll": float("nan"), "logprob_mean": -1.0, "cll_frac_pos": 0.5, "n_tokens": 3},
             {"id": "inf", "cll": 1.0, "logprob_mean": float("inf"), "cll_frac_pos": 0.5, "n_tokens": 3},
             {"id": "err", "cll": 1.0, "logprob_mean": -1.0, "cll_frac_pos": 0.5, "error": "bad"},
             {"id": "empty-err", "cll": 2.0, "logprob_mean": -1.0, "cll_frac_pos": 0.5, "error": ""}]
    for ext in ("parquet", "jsonl"):
        write_rows(rows, tmp_path / f"s.{ext}")
        summary = build_report([("x", str(tmp_path / f"s.{ext}")), ("y", rows)], tmp_path / f"rep-{ext}")
        for label in ("x", "y"):
            src = summary["sources"][label]
            assert (src["rows"], src["error_rows"], src["cll"]["n"]) == (10, 3, 7), (ext, label)
            assert src["token_phi"]["n"] == 18 and src["token_phi"]["frac_pos"] == 1.0
        assert summary["pairs"]["x__y"]["cll"]["auroc"] == pytest.approx(0.5)
        assert (tmp_path / f"rep-{ext}" / "token_phi_hist.png").exists()
