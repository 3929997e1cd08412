"""Candidate rules on hand-made score matrices (exact sets), rule parsing, and templates."""

from __future__ import annotations

import numpy as np
import pytest

from annotators.candidates import (
    Rule,
    apply_rule,
    mask_to_lists,
    mass,
    parse_rule,
    ratio,
    top_k,
    union_of_votes,
)
from annotators.templates import fill, load_questions, load_templates
from pipeline.errors import CoregError

PROBS = np.array(
    [
        [0.70, 0.20, 0.10, 0.00],
        [0.25, 0.25, 0.40, 0.10],  # a tie between classes 0 and 1
        [0.10, 0.30, 0.30, 0.30],  # three-way tie
    ],
    dtype=np.float32,
)


def sets(mask):
    return mask_to_lists(mask)


def test_union_of_votes_ignores_missing_answers():
    votes = np.array([[2, 2, 0], [1, -1, -1], [-1, -1, -1]])
    assert sets(union_of_votes(votes, 4)) == [[0, 2], [1], []]


def test_topk_is_exact_and_breaks_ties_to_the_lower_index():
    assert sets(top_k(PROBS, 1)) == [[0], [2], [1]]
    assert sets(top_k(PROBS, 2)) == [[0, 1], [0, 2], [1, 2]]
    assert sets(top_k(PROBS, 4)) == [[0, 1, 2, 3]] * 3


def test_ratio_keeps_classes_near_the_top():
    assert sets(ratio(PROBS, 0.5)) == [[0], [0, 1, 2], [1, 2, 3]]  # 0.25 >= 0.5 * 0.4 exactly
    assert sets(ratio(PROBS, 0.2)) == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert sets(ratio(PROBS, 1.0)) == [[0], [2], [1, 2, 3]]


def test_mass_is_the_smallest_prefix_reaching_m():
    assert sets(mass(PROBS, 0.7)) == [[0], [0, 1, 2], [1, 2, 3]]  # 0.4 + 0.25 = 0.65 < 0.7: one more (tie -> class 1)
    assert sets(mass(PROBS, 0.5)) == [[0], [0, 2], [1, 2]]
    assert sets(mass(PROBS, 0.9)) == [[0, 1], [0, 1, 2], [1, 2, 3]]  # 0.7+0.2 = 0.9 reaches 0.9 (float tolerance)
    assert sets(mass(PROBS, 1.0)) == [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]]  # a zero-probability class is not needed


def test_apply_rule_falls_back_to_argmax_and_counts():
    votes = np.array([[1, 1], [-1, -1], [3, 0]])
    mask, fallback = apply_rule(Rule("union"), PROBS, votes)
    assert sets(mask) == [[1], [2], [0, 3]] and fallback == 1
    mask, fallback = apply_rule(Rule("topk", 2), PROBS, votes)
    assert sets(mask) == [[0, 1], [0, 2], [1, 2]] and fallback == 0


@pytest.mark.parametrize("text, rule", [("union", Rule("union")), ("topk:3", Rule("topk", 3)), ("ratio:0.5", Rule("ratio", 0.5)), ("mass:1", Rule("mass", 1.0))])
def test_parse_rule(text, rule):
    assert parse_rule(text, n_classes=4) == rule
    assert str(parse_rule(str(rule))) == str(rule)


@pytest.mark.parametrize("text", ["", "unions", "union:2", "topk", "topk:0", "topk:5", "topk:x", "ratio:0", "ratio:1.5", "mass:-1", "mass:abc", "top:1"])
def test_parse_rule_rejects(text):
    with pytest.raises(CoregError, match="--candidates"):
        parse_rule(text, n_classes=4)


def test_builtin_templates_and_user_files(tmp_path):
    import open_clip.zero_shot_metadata as meta

    paper = load_templates("paper27")
    assert len(paper) == 27 and paper[0] == "a photo of a {}" and not any(t.endswith(".") for t in paper)
    assert load_templates("imagenet80") == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    assert fill("a photo of a {}", "aquarium_fish") == "a photo of a aquarium fish"
    f = tmp_path / "t.txt"
    f.write_text("# mine\nan image of {}\n\n{} in the wild\n")
    assert load_templates(str(f)) == ["an image of {}", "{} in the wild"]
    for bad, match in (("no placeholder", "exactly one"), ("{} and {}", "exactly one"), ("x {}\nx {}", "twice"), ("# only", "no templates")):
        f.write_text(bad)
        with pytest.raises(CoregError, match=match):
            load_templates(str(f))
    with pytest.raises(CoregError, match="not a built-in"):
        load_templates("paper28")
    assert len(load_questions("default")) >= 3
    f.write_text("What is it?")
    with pytest.raises(CoregError, match="{options}"):
        load_questions(str(f))
