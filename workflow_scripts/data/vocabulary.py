"""The closed vocabulary of the built-in text sets: the word lists their grammars draw from.

The generator (``workflow_scripts.data.builtin``) writes sentences from these lists only, so a
word-level tokenizer over :func:`vocabulary` (``workflow_scripts.models.builtin_tokenizer``)
covers the sets exactly.
"""

from __future__ import annotations

# sentence pairs: people acting on objects in places
PEOPLE = [
    "teacher",
    "doctor",
    "farmer",
    "student",
    "painter",
    "baker",
    "pilot",
    "nurse",
    "singer",
    "lawyer",
    "driver",
    "writer",
]
ADJECTIVES = ["tall", "young", "old", "quiet", "happy", "tired", "clever", "busy"]
OBJECTS = ["book", "ball", "letter", "cake", "box", "map", "lamp", "chair", "kite", "basket"]
PLACES = ["park", "kitchen", "garden", "library", "station", "market", "office", "school"]
# (past tense, base form) of transitive verbs
VERBS = [
    ("carried", "carry"),
    ("found", "find"),
    ("painted", "paint"),
    ("moved", "move"),
    ("bought", "buy"),
    ("opened", "open"),
    ("cleaned", "clean"),
    ("dropped", "drop"),
]
TIMES = ["yesterday", "today", "early", "late"]
REASONS = ["it was raining", "it was heavy", "the day was long", "a friend asked"]

# corpus grammar: (singular, plural) nouns and (singular, plural) present-tense verbs
ANIMALS = [
    ("dog", "dogs"),
    ("cat", "cats"),
    ("bird", "birds"),
    ("horse", "horses"),
    ("fox", "foxes"),
    ("rabbit", "rabbits"),
    ("mouse", "mice"),
    ("sheep", "sheep"),
]
CORPUS_VERBS = [
    ("chases", "chase"),
    ("sees", "see"),
    ("follows", "follow"),
    ("likes", "like"),
    ("watches", "watch"),
    ("finds", "find"),
]
INTRANSITIVE = [("runs", "run"), ("sleeps", "sleep"), ("jumps", "jump"), ("waits", "wait")]
CORPUS_ADJECTIVES = ["small", "big", "brown", "white", "fast", "slow", "wild", "gentle"]
ADVERBS = ["quickly", "slowly", "often", "never", "always", "quietly"]

# the words the templates of both sets write themselves, and punctuation
FUNCTION_WORDS = [
    "the",
    "a",
    "in",
    "did",
    "not",
    "nobody",
    "someone",
    "person",
    "was",
    "is",
    "also",
    "because",
    "somewhere",
    "something",
    "that",
    "and",
    "but",
    "then",
    ".",
    ",",
]


def vocabulary() -> list[str]:
    """Every word and punctuation mark that the built-in text sets can produce, sorted."""
    words = set(PEOPLE + ADJECTIVES + OBJECTS + PLACES + TIMES + CORPUS_ADJECTIVES + ADVERBS)
    words |= {w for pair in VERBS + ANIMALS + CORPUS_VERBS + INTRANSITIVE for w in pair}
    words |= {w for phrase in REASONS for w in phrase.split()}
    words |= set(FUNCTION_WORDS)
    return sorted(words)
