"""`opsft plan`: will each stage of a job, cycle or service fit its GPUs? Per stage and GPU: weights,
kv cache or activations, optimiser and gradient state, the float32 head and its chunk, the engine's
memory share and the headroom, from the model's config.json (opsft.plan; docs/planning.md).

    opsft plan --config deploy/realign_config.yaml --model /models/qwen2.5-7b --gpu-memory 80
"""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("plan", help="per-GPU memory of each stage of a config; exit 1 when one cannot fit")
    parser.add_argument("--config", required=True, help="a score, rewrite, realign, train or serve config (YAML; a "
                        "Ray Serve config, a ConfigMap or a RayService holding one is read too)")
    from opsft.plan import CONFIG_KINDS

    parser.add_argument("--kind", choices=CONFIG_KINDS,
                        help="the config's kind (default: guessed from its fields)")
    parser.add_argument("--model", help="the model folder (config.json is enough; default: the config's model)")
    parser.add_argument("--gpu-memory", type=float, metavar="GiB", help="memory per GPU (default: this machine's "
                        "GPU, $OPSFT_GPU_MEMORY_GIB, else 80: an H100)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    import json

    from opsft import plan

    cfg = plan.load_any_config(args.config, args.kind)
    model = args.model or plan.config_model(cfg)
    shape = plan.read_shape(plan.model_folder(model))
    gpu_bytes, source = plan.gpu_memory(args.gpu_memory)
    if gpu_bytes is None:
        gpu_bytes, source = 80 * plan.GIB, "H100 (80 GiB) assumed: no GPU here, none given"
    stages = plan.plan_config(cfg, shape, gpu_bytes)
    fits = all(s.fits for s in stages)
    if args.json:
        print(json.dumps({"model": model, "params": shape.params, "gpu_gib": gpu_bytes / plan.GIB, "gpu_source": source,
                          "fits": fits, "stages": [s.to_json() for s in stages]}, indent=2))
    else:
        print(plan.format_plan(stages, shape, gpu_bytes))
    return 0 if fits else 1
