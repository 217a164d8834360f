"""Each Ray Train worker's part of the tokenised training corpus (its rows, not parameter shards:
those are opsft.train.fsdp's), read and tokenised by Ray Data, with the exact example numbering,
eval split and batches of the one-process path. Plain code; the Ray Data side is opsft.train.ray_data.

The one-process path (opsft.train.loop.prepare_data) numbers the usable rows 0..n-1 in file
order (skipped rows left out), holds out `split_eval`'s seeded draw and plans batches over the
rest. Here the driver only cuts the corpus into ranges (JSONL: byte ranges at line ends, knowing
each range's first line and row number; Parquet: row groups), and Ray Data reads and tokenises
them on the cluster (the same code as prepare_examples, row by row), every output row keeping
its position `row` in the file. Ray's streaming split hands rows to the workers in an order and
split that vary from run to run, so each worker builds a ShardedCorpus from its shard (a
collective): the workers exchange light metadata (row numbers, lengths, statuses; no token id),
from which every worker derives the same dense numbering, eval split, lengths and PrepareStats
as the one-process path. The examples of a global step are then exchanged on demand (`fetch`,
a collective): each worker sends the requested rows it holds, so no worker ever holds all token
ids, and the rows of step k do not depend on the number of workers or on how Ray split the data.

    ds = corpus_dataset("corpus.jsonl", model_dir, max_length=512, overlong="skip").materialize()  # driver,
                                                                                   # opsft.train.ray_data
    stats = corpus_summary(ds, "corpus.jsonl", 512, eval_rows=2)   # the counts; raises what prepare_data raises
    TorchTrainer(..., datasets=worker_datasets(ds, W), dataset_config=DataConfig(datasets_to_split=[]))
    corpus = ShardedCorpus(ray.train.get_dataset_shard(f"train_{rank}").iter_rows(), dist_gather, eval_rows=2,
                           seed=0, source="corpus.jsonl", max_length=512)                        # every worker
    plan = BatchPlan(corpus.n_train, global_batch_size=8, seed=0)
    batch = corpus.fetch(plan.step_indices(k))  # every worker, the same indices

Two things Ray Train needs here. Its default DataConfig splits with streaming_split(equal=True),
which drops rows to even the shards (25 rows, 2 workers: 24 trained on): worker_datasets splits
on the driver with Dataset.split(equal=False) into one dataset per worker, and every row carries
the corpus' row count, so that a worker refuses a split that lost a row. And Ray Data leaves the
Train workers' resources out of its budget: when the workers hold every CPU the read and tokenise
tasks wait for ever (seen: 2 workers x 1 CPU on a 2-CPU cluster), so materialize() the dataset on
the driver before fit (its blocks stay in the
object store, on the nodes; a restart splits them again without tokenising again).

The ranges and their reading are the one corpus reader's (opsft.data.reader: JSONL byte ranges,
Parquet row groups, .gz files whole; local paths or object storage).

Token losses only (TrainExample); pair data stays on the driver path (opsft.train.pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from opsft.data.reader import RANGE_BYTES, corpus_ranges, read_range
from opsft.train.batches import PrepareStats, TrainExample, prepare_examples, split_eval

MIN_RANGE_BYTES = 1 << 20  # corpus_dataset's default range: file size / 64, within [1, 16] MiB
TOKENISE_BATCH = 256  # rows per tokenising call
DATA_CPUS = 0.25  # CPU share of the read and tokenise tasks (beside Train workers that hold whole CPUs)
STATUSES = ("ok", "truncated", "too_long", "error")  # a row's outcome in tokenize_rows
OK, TRUNCATED, TOO_LONG, ERROR = range(len(STATUSES))


# ---------------------------------------------------------------------------- cluster: read and tokenise


def tokenise_rows(rows: Iterable[tuple[int, dict]], tokenizer, max_length: int, overlong: str,
                  n_rows: int) -> list[dict]:
    """The dataset rows of (row position, corpus row) pairs: each row through prepare_examples on
    its own (the very code of the one-process path), with its outcome: `status` (STATUSES),
    `reason` (an error row's key in PrepareStats.errors, else "") and `response_tokens`;
    `input_ids` is empty for a skipped row. `n_rows` (the corpus' row count) goes with every row:
    from it the workers can tell that a split lost rows."""
    out = []
    for row, data in rows:
        examples, stats = prepare_examples([data], tokenizer, max_length, overlong)
        if examples:
            e = examples[0]
            status = TRUNCATED if stats.truncated else OK
            out.append({"row": row, "input_ids": list(e.input_ids), "length": len(e),
                        "response_start": e.response_start, "has_eos": e.has_eos, "status": STATUSES[status],
                        "reason": "", "response_tokens": stats.response_tokens, "n_rows": n_rows})
            continue
        status = TOO_LONG if stats.too_long_skipped else ERROR
        reason = next(iter(stats.errors), "") if status == ERROR else ""
        out.append({"row": row, "input_ids": [], "length": 0, "response_start": 0, "has_eos": False,
                    "status": STATUSES[status],
                    "reason": reason, "response_tokens": 0, "n_rows": n_rows})
    return out


def local_rows(path: str | Path, tokenizer, max_length: int, overlong: str = "skip",
               range_bytes: int = RANGE_BYTES) -> list[dict]:
    """The rows corpus_dataset yields, made in this process (the same functions, in file order)."""
    return [r for piece in corpus_ranges(path, range_bytes) for r in
            tokenise_rows(read_range(piece), tokenizer, max_length, overlong, piece["n_rows"])]


def check_usable(stats: dict, source: str, max_length: int | None, eval_rows: int) -> None:
    if not stats["rows"]:
        raise ValueError(f"{source}: the corpus has no rows")
    if not stats["used"]:
        limit = f"{max_length} tokens" if max_length is not None else "the maximum length"
        raise ValueError(f"{source}: no usable training rows out of {stats['rows']} ({stats['error_rows']} invalid "
                         f"{stats['errors']}, {stats['too_long_skipped']} longer than {limit})")
    if eval_rows and eval_rows >= stats["used"]:
        raise ValueError(f"eval_rows={eval_rows} leaves no training rows (only {stats['used']} usable)")


# ---------------------------------------------------------------------------- workers: the shard and the collectives


def dist_gather(obj) -> list:
    """Every worker's `obj`, in rank order (torch.distributed all_gather_object; [obj] without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _compact(ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    return ids.astype(np.int32) if not ids.size or (ids.min() >= 0 and ids.max() < 2**31) else ids


class ShardedCorpus:
    """This worker's shard of corpus_dataset rows, numbered, split and fetched exactly as the one-process
    path does (module doc). The constructor and `fetch` are collectives: every worker calls them, in
    the same order, with the same arguments (a check that fails, fails on every worker alike).
    `gather(obj)` returns every worker's obj in rank order (dist_gather under torch.distributed,
    `lambda x: [x]` in one process).

    Attributes: n_train, n_eval, lengths (int32 array; train_lengths as a list: the token length of
    train example t, in train order:
    the dense order minus the held-out rows), stats (PrepareStats.as_dict() of the whole corpus),
    train_rows / eval_file_rows (the file row of each train / eval example)."""

    def __init__(self, rows: Iterable[dict], gather: Callable[[object], list], eval_rows: int, seed: int, *,
                 source: str = "corpus", max_length: int | None = None, expected_rows: int | None = None):
        self._gather = gather
        meta = self._keep(rows)
        parts = gather(meta)
        file_rows = np.concatenate([p["row"] for p in parts])
        order = np.argsort(file_rows, kind="stable")
        file_rows = file_rows[order]
        told = {n for p in parts for n in p["n_rows"]} | ({expected_rows} - {None})
        if len(told) > 1:
            raise RuntimeError(f"{source}: the workers' rows disagree on the corpus' row count: {sorted(told)}")
        n = told.pop() if told else len(file_rows)
        if len(file_rows) != n or not np.array_equal(file_rows, np.arange(n)):
            raise RuntimeError(f"{source}: the workers' shards do not hold each of the corpus' {n} rows exactly once "
                               f"({len(file_rows)} rows, {len(np.unique(file_rows))} distinct)")
        status = np.concatenate([p["status"] for p in parts])[order]
        lengths = np.concatenate([p["length"] for p in parts])[order]
        usable = (status == OK) | (status == TRUNCATED)
        self.stats = corpus_stats(status, lengths, parts)
        check_usable(self.stats, source, max_length, 0)
        dense_rows, dense_lengths = file_rows[usable], lengths[usable]
        train, held = split_eval(range(len(dense_rows)), eval_rows, seed)
        train, held = np.asarray(train, dtype=np.int64), np.asarray(held, dtype=np.int64)
        self.train_rows, self.eval_file_rows = dense_rows[train], dense_rows[held]
        self.lengths = dense_lengths[train].astype(np.int32)  # 4 bytes a row: a Python list would take ~36
        self.n_train, self.n_eval = len(train), len(held)
        self._eval = self._collect(self.eval_file_rows)

    def __len__(self) -> int:
        return self.n_train

    @property
    def train_lengths(self) -> list[int]:
        return self.lengths.tolist()

    def _keep(self, rows: Iterable[dict]) -> dict:
        """Keep this shard's token ids (one array, sorted by row); return the metadata to gather."""
        file_rows, status, lengths, starts, response_start, has_eos, chunks = [], [], [], [], [], [], []
        errors, response_tokens, offset, n_rows = [], 0, 0, set()
        for r in rows:
            row, code = int(r["row"]), STATUSES.index(str(r["status"]))
            if r.get("n_rows") is not None:
                n_rows.add(int(r["n_rows"]))
            file_rows.append(row)
            status.append(code)
            if code == ERROR:
                errors.append((row, str(r["reason"])))
            if code not in (OK, TRUNCATED):
                lengths.append(0)
                continue
            ids = _compact(r["input_ids"])
            chunks.append(ids)
            lengths.append(len(ids))
            starts.append(offset)
            offset += len(ids)
            response_start.append(int(r["response_start"]))
            has_eos.append(bool(r["has_eos"]))
            response_tokens += int(r["response_tokens"])
        file_rows_a = np.asarray(file_rows, dtype=np.int64)
        status_a, lengths_a = np.asarray(status, dtype=np.int8), np.asarray(lengths, dtype=np.int64)
        held = (status_a == OK) | (status_a == TRUNCATED)
        order = np.argsort(file_rows_a[held], kind="stable")
        self._rows = file_rows_a[held][order]  # the rows whose tokens this worker holds, sorted
        self._starts = np.asarray(starts, dtype=np.int64)[order]
        self._lengths = lengths_a[held][order]
        self._response_start = np.asarray(response_start, dtype=np.int64)[order]
        self._has_eos = np.asarray(has_eos, dtype=bool)[order]
        self._ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        return {"row": file_rows_a, "status": status_a, "length": lengths_a, "errors": errors,
                "response_tokens": response_tokens, "n_rows": sorted(n_rows)}  # one count, or none: checked by all

    def _collect(self, file_rows: np.ndarray) -> list[TrainExample]:
        """The examples of these file rows, in this order (a collective: each worker sends those it holds)."""
        wanted = np.unique(file_rows)
        pos = np.searchsorted(self._rows, wanted)
        held = pos < len(self._rows)
        held[held] = self._rows[pos[held]] == wanted[held]
        mine = {}
        for row, k in zip(wanted[held].tolist(), pos[held].tolist(), strict=True):
            start = int(self._starts[k])
            mine[row] = (self._ids[start:start + int(self._lengths[k])].copy(), int(self._response_start[k]),
                         bool(self._has_eos[k]))
        found: dict = {}
        for part in self._gather(mine):
            found.update(part)
        missing = [r for r in wanted.tolist() if r not in found]
        if missing:
            raise RuntimeError(f"no worker holds rows {missing[:10]} (of {len(missing)} missing)")
        return [TrainExample(found[r][0].tolist(), found[r][1], found[r][2]) for r in file_rows.tolist()]

    def fetch(self, train_indices: list[int]) -> list[TrainExample]:
        """The train examples of these indices (0..n_train-1), in this order. A collective: every worker
        passes the same indices (a step's global batch) and only those rows' tokens are exchanged."""
        idx = np.asarray(list(train_indices), dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= self.n_train)]
        if bad.size:
            raise IndexError(f"train indices out of range 0..{self.n_train - 1}: {bad[:5].tolist()}")
        return self._collect(self.train_rows[idx])

    def eval_examples(self) -> list[TrainExample]:
        """The held-out examples in dense order (gathered once, by the constructor; not a collective)."""
        return list(self._eval)

    @property
    def held_rows(self) -> int:
        """How many examples' token ids this worker holds (its shard's usable rows)."""
        return len(self._rows)


def corpus_stats(status: np.ndarray, lengths: np.ndarray, parts: list[dict]) -> dict:
    """PrepareStats.as_dict() of the whole corpus from the gathered metadata (status, lengths in row order)."""
    stats = PrepareStats(rows=len(status))
    usable = (status == OK) | (status == TRUNCATED)
    stats.used = int(usable.sum())
    stats.too_long_skipped = int((status == TOO_LONG).sum())
    stats.truncated = int((status == TRUNCATED).sum())
    stats.tokens = int(lengths[usable].sum())
    stats.response_tokens = sum(int(p["response_tokens"]) for p in parts)
    for _, reason in sorted(e for p in parts for e in p["errors"]):  # in file order: the dict's order too
        stats.count_error(reason)  # a key is its own key (no ':', at most 60 characters)
    return stats.as_dict()
