"""A small built-in dialogue text generator, so that the demo dataset needs nothing from outside.

Templates and word lists give two-speaker exchanges (greetings, preferences, plans, weather,
counting, small talk) with topic carry-over: the answer reuses the question's slots, so that
a model that attends to its context can predict part of the reply. Speaker 0 is Moshi
(channel 0), speaker 1 the user. Deterministic given the seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

NAMES = [
    "anna",
    "ben",
    "clara",
    "david",
    "emma",
    "felix",
    "grace",
    "henry",
    "iris",
    "jack",
    "lena",
    "marco",
    "nora",
    "oscar",
    "paula",
    "sam",
]
FEELINGS = ["fine", "great", "tired", "happy", "busy", "good", "calm", "sleepy"]
CATEGORIES = {
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "fruit": ["apples", "bananas", "cherries", "grapes", "lemons", "mangoes", "peaches", "plums"],
    "animal": ["cats", "dogs", "horses", "rabbits", "birds", "turtles", "goats", "ducks"],
    "sport": ["tennis", "football", "swimming", "running", "cycling", "skiing", "golf", "rowing"],
    "food": ["pasta", "soup", "rice", "bread", "salad", "pizza", "noodles", "cheese"],
    "music": ["jazz", "rock", "piano", "guitar", "violin", "drums", "opera", "blues"],
}
PLACES = [
    "the park",
    "the beach",
    "the market",
    "the museum",
    "the library",
    "the station",
    "the lake",
    "the mountains",
    "the city",
    "the garden",
]
CITIES = ["paris", "london", "berlin", "madrid", "rome", "tokyo", "boston", "sydney", "vienna", "lisbon"]
WEATHER = ["sunny", "rainy", "cloudy", "windy", "cold", "warm", "foggy", "snowy"]
TIMES = ["monday", "tuesday", "friday", "weekend", "morning", "evening", "summer", "winter"]
RELATIVES = ["sister", "brother", "mother", "father", "cousin", "friend", "uncle", "aunt"]
ADJECTIVES = ["nice", "lovely", "strange", "funny", "perfect", "interesting", "wonderful", "simple"]
NUMBERS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "twenty",
    "thirty",
    "forty",
    "fifty",
]
BACKCHANNELS = ["yeah", "okay", "right", "mhm", "sure", "really"]
# Single words for the recall task: easy to say, tokenised into a few pieces.
CODE_WORDS = [
    "falcon",
    "harbor",
    "velvet",
    "lantern",
    "marble",
    "copper",
    "meadow",
    "thunder",
    "pepper",
    "canyon",
    "violet",
    "maple",
    "silver",
    "rocket",
    "island",
    "winter",
    "garlic",
    "saddle",
    "tulip",
    "comet",
]


# Values of the long recall conversations' facts: words the small talk never says, so that a fact's
# value occurs only where it is stated and where it is recalled.
FACT_VALUES = [
    *(w for w in CODE_WORDS if w != "winter"),  # "winter" is also a time of the small talk
    "anchor",
    "beacon",
    "cobalt",
    "dolphin",
    "ember",
    "glacier",
    "hazel",
    "indigo",
    "juniper",
    "kettle",
    "lagoon",
    "nectar",
    "orchid",
    "pebble",
    "quartz",
    "raven",
    "sapphire",
    "timber",
    "walnut",
    "zephyr",
]


@dataclass(frozen=True)
class FactKind:
    """A fact the user can ask Moshi to keep: four sentences, ``{v}`` standing for its one-word value.

    The user states it (``state``), Moshi confirms it (``confirm``, so the value is in Moshi's text
    stream), and much later the user asks (``ask``) and Moshi answers (``answer``)."""

    name: str
    state: str
    confirm: str
    ask: str
    answer: str


FACT_KINDS = (
    FactKind("code_word", "please remember the code word {v}.", "okay, the code word is {v}.",
             "what was the code word?", "the code word was {v}."),
    FactKind("dog", "my dog is called {v}.", "okay, your dog is called {v}.", "what is my dog called?",
             "your dog is called {v}."),
    FactKind("password", "the wifi password is {v}.", "okay, the password is {v}.", "what is the wifi password?",
             "the wifi password is {v}."),
    FactKind("boat", "my boat is named {v}.", "okay, your boat is named {v}.", "what is my boat named?",
             "your boat is named {v}."),
    FactKind("room", "our meeting room is called {v}.", "okay, the meeting room is {v}.",
             "what is our meeting room called?", "the meeting room is called {v}."),
    FactKind("street", "i live on {v} street.", "okay, you live on {v} street.", "which street do i live on?",
             "you live on {v} street."),
    FactKind("project", "our new project is called {v}.", "okay, the project is called {v}.",
             "what is our new project called?", "the project is called {v}."),
    FactKind("horse", "my horse is named {v}.", "okay, your horse is named {v}.", "what is my horse named?",
             "your horse is named {v}."),
)


@dataclass(frozen=True)
class Turn:
    speaker: int  # 0 = Moshi (channel 0), 1 = the user (channel 1)
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _turn(speaker: int, text: str) -> Turn:
    return Turn(speaker, tuple(text.split()))


class DialogueGenerator:
    """An endless, seeded stream of dialogue turns; see :meth:`turns`."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def _exchange(self) -> list[Turn]:
        r = self.rng
        asker = r.choice([1, 1, 0])  # the user asks more often than Moshi
        ans = 1 - asker
        kind = r.randrange(7)
        if kind == 0:
            name, f1, f2 = r.choice(NAMES), r.choice(FEELINGS), r.choice(FEELINGS)
            return [
                _turn(asker, f"hello {name}, how are you today?"),
                _turn(ans, f"i am {f1}, thank you. and how are you?"),
                _turn(asker, f"i am {f2} too, thanks for asking."),
            ]
        if kind == 1:
            cat = r.choice(sorted(CATEGORIES))
            a, b = r.sample(CATEGORIES[cat], 2)
            return [
                _turn(asker, f"what is your favorite {cat}?"),
                _turn(ans, f"i really like {a}. what about you?"),
                _turn(
                    asker,
                    f"i prefer {b}, but {a} are {r.choice(ADJECTIVES)} too."
                    if cat in ("fruit", "animal")
                    else f"i prefer {b}, but {a} is {r.choice(ADJECTIVES)} too.",
                ),
            ]
        if kind == 2:
            place, when, rel = r.choice(PLACES), r.choice(TIMES), r.choice(RELATIVES)
            yes = r.random() < 0.6
            reply = (
                f"yes, i went to {place} with my {rel}." if yes else f"no, i stayed at home with my {rel}."
            )
            return [
                _turn(asker, f"did you go to {place} last {when}?"),
                _turn(ans, reply),
                _turn(asker, f"that sounds {r.choice(ADJECTIVES)}."),
            ]
        if kind == 3:
            city, w, n = r.choice(CITIES), r.choice(WEATHER), r.choice(NUMBERS)
            return [
                _turn(asker, f"can you tell me the weather in {city}?"),
                _turn(ans, f"it is {w} in {city} today, about {n} degrees."),
                _turn(asker, f"{w} again? okay, thank you."),
            ]
        if kind == 4:
            rel, animal, n = r.choice(RELATIVES), r.choice(CATEGORIES["animal"]), r.choice(NUMBERS)
            return [
                _turn(asker, f"how many {animal} does your {rel} have?"),
                _turn(ans, f"my {rel} has {n} {animal}."),
                _turn(asker, f"{n} {animal}? that is a lot of {animal}."),
            ]
        if kind == 5:
            food, adj, when = r.choice(CATEGORIES["food"]), r.choice(ADJECTIVES), r.choice(TIMES)
            return [
                _turn(asker, f"i am going to cook {food} this {when}."),
                _turn(ans, f"that sounds {adj}. can i have some {food} too?"),
                _turn(asker, f"of course, there is enough {food} for everyone."),
            ]
        sport, rel, when = r.choice(CATEGORIES["sport"]), r.choice(RELATIVES), r.choice(TIMES)
        return [
            _turn(asker, f"do you play {sport} with your {rel}?"),
            _turn(ans, f"sometimes, usually on {when}. do you like {sport}?"),
            _turn(asker, f"yes, {sport} is my favorite sport."),
        ]

    def turns(self) -> Iterator[Turn]:
        """Exchanges one after the other, forever."""
        while True:
            yield from self._exchange()

    def backchannel(self, speaker: int) -> Turn:
        return Turn(speaker, (self.rng.choice(BACKCHANNELS),))


def fact_turns(kind: FactKind, value: str) -> tuple[list[Turn], list[Turn], int, int]:
    """(turns that state the fact, turns that recall it, index of the value in the last word list of
    each): the user states, Moshi confirms; later the user asks and Moshi answers. The value is in
    Moshi's confirmation and answer, so both the fact and its recall are in the text stream."""
    if not value or " " in value:
        raise ValueError(f"a fact's value is one word, got {value!r}")
    state, recall = [_turn(1, kind.state.format(v=value)), _turn(0, kind.confirm.format(v=value))], \
        [_turn(1, kind.ask), _turn(0, kind.answer.format(v=value))]
    return state, recall, _value_index(kind.confirm), _value_index(kind.answer)


def _value_index(template: str) -> int:
    return next(i for i, w in enumerate(template.split()) if "{v}" in w)


def recall_turns(code_word: str) -> tuple[list[Turn], list[Turn]]:
    """(fact turns, recall turns) of the code-word fact (``FACT_KINDS[0]``)."""
    state, recall, _, _ = fact_turns(FACT_KINDS[0], code_word)
    return state, recall


def corpus(seed: int = 0, num_exchanges: int = 3000) -> list[str]:
    """Sentences covering every template and word, to train the demo tokenizer on."""
    gen = DialogueGenerator(seed)
    lines = []
    it = gen.turns()
    for _ in range(num_exchanges * 3):
        lines.append(next(it).text)
    for i, w in enumerate(FACT_VALUES):
        for kind in (FACT_KINDS[0], FACT_KINDS[i % len(FACT_KINDS)]):
            fact, recall, _, _ = fact_turns(kind, w)
            lines += [t.text for t in fact + recall]
    words = [
        *NAMES,
        *FEELINGS,
        *sum(CATEGORIES.values(), []),
        *CITIES,
        *WEATHER,
        *TIMES,
        *RELATIVES,
        *ADJECTIVES,
        *NUMBERS,
        *BACKCHANNELS,
        *CODE_WORDS,
        *FACT_VALUES,
    ]
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return lines
