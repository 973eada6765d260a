"""A reward that needs no model: the arithmetic word problems of the synthetic data, checked by
string matching.

:func:`ldjax.data.synthetic.generate_preferences` writes arithmetic records (topic
``"arithmetic"``) whose prompt asks one of four questions (add, subtract, multiply, divide) about
two numbers. :func:`parse_problem` reads the numbers and the operation back from the prompt and
computes the answer; :func:`stated_answers` finds the results a response states (``"= N"``,
``"the answer is N"``, ``"there are N"``); a response is correct
(:func:`is_correct`, :func:`reward`) when its final stated result is the answer (the usual
final-answer check of math rewards; a wrong intermediate ``= N`` does not matter). The data
set's chosen responses are correct, its "wrong" rejected ones incorrect and its "evasive" ones
(no number) incorrect.

>>> from ldjax.data.arithmetic import arithmetic_records, reward
>>> rec = arithmetic_records(1)[0]
>>> reward(rec["prompt"], rec["chosen"]), reward(rec["prompt"], " The answer is 99999.")
(1.0, 0.0)
"""

from __future__ import annotations

import re

from ldjax.data.synthetic import generate_preferences

__all__ = ["parse_problem", "stated_answers", "is_correct", "reward", "arithmetic_records"]

_PROBLEMS = (
    ("add", re.compile(r"has (\d+) \w+ and gets (\d+) more"), lambda a, b: a + b),
    ("sub", re.compile(r"had (\d+) \w+ and gave (\d+) of them"), lambda a, b: a - b),
    ("mul", re.compile(r"There are (\d+) boxes with (\d+) \w+ in each box"), lambda a, b: a * b),
    ("div", re.compile(r"shares (\d+) \w+ equally among (\d+) friends"), lambda a, b: a // b),
)
_STATED = re.compile(r"(?:=|\banswer is|\bthere are)\s*(-?\d+)")


def parse_problem(prompt: str) -> tuple[str, int, int, int]:
    """``(op, a, b, answer)`` of the arithmetic question in ``prompt`` (its last one).

    Raises:
      ValueError: the prompt holds no arithmetic question of the synthetic templates.
    """
    found = None
    for op, rx, f in _PROBLEMS:
        for mt in rx.finditer(prompt):
            if found is None or mt.start() > found[0]:
                a, b = int(mt.group(1)), int(mt.group(2))
                found = (mt.start(), op, a, b, f(a, b))
    if found is None:
        raise ValueError(
            "prompt holds no arithmetic question of ldjax.data.synthetic (add, sub, mul, div): "
            f"{prompt[-120:]!r}"
        )
    return found[1:]


def stated_answers(response: str) -> list[int]:
    """The results ``response`` states: the numbers right after ``=``, ``answer is`` or
    ``there are``, in order (``"That gives 57 - 22 = 35"`` states 35 only)."""
    return [int(m) for m in _STATED.findall(response)]


def is_correct(response: str, answer: int) -> bool:
    """The final stated result (:func:`stated_answers`) exists and equals ``answer``."""
    got = stated_answers(response)
    return bool(got) and got[-1] == answer


def reward(prompt: str, response: str) -> float:
    """1.0 if ``response`` correctly answers the arithmetic question of ``prompt``, else 0.0."""
    return float(is_correct(response, parse_problem(prompt)[3]))


def arithmetic_records(n: int, seed: int = 0) -> list[dict]:
    """The first ``n`` arithmetic records of :func:`ldjax.data.synthetic.generate_preferences`
    (``seed``), each with ``answer`` (int) added. Deterministic."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    size = max(8, 8 * n)
    while True:
        recs = [r for r in generate_preferences(size, seed) if r["topic"] == "arithmetic"]
        if len(recs) >= n:
            return [dict(r, answer=parse_problem(r["prompt"])[3]) for r in recs[:n]]
        size *= 2
