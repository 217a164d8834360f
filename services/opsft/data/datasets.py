"""Deterministic corpora generated locally from reasoning-gym (no hub): the off-policy data the
recipe rewrites, and held-out questions for evaluation.

    rows = gsm_symbolic_corpus(200, seed=0)             # {id, prompt, response, answer, task}
    train, held_out = train_eval_split(200, 100, seed=0)  # disjoint questions
    rows = task_corpus("basic_arithmetic", 50, seed=0)   # any reasoning-gym task (response = answer)
    rows = task_corpus("chain_sum", 50, config={"max_terms": 2})  # with the task's generator settings
    rows = addition_corpus(160, seed=0)                 # the demo's family: sums, column-method solutions
    rows = subtraction_corpus(160, seed=0)              # differences, column subtraction with borrows
    rows = product_corpus(160, seed=0)                  # products, partial products by running totals
    rows = friends_corpus(160, seed=0)                  # aiw friends word problems, Given/Let/Compute solutions
    rows = FAMILIES["products"](160, seed=0, offset=0)  # the study's families by name (FAMILY_TASKS: task, settings)

reasoning-gym builds item i from Random(seed + i) and picks its template from a prefix-stable
list, so item i is the same whatever the dataset size: `offset` selects items offset..offset+n-1.
For gsm_symbolic the response is the template-written worked solution `metadata["answer_cot"]`,
which ends with "#### <answer>" (a final answer opsft.data.verify extracts).
"""

from __future__ import annotations

import hashlib
import json
import re


def _task_settings(task: str, config: dict) -> dict:
    """The settings as reasoning-gym takes them: aiw's task_types as its TaskType enum (a plain name,
    as YAML gives it, fails at the first item), everything else as given."""
    if task == "aiw" and config.get("task_types"):
        from reasoning_gym.logic.aiw import TaskType

        return {**config, "task_types": [TaskType(t) for t in config["task_types"]]}
    return config


def _rows_from(task: str, n: int, seed: int, offset: int, response_of, config: dict | None = None) -> list[dict]:
    import reasoning_gym

    if n < 0 or offset < 0:
        raise ValueError("n and offset must be >= 0")
    if n == 0:
        return []
    try:  # settings the task refuses fail here or at its first item: say which task and settings
        ds = reasoning_gym.create_dataset(task, size=offset + n, seed=seed, **_task_settings(task, config or {}))
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


# The other families of the hinted-decoding settings study (each a task the base model partly does, with
# off-policy worked solutions in a style of its own). Accuracies: the embedded 135M model, greedy, 40
# held-out items (seed 1234) each, as `opsft eval` scores them.

# Two-term subtraction of 1- and 2-digit numbers (terms 0..100; half the results are negative, which
# basic_arithmetic cannot rule out): 7/40 right (1-digit terms only: 12/40, but about 120 questions).
SUBTRACTION = {**ADDITION, "operators": ["-"]}

# Two factors of 1 digit or (half the items) both of 2 digits (reasoning-gym products): 12/40 right
# (1 digit only: 25/40, 100 questions).
MULTIPLICATION = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "allow_negation": False}

# The word-problem family: reasoning-gym aiw ("Alice in Wonderland"), friends questions, 1-3 male and
# 1-3 female friends. 5/40 right (at 96 new tokens; 3/40 at 192): below the 15% aimed at, and the best of
# the word problems surveyed (aiw siblings 2/40, leg_counting 0/40, calendar weekday_offset 0/40,
# time_intervals 0/40).
# (aiw wants its TaskType enum in task_types; _rows_from turns these names into it.)
AIW_FRIENDS = {"task_types": ["friends"], "task_type_weights": [1.0], "max_entities": 3}


def _final(solution: str, entry: dict) -> str:
    """The solution, once its "#### x" is the dataset's answer (a generator that disagrees is a bug)."""
    stated = solution.rsplit("####", 1)[-1].strip()
    if stated != str(entry["answer"]):
        raise AssertionError(f"worked solution ends with {stated!r}, the dataset's answer is {entry['answer']!r}: "
                             f"{entry['question']!r}")
    return solution


def _column_name(col: int) -> str:
    return COLUMN_NAMES[col] if col < len(COLUMN_NAMES) else f"10^{col}"


def column_subtraction(expression: str) -> str:
    """A worked solution of "a - b" (non-negative integers) by column subtraction with borrows, one
    terse line per column (a < b: the other way round, then the sign); ends with "#### <difference>"."""
    a, b = (int(t) for t in expression.split(" - "))
    if a < 0 or b < 0:
        raise ValueError(f"column_subtraction needs non-negative terms, got {expression!r}")
    top, bottom = max(a, b), min(a, b)
    lines = [f"Column subtraction for {a} - {b}."]
    if a < b:
        lines.append(f"{a} < {b}: subtract {a} from {b}, then the result is negative.")
    borrow, digits = 0, []
    for col in range(len(str(top))):
        dt, db = top // 10 ** col % 10, bottom // 10 ** col % 10
        name = _column_name(col)
        if dt - borrow >= db:
            digit = dt - borrow - db
            lines.append(f"{name} column: {dt} - {borrow} - {db} = {digit}; write {digit}, borrow 0.")
            borrow = 0
        else:
            digit = dt + 10 - borrow - db
            lines.append(f"{name} column: {dt} - {borrow} < {db}: borrow 1, {dt + 10} - {borrow} - {db} = {digit}; "
                         f"write {digit}, borrow 1.")
            borrow = 1
        digits.append(digit)
    if borrow:  # top >= bottom: the last column never borrows
        raise AssertionError(f"column_subtraction({expression!r}) ended with a borrow")
    written = "".join(map(str, reversed(digits)))
    magnitude = int(written)
    result = magnitude if a >= b else -magnitude
    if result != a - b:  # the method, checked against Python's difference
        raise AssertionError(f"column_subtraction({expression!r}) gave {result}")
    read = f"Reading the columns gives {written}" + (f" = {magnitude}" if written != str(magnitude) else "")
    lines.append(read + (f"; with the sign, {result}." if a < b else "."))
    return "\n".join(lines + [f"#### {result}"])


def partial_products(expression: str) -> str:
    """A worked solution of "a * b" (non-negative integers): one partial product per digit of b, each
    by repeated addition written as running totals, then shifted and summed; ends with "#### <product>"."""
    a, b = (int(t) for t in expression.split(" * "))
    if a < 0 or b < 0:
        raise ValueError(f"partial_products needs non-negative factors, got {expression!r}")
    lines, partials = [f"Partial products for {a} x {b}, one per digit of {b}."], []
    for col in range(len(str(b))):
        d, name = b // 10 ** col % 10, _column_name(col)
        if d == 0:
            lines.append(f"{name} digit 0: contributes 0.")
            partials.append(0)
            continue
        totals = [a * k for k in range(1, d + 1)]  # the running totals of a added d times
        running, check = [], 0
        for _ in range(d):
            check += a
            running.append(check)
        if running != totals:
            raise AssertionError(f"partial_products({expression!r}): running totals {running}")
        shifted = running[-1] * 10 ** col
        tail = f"; x {10 ** col} = {shifted}." if col else "."
        lines.append(f"{name} digit {d}: {a} added {d} time{'s' if d > 1 else ''}: "
                     f"{', '.join(map(str, running))}{tail}")
        partials.append(shifted)
    result = sum(partials)
    lines.append(f"Sum of partial products: {' + '.join(map(str, reversed(partials)))} = {result}."
                 if len(partials) > 1 else f"Product: {result}.")
    if result != a * b:  # the method, checked against Python's product
        raise AssertionError(f"partial_products({expression!r}) gave {result}")
    return "\n".join(lines + [f"#### {result}"])


_AIW_FRIENDS = re.compile(
    r"^(?P<she>\w+) has (?P<m>\d+) male friends and she also has (?P<f>\d+) female friends\. They all are "
    r"friends with each other and have no other friends aside\. How many female friends does (?P<he>\w+), a "
    r"male friend of (?P=she), have\?$")


def friends_solution(question: str) -> str:
    """A worked solution of an aiw friends question in a formal Given / Let / Compute / Therefore
    style; ends with "#### <count>"."""
    found = _AIW_FRIENDS.match(question.strip())
    if not found:
        raise ValueError(f"not an aiw friends question: {question!r}")
    she, he, m, f = found["she"], found["he"], int(found["m"]), int(found["f"])
    group = 1 + m + f  # she, her male friends (he is one of them), her female friends
    females_in_group = 1 + f  # she and her female friends; he is not female
    x = females_in_group
    lines = [f"Given: {she} (female) has m = {m} male friends and f = {f} female friends; {he} is one of the m.",
             f"Given: the group {{{she}}} + m + f, of 1 + {m} + {f} = {group} persons, is fully connected, "
             "no friends outside.",
             f"Let x = the number of female friends of {he}.",
             f"Friends of {he} = the group minus {he}: {group} - 1 = {group - 1} persons.",
             f"Female among them: {she}, and the f = {f} female friends.",
             f"Compute: x = 1 + f = 1 + {f} = {x}.",
             f"Therefore x = {x}.",
             f"#### {x}"]
    return "\n".join(lines)


def subtraction_corpus(n: int, seed: int = 0, offset: int = 0) -> list[dict]:
    """n subtraction rows (SUBTRACTION settings): question, off-policy column-subtraction solution, answer."""
    return _rows_from("basic_arithmetic", n, seed, offset,
                      lambda entry: _final(column_subtraction(entry["metadata"]["expression"]), entry), SUBTRACTION)


def product_corpus(n: int, seed: int = 0, offset: int = 0) -> list[dict]:
    """n multiplication rows (MULTIPLICATION settings): question, off-policy partial-products solution, answer."""
    return _rows_from("products", n, seed, offset,
                      lambda entry: _final(partial_products(entry["metadata"]["expression"]), entry), MULTIPLICATION)


def friends_corpus(n: int, seed: int = 0, offset: int = 0) -> list[dict]:
    """n aiw friends word problems (AIW_FRIENDS settings): question, off-policy formal solution, answer."""
    return _rows_from("aiw", n, seed, offset, lambda entry: _final(friends_solution(entry["question"]), entry),
                      AIW_FRIENDS)


# The study's task families: name -> corpus function (n, seed=0, offset=0).
FAMILIES = {"sums": addition_corpus, "differences": subtraction_corpus, "products": product_corpus,
            "friends": friends_corpus}
# Each family's reasoning-gym task and settings (held-out items: opsft.evaluation.task_items(task, n,
# exclude=corpus, config=settings)).
FAMILY_TASKS = {"sums": ("basic_arithmetic", ADDITION), "differences": ("basic_arithmetic", SUBTRACTION),
                "products": ("products", MULTIPLICATION), "friends": ("aiw", AIW_FRIENDS)}


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
