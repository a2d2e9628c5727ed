"""Built-in synthetic domains: small text distributions that differ clearly, generated deterministically.

Each generator draws one example from a `random.Random`; `make_domain` draws unique examples and splits them
into train and held-out parts that never share an example. With `general=True` a generator draws from a part of
its vocabulary only (fewer names, words, operators): that is the base model's general mixture, so a site's domain
teaches the base something it has not seen, as a real domain corpus does.
"""

import random
from typing import Callable

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
_CITIES = ["paris", "lima", "oslo", "cairo", "tokyo", "quito", "delhi", "rome", "accra", "perth"]
_JOBS = ["nurse", "clerk", "pilot", "baker", "judge", "miner", "actor", "coder"]


def _pick(rng: random.Random, items, general: bool):
    """A random item; the general mixture sees only the first half of each list."""
    return rng.choice(items[: max(1, len(items) // 2)] if general else items)


def arithmetic(rng: random.Random, general: bool = False) -> str:
    """Sums, differences and products of small integers, with their answers."""
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = _pick(rng, "+-*", general)
    if op == "*":
        a, b = a % 100, b % 100
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a}{op}{b}={result}"


def records(rng: random.Random, general: bool = False) -> str:
    """Structured key/value records about people."""
    name = _pick(rng, _NAMES, general)
    age = rng.randint(18, 90)
    return (
        f"{{id:{rng.randint(1000, 9999)};name:{name};age:{age};city:{_pick(rng, _CITIES, general)};"
        f"job:{_pick(rng, _JOBS, general)};born:{2026 - age}}}"
    )


_DET = ["the", "a", "every", "no", "this"]
_ADJ = ["small", "red", "quiet", "old", "happy", "bright", "lazy"]
_NOUN = ["cat", "dog", "bird", "child", "farmer", "river", "teacher", "horse"]
_VERB = ["sees", "likes", "follows", "finds", "helps", "watches"]
_ADV = ["slowly", "today", "again", "quietly", "often"]


def prose(rng: random.Random, general: bool = False) -> str:
    """Sentences of a small English-like grammar."""
    def noun_phrase() -> str:
        adj = f"{_pick(rng, _ADJ, general)} " if rng.random() < 0.6 else ""
        return f"{_pick(rng, _DET, general)} {adj}{_pick(rng, _NOUN, general)}"

    sentence = f"{noun_phrase()} {_pick(rng, _VERB, general)} {noun_phrase()}"
    if rng.random() < 0.5:
        sentence += f" {_pick(rng, _ADV, general)}"
    if rng.random() < 0.3:
        sentence += f" and {noun_phrase()} {_pick(rng, _VERB, general)} {noun_phrase()}"
    return sentence[0].upper() + sentence[1:] + "."


_FUNCS = ["load", "parse", "emit", "merge", "scan", "fetch", "sort"]


def code(rng: random.Random, general: bool = False) -> str:
    """Assignment and call lines of a small programming language."""
    def var() -> str:
        return f"{_pick(rng, 'xyzuvw', general)}{rng.randint(0, 9)}"

    kind = rng.randrange(2 if general else 3)
    if kind == 0:
        return f"{var()} = {_pick(rng, _FUNCS, general)}({var()}, {rng.randint(0, 99)});"
    if kind == 1:
        return f"if ({var()} > {rng.randint(0, 99)}) {{ {var()} += {var()}; }}"
    return f"for (i = 0; i < {rng.randint(1, 64)}; i++) {_pick(rng, _FUNCS, general)}({var()}[i]);"


DOMAINS: dict[str, Callable[..., str]] = {
    "arithmetic": arithmetic,
    "records": records,
    "prose": prose,
    "code": code,
}


def make_domain(name: str, train_size: int, heldout_size: int, seed: int,
                general: bool = False) -> tuple[list[str], list[str]]:
    """Unique examples of one domain, split into train and held-out lists that do not overlap."""
    def generate(r: random.Random) -> str:
        return DOMAINS[name](r, general)

    rng = random.Random(f"{seed}:{name}:{'general' if general else 'domain'}")
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
