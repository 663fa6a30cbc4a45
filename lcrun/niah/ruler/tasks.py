"""The six tasks, after NVIDIA/RULER's task definitions (scripts/data/synthetic/niah.py, variable_tracking.py,
common_words_extraction.py, with the settings of its synthetic.yaml), and RULER's scoring (eval/synthetic/
constants.py: string_match_all).

Five tasks hide their needles in one essay document per (length, sample) and ask their questions after it, so the
document is prefilled once for the five:

| task        | RULER's    | hidden                                                | asked                          |
|-------------|------------|-------------------------------------------------------|--------------------------------|
| single      | niah_single| today's niah needle: `The special magic <city> number is: <n>.` | the number             |
| multikey    | multikey_1 | 4 keys with one number each                           | the number of one key          |
| multivalue  | multivalue | 4 numbers for one key                                 | all 4                          |
| multiquery  | multiquery | 4 keys with one number each                           | the numbers of all 4 keys      |
| vt          | vt         | a chain `VAR A = 12345`, `VAR B = VAR A`, … (4 hops)  | every variable equal to 12345  |

The common-words task (cwe) is its own document: a numbered list of words, 10 of them 30 times each (6 below 4K
tokens), the rest 3 times (1), with one worked example before it; asked: the 10 most common words.

Every needle of one document is a distractor for the others' questions: a retrieval question there sees 12 needles
of its own form where RULER's multikey_1 has 4 — a little harder than RULER, never easier."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..prompt import CITIES, NEEDLE as SINGLE_NEEDLE
from .words import Draw

TASKS = ("single", "multikey", "multivalue", "multiquery", "vt", "cwe")
ESSAY_TASKS = TASKS[:5]
TASK_LABELS = {"single": "single needle", "multikey": "multi-key", "multivalue": "multi-value",
               "multiquery": "multi-query", "vt": "variable tracking", "cwe": "common words"}
# RULER's tokens_to_generate: the room an answer gets, counted into the context length
ANSWER_TOKENS = {"single": 128, "multikey": 128, "multivalue": 128, "multiquery": 128, "vt": 30, "cwe": 120}
# RULER's threshold: Llama-2-7B's score at 4K; the effective context is the longest length scoring at least this
THRESHOLD = 85.6
# bump when anything a prompt holds changes (wording, counts, order): results of another format do not compare
PROMPT_FORMAT = 1

VALUE_DIGITS = 7          # RULER's needle numbers
MULTI = 4                 # keys of multikey and multiquery, values of multivalue (RULER's 4)
VT_HOPS = 4               # RULER's vt: one chain, four hops: five variables
VT_DIGITS = 5
CWE_COMMON = 10
# RULER's freq_cw / freq_ucw at 4K and above, and what it uses below 4K
CWE_REPEATS, CWE_REPEATS_SHORT = (30, 3), (6, 1)
CWE_SHORT_BELOW = 4096
# the worked example before the list: (words, repeats of the common, of the others), as RULER's one few-shot
CWE_EXAMPLE, CWE_EXAMPLE_SHORT = (40, 10, 3), (20, 3, 1)
# where needles go: RULER's 40 depths from 0 % to 100 %, drawn without replacement
DEPTHS = tuple(round(100 * i / 39) / 100 for i in range(40))

NEEDLE = "One of the special magic numbers for {key} is: {value}."
ESSAY_PREAMBLE = ("Some special magic numbers and a chain of variable assignments are hidden within the following "
                  "text. Make sure to memorize and track them. I will quiz you about them afterwards.")
CWE_PREAMBLE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.")
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"


@dataclass(frozen=True)
class Question:
    task: str
    question: str            # what follows the document
    answer_prefix: str       # the answer's first words, written for the model (RULER's answer_prefix)
    answers: tuple[str, ...]
    max_tokens: int


@dataclass(frozen=True)
class Insert:
    """A sentence hidden in the essay document at `depth` (0 = its start, 1 = its end)."""
    text: str
    depth: float
    task: str


@dataclass(frozen=True)
class EssaySample:
    inserts: tuple[Insert, ...]    # in document order of their depths (a chain keeps its order)
    questions: tuple[Question, ...]


def sample_rng(kind: str, seed: int, ctx: int, sample: int) -> random.Random:
    """One sample's draws depend on the seed, the length and the sample only: a resumed run, another KV type or
    another model asks the same questions."""
    return random.Random(f"lcrun-ruler:{kind}:{seed}:{ctx}:{sample}")


def _keys_question(task: str, keys: list[str], answers: list[str]) -> Question:
    if len(keys) == 1 and len(answers) == 1:
        what = f"special magic number for {keys[0]} mentioned in the provided text"
        return Question(task, f"What is the {what}?", f" The {what} is", tuple(answers), ANSWER_TOKENS[task])
    listed = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]
    what = f"special magic numbers for {listed} mentioned in the provided text"
    return Question(task, f"What are all the {what}?", f" The {what} are", tuple(answers), ANSWER_TOKENS[task])


def essay_sample(seed: int, ctx: int, sample: int, avoid: str) -> EssaySample:
    """The needles of the five essay tasks and their questions; `avoid`: the haystack's text."""
    rng = sample_rng("essay", seed, ctx, sample)
    draw = Draw(rng, avoid)
    needles: list[tuple[str, str]] = []     # (task, sentence)
    questions: list[Question] = []

    city = rng.choice([c for c in CITIES if c not in avoid] or CITIES)
    number = draw.number(VALUE_DIGITS)
    needles.append(("single", SINGLE_NEEDLE.format(city=city, number=number)))
    what = f"special magic {city} number mentioned in the provided text"
    questions.append(Question("single", f"What is the {what}?", f" The {what} is", (number,), ANSWER_TOKENS["single"]))

    keys = [draw.key() for _ in range(MULTI)]
    values = [draw.number(VALUE_DIGITS) for _ in keys]
    needles += [("multikey", NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
    asked = rng.randrange(MULTI)
    questions.append(_keys_question("multikey", [keys[asked]], [values[asked]]))

    key = draw.key()
    values = [draw.number(VALUE_DIGITS) for _ in range(MULTI)]
    needles += [("multivalue", NEEDLE.format(key=key, value=v)) for v in values]
    questions.append(_keys_question("multivalue", [key], values))

    keys = [draw.key() for _ in range(MULTI)]
    values = [draw.number(VALUE_DIGITS) for _ in keys]
    needles += [("multiquery", NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
    questions.append(_keys_question("multiquery", keys, values))

    names = [draw.variable() for _ in range(VT_HOPS + 1)]
    value = draw.number(VT_DIGITS)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    questions.append(Question(
        "vt", f"Question: Find all variables that are assigned the value {value} in the text above.",
        f" Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables are "
        f"assigned the value {value}, they are:", tuple(names), ANSWER_TOKENS["vt"]))

    depths = rng.sample(DEPTHS, len(needles) + len(chain))
    inserts = [Insert(text, depth, task) for (task, text), depth in zip(needles, depths)]
    inserts += [Insert(text, depth, "vt") for text, depth in zip(chain, sorted(depths[len(needles):]))]
    # stable: a chain's statements sharing a depth stay in chain order
    return EssaySample(tuple(sorted(inserts, key=lambda i: i.depth)), tuple(questions))


@dataclass(frozen=True)
class WordList:
    common: tuple[str, ...]          # the answer: the CWE_COMMON most frequent words
    others: list[str]                # drawn as the list needs them (`more`)
    repeats: tuple[int, int]         # of each common word, of each other word
    example: str                     # the worked example (list, question, answer) before the list
    draw: Draw

    def more(self, count: int) -> None:
        while len(self.others) < count:
            self.others.append(self.draw.word())

    def entries(self, n_others: int, seed: int, ctx: int, sample: int) -> list[str]:
        """The list's words in order, with `n_others` words beside the common ones."""
        common, other = self.repeats
        words = list(self.common) * common + self.others[:n_others] * other
        sample_rng("cwe-order", seed, ctx, sample).shuffle(words)
        return words


def numbered(words: list[str]) -> str:
    return " ".join(f"{i}. {word}" for i, word in enumerate(words, 1))


def word_list(seed: int, ctx: int, sample: int) -> WordList:
    rng = sample_rng("cwe", seed, ctx, sample)
    draw = Draw(rng, "")  # the list is the whole document: no haystack to avoid
    short = ctx < CWE_SHORT_BELOW
    n_words, common_repeats, other_repeats = CWE_EXAMPLE_SHORT if short else CWE_EXAMPLE
    example_words = [draw.word() for _ in range(n_words)]
    listed = example_words[:CWE_COMMON] * common_repeats + example_words[CWE_COMMON:] * other_repeats
    rng.shuffle(listed)
    example = (f"{CWE_PREAMBLE}\n{numbered(listed)}\n{CWE_QUESTION}{CWE_PREFIX} "
               f"{numbered(example_words[:CWE_COMMON])}")
    common = tuple(draw.word() for _ in range(CWE_COMMON))
    return WordList(common, [], CWE_REPEATS_SHORT if short else CWE_REPEATS, example, draw)


def cwe_question(words: WordList) -> Question:
    return Question("cwe", CWE_QUESTION, CWE_PREFIX, words.common, ANSWER_TOKENS["cwe"])


# -- scoring, as RULER's evaluate.py and eval/synthetic/constants.py --------------------------------------------
_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(answer: str) -> str:
    """RULER's postprocess_pred: control characters become line breaks, the ends are stripped."""
    return _CONTROL.sub("\n", answer.strip()).strip()


def string_match_all(answer: str, expected: tuple[str, ...]) -> float:
    """The fraction of the expected strings the answer contains, case-insensitive (one sample of RULER's
    string_match_all, which averages these and scales to 100)."""
    text = postprocess(answer).lower()
    return sum(r.lower() in text for r in expected) / len(expected)


def string_match_part(answer: str, expected: tuple[str, ...]) -> float:
    """1 if the answer contains any expected string (RULER's QA metric; none of these tasks uses it)."""
    text = postprocess(answer).lower()
    return float(any(r.lower() in text for r in expected))


def score(answer: str, question: Question) -> float:
    return string_match_all(answer, question.answers)
