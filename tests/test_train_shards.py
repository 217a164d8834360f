"""opsft.train.worker_corpus against the one-process path it must reproduce exactly: read_rows +
prepare_examples + split_eval. Hostile corpora (BOM, blank lines, CRLF / CR ends, invalid JSON and
UTF-8, non-objects, rows with `error`, no response, too long under skip and truncate, unicode;
Parquet with several row groups) are cut into ranges of many sizes, their rows split over 1-3
simulated workers in many ways (threads whose gather is a barrier), and every worker must see the
same numbering, lengths, stats and examples as the reference, fetching only the requested rows.
One test runs two real torch.distributed (gloo) processes; one runs the Ray Data pipeline and
splits it per worker (worker_datasets), and with Ray's default DataConfig (slow: starts Ray)."""

from __future__ import annotations

import pickle
import random
import socket
import tempfile
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opsft.data.corpus import jsonl_rows, rows_table
from opsft.data.reader import corpus_ranges, read_range, read_rows
from opsft.train.batches import BatchPlan, prepare_examples, split_eval
from opsft.train.ray_data import corpus_dataset, corpus_summary, worker_datasets
from opsft.train.worker_corpus import ShardedCorpus, dist_gather, local_rows
from train_helpers import arithmetic_rows

MAX_LENGTH = 64  # the good rows fit (47-58 tokens); the LONG ones do not
LONG = "word " * 60  # well over MAX_LENGTH tokens


def hostile_jsonl(path: Path) -> str:
    """Every kind of line read_rows handles, with every line end, plus enough good rows to train on."""
    good = [b'{"id": "r%d", "prompt": "What is %d plus %d?", "response": "It is %d."}' % (i, i, i + 1, 2 * i + 1)
            for i in range(10)]
    lines = [
        (b'\xef\xbb\xbf{"prompt": "after a BOM", "response": "yes"}', b"\n"),
        (b"", b"\r\n"),
        (b"  \t \x0b\x0c", b"\n"),  # whitespace only: not a row
        (good[0], b"\r\n"),
        (b'{"prompt": "caf\xc3\xa9 \xe2\x98\x95?", "response": "\xf0\x9f\x98\x80 s\xc3\xbbr"}', b"\r"),
        (b"not json at all", b"\r"),
        (b"[1, 2, 3]", b"\n"),
        (b'"a string"', b"\r\n"),
        (b"\xff\xfe not utf-8", b"\n"),
        (good[1], b"\r"),
        (b'{"prompt": "p", "response": "r", "error": "upstream failed: code 7"}', b"\n"),
        (b'{"prompt": "no response here"}', b"\n"),
        (b'{"prompt": "", "response": "empty prompt"}', b"\r\n"),
        (b'{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], '
         b'"response": "Hello."}', b"\n"),
        (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "response": "z"}',
         b"\n"),
        (b'{"prompt": "%s", "response": "short"}' % LONG.encode(), b"\n"),  # long prompt: skipped under truncate too
        (b'{"prompt": "Say it.", "response": "%s"}' % LONG.encode(), b"\r\n"),  # long response: truncated
        (b'{"prompt": "lone \\ud800 surrogate", "response": "r"}', b"\n"),
        (b"", b"\r"),
        *((g, b"\n") for g in good[2:]),
        (b"", b"\r\n"),
        (b'{"prompt": "no final line end", "response": "fine"}', b""),
    ]
    path.write_bytes(b"".join(body + end for body, end in lines))
    return str(path)


def hostile_parquet(path: Path, row_group_size: int = 3) -> str:
    rows = [
        *arithmetic_rows(5),
        {"prompt": "p", "response": "r", "error": "upstream failed: code 7"},
        {"prompt": "no response"},
        {"prompt": "caf\u00e9 \u2615?", "response": "\U0001f600 s\u00fbr"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
         "response": "Hello."},
        {"prompt": LONG, "response": "short"},
        {"prompt": "Say it.", "response": LONG},
        *arithmetic_rows(12)[5:],
    ]
    pq.write_table(rows_table(rows), path, row_group_size=row_group_size)
    return str(path)


def reference(path: str, tokenizer, overlong: str, eval_rows: int, seed: int):
    """(train, eval, stats) of the one-process path."""
    examples, stats = prepare_examples(read_rows(path), tokenizer, MAX_LENGTH, overlong)
    train, eval_ex = split_eval(examples, eval_rows, seed)
    return train, eval_ex, stats.as_dict()


class FakeGroup:
    """W threads as W workers: gather(obj) is an all-gather through a barrier; every object travels
    pickled (as it would between processes); `sent` records what each rank contributed, per call."""

    def __init__(self, world: int):
        self.world, self.slots = world, [None] * world
        # a hang guard only (every worker of these tests raises at the same point, or none does): no
        # timing that a slow machine could hit
        self.barrier = threading.Barrier(world, timeout=600)
        self.sent: list[list] = [[] for _ in range(world)]

    def gather_of(self, rank: int):
        def gather(obj) -> list:
            self.sent[rank].append(obj)
            self.slots[rank] = pickle.dumps(obj)
            self.barrier.wait()
            out = [pickle.loads(blob) for blob in self.slots]
            self.barrier.wait()
            return out

        return gather

    def run(self, work) -> list:
        """work(rank, gather) on every rank at once; the results in rank order (an exception re-raised)."""
        outcomes = self.outcomes(work)
        raised = [value for kind, value in outcomes if kind == "raised"]
        if raised:  # the first real error; a broken barrier only says that another worker raised
            raise next((e for e in raised if not isinstance(e, threading.BrokenBarrierError)), raised[0])
        return [value for _, value in outcomes]

    def outcomes(self, work) -> list[tuple[str, object]]:
        """("ok", result) or ("raised", exception) of work(rank, gather) on every rank, in rank order."""
        results: list = [None] * self.world

        def target(rank):
            try:
                results[rank] = ("ok", work(rank, self.gather_of(rank)))
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                results[rank] = ("raised", exc)  # no abort: it would break the others' wait in flight

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        assert None not in results, "a worker hung"
        return results


def splits(rows: list[dict], world: int, seed: int) -> list[list[list[dict]]]:
    """Ways to deal rows to `world` workers: round-robin, everything on the last worker (the others
    empty), and a random shuffle cut at random points; each shard in a shuffled order."""
    rng = random.Random(seed)
    ways = [[rows[r::world] for r in range(world)], [[] for _ in range(world - 1)] + [list(rows)]]
    shuffled = rng.sample(rows, len(rows))
    cuts = sorted(rng.randint(0, len(rows)) for _ in range(world - 1))
    ways.append([shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True)])
    return [[rng.sample(shard, len(shard)) for shard in way] for way in ways]


def batches(n_train: int) -> list[list[int]]:
    """Index lists to fetch: two epochs of a BatchPlan, one batch in reverse, a repeat, none."""
    plan = BatchPlan(n_train, 4, seed=5)
    out = [plan.step_indices(k) for k in range(2 * plan.steps_per_epoch)]
    return out + [list(range(n_train))[::-1], [0, 0, n_train - 1], []]


def build_and_fetch(rows, gather, wanted: list[list[int]], **kwargs) -> tuple[ShardedCorpus, list]:
    """One worker: its ShardedCorpus and the examples of each batch in `wanted` (all collectives)."""
    corpus = ShardedCorpus(rows, gather, **kwargs)
    return corpus, [corpus.fetch(b) for b in wanted]


# ---------------------------------------------------------------------------- reading ranges


@pytest.mark.parametrize("range_bytes", [1, 2, 3, 7, 16, 50, 1 << 20])
def test_ranges_read_the_rows_of_read_rows(tmp_path, range_bytes):
    for path in (hostile_jsonl(tmp_path / "c.jsonl"), hostile_parquet(tmp_path / "c.parquet")):
        pieces = corpus_ranges(path, range_bytes)
        got = [pair for piece in pieces for pair in read_range(piece)]
        assert got == list(enumerate(read_rows(path)))  # rows, error messages and their line numbers
        assert {piece["n_rows"] for piece in pieces} == {len(got)}
        if path.endswith(".jsonl"):
            assert all(a["end"] <= b["start"] for a, b in zip(pieces, pieces[1:], strict=False))
    assert len(corpus_ranges(tmp_path / "c.parquet")) == 6  # 18 rows in row groups of 3


# bodies: blank, whitespace, rows, junk, bad UTF-8, a non-object, and a bare CR inside a line
line_bodies = st.sampled_from([b"", b" ", b"\t\x0b", b"{}", b'{"a": 1}', b"x", b"\xff", b"[]", b'{"p": "\r"}'])
line_ends = st.sampled_from([b"\n", b"\r", b"\r\n"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(line_bodies, line_ends), max_size=12), st.booleans(), st.booleans(), st.integers(1, 30))
def test_any_cut_of_any_line_ends_reads_like_jsonl_rows(lines, bom, last_end, range_bytes):
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(body + end for body, end in lines)
    if lines and not last_end:
        data = data[:-len(lines[-1][1])]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.jsonl"
        path.write_bytes(data)
        pieces = corpus_ranges(path, range_bytes)
        got = [pair for piece in pieces for pair in read_range(piece)]
    assert got == list(enumerate(jsonl_rows(data)))
    assert {piece["n_rows"] for piece in pieces} <= {len(got)}


def test_bad_paths_fail_on_the_driver_like_read_rows(tmp_path):
    (tmp_path / "notes.txt").write_text("{}\n")
    (tmp_path / "folder.jsonl").mkdir()
    for name in ("missing.jsonl", "missing.txt", "notes.txt", "folder.jsonl"):
        with pytest.raises(Exception) as expected:
            read_rows(tmp_path / name)
        for call in (lambda p: corpus_ranges(p), lambda p: corpus_dataset(p, "no-tokenizer", MAX_LENGTH)):
            with pytest.raises(type(expected.value)) as got:
                call(tmp_path / name)
            assert str(got.value) == str(expected.value)
    (tmp_path / "blank.jsonl").write_bytes(b"\xef\xbb\xbf\n \r\n\r")
    assert corpus_ranges(tmp_path / "blank.jsonl") == [] and read_rows(tmp_path / "blank.jsonl") == []
    with pytest.raises(ValueError, match="blank.jsonl: the corpus has no rows"):
        corpus_dataset(tmp_path / "blank.jsonl", "no-tokenizer", MAX_LENGTH)


# ---------------------------------------------------------------------------- workers (simulated)


@pytest.mark.parametrize("overlong", ["skip", "truncate"])
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_every_split_over_workers_gives_the_one_process_examples(tmp_path, tokenizer, kind, overlong):
    path = hostile_jsonl(tmp_path / "c.jsonl") if kind == "jsonl" else hostile_parquet(tmp_path / "c.parquet")
    train, eval_ex, stats = reference(path, tokenizer, overlong, eval_rows=3, seed=11)
    assert stats["error_rows"] >= (8 if kind == "jsonl" else 2) and stats["too_long_skipped"] >= 1
    assert stats["truncated"] == (1 if overlong == "truncate" else 0)
    rows = local_rows(path, tokenizer, MAX_LENGTH, overlong, range_bytes=40)
    assert rows == local_rows(path, tokenizer, MAX_LENGTH, overlong)  # the cut does not matter
    wanted = batches(len(train))
    for world in (1, 2, 3):
        for way in splits(rows, world, seed=world):
            group = FakeGroup(world)

            results = group.run(lambda rank, gather, way=way: build_and_fetch(
                iter(way[rank]), gather, wanted, eval_rows=3, seed=11, source=path, max_length=MAX_LENGTH))
            for rank, (corpus, fetched) in enumerate(results):
                assert corpus.stats == stats and list(corpus.stats["errors"]) == list(stats["errors"])  # file order
                assert (corpus.n_train, corpus.n_eval) == (len(train), len(eval_ex))
                assert corpus.train_lengths == [len(e) for e in train]
                assert corpus.eval_examples() == eval_ex
                assert fetched == [[train[i] for i in b] for b in wanted]
                usable = [r for r in way[rank] if r["status"] in ("ok", "truncated")]
                assert corpus.held_rows == len(usable)  # its own shard's tokens, no more
            # the metadata carries no token ids; a fetch carries exactly the requested rows, each once
            meta = [sent[0] for sent in group.sent]
            assert all(set(m) == {"row", "status", "length", "errors", "response_tokens", "n_rows"} for m in meta)
            assert all(m["row"].dtype == np.int64 and len(m["row"]) == len(shard) for m, shard in zip(meta, way,
                                                                                                      strict=True))
            for call, b in enumerate(wanted, start=2):  # call 0: metadata, 1: eval
                sent = [set(group.sent[rank][call]) for rank in range(world)]
                assert sum(len(s) for s in sent) == len(set(b))
                assert set().union(*sent) == {int(results[0][0].train_rows[i]) for i in b}


def test_errors_are_the_one_process_errors_on_every_worker(tmp_path, tokenizer):
    from opsft.train.loop import prepare_data

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "no response"}\nnot json\n{"prompt": "x", "response": "' + LONG.encode() + b'"}\n')
    few = hostile_jsonl(tmp_path / "few.jsonl")
    n_usable = len(prepare_examples(read_rows(few), tokenizer, MAX_LENGTH)[0])
    for path, eval_rows in ((str(bad), 0), (few, n_usable)):
        cfg = SimpleNamespace(input=path, eval_input=None, eval_rows=eval_rows, seed=0, overlong="skip",
                              loss=SimpleNamespace(pairs=False))
        with pytest.raises(ValueError) as expected:
            prepare_data(cfg, tokenizer, MAX_LENGTH)
        rows = local_rows(path, tokenizer, MAX_LENGTH)
        outcomes = FakeGroup(2).outcomes(lambda rank, gather, rows=rows, path=path, eval_rows=eval_rows: ShardedCorpus(
            rows[rank::2], gather, eval_rows, seed=0, source=path, max_length=MAX_LENGTH))
        for kind, value in outcomes:  # every worker raises it, none waits for the others
            assert kind == "raised" and type(value) is ValueError and str(value) == str(expected.value)
    rows = local_rows(few, tokenizer, MAX_LENGTH)
    with pytest.raises(RuntimeError, match="exactly once"):  # a row in two shards
        FakeGroup(2).run(lambda rank, gather: ShardedCorpus(rows[:5] if rank else rows, gather, 1, 0))
    for kwargs in ({}, {"expected_rows": len(rows)}):  # the last row missing: every row says how many there are
        with pytest.raises(RuntimeError, match="exactly once"):
            ShardedCorpus(rows[:-1], lambda x: [x], 1, 0, **kwargs)
    with pytest.raises(RuntimeError, match="disagree"):
        ShardedCorpus(rows, lambda x: [x], 1, 0, expected_rows=len(rows) + 1)
    other = [{**r, "n_rows": r["n_rows"] + 1} for r in rows[1::2]]  # rows of another corpus on worker 1
    outcomes = FakeGroup(2).outcomes(lambda rank, gather: ShardedCorpus(other if rank else rows[::2], gather, 1, 0))
    assert all(kind == "raised" and "disagree" in str(value) for kind, value in outcomes)
    corpus = ShardedCorpus(rows, lambda x: [x], 1, 0)
    with pytest.raises(IndexError, match="out of range"):
        corpus.fetch([0, corpus.n_train])


# ---------------------------------------------------------------------------- two gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, shards: list, wanted: list, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        corpus = ShardedCorpus(iter(shards[rank]), dist_gather, eval_rows=2, seed=4, max_length=MAX_LENGTH)
        result = {"n_train": corpus.n_train, "lengths": corpus.train_lengths, "stats": corpus.stats,
                  "eval": corpus.eval_examples(), "fetched": [corpus.fetch(b) for b in wanted],
                  "held": corpus.held_rows}
        Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_fetch_the_one_process_batches(tmp_path, tokenizer):
    import torch.multiprocessing as mp

    path = hostile_jsonl(tmp_path / "c.jsonl")
    train, eval_ex, stats = reference(path, tokenizer, "skip", eval_rows=2, seed=4)
    rows = local_rows(path, tokenizer, MAX_LENGTH)
    shards = [rows[1::3], rows[0::3] + rows[2::3]]
    wanted = batches(len(train))
    mp.spawn(_gloo_worker, args=(2, _free_port(), shards, wanted, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = pickle.loads((tmp_path / f"{rank}.pkl").read_bytes())
        assert (got["n_train"], got["lengths"], got["stats"]) == (len(train), [len(e) for e in train], stats)
        assert got["eval"] == eval_ex and got["fetched"] == [[train[i] for i in b] for b in wanted]
        assert got["held"] == sum(r["status"] in ("ok", "truncated") for r in shards[rank])
    assert dist_gather("alone") == ["alone"]  # no process group here: itself only


# ---------------------------------------------------------------------------- Ray Data


@pytest.mark.slow
def test_ray_dataset_and_train_split_give_the_one_process_examples(tmp_path, tokenizer, model_dir, ray_local):
    """corpus_dataset's rows are local_rows' (and so the reference's); corpus_summary gives the
    reference's counts on the driver; split for two workers by worker_datasets (one dataset per
    rank), they give every worker the reference. Ray's default DataConfig drops a row of 25 to even
    the shards: the workers refuse to train on that."""
    import ray.train

    for path in (hostile_jsonl(tmp_path / "c.jsonl"), hostile_parquet(tmp_path / "c.parquet")):
        ds = corpus_dataset(path, model_dir, MAX_LENGTH, "truncate", range_bytes=64, batch_size=4, max_tasks=1)
        ds = ds.materialize()
        got = sorted(ds.take_all(), key=lambda r: r["row"])
        for r in got:
            r["input_ids"] = [int(t) for t in r["input_ids"]]
        assert got == local_rows(path, tokenizer, MAX_LENGTH, "truncate")
        train, eval_ex, stats = reference(path, tokenizer, "truncate", eval_rows=2, seed=1)
        assert corpus_summary(ds, str(path), MAX_LENGTH, eval_rows=2) == stats
        wanted = batches(len(train))
        parts = worker_datasets(ds, 2)
        assert sorted(parts) == ["train_0", "train_1"]
        assert sum(part.count() for part in parts.values()) == ds.count()
        assert all(part.count() for part in parts.values())  # each worker has a part
        one_block = corpus_dataset(path, model_dir, MAX_LENGTH, "truncate", max_tasks=1).materialize()
        assert one_block.num_blocks() < 8  # a small file is one range: worker_datasets still gives every worker rows
        assert all(part.count() for part in worker_datasets(one_block, 2).values())
        results = FakeGroup(2).run(lambda rank, gather, parts=parts, wanted=wanted: build_and_fetch(
            parts[f"train_{rank}"].iter_rows(), gather, wanted, eval_rows=2, seed=1))
        assert sum(c.held_rows for c, _ in results) == len(train) + len(eval_ex)
        for corpus, fetched in results:
            assert corpus.stats == stats and corpus.train_lengths == [len(e) for e in train]
            assert corpus.eval_examples() == eval_ex
            assert fetched == [[train[i] for i in b] for b in wanted]
    ds = corpus_dataset(tmp_path / "c.jsonl", model_dir, MAX_LENGTH, "truncate", max_tasks=1)
    with warnings.catch_warnings():  # Ray's own default ingest options pass a deprecated field (Ray 2.60)
        warnings.filterwarnings("ignore", message="`ExecutionOptions.exclude_resources` is deprecated")
        its = [split["train"] for split in ray.train.DataConfig().configure({"train": ds}, 2, None, None)]
    with pytest.raises(RuntimeError, match="exactly once"):
        FakeGroup(2).run(lambda rank, gather: ShardedCorpus(its[rank].iter_rows(), gather, 2, 1))
