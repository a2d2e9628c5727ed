"""What may enter the run store: JSON texts within a size and a depth, numbers that fit the records (64-bit integers,
finite floats), bounded strings, and run reports whose rounds, sites, weights and metrics are in range. Every
refusal is an InvalidArgument that quotes at most a short prefix of the input (`quote`), so an error never grows
with what a client sent."""

import json

from feddem.server.store.errors import InvalidArgument

MAX_CONFIG_BYTES = 64 << 10  # a run config is a few dozen keys
MAX_REPORT_BYTES = 8 << 20  # a report with thousands of sites and rounds; stays under the API's 16 MiB messages
MAX_DEPTH = 16  # nesting of objects and arrays in a config or report
INT64 = 1 << 63
UINT64_END = 1 << 64  # JSON values may hold unsigned 64-bit ids (Flower's run ids)
MAX_ROUND = 1_000_000
MAX_SITES = 10_000
MAX_WEIGHTS = 200_000  # rows of a report (sites x rounds): a run's GetRun answer stays a few MB
MAX_METRICS = 100_000
MAX_NAME = 128  # a site, domain, stage or aggregation name
MAX_TEXT = 4096  # a path or model reference


def quote(value, limit: int = 48) -> str:
    """`value` for an error message: its repr when short, else the repr of a prefix and its length."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def text(value, what: str, limit: int = MAX_NAME, empty: bool = True) -> str:
    """A string of at most `limit` characters, without control characters."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidArgument(f"{what} {quote(value)} is longer than {limit} characters")
    if not empty and not value:
        raise InvalidArgument(f"{what} is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument(f"{what} {quote(value)} holds control characters")
    return value


def integer(value, what: str, low: int = 0, high: int = INT64 - 1) -> int:
    """An integer in [low, high] (a float with an integral value is accepted, as JSON writers may emit 3.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be an integer, got {quote(value)}")
    if not low <= value <= high:
        raise InvalidArgument(f"{what} {quote(value)} is outside [{low}, {high}]")
    return value


def check_tree(value, what: str) -> None:
    """A decoded JSON value: nested at most MAX_DEPTH deep, integers within 64 bits (signed or unsigned: Flower's
    run and node ids are unsigned 64-bit), floats finite, keys strings."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):  # (a tuple: what json.dumps writes as an array)
            if depth > MAX_DEPTH:
                raise InvalidArgument(f"{what} is nested more than {MAX_DEPTH} levels deep")
            if isinstance(item, dict):
                for key in item:
                    if not isinstance(key, str):
                        raise InvalidArgument(f"{what} has a key that is not a string: {quote(key)}")
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, bool) or item is None or isinstance(item, str):
            continue
        elif isinstance(item, int):
            if not -INT64 <= item < UINT64_END:
                raise InvalidArgument(f"{what} holds an integer beyond 64 bits: {quote(item)}")
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                raise InvalidArgument(f"{what} holds a number that is not finite ({item})")
        else:
            raise InvalidArgument(f"{what} holds a {type(item).__name__}, which JSON does not have")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def parse_json(raw: str, what: str, max_bytes: int):
    """Decode a JSON text of at most `max_bytes` UTF-8 bytes and check it with `check_tree`."""
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidArgument(f"{what} is {size} bytes, more than the {max_bytes} allowed")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidArgument(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # JSONDecodeError, an integer of more than 4300 digits, NaN/Infinity
        raise InvalidArgument(f"{what} is not JSON: {str(exc)[:200]}") from None
    check_tree(value, what)
    return value


def encode(value, what: str, max_bytes: int) -> str:
    """A config or report (already decoded) as the JSON text the store keeps, checked like `parse_json`'s."""
    check_tree(value, what)
    raw = json.dumps(value)
    if len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidArgument(f"{what} is more than the {max_bytes} bytes allowed")
    return raw


def check_config(config) -> str:
    """A run config: a JSON object of at most MAX_CONFIG_BYTES; returns its JSON text."""
    if not isinstance(config, dict):
        raise InvalidArgument("the run config must be a JSON object")
    raw = encode(config, "the run config", MAX_CONFIG_BYTES)
    for key in ("aggregation", "weighting"):
        if key in config:
            text(str(config[key]), f"config {key}", 64)
    return raw
