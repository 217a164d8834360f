"""The method, as plain functions over tensors and token ids (no Ray, vLLM or FastAPI):
CLL (cll), the SFT loss family and IDFT (losses, loss_registry), the preference baselines
(preference) and hinted decoding (hinted)."""
