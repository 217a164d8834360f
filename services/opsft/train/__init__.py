"""`opsft train`: fine-tuning with the SFT loss family (SFT, DFT, EAFT, IDFT) and the preference
baselines (DPO, SimPO) on Ray Train, or in one process (`--local`).

Plain torch, testable without Ray, by concern:
- batches: corpus rows -> token examples (TrainExample), the deterministic global batch of each
  step, its length-sorted micro-batches per worker, padding and packing;
- pairs: the same for preference pairs, dpo's reference log-probs, their held-out evaluation;
- worker_corpus: each Ray worker's part of the tokenised corpus (ShardedCorpus), numbered and
  fetched exactly as one process would;
- step: the module the trainers wrap (LossHead) and one optimiser step with exact normalisation
  over workers and micro-batches;
- optim: AdamW with weight decay by name, the LR schedule;
- heldout: held-out evaluation of the token losses;
- precision: the parameter dtype (float64 as the exactness reference) and bf16 compute;
- strategy: the named parallel strategy (none, ddp, fsdp) and the Runtime it builds;
- fsdp: FSDP2 sharding of the parameters and the sharded checkpoints;
- checkpoint: HF folder + exact trainer state (the strategy recorded);
- metrics: metrics.jsonl + TensorBoard; tracking: MLflow / W&B;
- loop: the training loop and the in-process runner (run_local).
The Ray layer is ray_job (TorchTrainer) and ray_data (the corpus read and tokenised by Ray Data).
See docs/training.md.
"""
