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
    # (the verb swapped in an otherwise identical sentence is the substitution rule's to judge, not this one's)
    veto = cg.check("A dog jumps over a fence.", "A dog leaping over a fence.")
    assert veto is None or veto.category == "substitution", veto


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


# -- second holdout's blind spots, by category (none of these sentences is in a benchmark file) ------------------

# who: role and profession titles, multi-word ones included, and a role word made into another title
@pytest.mark.parametrize("q,c", [
    ("How many hours does a registered nurse work per week?", "How many hours does a nurse practitioner work per week?"),
    ("What does a physician assistant do all day?", "What does a medical assistant do all day?"),
    ("Average pay for a project manager in Ohio", "Average pay for a product manager in Ohio"),
    ("What exams does a dental hygienist take?", "What exams does a dental assistant take?"),
    ("Can a nurse prescribe antibiotics?", "Can a nurse anesthetist prescribe antibiotics?"),
    ("What does a teacher do in the summer break?", "What does a teacher assistant do in the summer break?"),
    ("Is it hard to become a truck driver?", "Is it hard to become a flight attendant?"),
])
def test_role_titles_differ(q, c):
    assert all(v is not None and v.category == "who" for v in _vetoed(q, c)), (q, c, _vetoed(q, c))


@pytest.mark.parametrize("q,c", [
    ("How many hours does a registered nurse work per week?", "How many hours a week does a nurse work?"),
    ("What does a nurse practitioner earn?", "How much does a nurse practitioner make?"),
    ("What does a teacher's aide do?", "What are the duties of a teaching assistant?"),
])
def test_role_title_rephrasings_pass(q, c):
    veto = cg.check(q, c)
    assert veto is None or veto.category != "who", veto


# when: seasons (the verb "fall" only in season phrases) and months
@pytest.mark.parametrize("q,c", [
    ("When should I plant tulip bulbs in the fall?", "When should I plant tulip bulbs in the spring?"),
    ("Is it a good idea to paint my deck this fall?", "Is it a good idea to paint my deck this winter?"),
    ("What to pack for Iceland in winter", "What to pack for Iceland in summer"),
    ("Best crops to grow during the rainy season", "Best crops to grow during the dry season"),
    ("Should I fertilise roses in autumn?", "Should I fertilise roses in March?"),
])
def test_seasons_and_months_differ(q, c):
    assert all(v is not None and v.category == "when" for v in _vetoed(q, c)), (q, c, _vetoed(q, c))


@pytest.mark.parametrize("q,c", [
    ("When should I plant tulip bulbs in the fall?", "When is the right time in autumn to plant tulip bulbs?"),
    ("Why do stock prices fall after earnings?", "Why do share prices drop after an earnings report?"),
    ("What should I do if my toddler has a fall?", "My toddler had a fall, what should I do?"),
])
def test_fall_as_verb_or_same_season_passes(q, c):
    veto = cg.check(q, c)
    assert veto is None or veto.category != "when", veto


# which way: the same parties around the same verb or comparison, in the opposite order, at any mention
@pytest.mark.parametrize("q,c", [
    ("Did Google acquire YouTube?", "Did YouTube acquire Google?"),
    ("Does Amazon own Whole Foods?", "Does Whole Foods own Amazon?"),
    ("Is Mercury closer to the sun than Venus?", "Is Venus closer to the sun than Mercury?"),
    ("Mozart or Beethoven: was Mozart born before Beethoven?", "Mozart or Beethoven: was Beethoven born before Mozart?"),
    ("Did Sparta defeat Athens in the war?", "Did Athens defeat Sparta in the war?"),
])
def test_party_order_reversed(q, c):
    assert all(v is not None and v.category == "which way" for v in _vetoed(q, c)), (q, c, _vetoed(q, c))


@pytest.mark.parametrize("q,c", [
    ("Did Google acquire YouTube?", "Was YouTube acquired by Google?"),  # passive: no shared word between them
    ("Compare Rust and Go for web servers", "Compare Go and Rust for web servers"),  # "and" relates nothing
    ("Is Mercury hotter than Venus?", "Is Venus colder than Mercury?"),
])
def test_party_order_rephrasings_pass(q, c):
    # the rule itself: the older first-position check may still veto a swap of two key terms on its own
    assert cg._party_order(cg._analyse(q), cg._analyse(c)) is None
    assert cg._party_order(cg._analyse(c), cg._analyse(q)) is None


# how much: sizes
@pytest.mark.parametrize("q,c", [
    ("How long does it take to bake a small pizza?", "How long does it take to bake a large pizza?"),
    ("What does a tiny house cost to build?", "What does a full-size house cost to build?"),
    ("How many people fit at a medium-sized table?", "How many people fit at an extra large table?"),
    ("How big is a queen size duvet?", "How big is a king size duvet?"),
])
def test_sizes_differ(q, c):
    assert all(v is not None for v in _vetoed(q, c)), (q, c)


@pytest.mark.parametrize("q,c", [
    ("How long does it take to bake a small pizza?", "What's the baking time for a little pizza?"),
    ("What is big-O notation?", "Explain big O notation"),
])
def test_size_rephrasings_pass(q, c):
    veto = cg.check(q, c)
    assert veto is None or veto.category != "how much", veto


# object: materials and fabrics, with or without a determiner in front
@pytest.mark.parametrize("q,c", [
    ("Can I tumble dry wool sweaters?", "Can I tumble dry cotton sweaters?"),
    ("How do I remove a stain from linen trousers?", "How do I remove a stain from polyester trousers?"),
    ("Is it safe to put glass containers in the oven?", "Is it safe to put plastic containers in the oven?"),
    ("How to polish wooden floors", "How to polish marble floors"),
    ("Cleaning suede boots after rain", "Cleaning leather boots after rain"),
])
def test_materials_differ(q, c):
    assert all(v is not None and v.category == "object" for v in _vetoed(q, c)), (q, c, _vetoed(q, c))


@pytest.mark.parametrize("q,c", [
    ("Can I tumble dry wool sweaters?", "Is it okay to put woollen sweaters in the dryer?"),
    ("How do I season a cast-iron skillet?", "What's the way to season a cast iron skillet?"),
])
def test_material_rephrasings_pass(q, c):
    veto = cg.check(q, c)
    assert veto is None or veto.category != "object", veto


# substitution: otherwise identical prompts with one content word (or two) replaced are different questions,
# whatever the words are (no category lists every pair of things)
@pytest.mark.parametrize("q,c", [
    ("Can I substitute oat milk for cream in a quiche?", "Can I substitute soy milk for cream in a quiche?"),
    ("What temperature should I roast a whole duck at?", "What temperature should I roast a whole goose at?"),
    ("What should a new hire do during the first month?", "What should a new hire do during the first quarter?"),
    ("Which vaccines does a puppy need before boarding?", "Which vaccines does a kitten need before boarding?"),
])
def test_one_content_word_replaced_is_vetoed(q, c):
    assert all(v is not None for v in _vetoed(q, c)), (q, c)
    assert cg._one_slot_changed(cg._analyse(q), cg._analyse(c)) is not None


@pytest.mark.parametrize("q,c", [
    ("How do I change the colour of a div?", "How do I change the color of a div?"),      # a spelling
    ("How do I organise my email inbox?", "How do I organize my email inbox?"),
    ("How does a kid learn to play chess?", "How do kids learn to play chess?"),          # an inflection
    ("How do I reverse a list in Python?", "How can I reverse a list in Python?"),       # function words only
    ("Please explain how DNS caching works", "Explain how DNS caching works"),             # framing
])
def test_spelling_inflection_and_function_words_are_not_a_substitution(q, c):
    assert cg._one_slot_changed(cg._analyse(q), cg._analyse(c)) is None
    assert cg._one_slot_changed(cg._analyse(c), cg._analyse(q)) is None


# which way: the same words in the same frame with two of them trading places; coordinations and one moved
# block are the same question
@pytest.mark.parametrize("q,c", [
    ("Can I swap butter for margarine in shortbread?", "Can I swap margarine for butter in shortbread?"),
    ("Is a visa from Chile needed to visit Peru?", "Is a visa from Peru needed to visit Chile?"),
    ("Why does my cat chase my dog at night?", "Why does my dog chase my cat at night?"),
])
def test_two_words_trading_places_is_vetoed(q, c):
    assert all(v is not None and v.category == "which way" for v in _vetoed(q, c)), (q, c, _vetoed(q, c))


@pytest.mark.parametrize("q,c", [
    ("Should I learn Rust or Go first?", "Should I learn Go or Rust first?"),
    ("What wine goes with salmon and asparagus?", "What wine goes with asparagus and salmon?"),
    ("What is the speed of sound at high altitude?", "At high altitude, what is the speed of sound?"),
])
def test_coordinations_and_a_moved_block_are_not_a_swap(q, c):
    assert cg._same_words_reordered(cg._analyse(q), cg._analyse(c)) is None
    assert cg._same_words_reordered(cg._analyse(c), cg._analyse(q)) is None


# negation: as many negations, in another clause
@pytest.mark.parametrize("q,c", [
    ("Why does my laptop charge but not turn on?", "Why does my laptop not charge but turn on?"),
    ("My tomato plant flowers although it doesn't fruit; why?", "My tomato plant doesn't flower although it fruits; why?"),
])
def test_a_negation_moved_to_another_clause_is_vetoed(q, c):
    assert all(v is not None and v.category == "negation" for v in _vetoed(q, c)), (q, c, _vetoed(q, c))


def test_clauses_in_another_order_keep_their_negations():
    q = "My phone won't connect to wifi, but bluetooth works fine"
    c = "Bluetooth works fine but my phone won't connect to wifi"
    assert cg._negation_moved(cg._analyse(q), cg._analyse(c)) is None


# when: the same clock time in the other half of the day
@pytest.mark.parametrize("q,c", [
    ("Should I take my thyroid pill at 7 am or later?", "Should I take my thyroid pill at 7 pm or later?"),
    ("Is a 10:30 p.m. bedtime fine for a teenager?", "Is a 10:30 a.m. bedtime fine for a teenager?"),
])
def test_am_and_pm_differ(q, c):
    assert all(v is not None and v.category == "when" for v in _vetoed(q, c)), (q, c, _vetoed(q, c))


def test_am_the_verb_is_not_a_clock():
    assert cg._clock("Am I too old at 45 to learn piano?") == frozenset()
    assert cg._clock("I am 3 weeks pregnant") == frozenset()


# modality: a question opened by "Could" / "Might" asks about possibility, not what will happen
def test_could_opening_a_question_is_modality():
    v = _vetoed("Could my landlord raise the rent twice a year?", "Will my landlord raise the rent twice a year?")
    assert all(x is not None and x.category == "modality" for x in v), v
    assert cg.check("Could I get a refund on a sale item?", "Can I get a refund on a sale item?") is None
    assert cg.check("Could you summarise this contract?", "Can you summarise this contract?") is None


# negation: a hyphenated non- / anti- modifier on one side only
@pytest.mark.parametrize("q,c", [
    ("Can I use metal utensils on a non-stick pan?", "Can I use metal utensils on a pan?"),
    ("Is an anti-glare coating worth it on glasses?", "Is a coating worth it on glasses?"),
])
def test_a_negated_modifier_on_one_side_only_is_vetoed(q, c):
    assert all(v is not None and v.category == "negation" for v in _vetoed(q, c)), (q, c, _vetoed(q, c))
