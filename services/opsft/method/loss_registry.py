"""Every training loss by name, once: its kind (token or pair), whether its token weight is a
constant (stopgrad), its parameters and their defaults, and the metrics it adds. Plain Python
(no torch): opsft.config (LossConfig: names, defaults, params()), the `--loss` choices of
`opsft train`, opsft.method.losses, opsft.method.preference and the trainer's metric keys are derived from it.

A parameter has a config name (a LossConfig field, e.g. `dpo_beta`) and the keyword name the
loss function takes (`beta`); `PARAMS` holds each config name's default and meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# config name -> (default, description). The defaults are the official ones (method.md): IDFT's
# beta / gamma from the official config file, its lambda schedule 0 / 0 from every released run
# script (lambda = 1 throughout; the config file says 0.2 / 0.1).
PARAMS: dict[str, tuple[float, str]] = {
    "beta": (1.0, "idft: gamma_raw = clamp(exp(-phi / beta), gamma_min, gamma_max)"),
    "gamma_min": (0.1, "idft: lower clamp of gamma"),
    "gamma_max": (2.0, "idft: upper clamp of gamma"),
    "warmup_ratio": (0.0, "idft lambda schedule: 0 while progress < this. 0 = the released run scripts; "
                          "the official config file says 0.2"),
    "transition_ratio": (0.0, "idft lambda: linear rise length (config file: 0.1)"),
    "bound": (5.0, "idft_hardmask: keep tokens with -bound < phi < bound"),
    "dpo_beta": (0.1, "dpo: scale of the implicit reward beta * (log pi - log ref); 0.1 = the DPO paper's "
                      "usual setting"),
    "label_smoothing": (0.0, "dpo: conservative DPO, the probability that a pair's label is flipped; 0 = plain DPO"),
    "simpo_beta": (2.0, "simpo: reward = beta * mean token log-prob (SimPO paper: 2.0-2.5)"),
    "simpo_gamma": (1.0, "simpo: target reward margin (gamma / beta = 0.5, the SimPO paper's Llama-3-Base "
                         "setting and recommended start)"),
}

IDFT_PARAMS = {"beta": "beta", "gamma_min": "gamma_min", "gamma_max": "gamma_max", "warmup_ratio": "warmup_ratio",
               "transition_ratio": "transition_ratio"}
IDFT_METRICS = ("gamma_mean", "lambda_mean", "frac_gamma_min", "frac_gamma_max")


@dataclass(frozen=True)
class Loss:
    name: str
    kind: Literal["token", "pair"]
    doc: str
    params: dict[str, str] = field(default_factory=dict)  # function keyword -> config name
    detached: bool = True  # token losses: the weight is stopgrad (False only for the legacy gradient)
    metrics: tuple[str, ...] = ()  # token losses: metric keys beyond the common ones

    def defaults(self) -> dict[str, float]:
        """Function keyword -> default value."""
        return {kw: PARAMS[cfg][0] for kw, cfg in self.params.items()}


LOSSES: dict[str, Loss] = {loss.name: loss for loss in (
    Loss("sft", "token", "w = 1"),
    Loss("dft", "token", "w = p"),
    Loss("eaft", "token", "w = H(p) / log V"),
    Loss("idft", "token", "w = p ** gamma (the official HEAD gradient)", IDFT_PARAMS, metrics=IDFT_METRICS),
    Loss("idft_hardmask", "token", "idft on tokens with -bound < phi < bound only", {**IDFT_PARAMS, "bound": "bound"},
         metrics=(*IDFT_METRICS, "frac_kept")),
    Loss("idft_legacy", "token", "idft with only gamma detached (pre-2026-03-13 official gradient)", IDFT_PARAMS,
         detached=False, metrics=IDFT_METRICS),
    Loss("dpo", "pair", "sigmoid DPO against the initial model", {"beta": "dpo_beta",
                                                                 "label_smoothing": "label_smoothing"}),
    Loss("simpo", "pair", "SimPO, reference-free", {"beta": "simpo_beta", "gamma": "simpo_gamma"}),
)}
NAMES = tuple(LOSSES)
TOKEN_LOSSES = tuple(n for n, loss in LOSSES.items() if loss.kind == "token")
PAIR_LOSSES = tuple(n for n, loss in LOSSES.items() if loss.kind == "pair")


def get(name: str) -> Loss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {list(NAMES)}")
    return LOSSES[name]
