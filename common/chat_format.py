"""Instruction and chat examples: which format a shard is in, checking its rows, and rendering them for training.

Accepted formats (what TRL's `SFTTrainer` takes), one per shard, chosen by columns in this order:
- conversations: `messages`, a list of `{"role": ..., "content": ...}` (roles system, user, assistant), with at
  least one assistant turn;
- prompt/completion: `prompt` + `completion`, or `prompt` + `response`;
- alpaca: `instruction` + `output`, with an optional `input` (appended to the instruction after a blank line);
- plain text: `text`, or the column named by `--text-column`.

Every instruction format becomes a `messages` list (prompt/completion: one user turn, one assistant turn) and is
rendered with the model's chat template; a tokenizer without one gets `PLAIN_CHAT_TEMPLATE`:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}{eos}\\n

The loss counts the assistant turns only (their content and the template's end-of-turn text); every other token
is labelled -100.
"""

from dataclasses import dataclass

from feddem.common.errors import FeddemError

ROLES = ("system", "user", "assistant")
TEXT, CHAT = "text", "chat"

# name -> the columns that must be present (non-null) in a row; checked in this order
FORMATS = {
    "messages": ("messages",),
    "prompt/completion": ("prompt", "completion"),
    "prompt/response": ("prompt", "response"),
    "alpaca (instruction/input/output)": ("instruction", "output"),
}
ACCEPTED = ("'text' (or --text-column NAME); 'prompt'+'completion'; 'prompt'+'response'; alpaca "
            "'instruction'+'output' (+ optional 'input'); 'messages' (a list of {role, content})")

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _present(row: dict, columns: tuple[str, ...]) -> bool:
    return all(row.get(c) is not None for c in columns)


def _row_format(row: dict, text_column: str) -> str | None:
    for name, columns in FORMATS.items():
        if _present(row, columns):
            return name
    return TEXT if row.get(text_column) is not None else None


def _string(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise FeddemError(f"{where}: field '{field}' must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise FeddemError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got "
                          f"{'an empty list' if value == [] else type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise FeddemError(f"{where}: messages[{i}] must be an object with 'role' and 'content', got {message!r:.80}")
        role = _string(message["role"], where, f"messages[{i}].role")
        if role not in ROLES:
            raise FeddemError(f"{where}: messages[{i}] has unknown role '{role}' (accepted: {', '.join(ROLES)})")
        out.append({"role": role, "content": _string(message["content"], where, f"messages[{i}].content")})
    if not any(m["role"] == "assistant" for m in out):
        raise FeddemError(f"{where}: 'messages' has no assistant turn: nothing to learn from")
    return out


def _to_messages(row: dict, fmt: str, where: str) -> list[dict]:
    if fmt == "messages":
        return _messages(row["messages"], where)
    if fmt == "alpaca (instruction/input/output)":
        prompt = _string(row["instruction"], where, "instruction")
        if row.get("input") is not None and _string(row["input"], where, "input").strip():
            prompt += "\n\n" + row["input"]
        answer = _string(row["output"], where, "output")
    else:
        prompt = _string(row["prompt"], where, "prompt")
        answer = _string(row[FORMATS[fmt][1]], where, FORMATS[fmt][1])
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def canonical_rows(rows: list[dict], source: str, text_column: str = "text") -> tuple[str, list]:
    """The kind of a shard's rows (TEXT or CHAT) and their canonical values: the texts (empty ones dropped) or the
    `messages` lists. A FeddemError names `source`, the row and the problem: no known columns (listing the columns
    found and the formats accepted), a mix of formats, a non-string field, a malformed `messages` list."""
    if not rows:
        raise FeddemError(f"{source} holds no examples")
    formats = [_row_format(row, text_column) for row in rows]
    if None in formats:
        index = formats.index(None)
        found = sorted(k for k, v in rows[index].items() if v is not None)
        raise FeddemError(f"{source}, row {index + 1}: no known columns (found: {', '.join(found) or 'none'}); "
                          f"accepted formats: {ACCEPTED}")
    kinds = sorted(set(formats))
    if len(kinds) > 1:
        first = {k: formats.index(k) + 1 for k in kinds}
        raise FeddemError(f"{source} mixes formats in one shard: "
                          + ", ".join(f"{k} (first at row {first[k]})" for k in kinds)
                          + "; give each shard one format")
    fmt = kinds[0]
    if fmt == TEXT:
        texts = [_string(row[text_column], f"{source}, row {i + 1}", text_column) for i, row in enumerate(rows)]
        return TEXT, [t for t in texts if t.strip()]
    return CHAT, [_to_messages(row, fmt, f"{source}, row {i + 1}") for i, row in enumerate(rows)]


def chat_template_of(tokenizer) -> str:
    """The tokenizer's chat template, or `PLAIN_CHAT_TEMPLATE` when it has none."""
    return getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    """The text of `messages` under the model's chat template (a prompt ending in the assistant header when
    `generation_prompt`)."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template_of(tokenizer), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own errors for templates that refuse a conversation
        raise FeddemError(f"the model's chat template refused a conversation ({type(exc).__name__}: {exc})") from None


def _segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces that concatenate to the full rendering."""
    full = render(tokenizer, messages)
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        end = render(tokenizer, messages[: i + 1])
        if not (full.startswith(end) and end.startswith(start) and len(start) >= done):
            # a template that rewrites earlier turns: label the assistant content where it appears
            at = full.find(message["content"], done)
            if at < 0:
                raise FeddemError("the model's chat template does not keep assistant turns as written")
            start, end = full[:at], full[: at + len(message["content"])]
        pieces += [(full[done: len(start)], False), (end[len(start):], True)]
        done = len(end)
    pieces.append((full[done:], False))
    return [(text, assistant) for text, assistant in pieces if text]


@dataclass
class Encoded:
    """One tokenised example: ids and labels (-100 where the loss does not count) of equal length."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def encode_conversation(tokenizer, messages: list[dict], seq_len: int) -> Encoded:
    """Token ids of the rendered conversation and labels that count the assistant turns only; cut to `seq_len`
    tokens (`truncated` then says so)."""
    ids, labels = [], []
    for text, assistant in _segments(tokenizer, messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if assistant else [-100] * len(piece)
    truncated = len(ids) > seq_len
    return Encoded(ids[:seq_len], labels[:seq_len], truncated)


def split_for_generation(messages: list[dict]) -> tuple[list[dict], str]:
    """The prompt (every turn before the last assistant turn) and the reference answer (that turn's content)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
