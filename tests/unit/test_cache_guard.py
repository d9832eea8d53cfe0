"""runtime.cache_guard: the near-miss veto by category, its vocabulary files, and the frozen baseline. Pure."""

from __future__ import annotations

from importlib import resources

import pytest

from runtime import cache_guard as cg

pytestmark = pytest.mark.pure


# each category: near misses it must veto (both ways round) ...
@pytest.mark.parametrize("category,q,c", [
    # who: age groups, pregnancy, species, roles, organisation size, gender, family, professions
    ("who", "What is the ibuprofen dose for children?", "What is the ibuprofen dose for adults?"),
    ("who", "What is the ibuprofen dose for toddlers?", "What is the ibuprofen dose?"),
    ("who", "How much caffeine is safe when pregnant?", "How much caffeine is safe?"),
    ("who", "Is chocolate toxic to dogs?", "Is chocolate toxic to cats?"),
    ("who", "What are the landlord's obligations for repairs?", "What are the tenant's obligations for repairs?"),
    ("who", "Which accounting software suits a startup?", "Which accounting software suits an enterprise?"),
    ("who", "What are heart attack symptoms in men?", "What are heart attack symptoms in women?"),
    ("who", "How do I support my husband through grief?", "How do I support my daughter through grief?"),
    ("who", "What does a nurse earn?", "What does a pharmacist earn?"),
    # when: years, versions written as words, relative days and periods, weekdays, months, eras
    ("how much", "Who won the World Cup in 2014?", "Who won the World Cup in 2018?"),
    ("when", "How do I print in python2?", "How do I print in python3?"),
    ("when", "Which ports does ipv4 use?", "Which ports does ipv6 use?"),
    ("when", "What did the council decide yesterday?", "What did the council decide last week?"),
    ("when", "Is the library open on Sundays?", "Is the library open on Mondays?"),
    ("when", "What is the weather like in Rome in March?", "What is the weather like in Rome in July?"),
    ("when", "How did people travel in medieval times?", "How did people travel?"),
    # where: countries, cities, regions; a place on one side only
    ("where", "What is the minimum wage in Germany?", "What is the minimum wage in France?"),
    ("where", "What is the minimum wage in Germany?", "What is the minimum wage?"),
    ("where", "What is the rent in Manhattan?", "What is the rent in Brooklyn?"),
    ("where", "Best restaurants in Lyon", "Best restaurants in Munich"),
    # which way: opposite actions, to/from a shared word, order across a relation word, swapped key terms
    ("which way", "How do I enable dark mode?", "How do I disable dark mode?"),
    ("which way", "Should I buy bonds when rates rise?", "Should I sell bonds when rates rise?"),
    ("which way", "How long are flights to Tokyo?", "How long are flights from Tokyo?"),
    ("which way", "Convert miles to kilometres", "Convert kilometres to miles"),
    ("which way", "What should I eat before a run?", "What should I eat after a run?"),
    ("which way", "Did Oracle buy Sun?", "Did Sun buy Oracle?"),
    # how much: numbers, units, currencies, comparators, superlatives
    ("how much", "What is 20% of 150?", "What is 25% of 150?"),
    ("how much", "How far is the moon in miles?", "How far is the moon in kilometres?"),
    ("how much", "What is the price in euros?", "What is the price in dollars?"),
    ("how much", "Which planet is the largest?", "Which planet is the smallest?"),
    ("how much", "What is the tallest building?", "What is a building?"),
    ("how much", "Can I carry more than 50 kg?", "Can I carry less than 50 kg?"),
    # modality: can / should / must / legal / safe
    ("modality", "Can I take aspirin with coffee?", "Should I take aspirin with coffee?"),
    ("modality", "Is it legal to fish here?", "Is it safe to fish here?"),
    ("modality", "Do I have to file a tax return?", "Should I file a tax return?"),
    # object: languages, libraries, tools, products, drugs, foods
    ("object", "How do I parse JSON in Ruby?", "How do I parse JSON in Kotlin?"),
    ("object", "How do I read a CSV file?", "How do I read a CSV file in Rust?"),
    ("object", "Can I take paracetamol for a headache?", "Can I take naproxen for a headache?"),
    ("object", "How long should I grill salmon?", "How long should I grill tofu?"),
    ("object", "How do I reset my iPhone?", "How do I reset my Kindle?"),
    # negation, quoted strings, names, layout
    ("negation", "Which plants need shade?", "Which plants don't need shade?"),
    ("negation", "Is this snack gluten-free?", "Does this snack contain gluten?"),
    ("quoted", "What does the error 'permission denied' mean?", "What does the error 'file missing' mean?"),
    ("quoted", "Count the capitals in 'HeLLo'", "Count the capitals in 'hello'"),
    ("names", "Summarise the plot of Hamlet", "Summarise the plot of Macbeth"),
    ("layout", "fix this:\nx = 1\n  y = 2", "fix this:\nx = 1\ny = 2"),
])
def test_guard_vetoes_each_category(category, q, c):
    for a, b in ((q, c), (c, q)):
        veto = cg.check(a, b)
        assert veto is not None, (a, b)
        assert veto.category == category, veto
        assert cg.guard(a, b) == str(veto) and str(veto).startswith(category + ": ")


# ... and the same-question rephrasings it must let through to the verifier
@pytest.mark.parametrize("q,c", [
    ("How do I reverse a list in Python?", "How can I reverse a list in Python?"),  # "how can": method
    ("Can you explain how vaccines work?", "How do vaccines work?"),  # "can you": a request
    ("What's the best way to cook rice?", "How do I cook rice?"),  # "best way": method
    ("How do I reverse a string in Python?", "What's the easiest way to reverse a string in Python?"),
    ("What is the population of Glasgow, Scotland?", "What is the population of Glasgow?"),  # city in country
    ("How do I convert a list to a set in Python?", "How can I turn a Python list into a set?"),
    ("Why don't cats like water?", "Why do cats not like water?"),  # one negation each
    ("What is the meaning of 'ubiquitous'?", "What does ubiquitous mean?"),  # quoting adds nothing
    ("How do I stop my dog from pulling on the leash?", "How can I train my dog to stop pulling on the leash?"),
    ("Is it safe to eat raw eggs?", "Are raw eggs safe to eat?"),
    ("What is the tallest mountain in the world?", "Which mountain is the tallest on Earth?"),
    ("How do I install Node.js on Ubuntu?", "How do I install nodejs on Ubuntu?"),  # one spelling of a tool
    ("Bradley Cooper in talks to play Lance Armstrong", "Bradley Cooper in talks about a Lance Armstrong film"),
])
def test_guard_passes_rephrasings(q, c):
    assert cg.check(q, c) is None and cg.check(c, q) is None


def test_identical_prompts_always_pass():
    assert cg.guard("Is it legal?", "Is it legal?") is None
    assert cg.guard("  same text\r\n", "same text") is None


def test_signals_count_what_the_guard_tolerates():
    s = cg.signals("Bradley Cooper and JJ Abrams in talks", "Bradley Cooper in talks")
    assert s["names_one_sided"] >= 1
    assert cg.signals("a b", "a b")["names_one_sided"] == 0
    assert set(s) == {"negation_diff", "numbers_diff", "names_one_sided", "category_one_sided", "places_diff",
                      "direction", "quoted_diff"}


def test_vocabulary_ships_in_the_package_and_covers_every_category():
    files = {p.name for p in (resources.files("runtime") / "data" / "guard").iterdir()}
    assert {"who.txt", "when.txt", "where.txt", "which_way.txt", "how_much.txt", "modality.txt", "object.txt",
            "negation.txt", "names.txt", "rewrites.txt", "baseline.json"} <= files
    summary = cg.vocabulary_summary()
    for category in ("who", "when", "where", "which way", "how much", "modality", "object"):
        assert sum(summary[category].values()) > 0, category
    assert {"age groups", "species", "people", "organisation size"} <= set(summary["who"])
    assert summary["where"]["places"] > 200


@pytest.mark.parametrize("q,c,vetoed", [
    # the baseline is frozen: these are its known blind spots (the category guard vetoes them) ...
    ("What is the ibuprofen dose for children?", "What is the ibuprofen dose for adults?", False),
    ("Can I take ibuprofen with alcohol?", "Should I take ibuprofen with alcohol?", False),
    # ... and its known false vetoes (one-sided capitalised words, quotes the other side has unquoted)
    ("A dog is jumping in the air.", "A black dog jumps in the air.", True),
    ("Thai protesters begin Bangkok shutdown", "Thai protesters launch Bangkok 'shutdown'", True),
    ("Is it safe to eat raw chicken?", "Is it not safe to eat raw chicken?", True),
])
def test_baseline_guard_is_todays_guard(q, c, vetoed):
    assert (cg.baseline_guard(q, c) is not None) is vetoed
