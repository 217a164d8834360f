"""opsft: on-policy SFT (CLL scoring, IDFT, Hinted Decoding) on Ray.

Method code (plain torch, no Ray/vLLM/FastAPI): opsft.method.cll, opsft.method.losses, opsft.data.chat,
opsft.data.corpus, opsft.scoring, opsft.engines.hf. Ray layers: opsft.jobs (Ray Data),
opsft.train (Ray Train), opsft.serve (Ray Serve), opsft.cli.
"""

__version__ = "0.1.0"
