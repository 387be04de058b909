"""Qwen3-Next for causal LM pretraining: the hybrid decoder stack, LM head, MTP and their losses.

`Qwen3NextForCausalLM.forward(input_ids, position_ids=None, labels=None, documents=None,
mtp_accept=False, head_loss_weights=None)`:
- without labels it returns full logits [batch, seq, vocab] (HF parity, evaluation);
- with labels it never materialises the logits: it returns per-objective loss *sums* and token
  counts (next-token and each MTP depth) plus every MoE layer's `RouterStats` (model/moe.py), so
  that the training loop can form token-weighted means and the load-balancing loss over the whole
  global batch. With `head_loss_weights` (the gradient the caller's backward will give each head's
  loss sum: the training objective's `head_loss_weights()` times the engine's loss scale), the heads
  sum their LM-head weight gradient in one buffer instead of one each, or add it into the
  optimizer's fp32 gradient where the engine lends it to the weight (model/ops/cross_entropy.py:
  SharedWeightGradient, Fp32GradientBuffer).
Document boundaries come in `position_ids` (0 starts a document), or already derived as `documents`
(a DocumentLayout, which the training loop builds on the host); see model/documents.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import RotaryEmbedding
from model.config import ModelConfig
from model.decoder import DecoderLayer
from model.documents import DocumentLayout
from model.moe import RouterStats
from model.mtp import MultiTokenPredictor
from model.norms import RMSNorm
from model.ops.cross_entropy import SharedWeightGradient, linear_cross_entropy, shared_weight_gradient_of

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None  # [batch, seq, vocab], only when no labels were given
    lm_loss_sum: torch.Tensor | None = None  # sum of next-token CE over target tokens (fp32)
    lm_tokens: torch.Tensor | None = None  # how many target tokens that sum covers
    mtp_loss_sums: list[torch.Tensor] = field(default_factory=list)  # one per MTP depth
    mtp_tokens: list[torch.Tensor] = field(default_factory=list)
    router_stats: list[RouterStats] = field(default_factory=list)  # per MoE layer, in call order
    # with mtp_accept=True: (positions whose MTP depth-1 argmax is its target, positions with a target)
    mtp_accept: tuple[torch.Tensor, torch.Tensor] | None = None


class Qwen3NextModel(nn.Module):
    """Embedding, the hybrid layer stack and the final norm (HF's `model.*` keys)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, layer_type, moe=config.is_moe_layer(i))
            for i, layer_type in enumerate(config.layer_types)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta)
        # recompute layers in backward instead of keeping their activations (set by the trainer): every
        # layer, or with `recompute_layers` = N the first N only (the MTP layers never)
        self.activation_checkpointing = False
        self.recompute_layers: int | None = None

    def forward(
        self, embeds_btd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: DocumentLayout
    ) -> tuple[torch.Tensor, list[RouterStats]]:
        """The final-normed hidden states and the MoE layers' RouterStats, in call order."""
        x_btd, router_stats = embeds_btd, []
        for index, layer in enumerate(self.layers):
            if self.recomputes(index) and torch.is_grad_enabled():
                x_btd, stats = checkpoint(layer, x_btd, rope, layout, use_reentrant=False)
            else:
                x_btd, stats = layer(x_btd, rope, layout)
            if stats is not None:
                router_stats.append(stats)
        return self.norm(x_btd), router_stats

    def recomputes(self, index: int) -> bool:
        if not self.activation_checkpointing:
            return False
        return self.recompute_layers is None or index < self.recompute_layers


class LMHead(nn.Linear):
    """The output projection. `cross_entropy` gives the loss sum and target count without the
    [tokens, vocab] logits; tensor parallelism swaps in a vocabulary-parallel head with the same two
    methods (parallel/tensor.py)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def cross_entropy(
        self,
        h_nd: torch.Tensor,
        targets_n: torch.Tensor,
        ignore_index: int,
        *,
        shared: SharedWeightGradient | None = None,
        loss_weight: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_cross_entropy(
            h_nd, self.weight, targets_n, ignore_index=ignore_index, shared=shared, loss_weight=loss_weight
        )

    def shared_weight_gradient(self) -> SharedWeightGradient | None:
        """One weight-gradient sum for the heads of a forward, or None where no gradient is made (the
        vocabulary-parallel head has the same method)."""
        return shared_weight_gradient_of(self.weight)


class Qwen3NextForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3NextModel(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = MultiTokenPredictor(config) if config.mtp_num_layers > 0 else None

    def compile_layers(self, memory_budget: float | None = None) -> None:
        """torch.compile every decoder layer (main stack and MTP) in place, for CUDA training.

        Each layer becomes one or two fused graphs (fla's kernel stays outside: it is marked
        compiler-disabled), which fuses residual adds, norms and casts across module boundaries and
        cuts the per-kernel launch overhead. Parameter names do not change. Shapes are static except
        where they change between batches (the number of packed documents, hence `cu_seqlens`): those
        turn dynamic after their first change instead of recompiling for every count.

        `memory_budget` < 1 is selective recomputation inside the compiled graphs: torch.compile's
        partitioner then keeps at most that fraction of what a graph would save for backward beyond
        its inputs (always kept), and recomputes the ops cheapest to run again first (pointwise ones
        before any GEMM). It is torch's process-wide setting, so it holds for every graph compiled
        later in this process; None leaves it as it is.
        """
        if memory_budget is not None:
            import torch._functorch.config as functorch_config

            functorch_config.activation_memory_budget = memory_budget
        layers = list(self.model.layers) + (list(self.mtp.layers) if self.mtp is not None else [])
        # one forward code object serves every layer: a cache entry per layer kind x grad mode
        # (training, evaluation) x static or dynamic document counts; past dynamo's default limit of 8
        # the rest would run uncompiled without a word
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        for layer in layers:
            layer.compile(dynamic=None)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        documents: DocumentLayout | None = None,
        mtp_accept: bool = False,
        head_loss_weights: tuple[float, ...] | None = None,
    ) -> CausalLMOutput:
        self.check_input_ids(input_ids)
        batch, seq_len = input_ids.shape
        if documents is not None and position_ids is not None:
            raise ValueError("pass position_ids or documents (which holds them), not both")
        if documents is not None and documents.position_ids_bt.shape != input_ids.shape:
            raise ValueError(
                f"documents describe a batch of shape {tuple(documents.position_ids_bt.shape)}, "
                f"input_ids has {tuple(input_ids.shape)}"
            )
        layout = documents or DocumentLayout.from_position_ids(position_ids, batch, seq_len, input_ids.device)
        embeds_btd = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(layout.position_ids_bt, embeds_btd.dtype)
        h_btd, router_stats = self.model(embeds_btd, rope, layout)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(h_btd), router_stats=router_stats)

        out = CausalLMOutput(router_stats=router_stats)
        heads = self.heads_sharing_a_gradient(head_loss_weights)
        out.lm_loss_sum, out.lm_tokens = self.cross_entropy(h_btd, labels, **heads[0])
        for depth in range(1, self.config.mtp_num_layers + 1):
            h_btd, stats = self.mtp(depth, h_btd, shift_left(embeds_btd, depth, 0.0), rope, layout)
            if stats is not None:
                out.router_stats.append(stats)
            targets_bt = mtp_targets(labels, depth, layout)
            loss_sum, tokens = self.cross_entropy(h_btd, targets_bt, **heads[depth])
            if mtp_accept and depth == 1:
                out.mtp_accept = self.argmax_hits(h_btd, targets_bt)
            out.mtp_loss_sums.append(loss_sum)
            out.mtp_tokens.append(tokens)
        return out

    def cross_entropy(
        self, h_btd: torch.Tensor, targets_bt: torch.Tensor, **sharing
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One head's loss sum and target count; `sharing`: `shared` and `loss_weight`, or nothing."""
        return self.lm_head.cross_entropy(h_btd.flatten(0, 1), targets_bt.flatten(), IGNORE_INDEX, **sharing)

    @property
    def num_lm_heads(self) -> int:
        """The LM heads a forward with labels runs: the main one, then one per MTP depth."""
        return 1 + self.config.mtp_num_layers

    def heads_sharing_a_gradient(self, head_loss_weights: tuple[float, ...] | None) -> list[dict]:
        """Each head's `cross_entropy` options, main head first: one shared weight-gradient sum with
        its loss weight, where weights are given and a gradient is made; else none."""
        heads = self.num_lm_heads
        if head_loss_weights is None:
            return [{}] * heads
        weights = tuple(float(w) for w in head_loss_weights)
        if len(weights) != heads:
            raise ValueError(
                f"head_loss_weights has {len(weights)} weights; this model has {heads} heads "
                "(the main head, then one per MTP depth)"
            )
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"head_loss_weights must be finite and >= 0, got {weights}")
        shared = self.lm_head.shared_weight_gradient()
        if shared is None:
            return [{}] * heads
        return [{"shared": shared, "loss_weight": w} for w in weights]

    @torch.no_grad()
    def argmax_hits(
        self, h_btd: torch.Tensor, targets_bt: torch.Tensor, chunk: int = 2048
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions whose most likely token under the LM head is the target, positions with a
        target): a draft head's acceptance, given the true tokens before it. Logits a chunk of rows
        at a time (a vocabulary-parallel head gathers them whole)."""
        h_nd, targets_n = h_btd.flatten(0, 1), targets_bt.flatten()
        hits = torch.zeros((), dtype=torch.long, device=h_nd.device)
        for start in range(0, h_nd.shape[0], chunk):
            rows = slice(start, start + chunk)
            hits += (self.lm_head(h_nd[rows]).argmax(dim=-1) == targets_n[rows]).sum()
        return hits, (targets_n != IGNORE_INDEX).sum()

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Shape and length always; the id range on CPU only: on CUDA it would cost a host sync, and
        an out-of-range id there still fails loudly, as a device-side assert in the embedding.
        (The training loop checks every batch on the host before moving it.)"""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds model.max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        if input_ids.is_cuda:
            return
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")


def shift_left(x_bt_: torch.Tensor, k: int, fill) -> torch.Tensor:
    """x[:, i + k] at position i; `fill` past the end of the row."""
    pad = [0, 0] * (x_bt_.dim() - 2) + [0, k]
    return F.pad(x_bt_[:, k:], pad, value=fill)


def mtp_targets(labels_bt: torch.Tensor, depth: int, layout: DocumentLayout) -> torch.Tensor:
    """Targets of MTP depth k: labels[i + k] (= t[i+k+1]) while i + k stays in the same segment."""
    targets_bt = shift_left(labels_bt, depth, IGNORE_INDEX)
    if layout.segment_ids_bt is not None:
        crosses_bt = shift_left(layout.segment_ids_bt, depth, -1) != layout.segment_ids_bt
        targets_bt = targets_bt.masked_fill(crosses_bt, IGNORE_INDEX)
    return targets_bt
