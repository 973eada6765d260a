"""The model-free arithmetic reward (ldjax.data.arithmetic) on the synthetic data set."""

import pytest

from ldjax.data.arithmetic import (
    arithmetic_records,
    is_correct,
    parse_problem,
    reward,
    stated_answers,
)


def test_every_chosen_is_correct_and_every_rejected_incorrect():
    recs = arithmetic_records(60)
    assert len(recs) == 60 and all(r["topic"] == "arithmetic" for r in recs)
    assert {parse_problem(r["prompt"])[0] for r in recs} == {"add", "sub", "mul", "div"}
    for r in recs:
        assert reward(r["prompt"], r["chosen"]) == 1.0, r["chosen"]
        assert reward(r["prompt"], r["chosen_initial"]) == 1.0, r["chosen_initial"]
        assert reward(r["prompt"], r["rejected"]) == 0.0, r["rejected"]


@pytest.mark.parametrize(
    "prompt, answer",
    [
        ("Sam has 12 apples and gets 5 more. How many apples does Sam have now?", 17),
        ("Mei had 40 cards and gave 13 of them to a friend. How many cards are left?", 27),
        ("There are 7 boxes with 6 coins in each box. How many coins are there in total?", 42),
        ("Ali shares 36 books equally among 4 friends. How many books does each get?", 9),
    ],
)
def test_parse_problem_computes_the_answer(prompt, answer):
    assert parse_problem("\n\nHuman: " + prompt + "\n\nAssistant:")[3] == answer


def test_string_check():
    assert stated_answers(" That gives 57 - 22 = 35. The answer is 35 apples.") == [35, 35]
    assert is_correct(" So there are 17 apples.", 17)
    assert not is_correct(" 12 + 5 = 17. The answer is 18.", 17)  # the final result is wrong
    assert is_correct(" 12 + 5 = 16. The answer is 17.", 17)  # the final answer counts
    assert not is_correct(" It is hard to say how many apples there are.", 17)  # no result
    assert not is_correct("", 17)
    with pytest.raises(ValueError, match="no arithmetic question"):
        parse_problem("\n\nHuman: How do I bake bread?\n\nAssistant:")
