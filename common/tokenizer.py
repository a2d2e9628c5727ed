"""The embedded byte-level tokenizer: one token per byte plus <s>, </s>, <pad>, built in code with `tokenizers`.

It is a plain `PreTrainedTokenizerFast`, so `save_pretrained` writes a standard `tokenizer.json` and
`AutoTokenizer.from_pretrained` loads it back with no custom code.
"""

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from feddem.common.chat_format import PLAIN_CHAT_TEMPLATE

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[str, ...]:
    """The printable stand-in character of each byte value 0..255, as ByteLevel pre-tokenization writes them."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def build_byte_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0..255 are the bytes, then <s>, </s>, <pad>; chat data is rendered with the
    plain chat template (`common.chat_format.PLAIN_CHAT_TEMPLATE`)."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=model_max_length
    )
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok
