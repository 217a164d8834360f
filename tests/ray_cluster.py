"""A real multi-node Ray cluster on this machine: `ray start --head`, then more nodes with
`ray start --address`, each with its own resources, every port free-picked, one temp dir
(removed at the end; the nodes' `ray start` output stays in the folder given).

    with LocalCluster(tmp, nodes=[{"opsft_engine": 1}, {"opsft_engine": 1}]) as cluster:
        cluster.dashboard           # http://127.0.0.1:<port>, for the job API and the state API
        cluster.node_ids()          # the alive nodes' ids, head first

Each node runs as `ray start --block` in its own process group; leaving the block (even on
an error) terminates those groups, which stops that cluster's processes and no other Ray on
the machine (a plain `ray stop` would stop every Ray session here, other people's included).
Used by tests/test_cluster.py and benchmarks/reliability.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, temp: Path, nodes: list[dict[str, float]], num_cpus: int = 2, env: dict | None = None,
                 timeout_s: float = 300):
        self.temp, self.nodes, self.num_cpus, self.timeout_s = Path(temp), nodes, num_cpus, timeout_s
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        self.gcs = self.dashboard = ""
        self.ray_temp = ""  # Ray's own temp dir: short, its socket paths must stay under 108 bytes

    def _start(self, name: str, args: list[str], resources: dict) -> None:
        ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--metrics-export-port": free_port(), "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port()}
        cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--num-cpus={self.num_cpus}",
               f"--resources={json.dumps(resources)}", "--object-store-memory=300000000", *args,
               *(f"{k}={v}" for k, v in ports.items())]
        log = open(self.temp / f"{name}.log", "w")  # noqa: SIM115 - the node's process writes it until stopped
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def __enter__(self) -> LocalCluster:
        self.temp.mkdir(parents=True, exist_ok=True)
        self.ray_temp = tempfile.mkdtemp(prefix="opsft-ray-")
        port, dash = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        try:
            head = ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={self.ray_temp}",
                    f"--ray-client-server-port={free_port()}"]
            self._start("head", head, self.nodes[0])
            self._wait_nodes(1)
            for k, resources in enumerate(self.nodes[1:], 1):
                self._start(f"node{k}", [f"--address={self.gcs}", "--node-ip-address=127.0.0.1"], resources)
            self._wait_nodes(len(self.nodes))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def get(self, path: str):
        with urllib.request.urlopen(self.dashboard + path, timeout=30) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        """The dashboard's alive nodes (state API), head first."""
        nodes = self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        alive = [n for n in nodes if n["state"] == "ALIVE"]
        return sorted(alive, key=lambda n: not n["is_head_node"])

    def node_ids(self) -> list[str]:
        return [n["node_id"] for n in self.alive_nodes()]

    def actors(self) -> list[dict]:
        """Every actor the cluster has seen (state API): class_name, state, node_id, pid, ..."""
        return self.get("/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]

    def _wait_nodes(self, n: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            dead = [p.args[2:4] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a ray node exited: {dead}; see {self.temp}/*.log")
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except (OSError, KeyError, ValueError):
                pass  # the dashboard comes up some seconds after the head
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} Ray node(s) not alive after {self.timeout_s} s; see {self.temp}/*.log")
            time.sleep(1)

    def stop(self) -> None:
        """Stop every node at once, then kill what is left of them: a graceful stop after a job
        took 30-40 s here, and nothing of a throwaway cluster needs to be kept."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the node's group: its Ray processes and workers
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        self.procs.clear()
        if self.ray_temp:
            shutil.rmtree(self.ray_temp, ignore_errors=True)
