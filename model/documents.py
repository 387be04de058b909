"""Document boundaries of a packed batch, derived once per forward from `position_ids`.

The data loader packs documents into fixed windows and marks each document start with position 0
(a window may also begin in the middle of a document, with positions continuing). Every mixer reads
the boundaries from here: attention masks across documents, the DeltaNet conv and recurrent state
restart at each one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DocumentLayout:
    """Legend: b = batch row, t = position in the row, n = segments (documents pieces) in the batch."""

    position_ids_bt: torch.Tensor  # RoPE positions (restart at 0 at each document start)
    segment_pos_bt: torch.Tensor  # index of each token inside its segment of the row (conv taps)
    segment_ids_bt: torch.Tensor | None  # None when each row is a single segment (no packing)
    cu_seqlens_n1: torch.Tensor | None  # int32 segment offsets over the flattened batch, when packed
    max_seqlen: int

    @property
    def is_packed(self) -> bool:
        return self.segment_ids_bt is not None

    @classmethod
    def from_position_ids(
        cls, position_ids_bt: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
    ) -> DocumentLayout:
        if position_ids_bt is None:
            pos = torch.arange(seq_len, device=device).expand(batch, seq_len)
            return cls(pos, pos, None, None, seq_len)
        if position_ids_bt.shape != (batch, seq_len):
            raise ValueError(
                f"position_ids has shape {tuple(position_ids_bt.shape)}, "
                f"expected (batch, seq) = {(batch, seq_len)}"
            )
        if (position_ids_bt < 0).any():
            raise ValueError("position_ids must be >= 0 (0 marks the start of a document)")
        starts_bt = position_ids_bt == 0
        starts_bt[:, 0] = True  # a row may open in the middle of a document: a new segment all the same
        segment_ids_bt = starts_bt.flatten().cumsum(0).view(batch, seq_len) - 1
        num_segments = int(segment_ids_bt[-1, -1]) + 1
        if num_segments == batch:  # one segment a row: the plain causal fast paths apply
            return cls(
                position_ids_bt,
                torch.arange(seq_len, device=device).expand(batch, seq_len),
                None,
                None,
                seq_len,
            )
        start_idx_n = starts_bt.flatten().nonzero().squeeze(1)
        cu_seqlens_n1 = torch.cat([start_idx_n, start_idx_n.new_tensor([batch * seq_len])]).to(torch.int32)
        seg_start_bt = start_idx_n[segment_ids_bt]  # flat index of each token's segment start
        flat_idx_bt = torch.arange(batch * seq_len, device=device).view(batch, seq_len)
        max_seqlen = int((cu_seqlens_n1[1:] - cu_seqlens_n1[:-1]).max())
        return cls(position_ids_bt, flat_idx_bt - seg_start_bt, segment_ids_bt, cu_seqlens_n1, max_seqlen)
