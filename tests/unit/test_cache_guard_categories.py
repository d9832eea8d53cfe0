"""The guard rules added for the first holdout set's blind spots (benchmarks/data/cache_pairs_holdout.tsv), one
test per rule: near misses each rule must veto, and rephrasings it must still let through to the verifier.

The sentences are written for these tests (none is in the benchmark's pair files), so the rules are checked on
more than the holdout pairs that revealed them."""

from __future__ import annotations

import pytest

from runtime import cache_guard as cg


def _vetoed(q: str, c: str) -> list[cg.Veto | None]:
    return [cg.check(q, c), cg.check(c, q)]


# -- a hyphenated negating prefix stays on its word: "non-diabetic" is the opposite of "diabetic" ---------------

@pytest.mark.parametrize("q,c", [
    ("What's a healthy breakfast for a non-diabetic adult?", "What's a healthy breakfast for a diabetic adult?"),
    ("Is this glue non-toxic?", "Is this glue toxic?"),
    ("Which beers are non-alcoholic?", "Which beers are alcoholic?"),
    ("What are anti-inflammatory foods?", "What are inflammatory foods?"),
    ("Is this shampoo un-scented?", "Is this shampoo scented?"),
])
def test_hyphenated_negating_prefix_is_an_opposite(q, c):
    assert all(_vetoed(q, c)), (q, c)


@pytest.mark.parametrize("q,c", [
    ("How do I start a non-profit?", "How do I start a nonprofit?"),  # one spelling, hyphen or not
    ("How do I register a non-profit organisation?", "How can I register a nonprofit organization?"),
    ("Is a non-compete clause enforceable?", "Are non-compete clauses enforceable?"),
])
def test_hyphenated_prefix_spellings_agree(q, c):
    veto = cg.check(q, c)
    assert veto is None or veto.category not in ("which way", "negation"), veto


def test_no_one_is_one_negation_like_nobody():
    assert cg.check("Why does no one answer my emails?", "Why does nobody answer my emails?") is None


# -- ordinal and seniority modifiers: which year of study, which degree level --------------------------------

@pytest.mark.parametrize("q,c", [
    ("What should a first-year law student read?", "What should a final-year law student read?"),
    ("Tips for freshmen in college", "Tips for sophomores in college"),
    ("How much do undergrads pay in tuition at Oxford?", "How much do PhD students pay in tuition at Oxford?"),
    ("What is the final step of a merger?", "What is the first step of a merger?"),  # "final" is "last"
])
def test_year_of_study_and_ordinals_differ(q, c):
    assert all(_vetoed(q, c)), (q, c)


@pytest.mark.parametrize("q,c", [
    ("What should a first-year teacher know?", "What does a first year teacher need to know?"),
    ("What was the final score of the match?", "What was the last score of the match?"),
])
def test_same_year_or_ordinal_passes(q, c):
    veto = cg.check(q, c)
    assert veto is None or veto.category not in ("who", "which way"), veto


# -- part / whole: one item against all of them -----------------------------------------------------------------

@pytest.mark.parametrize("q,c", [
    ("How long does it take to tile one bathroom?", "How long does it take to tile the whole house?"),
    ("How much does it cost to reupholster a single chair?", "How much does it cost to reupholster every chair?"),
    ("Can I delete just one message in WhatsApp?", "Can I delete all messages in WhatsApp?"),
])
def test_one_against_all_is_a_different_quantity(q, c):
    vetoes = _vetoed(q, c)
    assert all(vetoes), (q, c)
    assert all(v.category == "how much" for v in vetoes), vetoes


def test_which_one_alone_is_not_a_quantity():
    assert cg.check("Which one is better for beginners, Spanish or Italian?",
                    "Which is better for beginners, Spanish or Italian?") is None


# -- a modifier that picks a variety of the same head noun ------------------------------------------------------

@pytest.mark.parametrize("q,c", [
    ("How long should I boil a brown egg?", "How long should I boil a quail egg?"),
    ("How do I wash a wool sweater?", "How do I wash a cashmere sweater?"),
    ("What is the life expectancy of a golden retriever?", "What is the life expectancy of a labrador retriever?"),
    ("How much sugar is in a glass of orange juice?", "How much sugar is in a glass of apple juice?"),
    ("How do I fix a flat on a road bike?", "How do I fix a flat on a mountain bike?"),
])
def test_variety_modifier_differs(q, c):
    vetoes = _vetoed(q, c)
    assert all(vetoes), (q, c)


@pytest.mark.parametrize("q,c", [
    ("How do I chop onions?", "How do I dice onions?"),  # a verb in front of the object is not a modifier
    ("What is a good laptop for students?", "What is a great laptop for students?"),  # praise, not a variety
    ("How do I clean a grey carpet?", "How do I clean a gray carpet?"),  # one word, two spellings
    ("Where do I find a chipmaker job?", "Where do I find a chip maker job?"),
    ("What caused the Syrian civil war?", "What caused the Syria civil war?"),  # a place is where.txt's to judge
    ("Who won the final match of the tournament?", "Who won the last match of the tournament?"),  # one class
])
def test_same_variety_or_no_modifier_passes(q, c):
    veto = cg.check(q, c)
    assert veto is None or "variety" not in veto.detail, veto


# -- the same alternatives, a different one chosen ("X or Y? X?" / "X or Y? Y?") ------------------------------

@pytest.mark.parametrize("q,c", [
    ("Should I drink coffee before or after breakfast? Before?", "Should I drink coffee before or after breakfast? After?"),
    ("Is it better to turn left or right at the roundabout? Left, right?", "Is it better to turn left or right at the roundabout? Right?"),
])
def test_a_follow_up_that_picks_another_alternative(q, c):
    assert all(_vetoed(q, c)), (q, c)


def test_naming_the_same_alternatives_passes():
    assert cg.check("Should I stretch before or after running?", "Should I do my stretches before or after a run?") \
        is None


def test_variety_rule_compares_only_whole_modifiers():
    # a modifier partly shared ("flat road" / "flat mountain") is left to the verifier: on STS-B train, reading
    # such spans as modifiers vetoed subject + verb phrases ("a dog jumps over" / "a dog leaping over")
    assert cg.check("A dog jumps over a fence.", "A dog leaping over a fence.") is None


# -- found under the v2 verifier on seen sets (the test half, the older 84 pairs), fixed by category ------------

@pytest.mark.parametrize("q,c", [
    ("Is the pound overvalued against the dollar?", "Is the pound undervalued against the dollar?"),
    ("How do I calculate pre-tax income?", "How do I calculate post-tax income?"),
    ("How do I upvote a post on Reddit?", "How do I downvote a post on Reddit?"),
    ("What are the symptoms of hyperthyroidism?", "What are the symptoms of hypothyroidism?"),
])
def test_opposite_prefixes(q, c):
    assert all(_vetoed(q, c)), (q, c)


@pytest.mark.parametrize("q,c", [
    ("Summarise the reign of Henry VIII", "Summarise the reign of Henry VII"),
    ("Who was Elizabeth I?", "Who was Elizabeth II?"),
    ("What happened in Rocky III", "What happened in Rocky IV"),
])
def test_roman_numerals_number_what_they_follow(q, c):
    vetoes = _vetoed(q, c)
    assert all(v is not None and v.category == "how much" for v in vetoes), vetoes


@pytest.mark.parametrize("q,c", [
    ("What were the causes of World War II?", "What were the causes of World War 2?"),  # one numeral, two spellings
    ("Should I learn Python or Java first?", "Which should I learn first, Python or Java?"),  # "I", the pronoun
    ("Steve I have seen the film twice.", "I have seen the film twice."),  # a pronoun after a name
])
def test_roman_numerals_leave_pronouns_and_equal_numbers_alone(q, c):
    veto = cg.check(q, c)
    assert veto is None or veto.category != "how much", veto


@pytest.mark.parametrize("q,c", [
    ("What's a realistic grocery budget for a couple?", "What's a realistic grocery budget for a family?"),
    ("Which phone plan suits a single person?", "Which phone plan suits a family?"),
])
def test_household_differs(q, c):
    vetoes = _vetoed(q, c)
    assert all(v is not None and v.category == "who" for v in vetoes), vetoes


def test_same_household_passes():
    assert cg.check("What's a good car for a family with kids?", "Which car is good for a family with children?") \
        is None
