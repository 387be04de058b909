"""Packing: documents into fixed token windows, windows into training batches.

A stream of documents is laid end to end as one token sequence T, with a position sequence P that
is 0 at each document's first token and counts up within the document. With L = seq_len, window k
of the stream is T[k*L : k*L + L + 1] (and P over the same span): consecutive windows overlap by one
token, so every token is an input exactly once and every next-token target inside a document is a
label exactly once, also where a long document runs on from one window into the next.

Batch rule for a window w with positions p (the model reads document boundaries off position 0):
    input_ids    = w[:-1]
    position_ids = p[:-1]   0 exactly at document starts; a window opening mid-document carries on
                            that document's positions
    labels       = w[1:], but IGNORE_INDEX wherever p[1:] == 0: there the input is the last token of
                   a document (its EOS) and the "next token" is the first of an unrelated document,
                   so no target crosses a document boundary.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

IGNORE_INDEX = -100

_positions = np.arange(1 << 16, dtype=np.int32)


def document_positions(length: int) -> np.ndarray:
    """0, 1, ..., length - 1 as int32, sliced from a cached range (grown by doubling)."""
    global _positions
    if length > len(_positions):
        _positions = np.arange(max(length, 2 * len(_positions)), dtype=np.int32)
    return _positions[:length]


class Packer:
    """Cuts one stream of documents into overlapping seq_len + 1 windows.

    The tokens read but not yet fully emitted (the leftover) are part of the resumable state. The
    arrays are never written in place (a refill builds new ones), so `leftover()` views stay valid
    as snapshots while packing goes on.
    """

    def __init__(self, seq_len: int, tokens: np.ndarray | None = None, positions: np.ndarray | None = None):
        self.seq_len = seq_len
        self._tokens = np.empty(0, np.int32) if tokens is None else np.asarray(tokens, np.int32)
        self._positions = np.empty(0, np.int32) if positions is None else np.asarray(positions, np.int32)
        if len(self._tokens) != len(self._positions):
            raise ValueError("packer state: tokens and positions differ in length")
        self._start = 0

    def next_window(self, next_document: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The next (tokens, positions) window, each seq_len + 1 int32 values (read-only views)."""
        size = self.seq_len + 1
        if len(self._tokens) - self._start < size:
            self._refill(next_document, size)
        window = slice(self._start, self._start + size)
        self._start += self.seq_len  # the window's last token opens the next window
        return self._tokens[window], self._positions[window]

    def leftover(self) -> tuple[np.ndarray, np.ndarray]:
        return self._tokens[self._start :], self._positions[self._start :]

    def _refill(self, next_document: Callable[[], np.ndarray], size: int) -> None:
        tokens, positions = self.leftover()
        token_parts, position_parts, have = [tokens], [positions], len(tokens)
        while have < size:
            document = next_document()
            token_parts.append(document)
            position_parts.append(document_positions(len(document)))
            have += len(document)
        # One concatenation per refill: a document far longer than the window is copied once, not
        # once per window cut from it.
        self._tokens = np.concatenate(token_parts)
        self._positions = np.concatenate(position_parts)
        self._start = 0


def windows_to_batch(tokens_bw: np.ndarray, positions_bw: np.ndarray) -> dict[str, torch.Tensor]:
    """[b, seq_len + 1] token and position windows -> int64 input_ids, labels, position_ids [b, seq_len]."""
    labels = tokens_bw[:, 1:].astype(np.int64)
    labels[positions_bw[:, 1:] == 0] = IGNORE_INDEX
    return {
        "input_ids": torch.from_numpy(tokens_bw[:, :-1].astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions_bw[:, :-1].astype(np.int64)),
    }
