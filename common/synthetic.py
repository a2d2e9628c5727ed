"""Built-in synthetic domains: small text distributions that differ clearly, generated deterministically.

Each generator draws one example from a `random.Random`; `make_domain` draws unique examples and splits them
into train and held-out parts that never share an example.
"""

import random
from typing import Callable

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
_CITIES = ["paris", "lima", "oslo", "cairo", "tokyo", "quito", "delhi", "rome", "accra", "perth"]
_JOBS = ["nurse", "clerk", "pilot", "baker", "judge", "miner", "actor", "coder"]


def arithmetic(rng: random.Random) -> str:
    """Sums, differences and products of small integers, with their answers."""
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    if op == "*":
        a, b = a % 100, b % 100
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a}{op}{b}={result}"


def records(rng: random.Random) -> str:
    """Structured key/value records about people."""
    name = rng.choice(_NAMES)
    age = rng.randint(18, 90)
    return (
        f"{{id:{rng.randint(1000, 9999)};name:{name};age:{age};city:{rng.choice(_CITIES)};"
        f"job:{rng.choice(_JOBS)};born:{2026 - age}}}"
    )


_DET = ["the", "a", "every", "no", "this"]
_ADJ = ["small", "red", "quiet", "old", "happy", "bright", "lazy"]
_NOUN = ["cat", "dog", "bird", "child", "farmer", "river", "teacher", "horse"]
_VERB = ["sees", "likes", "follows", "finds", "helps", "watches"]
_ADV = ["slowly", "today", "again", "quietly", "often"]


def prose(rng: random.Random) -> str:
    """Sentences of a small English-like grammar."""
    def noun_phrase() -> str:
        adj = f"{rng.choice(_ADJ)} " if rng.random() < 0.6 else ""
        return f"{rng.choice(_DET)} {adj}{rng.choice(_NOUN)}"

    sentence = f"{noun_phrase()} {rng.choice(_VERB)} {noun_phrase()}"
    if rng.random() < 0.5:
        sentence += f" {rng.choice(_ADV)}"
    if rng.random() < 0.3:
        sentence += f" and {noun_phrase()} {rng.choice(_VERB)} {noun_phrase()}"
    return sentence[0].upper() + sentence[1:] + "."


_FUNCS = ["load", "parse", "emit", "merge", "scan", "fetch", "sort"]


def code(rng: random.Random) -> str:
    """Assignment and call lines of a small programming language."""
    def var() -> str:
        return f"{rng.choice('xyzuvw')}{rng.randint(0, 9)}"

    kind = rng.randrange(3)
    if kind == 0:
        return f"{var()} = {rng.choice(_FUNCS)}({var()}, {rng.randint(0, 99)});"
    if kind == 1:
        return f"if ({var()} > {rng.randint(0, 99)}) {{ {var()} += {var()}; }}"
    return f"for (i = 0; i < {rng.randint(1, 64)}; i++) {rng.choice(_FUNCS)}({var()}[i]);"


DOMAINS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": arithmetic,
    "records": records,
    "prose": prose,
    "code": code,
}


def make_domain(name: str, train_size: int, heldout_size: int, seed: int) -> tuple[list[str], list[str]]:
    """Unique examples of one domain, split into train and held-out lists that do not overlap."""
    generate = DOMAINS[name]
    rng = random.Random(f"{seed}:{name}")
    wanted = train_size + heldout_size
    seen: dict[str, None] = {}
    attempts = 0
    while len(seen) < wanted:
        seen.setdefault(generate(rng), None)
        attempts += 1
        if attempts > 50 * wanted + 1000:
            raise ValueError(f"domain '{name}' cannot produce {wanted} distinct examples")
    examples = list(seen)
    return examples[:train_size], examples[train_size:]
