"""The Ray Data side of opsft.train.worker_corpus (the Ray layer; that module is plain code):
the tokenised corpus as a Ray Dataset, read in ranges and tokenised in a map stage on the cluster;
its per-row counts streamed back to the driver; its split into one dataset per Train worker.

    ds = corpus_dataset("corpus.jsonl", model_dir, max_length=512).materialize()
    stats = corpus_summary(ds, "corpus.jsonl", 512, eval_rows=2)
    datasets = worker_datasets(ds, world_size=8)     # {"train_0": ..., "train_7": ...}
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

from opsft.cluster import quiet_data_progress
from opsft.data import storage
from opsft.data.reader import RANGE_BYTES, corpus_files, corpus_ranges, read_range
from opsft.train.batches import OVERLONG, PrepareStats
from opsft.train.worker_corpus import (
    DATA_CPUS,
    ERROR,
    MIN_RANGE_BYTES,
    OK,
    STATUSES,
    TOKENISE_BATCH,
    TOO_LONG,
    TRUNCATED,
    check_usable,
    tokenise_rows,
)


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    """One tokenizer per worker process (Ray reuses task processes)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _dataset_schema():
    import pyarrow as pa

    return pa.schema([("row", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("length", pa.int64()),
                      ("response_start", pa.int32()),
                      ("has_eos", pa.bool_()), ("status", pa.string()), ("reason", pa.string()),
                      ("response_tokens", pa.int64()), ("n_rows", pa.int64())])


def _read_batch(batch):
    """Ray Data: a batch of corpus_ranges pieces -> (row, pickled corpus row) carrier rows; pickled so
    that Arrow cannot change a row (mixed types across rows, missing keys) before it is tokenised."""
    import pyarrow as pa

    rows = [(row, pickle.dumps(data, protocol=5), piece["n_rows"]) for piece in batch.to_pylist()
            for row, data in read_range(piece)]
    return pa.table({"row": pa.array([r[0] for r in rows], pa.int64()),
                     "data": pa.array([r[1] for r in rows], pa.binary()),
                     "n_rows": pa.array([r[2] for r in rows], pa.int64())})


def _tokenise_batch(batch, tokenizer_path: str, max_length: int, overlong: str):
    import pyarrow as pa

    rows = zip(batch.column("row").to_pylist(), map(pickle.loads, batch.column("data").to_pylist()), strict=True)
    n_rows = batch.column("n_rows")[0].as_py() if batch.num_rows else 0
    return pa.Table.from_pylist(tokenise_rows(rows, _tokenizer(tokenizer_path), max_length, overlong, n_rows),
                                schema=_dataset_schema())


def corpus_dataset(path: str | Path, tokenizer_path: str, max_length: int, overlong: str = "skip", *,
                   range_bytes: int | None = None, batch_size: int = TOKENISE_BATCH, num_cpus: float = DATA_CPUS,
                   max_tasks: int | None = None):
    """A lazy Ray Dataset of the tokenised corpus (tokenise_rows' columns), one row per row of
    read_rows(path), in no particular order: `row` says where each came from. Raises on the driver,
    before any Ray work, what read_rows and prepare_data raise for a missing file, a folder, an
    unknown format or a corpus without rows. The workers read `path` itself: it must be reachable
    from every node (a shared file system, or object storage: s3://...). Before a TorchTrainer whose workers
    hold every CPU, materialize() it (module doc). max_tasks: at most this many read and
    tokenise tasks at once (each worker process imports transformers and loads the tokenizer once)."""
    import ray.data

    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be 'skip' or 'truncate', got {overlong!r}")
    if range_bytes is None:  # some 64 read tasks for a mid-sized file, 1-16 MiB each
        size = sum(int(storage.info(f).size or 0) for f in corpus_files(path))
        range_bytes = min(RANGE_BYTES, max(MIN_RANGE_BYTES, size // 64))
    ranges = corpus_ranges(path, range_bytes)
    if not ranges:
        raise ValueError(f"{path}: the corpus has no rows")
    tasks = dict(num_cpus=num_cpus, compute=ray.data.TaskPoolStrategy(size=max_tasks) if max_tasks else None)
    ds = ray.data.from_items(ranges, override_num_blocks=len(ranges))
    quiet_data_progress(ds)  # outside a terminal; the datasets made from this one (split, summary) inherit it
    ds = ds.map_batches(_read_batch, batch_format="pyarrow", batch_size=1, **tasks)
    return ds.map_batches(_tokenise_batch, fn_kwargs={"tokenizer_path": str(tokenizer_path), "max_length": max_length,
                                                      "overlong": overlong},
                          batch_format="pyarrow", batch_size=batch_size, **tasks)


def worker_datasets(ds, world_size: int, name: str = "train") -> dict:
    """{f"{name}_{rank}": that worker's part} of a (materialized) corpus_dataset, for TorchTrainer's
    `datasets` with DataConfig(datasets_to_split=[]); worker r reads get_dataset_shard(f"{name}_{r}").
    Split by blocks with every row once (Dataset.split(equal=False)): Ray Train's own split,
    streaming_split(equal=True), drops rows to even the shards (25 rows over 2 workers: 12 and 12).
    The parts are as even as the blocks allow; ShardedCorpus does not need them even."""
    if ds.num_blocks() < 4 * world_size:  # a small corpus is one or two blocks: cut it so every worker gets some
        ds = ds.repartition(4 * world_size)
    return {f"{name}_{rank}": part for rank, part in enumerate(ds.split(world_size, equal=False))}


def worker_data_config():
    """Ray Train's DataConfig for worker_datasets: no dataset split again (each worker reads its own), and
    the ingest options made here from the driver's DataContext as Ray's default_ingest_options makes them,
    less `exclude_resources`, which that default always passes and Ray 2.60 deprecates (a warning a run)."""
    import ray.train
    from ray.data import DataContext, ExecutionOptions

    options = DataContext.get_current().execution_options
    return ray.train.DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(
        resource_limits=options.resource_limits, preserve_order=options.preserve_order,
        verbose_progress=options.verbose_progress))


def corpus_summary(ds, source: str = "corpus", max_length: int | None = None, eval_rows: int = 0,
                   check: bool = True) -> dict:
    """PrepareStats.as_dict() of a corpus_dataset, from its light columns streamed to the driver (no
    token ids; counts per batch, and the row and reason of each error row only: the driver's memory
    does not grow with the corpus), raising on the driver, before any training worker starts, what
    prepare_data raises (unless check is false): no rows, no usable row, eval_rows leaving no
    training row."""
    stats = PrepareStats()
    errors: list[tuple[int, str]] = []
    for batch in ds.select_columns(["row", "status", "reason", "length", "response_tokens"]).iter_batches(
            batch_format="numpy", batch_size=65536):
        names = batch["status"].astype(str)
        usable = (names == STATUSES[OK]) | (names == STATUSES[TRUNCATED])
        stats.rows += len(names)
        stats.used += int(usable.sum())
        stats.too_long_skipped += int((names == STATUSES[TOO_LONG]).sum())
        stats.truncated += int((names == STATUSES[TRUNCATED]).sum())
        stats.tokens += int(batch["length"][usable].sum())
        stats.response_tokens += int(batch["response_tokens"].sum())
        bad = names == STATUSES[ERROR]
        errors += list(zip(batch["row"][bad].tolist(), batch["reason"][bad].tolist(), strict=True))
    for _, reason in sorted(errors):  # in file order: the dict's order too
        stats.count_error(reason)
    out = stats.as_dict()
    if check:
        check_usable(out, source, max_length, eval_rows)
    return out
