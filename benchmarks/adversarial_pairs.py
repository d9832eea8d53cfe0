"""Hand-written question pairs for the semantic cache benchmark.

ADVERSARIAL: pairs whose wording is close (high cosine under MiniLM) but whose right answers differ. Not one of
them may ever be served from the other's cache entry. Categories: negation, swapped entities/roles, changed
numbers, different units, on/off-type antonyms, different programming languages / libraries, different
natural languages, different names, quoted strings.

PARAPHRASES: pairs a user would accept the same answer for; the cache should hit them (recall on questions,
which STS-B's captions and headlines do not measure).

Written for this project; not taken from a data set. Each entry: (query, cached prompt, category).

``load_pairs`` reads the larger set in benchmarks/data/cache_pairs.tsv: near misses by category (who, when,
where, which way, how much, modality, object, negation) and paraphrases written as prompts to an assistant, each
in a fixed tune or test half; benchmarks/data/cache_pairs_holdout.tsv, a fresh set written once the guard
and verifier were final (its misses were then read and fixed by category, so it is seen now); and
cache_pairs_holdout2.tsv, written before those fixes and never used to tune anything.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

PAIRS_FILE = Path(__file__).resolve().parent / "data" / "cache_pairs.tsv"
HOLDOUT_FILE = Path(__file__).resolve().parent / "data" / "cache_pairs_holdout.tsv"
HOLDOUT2_FILE = Path(__file__).resolve().parent / "data" / "cache_pairs_holdout2.tsv"
_FILES = {"holdout": HOLDOUT_FILE, "holdout2": HOLDOUT2_FILE}


class Pair(NamedTuple):
    query: str
    cached: str
    category: str  # "paraphrase" for the same question, else the kind of near miss
    split: str  # "tune" | "test" | "holdout" | "holdout2"

    @property
    def same(self) -> bool:
        return self.category == "paraphrase"


def load_pairs(split: str | None = None) -> list[Pair]:
    """The pairs of one half ("tune" or "test"), a fresh set ("holdout", "holdout2"), or (None) tune and test."""
    if split not in (None, "tune", "test", "holdout", "holdout2"):
        raise ValueError(f"split must be 'tune', 'test', 'holdout' or 'holdout2', not {split!r}")
    with open(_FILES.get(split or "", PAIRS_FILE), newline="", encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    rows = [Pair(r["query"], r["cached"], r["category"], r["split"])
            for r in csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return [r for r in rows if split is None or r.split == split]


ADVERSARIAL: list[tuple[str, str, str]] = [
    # negation
    ("Is it safe to eat raw chicken?", "Is it not safe to eat raw chicken?", "negation"),
    ("Why does my Python script work?", "Why doesn't my Python script work?", "negation"),
    ("Which foods contain gluten?", "Which foods contain no gluten?", "negation"),
    ("Can I take ibuprofen with alcohol?", "Can I not take ibuprofen with alcohol?", "negation"),
    ("List countries that use the euro", "List countries that do not use the euro", "negation"),
    ("How to write a loop that always terminates", "How to write a loop that never terminates", "negation"),
    ("Is it legal to record a phone call without consent?", "Is it legal to record a phone call with consent?",
     "negation"),
    ("Why is the sky blue?", "Why isn't the sky blue?", "negation"),
    ("What should I do if my dog eats chocolate?", "What should I do if my dog never eats chocolate?",
     "negation"),
    ("Is a tomato a fruit?", "Is a tomato not a fruit?", "negation"),
    # swapped entities / roles
    ("Is Paris bigger than London?", "Is London bigger than Paris?", "swap"),
    ("How do I convert a list to a string in Python?", "How do I convert a string to a list in Python?", "swap"),
    ("Convert Celsius to Fahrenheit", "Convert Fahrenheit to Celsius", "swap"),
    ("How far is it from Berlin to Munich by train?", "How far is it from Munich to Berlin by train?", "swap"),
    ("Translate 'good morning' from English to Spanish", "Translate 'good morning' from Spanish to English",
     "swap"),
    ("Did Germany beat Brazil in 2014?", "Did Brazil beat Germany in 2014?", "swap"),
    ("How to migrate from MySQL to PostgreSQL", "How to migrate from PostgreSQL to MySQL", "swap"),
    ("Is a whale heavier than an elephant?", "Is an elephant heavier than a whale?", "swap"),
    ("How do I cast an int to a float in C?", "How do I cast a float to an int in C?", "swap"),
    ("Who was older, Einstein or Newton when they died? Was Einstein older than Newton?",
     "Who was older, Einstein or Newton when they died? Was Newton older than Einstein?", "swap"),
    # changed numbers
    ("What is 15% of 80?", "What is 15% of 90?", "number"),
    ("What is the capital gains tax rate for 2023?", "What is the capital gains tax rate for 2024?", "number"),
    ("How many calories are in 2 eggs?", "How many calories are in 3 eggs?", "number"),
    ("What is the square root of 144?", "What is the square root of 169?", "number"),
    ("Write a function that returns the first 10 prime numbers",
     "Write a function that returns the first 100 prime numbers", "number"),
    ("What happened in 1969?", "What happened in 1968?", "number"),
    ("How long does it take to boil two eggs?", "How long does it take to boil three eggs?", "number"),
    ("Explain HTTP status code 404", "Explain HTTP status code 403", "number"),
    ("What does Python 2 print do?", "What does Python 3 print do?", "number"),
    ("Who won the World Cup in 2010?", "Who won the World Cup in 2018?", "number"),
    ("Convert 5 miles to kilometers", "Convert 50 miles to kilometers", "number"),
    ("What is the 3rd planet from the sun?", "What is the 4th planet from the sun?", "number"),
    # different units
    ("How many grams are in a cup of flour?", "How many ounces are in a cup of flour?", "unit"),
    ("What is 100 km/h in mph?", "What is 100 km/h in knots?", "unit"),
    ("Convert 30 degrees Celsius to Kelvin", "Convert 30 degrees Celsius to Fahrenheit", "unit"),
    ("How many liters are in a gallon?", "How many cups are in a gallon?", "unit"),
    ("How many seconds are in a day?", "How many minutes are in a day?", "unit"),
    ("How many bytes are in a megabyte?", "How many bits are in a megabyte?", "unit"),
    ("What is the height of Everest in meters?", "What is the height of Everest in feet?", "unit"),
    ("Price of 1 kg of coffee in euros", "Price of 1 kg of coffee in dollars", "unit"),
    # on/off-type antonyms
    ("How do I turn on Bluetooth on my laptop?", "How do I turn off Bluetooth on my laptop?", "antonym"),
    ("How to enable two-factor authentication on Gmail", "How to disable two-factor authentication on Gmail",
     "antonym"),
    ("How do I increase the font size in VS Code?", "How do I decrease the font size in VS Code?", "antonym"),
    ("Sort a list in ascending order", "Sort a list in descending order", "antonym"),
    ("How to encrypt a file with GPG", "How to decrypt a file with GPG", "antonym"),
    ("What are the advantages of remote work?", "What are the disadvantages of remote work?", "antonym"),
    ("How to upload a file to S3 with boto3", "How to download a file from S3 with boto3", "antonym"),
    ("How do I install Docker on Ubuntu?", "How do I uninstall Docker on Ubuntu?", "antonym"),
    ("What is the maximum value of an int32?", "What is the minimum value of an int32?", "antonym"),
    ("How do I convert a string to uppercase?", "How do I convert a string to lowercase?", "antonym"),
    ("What foods raise blood pressure?", "What foods lower blood pressure?", "antonym"),
    ("How do I lock my screen on a Mac?", "How do I unlock my screen on a Mac?", "antonym"),
    ("Show hidden files in Finder", "Hide hidden files in Finder", "antonym"),
    ("How to compress a folder with tar", "How to decompress a folder with tar", "antonym"),
    ("What are the pros of nuclear energy?", "What are the cons of nuclear energy?", "antonym"),
    # different programming languages / libraries
    ("How do I read a CSV file in Python?", "How do I read a CSV file in R?", "language"),
    ("How to sort an array in JavaScript", "How to sort an array in Java", "language"),
    ("How do I reverse a string in Rust?", "How do I reverse a string in Go?", "language"),
    ("How to make an HTTP request in Node.js", "How to make an HTTP request in Python", "language"),
    ("How do I drop a column in pandas?", "How do I drop a column in polars?", "language"),
    ("Create a table in PostgreSQL", "Create a table in MySQL", "language"),
    ("How to define a class in TypeScript", "How to define a class in Kotlin", "language"),
    ("How to handle exceptions in C++", "How to handle exceptions in C#", "language"),
    ("Train a linear regression with PyTorch", "Train a linear regression with TensorFlow", "language"),
    ("How do I create a virtual environment with conda?", "How do I create a virtual environment with venv?",
     "language"),
    ("How to center a div with flexbox", "How to center a div with grid", "language"),
    ("What is a closure in JavaScript?", "What is a closure in Swift?", "language"),
    # natural languages
    ("Translate 'thank you' into French", "Translate 'thank you' into German", "natural-language"),
    ("How do you say hello in Japanese?", "How do you say hello in Korean?", "natural-language"),
    ("Write a short poem in Spanish about the sea", "Write a short poem in Italian about the sea",
     "natural-language"),
    # different names / places / things
    ("Who is the president of France?", "Who is the president of Germany?", "entity"),
    ("What is the capital of Australia?", "What is the capital of Austria?", "entity"),
    ("When was Abraham Lincoln born?", "When was Abraham Lincoln assassinated?", "predicate"),
    ("Summarize the plot of Hamlet", "Summarize the plot of Macbeth", "entity"),
    ("What is the population of Tokyo?", "What is the population of Osaka?", "entity"),
    ("Who wrote Pride and Prejudice?", "Who wrote Sense and Sensibility?", "entity"),
    ("What are the side effects of aspirin?", "What are the side effects of ibuprofen?", "entity"),
    ("How tall is Mount Kilimanjaro?", "How tall is Mount Kenya?", "entity"),
    ("What is the boiling point of water?", "What is the boiling point of ethanol?", "entity"),
    ("Explain the causes of World War I", "Explain the causes of World War II", "entity"),
    ("What does the iPhone 15 cost?", "What does the iPhone 14 cost?", "number"),
    # quoted strings
    ("What does the error 'connection refused' mean?", "What does the error 'connection reset' mean?", "quoted"),
    ("Find all lines containing \"ERROR\" in a log file", "Find all lines containing \"WARN\" in a log file",
     "quoted"),
    ("What does the word 'ephemeral' mean?", "What does the word 'ethereal' mean?", "quoted"),
]

PARAPHRASES: list[tuple[str, str, str]] = [
    ("How do I reverse a list in Python?", "How can I reverse a list in Python?", "paraphrase"),
    ("What is the capital of France?", "What's the capital of France?", "paraphrase"),
    ("How do I sort a dictionary by value in Python?", "How can I sort a Python dictionary by its values?",
     "paraphrase"),
    ("Explain how photosynthesis works", "Can you explain how photosynthesis works?", "paraphrase"),
    ("What is the boiling point of water at sea level?", "At sea level, what is the boiling point of water?",
     "paraphrase"),
    ("How do I undo the last git commit?", "How can I undo my last git commit?", "paraphrase"),
    ("What causes earthquakes?", "What is the cause of earthquakes?", "paraphrase"),
    ("How do I remove duplicates from a list in Python?", "How to remove duplicate items from a Python list?",
     "paraphrase"),
    ("Who wrote Romeo and Juliet?", "Who is the author of Romeo and Juliet?", "paraphrase"),
    ("What is a black hole?", "What exactly is a black hole?", "paraphrase"),
    ("How many bones are in the human body?", "How many bones does the human body have?", "paraphrase"),
    ("What is the difference between TCP and UDP?", "What's the difference between TCP and UDP?",
     "paraphrase"),
    ("How do I center a div in CSS?", "How can I center a div using CSS?", "paraphrase"),
    ("What is machine learning?", "Can you tell me what machine learning is?", "paraphrase"),
    ("How do I make a cup of green tea?", "How should I make a cup of green tea?", "paraphrase"),
    ("Why do cats purr?", "Why is it that cats purr?", "paraphrase"),
    ("What is the speed of light?", "How fast is the speed of light?", "paraphrase"),
    ("How do I merge two dictionaries in Python?", "How can I merge two Python dictionaries?", "paraphrase"),
    ("What are the symptoms of the flu?", "What are common symptoms of the flu?", "paraphrase"),
    ("How do I check my Python version?", "How can I check which Python version I have?", "paraphrase"),
    ("What is the largest ocean on Earth?", "Which ocean is the largest on Earth?", "paraphrase"),
    ("How do I create a new branch in git?", "How to create a new git branch?", "paraphrase"),
    ("What does DNA stand for?", "What is DNA short for?", "paraphrase"),
    ("How do I read a file line by line in Python?", "How to read a file line by line in Python?",
     "paraphrase"),
    ("Explain recursion with an example", "Explain recursion using an example", "paraphrase"),
    ("What is the tallest mountain in the world?", "Which mountain is the tallest in the world?",
     "paraphrase"),
    ("How does a refrigerator work?", "How do refrigerators work?", "paraphrase"),
    ("What is the meaning of life?", "What's the meaning of life?", "paraphrase"),
    ("How do I list files in a directory in Linux?", "How can I list the files in a directory on Linux?",
     "paraphrase"),
    ("Give me a recipe for pancakes", "Give me a pancake recipe", "paraphrase"),
    ("How do I kill a process on Linux?", "How to kill a process in Linux?", "paraphrase"),
    ("What is the Pythagorean theorem?", "Explain the Pythagorean theorem", "paraphrase"),
    ("How do vaccines work?", "How does a vaccine work?", "paraphrase"),
    ("What is an API?", "What's an API?", "paraphrase"),
    ("How do I convert a string to an int in Python?", "How can I convert a string to an integer in Python?",
     "paraphrase"),
    ("Why is the ocean salty?", "Why is ocean water salty?", "paraphrase"),
    ("How do I install numpy?", "How can I install numpy?", "paraphrase"),
    ("Who painted the Mona Lisa?", "Who was the painter of the Mona Lisa?", "paraphrase"),
    ("What is inflation in economics?", "In economics, what is inflation?", "paraphrase"),
    ("How do I exit vim?", "How can I exit vim?", "paraphrase"),
]
