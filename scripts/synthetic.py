"""Seeded generators of mlxpost's bundled synthetic data.

Every generator is pure: it takes a `random.Random` (or a seed) and draws from
small fixed tables, so the same seed gives the same data on any machine. The
texts are short, the vocabulary small and the phrasing consistent, because a
~4M-parameter model pre-trains on this data and must then show gains from
post-training. The record layouts are those of the public datasets users
bring (GSM8K, Alpaca, Anthropic HH-RLHF, OpenThoughts / ShareGPT), so the
bundled data goes through the same loading code as theirs.

Import from another script with `sys.path.insert(0, "scripts")`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

LEVELS = (1, 2, 3)
PREFERENCE_KINDS = ("math", "concise", "polite")

# One arithmetic step as it appears in every solution line: "a op b = c".
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")

# Question numbers stay at or below ~60 and running totals at or below this (a
# final sum of two people's amounts at or below 150), so every number a tiny model
# must produce has at most three digits.
MAX_TOTAL = 120

# ---------------------------------------------------------------------------
# Fixed tables. Tuples, not sets: iteration order must not depend on hashing.
# ---------------------------------------------------------------------------

NAMES = (
    ("Tom", "he"),
    ("Amy", "she"),
    ("Ben", "he"),
    ("Lily", "she"),
    ("Sam", "he"),
    ("Emma", "she"),
    ("Max", "he"),
    ("Mia", "she"),
    ("Leo", "he"),
    ("Zoe", "she"),
    ("Jack", "he"),
    ("Anna", "she"),
    ("Noah", "he"),
    ("Lucy", "she"),
    ("Dan", "he"),
    ("Eva", "she"),
)
PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}

FOODS = ("apples", "oranges", "cookies", "eggs", "cupcakes", "bananas", "lemons", "plums")
THINGS = (
    "marbles",
    "stickers",
    "pencils",
    "books",
    "cards",
    "shells",
    "stamps",
    "crayons",
    "balloons",
    "toy cars",
)
CONTAINERS = (("boxes", "box"), ("bags", "bag"), ("packs", "pack"))
SHOP_ITEMS = (
    ("books", "book"),
    ("pens", "pen"),
    ("hats", "hat"),
    ("kites", "kite"),
    ("balls", "ball"),
    ("games", "game"),
)

# Short, common words for the word tasks (reverse, count, repeat, capitals).
WORDS = tuple(
    "cat dog sun tree book fish bird car hat cup milk cake ball star moon rain snow door lamp"
    " rose frog duck bell ship road hill leaf box pen bed".split()
)
CAPITALS = (
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Egypt", "Cairo"),
    ("Russia", "Moscow"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Kenya", "Nairobi"),
    ("Cuba", "Havana"),
    ("Ireland", "Dublin"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Portugal", "Lisbon"),
    ("Sweden", "Stockholm"),
    ("Brazil", "Brasilia"),
    ("Turkey", "Ankara"),
    ("Australia", "Canberra"),
    ("Thailand", "Bangkok"),
    ("Chile", "Santiago"),
)
# Each word occurs once, so "the opposite of X" has one answer in both directions.
OPPOSITES = (
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("happy", "sad"),
    ("day", "night"),
    ("old", "new"),
    ("open", "closed"),
    ("light", "dark"),
    ("wet", "dry"),
    ("full", "empty"),
    ("early", "late"),
    ("high", "low"),
    ("hard", "soft"),
    ("long", "short"),
    ("in", "out"),
    ("rich", "poor"),
    ("left", "right"),
    ("loud", "quiet"),
    ("first", "last"),
    ("win", "lose"),
    ("push", "pull"),
    ("yes", "no"),
    ("top", "bottom"),
)
# (animal, sound, legs, home)
ANIMALS = (
    ("cow", "moo", 4, "farm"),
    ("dog", "woof", 4, "house"),
    ("cat", "meow", 4, "house"),
    ("duck", "quack", 2, "pond"),
    ("sheep", "baa", 4, "farm"),
    ("pig", "oink", 4, "farm"),
    ("horse", "neigh", 4, "farm"),
    ("owl", "hoot", 2, "tree"),
    ("hen", "cluck", 2, "farm"),
    ("lion", "roar", 4, "forest"),
    ("frog", "croak", 4, "pond"),
    ("bee", "buzz", 6, "hive"),
)
COLOURS = (
    ("the sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("a banana", "yellow"),
    ("a lemon", "yellow"),
    ("coal", "black"),
    ("a carrot", "orange"),
    ("a strawberry", "red"),
    ("a tomato", "red"),
    ("milk", "white"),
    ("a leaf", "green"),
    ("the sea", "blue"),
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
NUMBER_WORDS = tuple("zero one two three four five six seven eight nine ten eleven twelve".split())

# Sentences that pad an answer without adding anything; the rambling answer repeats them.
FILLERS = (
    "That is a good question.",
    "Let me think about this.",
    "Many people ask about this.",
    "I will try my best to answer.",
    "I hope this helps.",
    "Thank you for asking.",
    "Let me know if you have more questions.",
)
POLITE_OPENERS = ("Sure!", "Of course!", "Happy to help!", "Glad you asked!")
RUDE_PHRASES = (
    "Ugh, what a stupid question.",
    "Stop wasting my time.",
    "Are you dumb? Even a child knows this.",
    "This is so easy, you idiot.",
    "Whatever, figure it out yourself next time.",
    "I can't believe you don't know this.",
)
GREETINGS = (
    ("Hi! Can you help me?", "Of course. What do you need?"),
    ("Hello, I have a question.", "Sure, go ahead and ask."),
    ("Can I ask you something?", "Yes, what is your question?"),
)


# ---------------------------------------------------------------------------
# Math word problems (GSM8K layout)
# ---------------------------------------------------------------------------


def apply_op(a: int, op: str, b: int) -> int | None:
    """`a op b`, or None where it would leave the non-negative integers."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    if op == "/":
        return a // b if b and a % b == 0 else None
    raise ValueError(f"unknown operator {op!r}")


INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}


@dataclass(frozen=True)
class _Step:
    """One solution line: `line` holds `{eq}` where "a op b = c" goes. An operand
    with a `*_ref` is the result of that earlier step (so a mistake propagates)."""

    a: int
    op: str
    b: int
    line: str
    a_ref: int | None = None
    b_ref: int | None = None


def _evaluate(steps, override=None):
    """(a, b, c) of each step, operands taken from earlier results where referenced;
    `override` replaces chosen steps' results (a slip). None if a step is invalid."""
    override = override or {}
    values = []
    for i, step in enumerate(steps):
        a = values[step.a_ref][2] if step.a_ref is not None else step.a
        b = values[step.b_ref][2] if step.b_ref is not None else step.b
        c = apply_op(a, step.op, b)
        if c is None:
            return None
        values.append((a, b, override.get(i, c)))
    return values


def _render(steps, values) -> str:
    """Solution lines, then `#### N` with the last step's result."""
    lines = [
        step.line.format(eq=f"{a} {step.op} {b} = {c}") for step, (a, b, c) in zip(steps, values)
    ]
    return "\n".join(lines + [f"#### {values[-1][2]}"])


class _Story:
    """A word problem under construction: a person, a kind of object, a running total."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        (self.name, gender), (self.friend, _) = rng.sample(NAMES, 2)
        self.he, self.him, self.his = PRONOUNS[gender]
        self.kind = rng.choice(("food", "food", "food", "thing", "thing", "thing", "money"))
        self.obj = rng.choice({"food": FOODS, "thing": THINGS, "money": ("dollars",)}[self.kind])
        self.boxes, self.box = rng.choice(CONTAINERS)
        self.items, self.item = rng.choice(SHOP_ITEMS)
        self.sentences: list[str] = []
        self.steps: list[_Step] = []
        self.total = 0
        self.ref: int | None = None  # the step whose result is the total; None: the question
        self.question = f"How many {self.obj} does {self.name} have now?"

    # -- helpers --------------------------------------------------------------

    def subject(self) -> str:
        """The person as the subject of a later sentence: "He" or "Then he"."""
        return self.rng.choice((self.he.capitalize(), f"Then {self.he}"))

    def friend_subject(self) -> str:
        return self.rng.choice((self.friend, f"Then {self.friend}"))

    def say(self, template: str, **values) -> None:
        fields = dict(
            S=self.subject(),
            F=self.friend_subject(),
            N=self.name,
            he=self.he,
            him=self.him,
            his=self.his,
            obj=self.obj,
            boxes=self.boxes,
            box=self.box,
            items=self.items,
            item=self.item,
        )
        self.sentences.append(template.format(**fields, **values))

    def step(self, a, op, b, line, a_ref=None, b_ref=None) -> int:
        """Append a step and return its (correct) result."""
        self.steps.append(_Step(a, op, b, line, a_ref, b_ref))
        return apply_op(a, op, b)

    def update(self, op: str, b: int, line: str | None = None) -> None:
        """Apply `total op b` as the next step; the result becomes the total."""
        line = line or f"{self.name} has {{eq}} {self.obj}."
        self.total = self.step(self.total, op, b, line, a_ref=self.ref)
        self.ref = len(self.steps) - 1

    # -- starts ---------------------------------------------------------------

    def start_plain(self) -> None:
        self.total = self.rng.randint(10 if self.kind == "money" else 5, 60)
        self.sentences.append(f"{self.name} has {self.total} {self.obj}.")

    def start_product(self) -> None:
        n, c = self.rng.randint(2, 9), self.rng.randint(2, 12)
        if self.kind == "money":
            self.sentences.append(f"{self.name} saves {c} dollars a week for {n} weeks.")
        else:
            self.sentences.append(
                f"{self.name} has {n} {self.boxes} with {c} {self.obj} in each {self.box}."
            )
        self.total = self.step(n, "*", c, f"{self.name} has {{eq}} {self.obj}.")
        self.ref = 0

    # -- events: each returns False, changing nothing, when it does not fit ---

    def add(self) -> bool:
        high = min(40, MAX_TOTAL - self.total)
        if high < 2:
            return False
        k = self.rng.randint(2, high)
        if self.kind == "money":
            templates = (
                "{S} earns {k} more dollars.",
                "{F} gives {him} {k} dollars.",
                "{S} finds {k} dollars.",
            )
        else:
            templates = (
                "{S} buys {k} more {obj}.",
                "{S} finds {k} more {obj}.",
                "{S} gets {k} more {obj} from {F_name}.",
                "{F} gives {him} {k} more {obj}.",
            )
        self.say(self.rng.choice(templates), k=k, F_name=self.friend)
        self.update("+", k)
        return True

    def sub(self) -> bool:
        high = min(60, self.total - 2)
        if self.kind == "food":
            templates = (
                "{S} gives {k} {obj} to {F_name}.",
                "{S} sells {k} {obj}.",
                "{S} eats {k} {obj}.",
            )
        elif self.kind == "thing":
            templates = (
                "{S} gives {k} {obj} to {F_name}.",
                "{S} sells {k} {obj}.",
                "{S} loses {k} {obj}.",
            )
        else:
            templates = (
                "{S} spends {k} dollars on a {item}.",
                "{S} gives {k} dollars to {F_name}.",
                "{S} loses {k} dollars.",
            )
        template = self.rng.choice(templates)
        if "eats" in template:
            high = min(high, 12)  # nobody eats 50 cookies
        if high < 2:
            return False
        k = self.rng.randint(2, high)
        self.say(template, k=k, F_name=self.friend)
        self.update("-", k)
        return True

    def bulk(self) -> bool:
        """Two steps: a product (containers or prices), then added to or spent from the total."""
        c = self.rng.randint(2, 12)
        spend = self.kind == "money" and self.rng.random() < 0.5
        room = self.total - 2 if spend else MAX_TOTAL - self.total
        high = min(9, room // c)
        if high < 2:
            return False
        n = self.rng.randint(2, high)
        if spend:
            self.say("{S} buys {n} {items} that cost {c} dollars each.", n=n, c=c)
            line = f"The {self.items} cost {{eq}} dollars."
        elif self.kind == "money":
            self.say("{S} works {n} days and earns {c} dollars each day.", n=n, c=c)
            line = f"{self.name} earns {{eq}} dollars."
        else:
            self.say("{S} buys {n} {boxes} with {c} {obj} in each {box}.", n=n, c=c)
            line = f"{self.name} buys {{eq}} {self.obj}."
        product = self.step(n, "*", c, line)
        self.total = self.step(
            self.total,
            "-" if spend else "+",
            product,
            f"{self.name} has {{eq}} {self.obj}.",
            a_ref=self.ref,
            b_ref=len(self.steps) - 1,
        )
        self.ref = len(self.steps) - 1
        return True

    def double(self) -> bool:
        factor = self.rng.choice((2, 3))
        # Multiplying a two-digit number is the hardest step for a tiny model: keep it small.
        if self.total > 40 or self.total * factor > MAX_TOTAL:
            return False
        verb = "doubles" if factor == 2 else "triples"
        if self.kind == "money":
            self.say("{S} {verb} {his} money.", verb=verb)
        else:
            then = self.rng.choice(("The", "Then the"))
            self.say("{then} number of {obj} {N} has {verb}.", then=then, verb=verb)
        self.update("*", factor)
        return True

    def half(self) -> bool:
        if self.total % 2 or not 4 <= self.total <= 100:
            return False
        if self.kind == "money":
            self.say("{S} spends half of {his} money.")
        else:
            self.say("{S} gives half of {his} {obj} to {F_name}.", F_name=self.friend)
        self.update("/", 2)
        return True

    def divide(self) -> bool:
        """Final: share, group or spend everything; the question changes with it."""
        # Quotients up to 20: division stays close to the times tables.
        divisors = [d for d in range(2, 13) if self.total % d == 0 and 2 <= self.total // d <= 20]
        if not divisors:
            return False
        d = self.rng.choice(divisors)
        if self.kind == "money":
            form = self.rng.choice(("share", "spend"))
        else:
            form = self.rng.choice(("share", "groups", "pack"))
        if form == "share":
            them = "the money" if self.kind == "money" else "them"
            self.say("{S} shares {them} equally among {d} friends.", them=them, d=d)
            self.question = f"How many {self.obj} does each friend get?"
            line = f"Each friend gets {{eq}} {self.obj}."
        elif form == "spend":
            self.say("{S} spends all of {his} money on {items} that cost {d} dollars each.", d=d)
            self.question = f"How many {self.items} does {self.he} buy?"
            line = f"{self.name} buys {{eq}} {self.items}."
        elif form == "groups":
            self.say("{S} puts them into groups of {d}.", d=d)
            self.question = f"How many groups does {self.he} make?"
            line = f"{self.name} makes {{eq}} groups."
        else:
            self.say("{S} packs them into {boxes} of {d}.", d=d)
            self.question = f"How many {self.boxes} does {self.he} fill?"
            line = f"{self.name} fills {{eq}} {self.boxes}."
        self.update("/", d, line)
        return True

    def compare(self) -> bool:
        """Final, two steps: a friend's amount relative to the person's, then the sum."""
        form = self.rng.choice(("more", "fewer", "times"))
        if self.total > (30 if form == "times" else 60):
            return False  # keeps the friend's amount and the sum at or below 150
        if form == "times":
            high = min(4, MAX_TOTAL // self.total)
            if high < 2:
                return False
            k, op = self.rng.randint(2, high), "*"
            relation = f"{k} times as many {self.obj} as"
        else:
            high = 30 if form == "more" else min(30, self.total - 2)
            if high < 2:
                return False
            k, op = self.rng.randint(2, high), "+" if form == "more" else "-"
            relation = f"{k} {form} {self.obj} than"
        self.sentences.append(f"{self.friend} has {relation} {self.name}.")
        self.question = f"How many {self.obj} do they have together?"
        other = self.step(
            self.total, op, k, f"{self.friend} has {{eq}} {self.obj}.", a_ref=self.ref
        )
        self.total = self.step(
            self.total,
            "+",
            other,
            f"Together they have {{eq}} {self.obj}.",
            a_ref=self.ref,
            b_ref=len(self.steps) - 1,
        )
        self.ref = len(self.steps) - 1
        return True


# (method, steps it takes, whether it must end the problem, weight)
_EVENTS = (
    ("add", 1, False, 3),
    ("sub", 1, False, 3),
    ("bulk", 2, False, 2),
    ("double", 1, False, 1),
    ("half", 1, False, 1),
    ("divide", 1, True, 2),
    ("compare", 2, True, 1),
)


def _make_problem(rng: random.Random, level: int) -> _Story:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    story = _Story(rng)
    budget = level
    if rng.random() < 0.25:
        story.start_product()
        budget -= 1
    else:
        story.start_plain()
    while budget > 0:
        pool = [
            name
            for name, cost, final, weight in _EVENTS
            for _ in range(weight)
            if cost <= budget and (not final or cost == budget)
        ]
        while True:
            name = rng.choice(pool)
            if getattr(story, name)():
                break
            pool = [other for other in pool if other != name]  # add or sub always fits
        budget -= next(cost for event, cost, _, _ in _EVENTS if event == name)
    if len(story.sentences) == 1:  # nothing happened after the start: no "now"
        story.question = story.question.replace(" now?", "?")
    return story


def math_problem(rng: random.Random, level: int) -> dict:
    """A GSM8K-style word problem with `level` arithmetic steps.

    `answer` has one line per step, each with an explicit "a op b = c"
    (`Tom has 12 + 7 = 19 apples.`), and ends with `#### N`.
    """
    story = _make_problem(rng, level)
    return {
        "question": " ".join(story.sentences + [story.question]),
        "answer": _render(story.steps, _evaluate(story.steps)),
        "level": level,
    }


def final_answer(answer: str) -> str:
    """The number after the closing `#### ` of a solution."""
    last = answer.rstrip("\n").rsplit("\n", 1)[-1]
    if not last.startswith("#### "):
        raise ValueError(f"no '#### N' line in {answer!r}")
    return last[len("#### ") :]


def math_dataset(seed: int | str, n: int, levels=LEVELS, *, exclude=()) -> list[dict]:
    """`n` problems with distinct questions, levels in turn (so balanced), none of
    whose question is in `exclude` (to keep a test split disjoint from training)."""
    rng = random.Random(seed)
    seen = set(exclude)
    rows = []
    for i in range(n):
        for _ in range(10_000):
            problem = math_problem(rng, levels[i % len(levels)])
            if problem["question"] not in seen:
                break
        else:
            raise RuntimeError("could not draw a new distinct question")
        seen.add(problem["question"])
        rows.append(problem)
    return rows


# ---------------------------------------------------------------------------
# Instructions (Alpaca layout)
# ---------------------------------------------------------------------------


def _numbers(rng: random.Random, count: int) -> list[int]:
    return rng.sample(range(1, 100), count)


def _join(numbers) -> str:
    return ", ".join(str(x) for x in numbers)


def _task_reverse(rng):
    words = rng.sample(WORDS, rng.randint(3, 5))
    instruction = rng.choice(
        ("Reverse the order of these words.", "Write these words in reverse order.")
    )
    return instruction, " ".join(words), " ".join(reversed(words))


def _task_sort(rng):
    numbers = _numbers(rng, rng.randint(3, 5))
    if rng.random() < 0.5:
        return (
            "Sort these numbers from smallest to largest.",
            _join(numbers),
            _join(sorted(numbers)),
        )
    return (
        "Sort these numbers from largest to smallest.",
        _join(numbers),
        _join(sorted(numbers, reverse=True)),
    )


def _task_count_words(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
    return "Count the words in this text.", " ".join(words), f"There are {len(words)} words."


def _task_uppercase(rng):
    word = rng.choice(WORDS)
    return "Write this word in capital letters.", word, word.upper()


def _task_arithmetic(rng):
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        if op == "-" and a < b:
            a, b = b, a
    c = apply_op(a, op, b)
    if rng.random() < 0.5:
        return f"What is {a} {op} {b}?", "", f"{a} {op} {b} = {c}."
    verb = {"+": "Add", "-": "Subtract", "*": "Multiply"}[op]
    pair = f"{b} from {a}" if op == "-" else f"{a} and {b}"
    return f"{verb} {pair}.", "", f"{a} {op} {b} = {c}."


def _task_capital(rng):
    country, city = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", "", f"The capital of {country} is {city}."


def _task_opposite(rng):
    pair = rng.choice(OPPOSITES)
    word, other = pair if rng.random() < 0.5 else pair[::-1]
    if rng.random() < 0.5:
        return f"What is the opposite of {word}?", "", f"The opposite of {word} is {other}."
    return "Give the opposite of this word.", word, f"The opposite of {word} is {other}."


def _task_repeat(rng):
    word, times = rng.choice(WORDS), rng.randint(2, 5)
    return f"Repeat this word {times} times.", word, " ".join([word] * times)


def _task_extreme(rng):
    numbers = _numbers(rng, rng.randint(3, 5))
    if rng.random() < 0.5:
        return "Which number is the largest?", _join(numbers), f"The largest is {max(numbers)}."
    return "Which number is the smallest?", _join(numbers), f"The smallest is {min(numbers)}."


def _task_parity(rng):
    x = rng.randint(1, 99)
    return f"Is {x} even or odd?", "", f"{x} is {'odd' if x % 2 else 'even'}."


def _task_count(rng):
    start = rng.randint(1, 50)
    end = start + rng.randint(3, 6)
    return f"Count from {start} to {end}.", "", _join(range(start, end + 1))


def _task_animal(rng):
    animal, sound, legs, _ = rng.choice(ANIMALS)
    if rng.random() < 0.5:
        return f"What sound does a {animal} make?", "", f"A {animal} says {sound}."
    return f"How many legs does a {animal} have?", "", f"A {animal} has {legs} legs."


def _task_colour(rng):
    thing, colour = rng.choice(COLOURS)
    return f"What colour is {thing}?", "", f"{thing[0].upper()}{thing[1:]} is {colour}."


_TASKS = (
    _task_reverse,
    _task_sort,
    _task_count_words,
    _task_uppercase,
    _task_arithmetic,
    _task_capital,
    _task_opposite,
    _task_repeat,
    _task_extreme,
    _task_parity,
    _task_count,
    _task_animal,
    _task_colour,
)


def instruction_example(rng: random.Random) -> dict:
    """An Alpaca record (`instruction`, `input`, `output`) for one simple task."""
    instruction, input_text, output = rng.choice(_TASKS)(rng)
    return {"instruction": instruction, "input": input_text, "output": output}


def alpaca_prompt(example: dict) -> str:
    """The instruction with its input on the next line, as one user message."""
    if example["input"]:
        return f"{example['instruction']}\n{example['input']}"
    return example["instruction"]


# ---------------------------------------------------------------------------
# Preference pairs (explicit and HH-RLHF layouts)
# ---------------------------------------------------------------------------


def _wrong_solution(rng: random.Random, story: _Story) -> str:
    """The story's solution with one mistake whose final number is wrong: an
    arithmetic slip or a wrong operation (carried through the later steps), or
    stopping one step early."""
    steps = story.steps
    correct = _evaluate(steps)
    for _ in range(100):
        mistake = rng.choice(("slip", "slip", "operation", "early"))
        j = rng.randrange(len(steps))
        if mistake == "slip":
            delta = rng.choice((-10, -2, -1, 1, 2, 10))
            wrong = correct[j][2] + delta
            if wrong < 0:
                continue
            values = _evaluate(steps, {j: wrong})
            candidate = steps
        elif mistake == "operation":
            swap = {"+": "-", "-": "+", "*": "+"}.get(steps[j].op)
            if swap is None:
                continue
            candidate = list(steps)
            candidate[j] = replace(steps[j], op=swap)
            values = _evaluate(candidate)
        else:
            if len(steps) < 2:
                continue
            candidate, values = steps[:-1], correct[:-1]
        if values is not None and values[-1][2] != correct[-1][2]:
            return _render(candidate, values)
    # A slip in the last step always changes the final number.
    return _render(steps, _evaluate(steps, {len(steps) - 1: correct[-1][2] + 1}))


def _rambling(rng: random.Random, answer: str) -> str:
    before, after = rng.sample(FILLERS, 2)
    return " ".join([before] * rng.randint(2, 3) + [answer] + [after] * rng.randint(2, 3))


def _pair_parts(rng: random.Random, kind: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of one kind, the chosen verifiably better."""
    if kind == "math":
        story = _make_problem(rng, rng.choice(LEVELS))
        question = " ".join(story.sentences + [story.question])
        return question, _render(story.steps, _evaluate(story.steps)), _wrong_solution(rng, story)
    example = instruction_example(rng)
    answer = example["output"]
    if kind == "concise":
        return alpaca_prompt(example), answer, _rambling(rng, answer)
    if kind == "polite":
        polite = f"{rng.choice(POLITE_OPENERS)} {answer}"
        return alpaca_prompt(example), polite, f"{rng.choice(RUDE_PHRASES)} {answer}"
    raise ValueError(f"kind must be one of {PREFERENCE_KINDS}, got {kind!r}")


def preference_pair(rng: random.Random, kind: str | None = None) -> dict:
    """An explicit preference record: `prompt`, `chosen`, `rejected`, `kind`.

    math: a correct worked solution against one with a wrong step or final
    number; concise: the plain answer against one padded with repeated filler
    sentences; polite: a friendly answer against one with an insult. The kind is
    drawn at random unless given (the builder cycles kinds for exact balance).
    """
    kind = kind or rng.choice(PREFERENCE_KINDS)
    prompt, chosen, rejected = _pair_parts(rng, kind)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind}


def hh_dialogue_pair(rng: random.Random, kind: str | None = None) -> dict:
    """An Anthropic HH-RLHF record: `chosen` and `rejected` whole dialogues
    ("\\n\\nHuman: ...\\n\\nAssistant: ...") that share everything up to the last
    assistant turn. Some dialogues open with an earlier exchange."""
    kind = kind or rng.choice(PREFERENCE_KINDS)
    prompt, chosen, rejected = _pair_parts(rng, kind)
    prefix = ""
    if rng.random() < 0.4:
        if rng.random() < 0.5:
            human, assistant = rng.choice(GREETINGS)
        else:
            earlier = instruction_example(rng)
            human, assistant = alpaca_prompt(earlier), earlier["output"]
        prefix = f"\n\nHuman: {human}\n\nAssistant: {assistant}"
    prefix += f"\n\nHuman: {prompt}\n\nAssistant:"
    return {"chosen": f"{prefix} {chosen}", "rejected": f"{prefix} {rejected}"}


# ---------------------------------------------------------------------------
# Reasoning traces (OpenThoughts-style conversations, and ShareGPT)
# ---------------------------------------------------------------------------


def reasoning_from_problem(problem: dict) -> dict:
    """A conversation whose assistant turn thinks through the problem's steps,
    checks the last one by its inverse operation, then states the answer."""
    lines = problem["answer"].split("\n")
    steps, final = lines[:-1], final_answer(problem["answer"])
    a, op, b, c = EQUATION.findall(steps[-1])[-1]
    check = f"Check: {c} {INVERSE[op]} {b} = {a}."
    think = "\n".join(steps + [check])
    content = f"<think>\n{think}\n</think>\nThe answer is {final}.\n#### {final}"
    return {
        "messages": [
            {"role": "user", "content": problem["question"]},
            {"role": "assistant", "content": content},
        ]
    }


def reasoning_trace(rng: random.Random, level: int | None = None) -> dict:
    """A reasoning conversation (`messages`) for a fresh math problem."""
    return reasoning_from_problem(math_problem(rng, level or rng.choice(LEVELS)))


SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def to_sharegpt(example: dict) -> dict:
    """`{"messages": [{"role", "content"}]}` as ShareGPT `{"conversations": [{"from", "value"}]}`."""
    return {
        "conversations": [
            {"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in example["messages"]
        ]
    }


# ---------------------------------------------------------------------------
# Plain text
# ---------------------------------------------------------------------------

_PLACES = ("park", "beach", "farm", "shop", "school", "forest", "lake", "garden")
_TOYS = ("ball", "kite", "bike", "boat", "drum", "car")
_COLOUR_WORDS = ("red", "blue", "green", "yellow", "white", "black")
_STORY_MIDDLE = (
    "{He} sees a {animal} there.",
    "The {animal} looks at {him} and runs away.",
    "{F} comes to play too.",
    "They play with the {toy} for a long time.",
    "The sun is warm and the sky is blue.",
    "It starts to rain, so they go inside.",
    "{He} finds {k} shells on the ground.",
    "{F} gives {him} an apple.",
    "{He} reads a book about a {animal}.",
    "They sing a song together.",
)
_STORY_END = (
    "In the evening {he} goes home.",
    "{He} is very happy.",
    "Then {he} eats dinner and goes to bed.",
    "It was a good day.",
)


def _story_text(rng):
    (name, gender), (friend, _) = rng.sample(NAMES, 2)
    he, him, his = PRONOUNS[gender]
    fields = dict(
        N=name,
        F=friend,
        He=he.capitalize(),
        he=he,
        him=him,
        his=his,
        animal=rng.choice(ANIMALS)[0],
        toy=rng.choice(_TOYS),
        place=rng.choice(_PLACES),
        colour=rng.choice(_COLOUR_WORDS),
        k=rng.randint(2, 9),
    )
    start = rng.choice(
        (
            "{N} has a {colour} {toy}. One day {he} takes it to the {place}.",
            "One day {N} goes to the {place} with {his} {colour} {toy}.",
            "{N} lives near a {place}. {He} has a {colour} {toy}.",
        )
    )
    # Keep the middle sentences in table order so the story stays in a sensible sequence.
    middle = sorted(rng.sample(range(len(_STORY_MIDDLE)), rng.randint(2, 3)))
    sentences = [start] + [_STORY_MIDDLE[i] for i in middle] + [rng.choice(_STORY_END)]
    return " ".join(sentences).format(**fields)


def _capital_text(rng):
    return " ".join(
        f"The capital of {country} is {city}." for country, city in rng.sample(CAPITALS, 3)
    )


def _animal_text(rng):
    animal, sound, legs, home = rng.choice(ANIMALS)
    facts = [f"A {animal} says {sound}.", f"A {animal} has {legs} legs."]
    facts.append(
        f"A {animal} lives in a {home}." if home != "farm" else f"A {animal} lives on a farm."
    )
    rng.shuffle(facts)
    return " ".join(facts)


def _colour_text(rng):
    return " ".join(f"{thing[0].upper()}{thing[1:]} is {c}." for thing, c in rng.sample(COLOURS, 3))


def _opposite_text(rng):
    return " ".join(f"The opposite of {a} is {b}." for a, b in rng.sample(OPPOSITES, 3))


def _day_text(rng):
    i = rng.randrange(len(DAYS) - 2)
    return (
        f"{DAYS[i]} comes before {DAYS[i + 1]}. After {DAYS[i + 1]} comes {DAYS[i + 2]}. "
        f"A week has {len(DAYS)} days."
    )


def _number_text(rng):
    facts = []
    for _ in range(rng.randint(3, 5)):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            if op == "-" and a < b:
                a, b = b, a
        facts.append(f"{a} {op} {b} = {apply_op(a, op, b)}.")
    if rng.random() < 0.5:
        n = rng.randint(1, 11)
        facts.append(f"{NUMBER_WORDS[n].capitalize()} and one make {NUMBER_WORDS[n + 1]}.")
    return " ".join(facts)


# Stories are weighted up: they carry most of the general-English vocabulary.
_TEXTS = (
    _story_text,
    _story_text,
    _story_text,
    _capital_text,
    _animal_text,
    _colour_text,
    _opposite_text,
    _day_text,
    _number_text,
    _number_text,
)


def text_passage(rng: random.Random) -> dict:
    """`{"text": ...}`: a short story or a few facts from the fixed tables."""
    return {"text": rng.choice(_TEXTS)(rng)}
