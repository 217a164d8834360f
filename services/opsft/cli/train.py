"""`opsft train`: fine-tune a model on a corpus with SFT / DFT / EAFT / IDFT, or on preference
pairs with DPO / SimPO, as a Ray Train job.

    opsft train --input corpus.jsonl --output-dir runs/idft --loss idft --max-steps 100 \\
        --global-batch-size 16 --micro-batch-size 4 --workers 2
    opsft pairs --input rewritten.jsonl --output pairs.jsonl     # pairs from an `opsft rewrite` output
    opsft train --input pairs.jsonl --output-dir runs/dpo --loss dpo --lr 5e-7 --dpo-beta 0.1
    opsft train --config train.yaml --lr 8e-6          # flags override the YAML (TrainConfig)
    opsft train ... --local                            # one process, no Ray (debugging)
    opsft train ... --mlflow [URI] --wandb-project P   # experiment tracking (pip install 'opsft[tracking]')

The final checkpoint folder (printed) is a Hugging Face model folder; see docs/training.md.
"""

from __future__ import annotations

from opsft.cli.common import Settings, print_summary
from opsft.config import TrainConfig
from opsft.data.corpus import refuse_overwrite

FLAGS = Settings(TrainConfig)  # each flag's type, choices and default: its TrainConfig field


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with SFT/DFT/EAFT/IDFT, or DPO/SimPO on pairs (Ray Train)")
    p.add_argument("--config", help="YAML TrainConfig; flags given on the command line override it")
    FLAGS.add(p, "input", help="corpus (JSONL/Parquet), or the output of score / rewrite; dpo/simpo: pair rows "
                               "(prompt|messages, chosen, rejected) or a rewrite output")
    FLAGS.add(p, "output_dir", help="metrics.jsonl, tensorboard/ and (without --storage-path) the checkpoints: a "
                                    "local or shared POSIX folder")
    FLAGS.add(p, "model", help="local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    FLAGS.add(p, "eval_input", help="held-out corpus for eval loss / CLL")
    FLAGS.add(p, "eval_rows", help="rows held out of --input when --eval-input is not given")
    g = p.add_argument_group("loss")
    FLAGS.add(g, "loss.name", "--loss", help="dpo / simpo train on pairs")
    FLAGS.add(g, "loss.beta", help="idft: the temperature of gamma")
    FLAGS.add(g, "loss.gamma_min")
    FLAGS.add(g, "loss.gamma_max")
    FLAGS.add(g, "loss.warmup_ratio", "--lambda-warmup-ratio", help="idft: lambda = 0 before this fraction of "
              "steps (the released run scripts; the official config file uses 0.2)")
    FLAGS.add(g, "loss.transition_ratio", "--lambda-transition-ratio", help="idft: lambda's rise length (the "
              "official config file: 0.1)")
    for name in ("bound", "dpo_beta", "label_smoothing", "simpo_beta", "simpo_gamma"):
        FLAGS.add(g, f"loss.{name}")
    g = p.add_argument_group("optimisation (defaults: the official settings, docs/training.md)")
    FLAGS.add(g, "lr", help="peak learning rate")
    FLAGS.add(g, "warmup_ratio", help="lr warm-up fraction, then cosine")
    for name in ("weight_decay", "grad_clip", "global_batch_size", "micro_batch_size", "epochs", "max_steps", "seed",
                 "autocast", "dtype", "gradient_checkpointing", "packing"):
        FLAGS.add(g, name)
    g.add_argument("--no-fused-head", dest="fused_head", action="store_false", default=None,
                   help="compute the loss from the model's logits ([tokens x vocab]) instead of the chunked head")
    FLAGS.keys["fused_head"] = "fused_head"
    FLAGS.add(g, "max_length")
    FLAGS.add(g, "overlong")
    g = p.add_argument_group("run")
    for name in ("checkpoint_every", "eval_every", "resume_from", "max_failures", "storage_path"):
        FLAGS.add(g, name)
    FLAGS.add(g, "scaling.num_workers", "--workers", help="Ray Train workers")
    FLAGS.add(g, "scaling.use_gpu", help="one GPU per worker (or --gpus-per-worker)")
    FLAGS.add(g, "scaling.gpus_per_worker")
    FLAGS.add(g, "scaling.cpus_per_worker")
    FLAGS.add(g, "scaling.strategy")
    FLAGS.add(g, "address")
    g.add_argument("--local", action="store_true", help="train in this process without Ray (one worker)")
    g = p.add_argument_group("experiment tracking (the `tracking` extra: pip install 'opsft[tracking]'; "
                             "docs/training.md)")
    g.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                   help="log params, every step's metrics and the final checkpoint to MLflow: to URI (a tracking "
                        "server http(s)://..., a database, or a folder for a local sqlite store), else to "
                        "MLFLOW_TRACKING_URI when set, else to <output-dir>/mlruns/ (open it with `mlflow ui "
                        "--backend-store-uri sqlite:///<output-dir>/mlruns/mlflow.db`)")
    FLAGS.add(g, "tracking.mlflow.experiment", "--mlflow-experiment", help="MLflow experiment name (created when "
              "missing)")
    FLAGS.add(g, "tracking.wandb.project", "--wandb-project", metavar="NAME",
              help="log the same to Weights & Biases project NAME, offline (the run under <output-dir>/wandb/, "
                   "uploaded later with `wandb sync`) unless WANDB_MODE says otherwise")
    FLAGS.add(g, "tracking.log_checkpoint")
    p.set_defaults(run=run)


def config_from_args(args):
    from opsft.config import load_config

    overrides = FLAGS.overrides(args)
    mlflow = getattr(args, "mlflow", None)
    if mlflow is not None:  # --mlflow [URI]
        overrides["tracking.mlflow.enabled"] = True
        overrides["tracking.mlflow.tracking_uri"] = mlflow or None
    cfg = load_config(TrainConfig, args.config, overrides)
    if not cfg.input or not cfg.output_dir:
        raise ValueError("--input and --output-dir are required (on the command line or in --config)")
    refuse_overwrite([cfg.output_dir], [cfg.input, cfg.eval_input])
    return cfg


def run(args) -> int:
    cfg = config_from_args(args)
    if args.local:
        from opsft.train.loop import run_local

        summary = run_local(cfg)
    else:
        from opsft.train.ray_job import run_ray

        summary = run_ray(cfg)
    print_summary("train", summary)
    return 0
