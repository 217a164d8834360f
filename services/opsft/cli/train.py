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

from opsft.cli.common import print_summary
from opsft.data.corpus import refuse_overwrite
from opsft.method import loss_registry

# flag -> dotted TrainConfig key
FLAGS = {
    "input": "input", "output_dir": "output_dir", "model": "model", "eval_input": "eval_input",
    "eval_rows": "eval_rows", "loss": "loss.name", "beta": "loss.beta", "gamma_min": "loss.gamma_min",
    "gamma_max": "loss.gamma_max", "lambda_warmup_ratio": "loss.warmup_ratio",
    "lambda_transition_ratio": "loss.transition_ratio", "bound": "loss.bound", "dpo_beta": "loss.dpo_beta",
    "label_smoothing": "loss.label_smoothing", "simpo_beta": "loss.simpo_beta", "simpo_gamma": "loss.simpo_gamma",
    "lr": "lr",
    "warmup_ratio": "warmup_ratio", "weight_decay": "weight_decay", "grad_clip": "grad_clip",
    "global_batch_size": "global_batch_size", "micro_batch_size": "micro_batch_size", "epochs": "epochs",
    "max_steps": "max_steps", "seed": "seed", "autocast": "autocast", "dtype": "dtype", "max_length": "max_length",
    "overlong": "overlong", "checkpoint_every": "checkpoint_every", "eval_every": "eval_every",
    "resume_from": "resume_from", "max_failures": "max_failures", "address": "address", "storage_path": "storage_path",
    "workers": "scaling.num_workers", "use_gpu": "scaling.use_gpu", "gpus_per_worker": "scaling.gpus_per_worker",
    "cpus_per_worker": "scaling.cpus_per_worker", "strategy": "scaling.strategy",
    "gradient_checkpointing": "gradient_checkpointing", "fused_head": "fused_head", "packing": "packing",
    "mlflow_experiment": "tracking.mlflow.experiment", "wandb_project": "tracking.wandb.project",
    "log_checkpoint": "tracking.log_checkpoint",
}


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with SFT/DFT/EAFT/IDFT, or DPO/SimPO on pairs (Ray Train)")
    p.add_argument("--config", help="YAML TrainConfig; flags given on the command line override it")
    p.add_argument("--input", help="corpus (JSONL/Parquet), or the output of score / rewrite; dpo/simpo: pair "
                                   "rows (prompt|messages, chosen, rejected) or a rewrite output")
    p.add_argument("--output-dir", help="metrics.jsonl, tensorboard/ and (without --storage-path) the checkpoints: "
                   "a local or shared POSIX folder")
    p.add_argument("--model", help="local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--eval-input", help="held-out corpus for eval loss / CLL")
    p.add_argument("--eval-rows", type=int, help="rows held out of --input when --eval-input is not given")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=loss_registry.NAMES,
                   help="default idft; dpo / simpo train on pairs")
    g.add_argument("--beta", type=float, help="idft temperature of gamma (default 1)")
    g.add_argument("--gamma-min", type=float, help="default 0.1")
    g.add_argument("--gamma-max", type=float, help="default 2.0")
    g.add_argument("--lambda-warmup-ratio", type=float,
                   help="idft lambda = 0 before this fraction of steps (default 0, the released run scripts; "
                        "the official config file uses 0.2)")
    g.add_argument("--lambda-transition-ratio", type=float, help="idft lambda rise length (default 0; config: 0.1)")
    g.add_argument("--bound", type=float, help="idft_hardmask: keep |phi| < bound (default 5)")
    g.add_argument("--dpo-beta", type=float, help="dpo reward scale (default 0.1)")
    g.add_argument("--label-smoothing", type=float, help="dpo: conservative DPO label noise (default 0)")
    g.add_argument("--simpo-beta", type=float, help="simpo reward scale (default 2.0)")
    g.add_argument("--simpo-gamma", type=float, help="simpo target margin (default 1.0)")
    g = p.add_argument_group("optimisation (defaults: the official settings, docs/training.md)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 6e-5)")
    g.add_argument("--warmup-ratio", type=float, help="lr warm-up fraction (default 0.1), then cosine")
    g.add_argument("--weight-decay", type=float, help="default 0.01")
    g.add_argument("--grad-clip", type=float, help="default 1.0; 0 = off")
    g.add_argument("--global-batch-size", type=int, help="rows per optimiser step over all workers (default 256)")
    g.add_argument("--micro-batch-size", type=int, help="rows per forward pass per worker (default 4)")
    g.add_argument("--epochs", type=int, help="default 1")
    g.add_argument("--max-steps", type=int, help="optimiser steps (wins over --epochs)")
    g.add_argument("--seed", type=int)
    g.add_argument("--autocast", choices=["auto", "bf16", "off"], help="auto = bf16 on a bf16 GPU, else fp32")
    g.add_argument("--dtype", choices=["float32", "float64"],
                   help="parameter dtype (default float32; float64 is the exactness reference on CPU)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute each decoder layer's activations in the backward pass (less memory, ~1/3 "
                        "more compute)")
    g.add_argument("--packing", action="store_true", default=None,
                   help="padding-free micro-batches (rows back to back, attention within each row)")
    g.add_argument("--no-fused-head", dest="fused_head", action="store_false", default=None,
                   help="compute the loss from the model's logits ([tokens x vocab]) instead of the chunked head")
    g.add_argument("--max-length", type=int, help="tokens per row (default: the model's context)")
    g.add_argument("--overlong", choices=["skip", "truncate"], help="rows over --max-length (default skip)")
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 0: only the last)")
    g.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default 0: only the last)")
    g.add_argument("--resume-from", help="checkpoint folder to continue from exactly")
    g.add_argument("--max-failures", type=int, help="worker failures Ray Train recovers from, each time from the "
                   "last checkpoint (default 3)")
    g.add_argument("--storage-path", help="where Ray Train keeps checkpoints: shared storage or s3://... (default: "
                   "--output-dir)")
    g.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    g.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    g.add_argument("--gpus-per-worker", type=float)
    g.add_argument("--cpus-per-worker", type=float)
    g.add_argument("--strategy", choices=["auto", "ddp", "fsdp"],
                   help="default auto: ddp where the whole training state fits a GPU (opsft plan), else fsdp. "
                        "fsdp shards parameters, gradients and optimiser state (FSDP2, one unit per decoder layer; "
                        "--autocast bf16 / auto on GPU = bf16 mixed precision)")
    g.add_argument("--address", help="Ray cluster address")
    g.add_argument("--local", action="store_true", help="train in this process without Ray (one worker)")
    g = p.add_argument_group("experiment tracking (the `tracking` extra: pip install 'opsft[tracking]'; "
                             "docs/training.md)")
    g.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                   help="log params, every step's metrics and the final checkpoint to MLflow: to URI (a tracking "
                        "server http(s)://..., a database, or a folder for a local sqlite store), else to "
                        "MLFLOW_TRACKING_URI when set, else to <output-dir>/mlruns/ (open it with `mlflow ui "
                        "--backend-store-uri sqlite:///<output-dir>/mlruns/mlflow.db`)")
    g.add_argument("--mlflow-experiment", help="MLflow experiment name (default opsft; created when missing)")
    g.add_argument("--wandb-project", metavar="NAME",
                   help="log the same to Weights & Biases project NAME, offline (the run under <output-dir>/wandb/, "
                        "uploaded later with `wandb sync`) unless WANDB_MODE says otherwise")
    g.add_argument("--log-checkpoint", choices=["auto", "path", "files"],
                   help="the final checkpoint in the trackers: files = uploaded as an artifact, path = its location "
                        "only; auto (default) = files up to 1 GiB, else path")
    p.set_defaults(run=run)


def config_from_args(args):
    from opsft.config import TrainConfig, load_config

    overrides = {key: getattr(args, flag, None) for flag, key in FLAGS.items()}
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
