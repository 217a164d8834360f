"""`opsft train`: fine-tuning with the SFT loss family (SFT, DFT, EAFT, IDFT) on Ray Train.

Method parts, plain torch and testable without Ray: data (tokenising, the deterministic
global batch of each step, length-sorted micro-batches), step (one optimiser step with exact
normalisation over workers and micro-batches, the LR schedule, held-out evaluation),
checkpoint (HF folder + exact trainer state), metrics (JSONL + TensorBoard), loop (the
training loop and the in-process runner). The Ray layer is ray_job (TorchTrainer).
See docs/training.md.
"""
