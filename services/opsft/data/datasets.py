"""Deterministic corpora generated locally from reasoning-gym (no hub): the off-policy data the
recipe rewrites, and held-out questions for evaluation.

    rows = gsm_symbolic_corpus(200, seed=0)             # {id, prompt, response, answer, task}
    train, held_out = train_eval_split(200, 100, seed=0)  # disjoint questions
    rows = task_corpus("basic_arithmetic", 50, seed=0)   # any reasoning-gym task (response = answer)
    rows = task_corpus("chain_sum", 50, config={"max_terms": 2})  # with the task's generator settings
    rows = addition_corpus(160, seed=0)                 # the demo's family: sums, column-method solutions

reasoning-gym builds item i from Random(seed + i) and picks its template from a prefix-stable
list, so item i is the same whatever the dataset size: `offset` selects items offset..offset+n-1.
For gsm_symbolic the response is the template-written worked solution `metadata["answer_cot"]`,
which ends with "#### <answer>" (a final answer opsft.data.verify extracts).
"""

from __future__ import annotations

import hashlib
import json


def _rows_from(task: str, n: int, seed: int, offset: int, response_of, config: dict | None = None) -> list[dict]:
    import reasoning_gym

    if n < 0 or offset < 0:
        raise ValueError("n and offset must be >= 0")
    if n == 0:
        return []
    try:  # settings the task refuses fail here or at its first item: say which task and settings
        ds = reasoning_gym.create_dataset(task, size=offset + n, seed=seed, **(config or {}))
        first = ds[offset]
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as exc:
        raise ValueError(f"reasoning-gym task {task!r} with settings {config or {}}: {exc}") from exc
    tag = f"-c{config_key(config)}" if config else ""
    rows = []
    for idx in range(offset, offset + n):
        entry = first if idx == offset else ds[idx]
        rows.append({
            "id": f"{task}{tag}-s{seed}-{idx}",
            "prompt": entry["question"],
            "response": response_of(entry),
            "answer": str(entry["answer"]),
            "task": task,
        })
    return rows


def _answer_cot(entry: dict) -> str:
    cot = entry["metadata"]["answer_cot"].rstrip()
    if "####" not in cot:  # every template seen ends with "#### <answer>"; make sure of it
        cot += f"\n#### {entry['answer']}"
    return cot


def gsm_symbolic_corpus(n: int, seed: int = 0, offset: int = 0) -> list[dict]:
    """n grade-school math rows: question, template-written solution (off-policy), answer."""
    return _rows_from("gsm_symbolic", n, seed, offset, _answer_cot)


def task_corpus(task: str, n: int, seed: int = 0, offset: int = 0, config: dict | None = None) -> list[dict]:
    """n rows of any reasoning-gym task; the response is the bare answer (no worked solution).
    `config`: the task's own generator settings (e.g. chain_sum max_terms=2), passed to
    reasoning_gym.create_dataset; the rows' ids then carry a short hash of it."""
    return _rows_from(task, n, seed, offset, lambda entry: str(entry["answer"]), config)


# Two-term addition of 1- and 2-digit numbers (reasoning-gym basic_arithmetic): the demo's task family.
# The embedded 135M model answers 28/80 of them right (workflows/demo_task_survey.yaml: a task it can
# partly do, so self-first has own answers to keep and hinted decoding has wrong ones to rewrite).
ADDITION = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"],
            "allow_parentheses": False, "allow_negation": False}


COLUMN_NAMES = ("Ones", "Tens", "Hundreds", "Thousands")


def column_addition(expression: str) -> str:
    """A worked solution of "a + b" (non-negative integers) in a style that is not the model's: the
    column method, terse, one line per column; an off-policy reference that ends with "#### <sum>"."""
    a, b = (int(t) for t in expression.split(" + "))
    if a < 0 or b < 0:
        raise ValueError(f"column_addition needs non-negative terms, got {expression!r}")
    lines, carry, digits = [f"Column method for {a} + {b}."], 0, []
    for col in range(max(len(str(a)), len(str(b)))):
        da, db = a // 10 ** col % 10, b // 10 ** col % 10
        total = da + db + carry
        name = COLUMN_NAMES[col] if col < len(COLUMN_NAMES) else f"10^{col}"
        lines.append(f"{name} column: {da} + {db} + {carry} = {total}; write {total % 10}, carry {total // 10}.")
        digits.append(total % 10)
        carry = total // 10
    if carry:
        lines.append(f"The last carry {carry} is the leading digit.")
        digits.append(carry)
    result = int("".join(map(str, reversed(digits))))
    if result != a + b:  # the method, checked against Python's sum
        raise AssertionError(f"column_addition({expression!r}) gave {result}")
    return "\n".join(lines + [f"Reading the columns gives {result}.", f"#### {result}"])


def addition_corpus(n: int, seed: int = 0, offset: int = 0) -> list[dict]:
    """n addition rows (ADDITION settings): question, off-policy column-method solution, answer."""
    return _rows_from("basic_arithmetic", n, seed, offset,
                      lambda entry: column_addition(entry["metadata"]["expression"]), ADDITION)


def config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]


def question_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).lower().encode()).hexdigest()


def train_eval_split(n_train: int, n_eval: int, seed: int = 0, task: str = "gsm_symbolic") -> tuple[list, list]:
    """Training rows (items 0..n_train-1) and held-out rows (items after them) whose questions
    never occur in the training rows (templates can repeat a question by chance; such items are
    skipped and replaced by later ones, deterministically)."""
    make = gsm_symbolic_corpus if task == "gsm_symbolic" else (lambda n, s, o: task_corpus(task, n, s, o))
    train = make(n_train, seed, 0)
    seen = {question_key(r["prompt"]) for r in train}
    held_out, offset = [], n_train
    while len(held_out) < n_eval:
        batch = make(max(n_eval - len(held_out), 8), seed, offset)
        offset += len(batch)
        for row in batch:
            key = question_key(row["prompt"])
            if key not in seen and len(held_out) < n_eval:
                seen.add(key)
                held_out.append(row)
    return train, held_out
