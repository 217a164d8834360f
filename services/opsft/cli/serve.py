"""`opsft serve`: run the CLL scoring HTTP API locally (Ray Serve, FastAPI ingress).

    OPSFT_API_KEY=... OPSFT_ADMIN_KEY=... opsft serve   # the embedded model on http://127.0.0.1:8000
    opsft serve --allow-open                      # a local demo: no auth at all (reloads open too)
    opsft serve --model /ckpt --port 8080 --api-key-file key --admin-key-file admin_key
    curl -s localhost:8000/v1/score -H 'content-type: application/json' \\
      -d '{"items": [{"prompt": "What is 2+2?", "response": "4"}]}'

Starts a local Ray cluster unless RAY_ADDRESS (or --address) names one; Ctrl-C stops it.
For a cluster use `serve deploy deploy/serve_config.yaml` instead (see docs/serving.md).
"""

from __future__ import annotations

import os
import signal
import time

from opsft.cli.common import Settings, add_engine_flags, add_model_flags
from opsft.config import ServeConfig

FLAGS = Settings(ServeConfig)


def add_parser(sub) -> None:
    parser = sub.add_parser("serve", help="serve CLL scoring over HTTP (Ray Serve)")
    add_model_flags(parser)
    add_engine_flags(parser, FLAGS)
    FLAGS.add(parser, "host", help="address to bind")
    FLAGS.add(parser, "port")
    FLAGS.add(parser, "num_replicas", "--replicas")
    parser.add_argument("--no-batching", dest="batching", action="store_false", default=None,
                        help="score each request on its own (for comparison)")
    parser.add_argument("--api-key-file", help="require 'Authorization: Bearer <key>' with the key in this file "
                                               "(or set OPSFT_API_KEY); without a key the service refuses to start")
    parser.add_argument("--admin-key-file", help="the admin key (reloads) in this file (or set OPSFT_ADMIN_KEY); "
                                                 "without one, reloads are refused")
    parser.add_argument("--allow-open", action="store_true", default=None,
                        help="DISABLES AUTH: serve without an API key (every route open, and reloads too unless an "
                             "admin key is set); for local demos only")
    parser.add_argument("--model-root", action="append", dest="model_roots", metavar="DIR",
                        help="a folder reloads may load checkpoints from (repeatable; default: the model's folder)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from opsft.config import load_config

    cfg = load_config(ServeConfig, args.config, {
        **FLAGS.overrides(args), "engine.model": args.model, "batching": args.batching,
        "api_key_file": args.api_key_file, "admin_key_file": args.admin_key_file,
        "allow_open": args.allow_open, "model_roots": args.model_roots})
    from opsft.serve.auth import read_keys

    keys = read_keys(cfg)  # no API key and no --allow-open: refused here, before Ray starts
    if keys.api_key is None:
        print("opsft serve: WARNING: auth is off (--allow-open): anyone who reaches the port can score"
              + ("" if keys.admin_key else " and reload models"), flush=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from opsft.cluster import connect
    from opsft.serve.app import run_local

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    connect(args.address, num_cpus=args.num_cpus if not args.address else None, log_to_driver=True)
    from opsft.plan import preflight

    preflight(cfg)  # a replica that cannot fit its GPU fails here, before any engine loads
    signal.signal(signal.SIGTERM, stop_on_signal)  # `kill` stops Serve as cleanly as Ctrl-C
    try:
        url = run_local(cfg)
        print(f"opsft serve: scoring API on {url} (OpenAPI at {url}/docs); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def stop_on_signal(_signum, _frame):
    raise KeyboardInterrupt
