"""The hinted-decoding study's task families (opsft.data.datasets.FAMILIES): deterministic rows whose
off-policy worked solutions reach reasoning-gym's answer, by a method checked here independently."""

import re

import pytest
import reasoning_gym
from opsft.data.datasets import (
    FAMILIES,
    FAMILY_TASKS,
    column_subtraction,
    friends_solution,
    partial_products,
    task_corpus,
)

N = 40


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_rows_are_deterministic_and_end_with_the_reasoning_gym_answer(family):
    make = FAMILIES[family]
    rows = make(N, seed=0)
    assert rows == make(N, seed=0) and rows[10:] == make(N - 10, seed=0, offset=10)
    assert len({r["id"] for r in rows}) == N and make(5, seed=1) != rows[:5]
    task, settings = FAMILY_TASKS[family]
    if task == "aiw":  # reasoning-gym itself wants aiw's enum
        from reasoning_gym.logic.aiw import TaskType

        settings = {**settings, "task_types": [TaskType(t) for t in settings["task_types"]]}
    gym = reasoning_gym.create_dataset(task, size=N, seed=0, **settings)
    for i, row in enumerate(rows):
        assert (row["prompt"], row["answer"], row["task"]) == (gym[i]["question"], str(gym[i]["answer"]), task)
        assert row["response"].splitlines()[-1] == f"#### {row['answer']}"
        assert row["response"].count("####") == 1


def _terms(row, op):
    expression = re.search(rf"(\d+) {re.escape(op)} (\d+)", row["prompt"])
    return int(expression[1]), int(expression[2])


def test_differences_match_python_and_the_dataset():
    for row in FAMILIES["differences"](N, seed=0):
        a, b = _terms(row, "-")
        assert int(row["answer"]) == a - b and row["response"].endswith(f"#### {a - b}")
    answers = {int(r["answer"]) for r in FAMILIES["differences"](N, seed=0)}
    assert min(answers) < 0 <= max(answers)  # basic_arithmetic gives negative differences too


def _column_digits(text):
    """The digits a column solution writes, ones first, and the borrows it passes on."""
    found = re.findall(r"write (\d), borrow ([01])\.", text)
    return [int(d) for d, _ in found], [int(b) for _, b in found]


def test_column_subtraction_is_right_for_every_pair_of_terms():
    for a in range(121):
        for b in range(121):
            text = column_subtraction(f"{a} - {b}")
            assert text.splitlines()[-1] == f"#### {a - b}"
            digits, borrows = _column_digits(text)
            top, bottom = max(a, b), min(a, b)
            assert sum(d * 10 ** i for i, d in enumerate(digits)) == top - bottom
            assert borrows[-1] == 0 and len(digits) == len(str(top))
            # a borrow leaves a column exactly when its top digit (less the incoming borrow) is short
            incoming = 0
            for i, borrow in enumerate(borrows):
                assert borrow == int(top // 10 ** i % 10 - incoming < bottom // 10 ** i % 10)
                incoming = borrow
    with pytest.raises(ValueError):
        column_subtraction("-3 - 4")


def test_column_subtraction_text():
    assert column_subtraction("52 - 17") == (
        "Column subtraction for 52 - 17.\n"
        "Ones column: 2 - 0 < 7: borrow 1, 12 - 0 - 7 = 5; write 5, borrow 1.\n"
        "Tens column: 5 - 1 - 1 = 3; write 3, borrow 0.\n"
        "Reading the columns gives 35.\n"
        "#### 35")
    assert column_subtraction("6 - 9") == (
        "Column subtraction for 6 - 9.\n"
        "6 < 9: subtract 6 from 9, then the result is negative.\n"
        "Ones column: 9 - 0 - 6 = 3; write 3, borrow 0.\n"
        "Reading the columns gives 3; with the sign, -3.\n"
        "#### -3")
    assert column_subtraction("100 - 97").splitlines()[-2:] == ["Reading the columns gives 003 = 3.", "#### 3"]


def test_products_match_python_and_the_dataset():
    for row in FAMILIES["products"](N, seed=0):
        a, b = _terms(row, "*")
        assert int(row["answer"]) == a * b and row["response"].endswith(f"#### {a * b}")


def test_partial_products_are_right_for_every_pair_of_factors():
    for a in [*range(0, 100, 7), 99]:
        for b in range(100):
            text = partial_products(f"{a} * {b}")
            assert text.splitlines()[-1] == f"#### {a * b}"
            for line in text.splitlines()[1:-2]:  # each digit's running totals: a, 2a, ..., d*a
                digit = re.match(r"\w+ digit (\d)", line)
                assert digit, line
                d = int(digit[1])
                totals = re.search(r"times?: ([\d, ]+)", line)
                assert (totals is None) == (d == 0)
                if totals:
                    assert [int(t) for t in totals[1].split(", ")] == [a * k for k in range(1, d + 1)]
    with pytest.raises(ValueError):
        partial_products("-3 * 4")


def test_partial_products_text():
    assert partial_products("7 * 6") == (
        "Partial products for 7 x 6, one per digit of 6.\n"
        "Ones digit 6: 7 added 6 times: 7, 14, 21, 28, 35, 42.\n"
        "Product: 42.\n"
        "#### 42")
    assert partial_products("47 * 30") == (
        "Partial products for 47 x 30, one per digit of 30.\n"
        "Ones digit 0: contributes 0.\n"
        "Tens digit 3: 47 added 3 times: 47, 94, 141; x 10 = 1410.\n"
        "Sum of partial products: 1410 + 0 = 1410.\n"
        "#### 1410")


def _female_friends_by_graph(question):
    """Build the friend group of an aiw friends question as people and count the male friend's female friends."""
    found = re.match(r"(\w+) has (\d+) male friends and she also has (\d+) female friends\..*does (\w+), a male",
                     question)
    she, m, f, he = found[1], int(found[2]), int(found[3]), found[4]
    people = {she: "F", he: "M"} | {f"male{i}": "M" for i in range(m - 1)} | {f"female{i}": "F" for i in range(f)}
    friends = {p: set(people) - {p} for p in people}  # everyone is a friend of everyone else, no one outside
    return sum(people[p] == "F" for p in friends[he])


def test_friends_match_a_friend_graph_and_the_dataset():
    rows = FAMILIES["friends"](N, seed=0)
    for row in rows:
        expected = _female_friends_by_graph(row["prompt"])
        assert int(row["answer"]) == expected and row["response"].endswith(f"#### {expected}")
        assert "How many female friends does" in row["prompt"]
    assert {int(r["answer"]) for r in rows} == {2, 3, 4}  # 1-3 female friends, plus her


def test_friends_solution_text():
    question = ("Susan has 2 male friends and she also has 3 female friends. They all are friends with each "
                "other and have no other friends aside. How many female friends does James, a male friend of "
                "Susan, have?")
    assert friends_solution(question) == (
        "Given: Susan (female) has m = 2 male friends and f = 3 female friends; James is one of the m.\n"
        "Given: the group {Susan} + m + f, of 1 + 2 + 3 = 6 persons, is fully connected, no friends outside.\n"
        "Let x = the number of female friends of James.\n"
        "Friends of James = the group minus James: 6 - 1 = 5 persons.\n"
        "Female among them: Susan, and the f = 3 female friends.\n"
        "Compute: x = 1 + f = 1 + 3 = 4.\n"
        "Therefore x = 4.\n"
        "#### 4")
    with pytest.raises(ValueError):
        friends_solution("Susan has 2 brothers and she also has 3 sisters. How many sisters does Susan's brother have?")


def test_aiw_settings_take_task_type_names():
    """YAML gives aiw's task_types as plain names; the rows (and so opsft eval's items) still build."""
    rows = task_corpus("aiw", 3, config={"task_types": ["friends"], "task_type_weights": [1.0], "max_entities": 3})
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in FAMILIES["friends"](3)]
