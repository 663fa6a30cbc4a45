"""What the tasks hide: keys (`adjective-noun`, as RULER's wonderwords keys), numbers, variable names and the words
of the common-words list — each drawn from a seeded `random.Random`, distinct within a sample and absent from the
haystack, so that an answer can only come from the needle that holds it."""
from __future__ import annotations

import random
import string
from collections.abc import Callable

ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "brisk", "calm", "clever", "crimson", "curious", "dizzy", "eager",
    "elegant", "fancy", "fierce", "fragile", "gentle", "gleaming", "grumpy", "hollow", "humble", "icy", "jolly",
    "lively", "lonely", "lucky", "mellow", "misty", "noble", "odd", "polite", "proud", "quiet", "rapid", "rusty",
    "shiny", "silent", "silver", "sleepy", "sly", "smoky", "spicy", "stormy", "swift", "tender", "tiny", "velvet",
    "wicked", "witty", "zealous", "zesty",
)
NOUNS = (
    "anchor", "badger", "banjo", "beacon", "biscuit", "blanket", "buffalo", "cactus", "canyon", "castle", "comet",
    "cricket", "dolphin", "dragon", "falcon", "fountain", "gazelle", "giraffe", "glacier", "harp", "helmet",
    "igloo", "jackal", "kettle", "lantern", "lemur", "lobster", "magnet", "meadow", "noodle", "otter", "parrot",
    "pebble", "pelican", "pepper", "puzzle", "quartz", "raccoon", "ribbon", "saddle", "scooter", "spider",
    "teapot", "thimble", "tulip", "umbrella", "violin", "walrus", "whistle", "zeppelin",
)
# Common-words extraction needs up to ~50,000 distinct words at 1M tokens. lcrun ships no dictionary, so the words
# are pronounceable inventions of three consonant-vowel syllables: all of one length, so no word contains another
# and a substring match (RULER's scoring) credits exactly the word asked for.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
WORD_SPACE = len(_SYLLABLES) ** 3


def invented_word(index: int) -> str:
    """The index-th of WORD_SPACE words (0 ≤ index < WORD_SPACE)."""
    n = len(_SYLLABLES)
    return _SYLLABLES[index // (n * n)] + _SYLLABLES[index // n % n] + _SYLLABLES[index % n]


class Draw:
    """Draws for one sample: nothing drawn twice, nothing that occurs in `avoid` (the haystack's text)."""

    def __init__(self, rng: random.Random, avoid: str) -> None:
        self.rng = rng
        self.avoid = avoid
        self.taken: set[str] = set()

    def _fresh(self, make: Callable[[], str]) -> str:
        for _ in range(10_000):
            value = make()
            if value not in self.taken and value not in self.avoid:
                self.taken.add(value)
                return value
        raise RuntimeError("no fresh value left to draw")  # 50 × 50 keys, 9·10^6 numbers: unreachable

    def key(self) -> str:
        return self._fresh(lambda: f"{self.rng.choice(ADJECTIVES)}-{self.rng.choice(NOUNS)}")

    def number(self, digits: int) -> str:
        return self._fresh(lambda: str(self.rng.randrange(10 ** (digits - 1), 10**digits)))

    def variable(self) -> str:
        """Five capital letters, as RULER's variable tracking names them."""
        return self._fresh(lambda: "".join(self.rng.choices(string.ascii_uppercase, k=5)))

    def word(self) -> str:
        return self._fresh(lambda: invented_word(self.rng.randrange(WORD_SPACE)))
