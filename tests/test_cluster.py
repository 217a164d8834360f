"""The cluster path for real: a two-node Ray cluster on this machine (`ray start --head`, then
`ray start --address` for a second node), each node offering one `opsft_engine` resource.
`opsft submit ... score --ray` with two engine actors that each need that resource must put
one actor on each node, and the job's output must equal the in-process scorer's.

    .venv/bin/python -m pytest -q tests/test_cluster.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import LocalCluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_submitted_score_job_spreads_over_two_nodes_and_equals_the_local_run(tmp_path, tiny_model, tokenizer,
                                                                            capsys):
    from opsft.cli import main
    from opsft.data.reader import read_rows
    from opsft.engines.hf import HFEngine
    from opsft.scoring import score_rows

    ckpt = tmp_path / "tiny"
    tiny_model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    rows = [{"id": f"r{i}", "prompt": f"What is {i} times three?", "response": f"{i} times three is {3 * i}."}
            for i in range(8)]
    rows.append({"id": "bad", "prompt": "", "response": "an error row travels too"})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "score.yaml"  # 2 actors, each needs a node's one opsft_engine: one per node
    config.write_text(yaml.safe_dump({"engine": {"model": str(ckpt)}, "pool": {
        "min_size": 2, "max_size": 2, "num_cpus": 0.5, "batch_size": 2, "resources": {"opsft_engine": 1}}}))
    out = tmp_path / "out.parquet"

    # the actor pool starts work once both actors are up (by default it starts with the first one,
    # and a small job can end before the second one has loaded its model)
    env = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"}
    start = time.monotonic()
    with LocalCluster(tmp_path / "ray", nodes=[{"opsft_engine": 1}, {"opsft_engine": 1}], env=env) as cluster:
        up = time.monotonic() - start
        nodes = cluster.node_ids()
        assert len(nodes) == 2
        code = main(["submit", "--address", cluster.dashboard, "--working-dir", str(ROOT), "--wait", "score",
                     "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--ray", "--config", str(config)])
        logs = capsys.readouterr().out
        assert code == 0, logs[-3000:]
        print(f"cluster up after {up:.1f} s, job done after {time.monotonic() - start:.1f} s")  # seen with -s
        engines = [a for a in cluster.actors() if "EngineActor" in a["class_name"]]
        assert sorted(str(a["node_id"]) for a in engines) == sorted(nodes), engines  # one engine actor per node

    engine = HFEngine(str(ckpt), device="cpu")
    want = {r["id"]: r for r in score_rows(rows, engine)}
    got = {r["id"]: r for r in read_rows(str(out))}
    assert got.keys() == want.keys()
    assert got["bad"]["error"] == want["bad"]["error"] == "'prompt' is empty"
    for rid, ref in want.items():
        if rid == "bad":
            continue
        assert got[rid]["n_tokens"] == ref["n_tokens"] and not got[rid]["error"]
        for name in ("cll", "cll_sum", "logprob_mean", "entropy_mean"):  # float32, other batches and threads
            assert got[rid][name] == pytest.approx(ref[name], abs=1e-5), (rid, name)


def test_plan_asks_for_the_custom_resource_and_leaves_the_pool_its_cpus(ray_local, tmp_path):
    """No cluster needed: the plan of a job whose pool asks for a custom resource, and whose light
    stages (read, reblock, write) ask for LIGHT_CPUS, so that a pool of 2 x 0.75 CPUs on
    2 CPUs still leaves them room (a reblocking task of Ray Data's default 1 CPU would wait forever)."""
    from opsft.config import EngineConfig, PoolConfig
    from opsft.jobs.pipeline import LIGHT_CPUS, JobSpec, build_plan

    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    pool = PoolConfig(min_size=2, max_size=2, num_cpus=0.75, resources={"opsft_engine": 1})
    plan = build_plan(JobSpec(input=str(tmp_path / "c.jsonl"), output=str(tmp_path / "o.parquet"),
                              fn="opsft.scoring:score_rows", engine=EngineConfig(), pool=pool))
    assert plan.stages[2].resources == {"num_cpus": 0.75, "num_gpus": 0.0, "opsft_engine": 1, "max_task_retries": 3,
                                        "calls_in_flight": 1}
    actors = plan.dataset._logical_plan.dag
    assert actors.ray_remote_args["resources"] == {"opsft_engine": 1} and actors.ray_remote_args["num_cpus"] == 0.75
    reblock = actors.input_dependencies[0]
    assert type(reblock).__name__ == "StreamingRepartition" and reblock.ray_remote_args == {"num_cpus": LIGHT_CPUS}
    assert reblock.input_dependencies[0].ray_remote_args["num_cpus"] == LIGHT_CPUS  # read
    # what Ray Data makes of it: every task before the actors asks for LIGHT_CPUS
    from ray.data._internal.logical.optimizers import get_execution_plan

    physical = get_execution_plan(plan.dataset._logical_plan)[0].dag  # (the plan is not run afterwards)
    light = []
    while physical.input_dependencies:
        physical = physical.input_dependencies[0]
        if physical.name != "Input":
            light.append((physical.name, physical._ray_remote_args.get("num_cpus")))
    assert light and all(cpus == LIGHT_CPUS for _, cpus in light), light
