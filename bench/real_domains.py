"""Site data for the benchmarks from real text that is already on this machine (no generator, no download).

Four domains, each written as a site folder `NAME/train.jsonl` + `NAME/test.jsonl` in a format `common.data` reads:
- `stdlib_docs` (instruction, prompt/completion): "What does `module.name` do?" answered by the first sentence of
  that function's or class's real docstring, over a fixed list of standard-library modules;
- `unicode_names` (chat, `messages`): "What is the Unicode name of U+XXXX (c)?" answered by `unicodedata.name`,
  over letters, symbols and punctuation of a fixed list of Unicode blocks, with a system turn;
- `python_reference` (text): paragraphs of the Python language reference shipped with CPython
  (`pydoc_data.topics`, the text `help()` shows);
- `licenses` (text): paragraphs of the licence files of the installed packages (`*.dist-info/LICENSE*`,
  `COPYING*`, `NOTICE*`), de-duplicated (many packages ship the same MIT or Apache text).

The examples of each domain are collected in a fixed order, de-duplicated, shuffled with `random.Random(seed)` and
cut into train and held-out parts: deterministic for a seed on a given interpreter and environment (the text is
whatever this Python and these packages ship). A domain with fewer examples than asked keeps them all and holds out
`heldout` first.

    python bench/real_domains.py --out runs/real-domains            # all four, 400 train + 48 held out each
    python -m feddem.server.cli simulate --data runs/real-domains --model smollm2-135m --lora ...
"""

import argparse
import functools
import importlib
import inspect
import json
import random
import re
import sys
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path

STDLIB_MODULES = (
    "argparse", "base64", "binascii", "bisect", "calendar", "collections", "colorsys", "configparser", "copy",
    "csv", "datetime", "decimal", "difflib", "email.utils", "enum", "filecmp", "fnmatch", "fractions", "functools",
    "getpass", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect",
    "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "math", "mimetypes",
    "operator", "os", "os.path", "pathlib", "pickle", "platform", "plistlib", "pprint", "queue", "quopri",
    "random", "re", "reprlib", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "traceback", "typing", "unicodedata", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "webbrowser", "zipfile", "zlib",
)
UNICODE_RANGES = (  # (first, last) code points: Latin, Greek, Cyrillic, arrows, maths, box drawing, shapes, dingbats
    (0x00C0, 0x024F), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x2010, 0x205E), (0x20A0, 0x20C0), (0x2100, 0x214F),
    (0x2190, 0x21FF), (0x2200, 0x22FF), (0x2500, 0x257F), (0x25A0, 0x25FF), (0x2600, 0x26FF), (0x2700, 0x27BF),
)
UNICODE_SYSTEM = "You answer with the official Unicode character name in capital letters, nothing else."
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
MIN_PARAGRAPH, MAX_PARAGRAPH = 80, 1200  # characters of a text example
MIN_SENTENCE, MAX_SENTENCE = 15, 240  # characters of a docstring answer


def _squash(text: str) -> str:
    return " ".join(text.split())


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring's first prose paragraph (a leading signature line such as
    `sum(iterable, /, start=0)` skipped), or None when there is none of a usable length."""
    if not doc:
        return None
    for paragraph in re.split(r"\n\s*\n", doc.strip()):
        text = _squash(paragraph)
        if not text or re.fullmatch(r"[\w.]+\(.*\)( -> .*)?", text):  # a signature, not prose
            continue
        match = re.match(r"(.+?[.!?])(\s|$)", text)
        sentence = match.group(1) if match else text
        return sentence if MIN_SENTENCE <= len(sentence) <= MAX_SENTENCE else None
    return None


def stdlib_docs() -> list[dict]:
    """prompt/completion pairs: a public function's or class's qualified name -> its docstring's first sentence."""
    with warnings.catch_warnings():  # some modules warn on attribute access (typing.re, deprecated aliases)
        warnings.simplefilter("ignore")
        return _stdlib_docs()


def _stdlib_docs() -> list[dict]:
    rows, seen = [], set()
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a module this build lacks (e.g. sqlite3): skipped
            continue
        for name in sorted(vars(module)):
            obj = vars(module)[name]
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            answer = first_sentence(inspect.getdoc(obj) if inspect.isclass(obj) else obj.__doc__)
            key = f"{module_name}.{name}"
            if answer is None or key in seen:
                continue
            seen.add(key)
            kind = "class" if inspect.isclass(obj) else "function"
            rows.append({"prompt": f"In Python, what does the {kind} `{key}` do?", "completion": answer})
    return rows


def unicode_names() -> list[dict]:
    """Conversations: a code point and its character -> the character's Unicode name."""
    rows = []
    for first, last in UNICODE_RANGES:
        for code in range(first, last + 1):
            char = chr(code)
            name = unicodedata.name(char, "")
            if not name or unicodedata.category(char)[0] not in "LSP":
                continue
            rows.append({"messages": [
                {"role": "system", "content": UNICODE_SYSTEM},
                {"role": "user", "content": f"What is the Unicode name of U+{code:04X} ({char})?"},
                {"role": "assistant", "content": name},
            ]})
    return rows


def _paragraphs(text: str) -> list[str]:
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        squashed = _squash(paragraph)
        if MIN_PARAGRAPH <= len(squashed) <= MAX_PARAGRAPH:
            out.append(squashed)
    return out


def python_reference() -> list[dict]:
    """Text: the paragraphs of CPython's language-reference topics (`pydoc_data.topics.topics`), in topic order."""
    from pydoc_data.topics import topics

    return [{"text": p} for name in sorted(topics) for p in _paragraphs(topics[name])]


def licenses() -> list[dict]:
    """Text: the paragraphs of every installed distribution's licence files, in distribution-name order."""
    from importlib.metadata import distributions

    texts = {}
    for dist in distributions():
        for file in dist.files or []:
            if Path(str(file)).name.upper().startswith(LICENSE_PREFIXES):
                path = Path(dist.locate_file(file))
                if path.is_file() and path.stat().st_size < 1 << 20:
                    texts[(dist.metadata["Name"] or "").lower(), str(file)] = path
    rows = []
    for key in sorted(texts):
        try:
            text = texts[key].read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        rows += [{"text": p} for p in _paragraphs(text)]
    return rows


DOMAINS: dict[str, Callable[[], list[dict]]] = {
    "stdlib_docs": stdlib_docs,
    "unicode_names": unicode_names,
    "python_reference": python_reference,
    "licenses": licenses,
}


@functools.lru_cache(maxsize=None)
def _collected(name: str) -> tuple[str, ...]:
    """A domain's examples as JSON lines, de-duplicated, in collection order (collected once per process)."""
    seen, out = set(), []
    for row in DOMAINS[name]():
        line = json.dumps(row, ensure_ascii=False)
        if line not in seen:
            seen.add(line)
            out.append(line)
    return tuple(out)


def domain_rows(name: str, train: int, heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A domain's (train, held-out) rows: collected, de-duplicated, shuffled with the seed, held-out part first."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain '{name}': choose from {', '.join(DOMAINS)}")
    rows = [json.loads(line) for line in _collected(name)]
    random.Random(f"{seed}:{name}").shuffle(rows)
    if len(rows) < heldout + 1:
        raise ValueError(f"domain '{name}' has {len(rows)} examples on this machine: fewer than {heldout} held out "
                         f"plus one to train on")
    return rows[heldout : heldout + train], rows[:heldout]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def build_domains(out: Path, domains: list[str] | None = None, train: int = 400, heldout: int = 48,
                  seed: int = 0) -> Path:
    """Write one site folder per domain (`out/NAME/train.jsonl`, `test.jsonl`) and return `out`, the data spec for
    `--data` (sites take the folders in name order). Files already there are rewritten; the folder of a domain of
    this module that is not asked for this time is removed (it would be one more site)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in set(DOMAINS) - set(domains or DOMAINS):
        for split in ("train", "test"):
            (out / name / f"{split}.jsonl").unlink(missing_ok=True)
        if (out / name).is_dir() and not any((out / name).iterdir()):
            (out / name).rmdir()
    for name in domains or list(DOMAINS):
        train_rows, heldout_rows = domain_rows(name, train, heldout, seed)
        folder = out / name
        folder.mkdir(exist_ok=True)
        _write_jsonl(folder / "train.jsonl", train_rows)
        _write_jsonl(folder / "test.jsonl", heldout_rows)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the site folders into")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--train", type=int, default=400, help="train examples per domain (default: 400)")
    parser.add_argument("--heldout", type=int, default=48, help="held-out examples per domain (default: 48)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_domains(args.out, args.domains, args.train, args.heldout, args.seed)
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        counts = [sum(1 for _ in open(folder / f"{s}.jsonl", encoding="utf-8")) for s in ("train", "test")]
        print(f"{folder.name}: {counts[0]} train, {counts[1]} held out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
