"""Exact match and F1 as the official SQuAD v1.1 and v2.0 scripts compute them, on hand-worked
cases (including the v2.0 script's edge cases: gold answers that normalise to nothing, empty
predictions, unanswerable questions)."""

from __future__ import annotations

import pytest

from tunelab.metrics import squad_exact, squad_f1, squad_metrics, squad_normalize


def test_normalisation_lowers_and_drops_punctuation_articles_and_spaces():
    # lower: "the  cat's hat!"; punctuation out: "the  cats hat"; "the" out; spaces collapsed
    assert squad_normalize("The  Cat's hat!") == "cats hat"
    assert squad_normalize("An apple a day") == "apple day"
    # articles only as whole words: "theatre" and "another" keep their letters
    assert squad_normalize("the theatre, another") == "theatre another"
    assert squad_normalize("  ") == ""


def test_exact_match_after_normalisation():
    assert squad_exact("Denver Broncos", "the Denver Broncos.") == 1
    assert squad_exact("Denver Broncos", "Denver") == 0


def test_f1_is_token_overlap():
    # prediction tokens: broncos, of, denver, team; gold: denver, broncos; 2 in common
    # precision 2/4, recall 2/2: F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert squad_f1("Denver Broncos", "Broncos of Denver team") == pytest.approx(2 / 3)
    # repeated tokens count as often as both sides have them: gold "a b b" -> b, b (a is an article)
    # prediction "b b b": common b x2, precision 2/3, recall 2/2 -> 0.8
    assert squad_f1("a b b", "b b b") == pytest.approx(0.8)
    assert squad_f1("Paris", "London") == 0.0


def test_empty_sides_differ_between_v1_and_v2():
    # v2.0: no answer against no answer is a match (1); against an answer, 0
    assert squad_f1("", "", version_2=True) == 1.0
    assert squad_f1("Paris", "the", version_2=True) == 0.0
    # v1.1: an empty side has no common token, so 0 even when both are empty
    assert squad_f1("the", "a", version_2=False) == 0.0


def test_max_over_gold_answers():
    m = squad_metrics([["Denver", "Denver Broncos"]], ["Denver Broncos"], version_2=False)
    assert m["exact_match"] == 1.0 and m["f1"] == 1.0
    # F1 takes its own max: "Denver" vs "Broncos team" -> 0; "Denver Broncos" vs it -> p 1/2, r 1/2 -> 0.5
    m = squad_metrics([["Denver", "Denver Broncos"]], ["Broncos team"], version_2=False)
    assert m["exact_match"] == 0.0 and m["f1"] == pytest.approx(0.5)


def test_v2_unanswerable_gold_is_the_empty_string():
    m = squad_metrics([[], []], ["", "Paris"], version_2=True)
    assert m["exact_match"] == 0.5 and m["f1"] == 0.5
    assert m["NoAns_total"] == 2 and m["NoAns_exact"] == 0.5 and m["HasAns_total"] == 0
    assert "HasAns_exact" not in m  # the official script leaves out a group with no questions


def test_v2_gold_answers_that_normalise_to_nothing_are_dropped():
    # the v2.0 script drops "the" and "a" as gold answers; none is left, so the question counts
    # as unanswerable and only an empty (after normalisation) prediction scores
    m = squad_metrics([["the", "a"]], ["an"], version_2=True)
    assert m["exact_match"] == 1.0 and m["f1"] == 1.0 and m["NoAns_total"] == 1
    # v1.1 keeps them: exact match on the normalised (empty) strings, but F1 0 (no tokens)
    m = squad_metrics([["the", "a"]], ["an"], version_2=False)
    assert m["exact_match"] == 1.0 and m["f1"] == 0.0
    # a kept answer beside a dropped one: "the" goes, "Paris" stays
    m = squad_metrics([["the", "Paris"]], ["paris"], version_2=True)
    assert m["HasAns_total"] == 1 and m["exact_match"] == 1.0


def test_v2_has_answer_and_no_answer_groups():
    golds = [["Paris"], ["Denver Broncos"], []]
    predictions = ["Paris", "Broncos of Denver team", "Lyon"]
    m = squad_metrics(golds, predictions, version_2=True)
    # per question: EM 1, 0, 0; F1 1, 2/3, 0
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx((1 + 2 / 3) / 3)
    assert m["HasAns_exact"] == pytest.approx(0.5) and m["HasAns_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["NoAns_exact"] == 0.0 and m["NoAns_f1"] == 0.0
    assert (m["HasAns_total"], m["NoAns_total"], m["total"]) == (2, 1, 3)
