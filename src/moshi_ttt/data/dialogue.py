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


def recall_turns(code_word: str) -> tuple[list[Turn], list[Turn]]:
    """(fact turns, recall turns): the user gives a code word, Moshi repeats it, and much later recalls it.

    Moshi says the code word in both, so the fact and its recall are both in the text stream.
    """
    fact = [
        _turn(1, f"please remember the code word {code_word}."),
        _turn(0, f"okay, the code word is {code_word}."),
    ]
    recall = [_turn(1, "what was the code word?"), _turn(0, f"the code word was {code_word}.")]
    return fact, recall


def corpus(seed: int = 0, num_exchanges: int = 3000) -> list[str]:
    """Sentences covering every template and word, to train the demo tokenizer on."""
    gen = DialogueGenerator(seed)
    lines = []
    it = gen.turns()
    for _ in range(num_exchanges * 3):
        lines.append(next(it).text)
    for w in CODE_WORDS:
        fact, recall = recall_turns(w)
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
    ]
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return lines
