"""Document boundaries of a packed batch, derived once per forward from `position_ids`.

The data loader packs documents into fixed windows and marks each document start with position 0
(a window may also begin in the middle of a document, with positions continuing). Every mixer reads
the boundaries from here: attention masks across documents, the DeltaNet conv and recurrent state
restart at each one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def copy_to_device(x: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    """`x` on `device` without stalling the host: a copy to a GPU goes through page-locked memory.

    From ordinary (pageable) memory CUDA first waits for all the GPU's queued work before copying, so
    each batch tensor moved that way drained the queue: the host then launched the next forward
    from an empty queue while the GPU waited (up to 34 ms a micro-batch on an H100)."""
    if x is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        # from torch's cache of pinned blocks, reused once the copy is done (an expanded view, such as
        # shared positions, is made whole first: pinning cannot copy into overlapping elements)
        x = x.contiguous().pin_memory()
    return x.to(device, non_blocking=True)


@dataclass
class DocumentLayout:
    """Legend: b = batch row, t = position in the row, n = segments (documents pieces) in the batch."""

    position_ids_bt: torch.Tensor  # RoPE positions (restart at 0 at each document start)
    segment_pos_bt: torch.Tensor  # index of each token inside its segment of the row (conv taps)
    segment_ids_bt: torch.Tensor | None  # None when each row is a single segment (no packing)
    cu_seqlens_n1: torch.Tensor | None  # int32 segment offsets over the flattened batch, when packed
    max_seqlen: int  # an upper bound on the segment lengths (kernels size their grids by it)
    # cu_seqlens on the host, when the layout was derived there: kernels that plan their launch grid
    # from the segment lengths (fla's) read it instead of waiting on the GPU for a copy
    cu_seqlens_host_n1: torch.Tensor | None = None

    @property
    def is_packed(self) -> bool:
        return self.segment_ids_bt is not None

    def __eq__(self, other: object) -> bool:
        """The same boundaries, element by element (DeepSpeed compares a batch's inputs across the
        tensor-parallel ranks, which must hold the same one)."""
        if not isinstance(other, DocumentLayout):
            return NotImplemented

        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            if a is None or b is None:
                return a is b
            return a.shape == b.shape and torch.equal(a, b.to(a.device))

        fields = ("position_ids_bt", "segment_pos_bt", "segment_ids_bt", "cu_seqlens_n1")
        return self.max_seqlen == other.max_seqlen and all(
            same(getattr(self, f), getattr(other, f)) for f in fields
        )

    def to(self, device: torch.device | str) -> DocumentLayout:
        """This layout with its tensors on `device` (copied asynchronously), the host copy kept.

        The training loop derives each batch's layout on the CPU and moves it: deriving it on the
        GPU costs host syncs (segment count, start offsets), and each one drains the GPU's queue."""

        return DocumentLayout(
            copy_to_device(self.position_ids_bt, device),
            copy_to_device(self.segment_pos_bt, device),
            copy_to_device(self.segment_ids_bt, device),
            copy_to_device(self.cu_seqlens_n1, device),
            self.max_seqlen,
            self.cu_seqlens_host_n1,
        )

    @classmethod
    def from_position_ids(
        cls,
        position_ids_bt: torch.Tensor | None,
        batch: int,
        seq_len: int,
        device: torch.device,
        *,
        always_packed: bool = False,
    ) -> DocumentLayout:
        """The layout of a batch. `always_packed` keeps the packed form even when every row holds a
        single segment: compiled layers and fla's autotuned kernels then see one form, where a first
        all-single-segment micro-batch cost a recompile and re-tune of 126 s mid-run (H100)."""
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
        if num_segments == batch and not always_packed:  # one segment a row: the plain causal paths
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
        # The row length bounds every segment. The exact maximum would cost a host sync, and as a
        # Python int it made compiled layers recompile whenever it changed (130 s, on an H100).
        # int64 as fla wants it, made once: fla caches its chunk plan per tensor object
        host_copy = cu_seqlens_n1.long() if cu_seqlens_n1.device.type == "cpu" else None
        segment_pos_bt = flat_idx_bt - seg_start_bt
        return cls(position_ids_bt, segment_pos_bt, segment_ids_bt, cu_seqlens_n1, seq_len, host_copy)
