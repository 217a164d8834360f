"""The hint of hinted decoding (method.md section 3), as text: the prompt that asks the model to
analyse the reference answer (hint_messages), how its output is read (read_hint: the analysis up to
its "# CoT" marker, or up to a header of an example the model invented) and turned into the
hinted stream's analysis prefix (marker_line, hint_prefix), and where generations stop (HINT_STOPS
for the hint, OUTPUT_STOPS for the hinted-decoding output; cut_at_stop). Torch-free; the recipe
(opsft.recipe) tokenizes, the decoder (opsft.method.hinted) works on the ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The hint prompt: our own wording of what the method asks (method.md section 3): analyse the
# reference line by line under "# Analyze", then write one's own chain of thought under "# CoT"
# without mentioning the reference. Short, so a small model's hinted stream stays cheap.
HINT_SYSTEM_PROMPT = (Path(__file__).parent / "hd_system_prompt.txt").read_text(encoding="utf-8")
# hint_prompt "direct": no analysis asked for; the hinted stream opens at the marker line at once
DIRECT_SYSTEM_PROMPT = (Path(__file__).parent / "hd_direct_prompt.txt").read_text(encoding="utf-8")
HINT_PROMPTS = ("analyze", "direct")
HINT_USER_TEMPLATE = "\n# Question:\n{question}\n\n# Answer:\n{answer}\n\n# CoT:\n"
COT_MARKER = "# CoT"

HINT_CUTS = ("line", "marker")
MISSING_HINT = ("cot", "skip")
# The hint template's own headers: a hint that writes one has started an example of its own (a new
# question), so its text from there on is not about the row being rewritten.
HINT_HEADERS = ("# Question", "# Answer")
HINT_STOPS = (COT_MARKER, *HINT_HEADERS)  # where hint generation stops: its marker, or a new example
# Where the hinted-decoding output stops (HDParams.stop_strings in the recipe): a line that opens a
# section of the hint template again is text the hinted stream invents past its own answer.
OUTPUT_STOPS = (*HINT_HEADERS, "# Analy", COT_MARKER)
_ANALYSIS_HEADING = re.compile(r"^[ \t]*#+[ \t]*analy[a-z]*[ \t]*:?[ \t]*$", re.IGNORECASE | re.MULTILINE)


def hint_messages(question: str, reference: str, prompt: str = "analyze") -> list[dict]:
    """The chat that asks the model for "# Analyze ... # CoT" given the question and the reference
    (prompt "analyze"), or for its own solution under "# CoT" at once (prompt "direct")."""
    if prompt not in HINT_PROMPTS:
        raise ValueError(f"hint prompt must be one of {HINT_PROMPTS}, got {prompt!r}")
    system = HINT_SYSTEM_PROMPT if prompt == "analyze" else DIRECT_SYSTEM_PROMPT
    return [{"role": "system", "content": system},
            {"role": "user", "content": HINT_USER_TEMPLATE.format(question=question, answer=reference)}]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """text up to the first occurrence of any stop string (the whole text when none occurs)."""
    at = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:at]


@dataclass(frozen=True)
class HintReading:
    """What a hint output holds for the row it was asked about: the analysis (the text before the
    first "# CoT" marker or the first header of a new example, whichever comes first), whether the
    marker ended it, and whether it is usable: it says something (more than an "# Analyze"
    heading) and the hint ended (a hint that ran out of tokens with neither marker nor header is
    runaway text, often one line repeated)."""

    analysis: str
    marker: bool
    ended: bool = True

    @property
    def usable(self) -> bool:
        return self.ended and bool(_ANALYSIS_HEADING.sub("", self.analysis).strip())


def read_hint(hint_output: str, ended: bool = True) -> HintReading:
    """The hint read up to the marker that belongs to the row's question: the FIRST "# CoT"; any
    marker after a "# Question"/"# Answer" header belongs to an example the model invented.
    `ended`: whether the generation ended by itself (an end-of-turn token or a stop string), not at
    its token budget; a hint stopped at its marker or at a header has ended whatever it says."""
    found = {text: hint_output.find(text) for text in HINT_STOPS}
    ends = [at for at in found.values() if at >= 0]
    end = min(ends, default=len(hint_output))
    return HintReading(analysis=hint_output[:end], marker=bool(ends) and found[COT_MARKER] == end,
                       ended=ended or bool(ends))


def marker_line(cut: str = "line") -> str:
    """The marker as the hinted stream sees it: "# CoT:" and a newline (cut "line": the template's own
    line, so both streams start on the chain of thought) or "# CoT" alone (cut "marker", official)."""
    if cut not in HINT_CUTS:
        raise ValueError(f"hint cut must be one of {HINT_CUTS}, got {cut!r}")
    return COT_MARKER + (":\n" if cut == "line" else "")


def hint_prefix(hint_output: str, cut: str = "line", missing_hint: str = "cot",
                ended: bool = True) -> tuple[str | None, bool]:
    """(the analysis prefix of the hinted stream, whether we wrote its marker) for a hint output.

    A hint with a usable analysis ended by its marker: the analysis, then the marker line (cut
    "marker", the official rule: the hint exactly up to the end of "# CoT"). Otherwise (no marker:
    the hint ended or began a new example; or no analysis before the marker; or a hint that ran
    out of tokens, `ended` False, with neither) as missing_hint says:
    "skip" (official) gives None (the row keeps its reference, finish reason no_hint); "cot" opens
    the hinted stream at the marker line anyway, after the analysis when there is one."""
    if missing_hint not in MISSING_HINT:
        raise ValueError(f"missing_hint must be one of {MISSING_HINT}, got {missing_hint!r}")
    reading = read_hint(hint_output, ended)
    if reading.marker and reading.usable:
        return reading.analysis + marker_line(cut), False
    if missing_hint == "skip":
        return None, False
    if not reading.usable:
        return marker_line(cut), True
    return reading.analysis.rstrip() + "\n\n" + marker_line(cut), True
