"""Answer verifiers for the on-policy data recipe: does a response reach the reference answer?

    extract_final_answer(text)          # \\boxed{...} (last, nested braces), "#### x", "The answer is x",
                                        # else the last number in the text
    NumericVerifier()(response, "288")  # the final answer compared as a number (1,000 / $5 / 3/4 / 50%)
    ExactVerifier()(response, "Paris")  # the final answer equal to the reference (case, spaces, trailing .)
    ReasoningGymVerifier("gsm_symbolic")(response, "288", row)   # reasoning-gym's own checker
    make_verifier("numeric" | "exact" | "rg:<task>" | "auto")

A verifier is a callable (response, reference, row=None) -> bool. `auto` picks per row: the
reasoning-gym checker of the row's `task` when it names a reasoning-gym dataset, else numeric
when the reference is a number, else exact.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = r"[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?%?|[-+]?\.\d+"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces respected."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def extract_final_answer(text: str | None) -> str | None:
    """The final answer a response states, or None when it states none."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = text.rfind("####")
    if hashes >= 0:
        tail = text[hashes + 4:].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip()
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        line = matches[-1].group(1).strip().splitlines()[0]
        number = re.search(_NUMBER, line)
        return number.group(0).strip() if number else line.rstrip(" .")
    numbers = re.findall(_NUMBER, text)
    return numbers[-1].strip() if numbers else None


def parse_number(text: str | None) -> Fraction | None:
    """A number written as 1,234 / -3.5 / $12 / 3/4 / 50% / \\frac{3}{4}; None if it is not one."""
    if text is None:
        return None
    s = str(text).strip().rstrip(".").replace("\\$", "").replace("$", "").replace(",", "").replace(" ", "")
    s = re.sub(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", s)
    s = re.sub(r"\\(?:text|mathrm)\{[^{}]*\}", "", s)
    percent = s.endswith("%") or s.endswith("\\%")
    s = s.rstrip("%").rstrip("\\")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = Fraction(Fraction(num), Fraction(den))
        else:
            value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


class NumericVerifier:
    """The response's final answer equals the reference as a number (within rel_tol)."""

    name = "numeric"

    def __init__(self, rel_tol: float = 1e-6):
        self.rel_tol = rel_tol

    def __call__(self, response: str, reference, row: dict | None = None) -> bool:
        got, want = parse_number(extract_final_answer(response)), parse_number(str(reference))
        if got is None or want is None:
            return False
        return abs(got - want) <= self.rel_tol * max(abs(want), 1)


class ExactVerifier:
    """The response's final answer equals the reference after whitespace / case / final-period normalisation."""

    name = "exact"

    def __call__(self, response: str, reference, row: dict | None = None) -> bool:
        got = extract_final_answer(response)
        return got is not None and normalize_text(got) == normalize_text(str(reference))


class ReasoningGymVerifier:
    """reasoning-gym's checker for `task`, fed the extracted final answer; accepts a score >= threshold.
    The row's `metadata` (when present) is passed on, as some checkers need it."""

    def __init__(self, task: str, threshold: float = 1.0):
        import reasoning_gym

        self.name = f"rg:{task}"
        self.score = reasoning_gym.get_score_answer_fn(task)
        self.threshold = threshold

    def __call__(self, response: str, reference, row: dict | None = None) -> bool:
        answer = extract_final_answer(response)
        entry = {"answer": str(reference), "metadata": (row or {}).get("metadata") or {}}
        try:
            return float(self.score(answer, entry)) >= self.threshold
        except Exception:  # a checker that chokes on a malformed answer has not accepted it
            return False


class AutoVerifier:
    """Per row: reasoning-gym's checker for a known `task`, else numeric for numbers, else exact."""

    name = "auto"

    def __init__(self):
        self.numeric, self.exact, self.gym = NumericVerifier(), ExactVerifier(), {}

    def __call__(self, response: str, reference, row: dict | None = None) -> bool:
        task = (row or {}).get("task")
        if task:
            if task not in self.gym:
                try:
                    self.gym[task] = ReasoningGymVerifier(task)
                except (ValueError, ImportError):
                    self.gym[task] = None
            if self.gym[task] is not None:
                return self.gym[task](response, reference, row)
        if parse_number(str(reference)) is not None:
            return self.numeric(response, reference, row)
        return self.exact(response, reference, row)


def make_verifier(name: str):
    """'numeric', 'exact', 'auto', or 'rg:<reasoning-gym task>'."""
    if name == "numeric":
        return NumericVerifier()
    if name == "exact":
        return ExactVerifier()
    if name == "auto":
        return AutoVerifier()
    if name.startswith("rg:"):
        return ReasoningGymVerifier(name[3:])
    raise ValueError(f"unknown verifier {name!r}; choose numeric, exact, auto or rg:<task>")
