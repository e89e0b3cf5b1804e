"""The mini world: a small closed set of facts that the course's models learn, hear and speak.

Forty people, each with four attributes (home town, job, pet, favourite colour). Every fact is rendered as
*statements* (several templates) and as *question/answer pairs*. One question template per attribute is
held out of all training text, so a model's knowledge can be measured on phrasings it never saw: that is
how later notebooks show catastrophic forgetting and its cure.

Everything is a pure function of a seed: :func:`build_world` returns the same facts and texts every time.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["ATTRIBUTES", "Fact", "TextExample", "World", "build_world"]

FIRST_NAMES = (
    "Mira", "Tobin", "Lena", "Oskar", "Nadia", "Felix", "Ruth", "Jonah", "Clara", "Marcus",
    "Ida", "Victor", "Hana", "Leon", "Greta", "Simon", "Alma", "Bruno", "Elsa", "Hugo",
    "Vera", "Anton", "Nora", "Emil", "Lotte", "Pavel", "Sofia", "Rafael", "Inga", "Dario",
)
LAST_NAMES = (
    "Castell", "Brook", "Harlow", "Finch", "Marsh", "Dale", "Rowan", "Holt", "Wren", "Carver",
    "Ashby", "Lark", "Fenwick", "Moss", "Tully", "Quill",
)
VALUES = {
    "town": ("Brackenford", "Dunmere", "Ellsworth", "Harrowgate", "Kelby", "Lindon", "Marlow", "Pellham"),
    "job": ("baker", "teacher", "pilot", "farmer", "doctor", "painter", "sailor", "carpenter"),
    "pet": ("cat", "dog", "parrot", "rabbit", "tortoise", "goldfish"),
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "silver", "white"),
}
ATTRIBUTES = tuple(VALUES)

# Statement templates: all of them are training text.
STATEMENTS = {
    "town": ("{name} lives in {value}.", "{name} has a house in {value}.", "The home of {name} is in {value}."),
    "job": ("{name} works as a {value}.", "{name} is a {value} by trade.", "By day, {name} is a {value}."),
    "pet": ("{name} keeps a {value}.", "{name} has a pet {value}.", "The pet of {name} is a {value}."),
    "colour": ("The favourite colour of {name} is {value}.", "{name} likes {value} best.",
               "{name} loves the colour {value}."),
}
# Question templates: the last one of each attribute is held out of training (the knowledge probe).
QUESTIONS = {
    "town": ("Where does {name} live?", "In which town does {name} live?", "What town is home to {name}?",
             "Which town does {name} call home?"),
    "job": ("What does {name} do for a living?", "What is the job of {name}?", "What work does {name} do?",
            "How does {name} earn a living?"),
    "pet": ("What pet does {name} have?", "Which animal does {name} keep?", "What is the pet of {name}?",
            "What animal lives with {name}?"),
    "colour": ("What is the favourite colour of {name}?", "Which colour does {name} like best?",
               "What colour does {name} love?", "Which colour is the favourite of {name}?"),
}
# The answer to every question is the first statement template: one canonical sentence per fact.
HELD_OUT_QUESTION = 3
NUM_PEOPLE = 40


@dataclass(frozen=True)
class Fact:
    """One (person, attribute, value) triple, e.g. ("Mira Castell", "town", "Brackenford")."""

    person: str
    attribute: str
    value: str

    @property
    def answer(self) -> str:
        """The canonical sentence that answers any question about this fact."""
        return STATEMENTS[self.attribute][0].format(name=self.person, value=self.value)


@dataclass(frozen=True)
class TextExample:
    """A training or evaluation text: a statement, or a question with its answer."""

    kind: str          # "statement" or "qa"
    text: str          # the statement, or the question
    answer: str        # "" for statements
    person: str
    attribute: str
    value: str
    template: int      # index of the statement/question template
    split: str         # "train" or "heldout"


@dataclass
class World:
    """All facts and the texts rendered from them (see :func:`build_world`)."""

    seed: int
    people: list[str]
    facts: list[Fact]
    texts: list[TextExample] = field(default_factory=list)

    def statements(self) -> list[TextExample]:
        return [t for t in self.texts if t.kind == "statement"]

    def questions(self, split: str | None = None) -> list[TextExample]:
        """Question/answer pairs; ``split`` "train" (seen templates) or "heldout" (the knowledge probe)."""
        return [t for t in self.texts if t.kind == "qa" and (split is None or t.split == split)]

    def fact(self, person: str, attribute: str) -> Fact:
        for fact in self.facts:
            if fact.person == person and fact.attribute == attribute:
                return fact
        raise KeyError(f"no fact about {person!r} / {attribute!r}")


def build_world(seed: int = 0, num_people: int = NUM_PEOPLE) -> World:
    """Draw ``num_people`` distinct names and their attribute values, and render every text, deterministically."""
    if not 1 <= num_people <= len(FIRST_NAMES) * len(LAST_NAMES):
        raise ValueError(f"num_people must be in 1..{len(FIRST_NAMES) * len(LAST_NAMES)}, got {num_people}")
    rng = random.Random(seed)
    firsts = rng.sample(FIRST_NAMES, k=min(num_people, len(FIRST_NAMES)))
    while len(firsts) < num_people:
        firsts.append(rng.choice(FIRST_NAMES))
    people, used = [], set()
    for first in firsts:
        last = rng.choice(LAST_NAMES)
        while f"{first} {last}" in used:
            last = rng.choice(LAST_NAMES)
        used.add(f"{first} {last}")
        people.append(f"{first} {last}")
    facts = [Fact(person, attribute, rng.choice(VALUES[attribute])) for person in people for attribute in ATTRIBUTES]
    texts = []
    for fact in facts:
        for index, template in enumerate(STATEMENTS[fact.attribute]):
            texts.append(TextExample("statement", template.format(name=fact.person, value=fact.value), "",
                                     fact.person, fact.attribute, fact.value, index, "train"))
        for index, template in enumerate(QUESTIONS[fact.attribute]):
            split = "heldout" if index == HELD_OUT_QUESTION else "train"
            texts.append(TextExample("qa", template.format(name=fact.person), fact.answer,
                                     fact.person, fact.attribute, fact.value, index, split))
    return World(seed=seed, people=people, facts=facts, texts=texts)
