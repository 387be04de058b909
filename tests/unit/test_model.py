"""The model on CPU: packed batches equal per-document runs, seeded init, input validation."""

import pytest
import torch

from model.documents import DocumentLayout
from model.init import init_weights
from model.moe import moe_blocks
from model.ops.attention import causal_attention, causal_attention_reference
from model.ops.conv import causal_conv1d_silu, causal_conv1d_silu_reference
from model.qwen3_next import IGNORE_INDEX, Qwen3NextForCausalLM
from tests.conftest import tiny_config


def build(config=None, seed=0, dtype=torch.float32):
    config = config or tiny_config()
    model = Qwen3NextForCausalLM(config)
    init_weights(model, config, seed)
    randomize_norms(model, seed)
    return model.to(dtype)


@torch.no_grad()
def randomize_norms(model, seed):
    """Initial norm weights are constants; perturb them so a test also sees their wiring."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def pack(docs, row_len):
    """Pack documents (lists of ids) into rows: input_ids, labels (no target across a document end
    or past a row), position_ids restarting at each document. Pads with a filler document."""
    rows_ids, rows_lab, rows_pos, row_ids, row_lab, row_pos = [], [], [], [], [], []
    for doc in docs:
        assert len(doc) <= row_len
        if len(row_ids) + len(doc) > row_len:
            rows_ids.append(row_ids), rows_lab.append(row_lab), rows_pos.append(row_pos)
            row_ids, row_lab, row_pos = [], [], []
        row_ids += doc
        row_lab += doc[1:] + [IGNORE_INDEX]
        row_pos += list(range(len(doc)))
    rows_ids.append(row_ids), rows_lab.append(row_lab), rows_pos.append(row_pos)
    for ids, lab, pos in zip(rows_ids, rows_lab, rows_pos, strict=True):
        filler = row_len - len(ids)
        ids += [1] * filler
        lab += [IGNORE_INDEX] * filler
        pos += list(range(filler))
    return torch.tensor(rows_ids), torch.tensor(rows_lab), torch.tensor(rows_pos)


def random_documents(lengths=(5, 17, 9, 30, 1, 12, 70), vocab=97, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def losses(out):
    return out.lm_loss_sum + sum(out.mtp_loss_sums)


@pytest.mark.slow
@pytest.mark.parametrize("boundaries_as", ["position_ids", "documents"])
def test_packed_batch_equals_documents_run_one_by_one(boundaries_as):
    """Also with the layout derived beforehand and passed as `documents` (the training loop's way)."""
    model = build()
    docs = random_documents()
    ids, labels, pos = pack(docs, row_len=80)
    assert ids.shape[0] >= 2 and (pos == 0).sum() > ids.shape[0]  # really packed

    model.zero_grad()
    if boundaries_as == "documents":
        layout = DocumentLayout.from_position_ids(pos, *ids.shape, ids.device).to("cpu")
        assert torch.equal(layout.cu_seqlens_host_n1, layout.cu_seqlens_n1)
        packed = model(ids, labels=labels, documents=layout)
    else:
        packed = model(ids, position_ids=pos, labels=labels)
    losses(packed).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    total, tokens, mtp_tokens = 0.0, 0, 0
    for doc in docs:
        d_ids = torch.tensor([doc])
        d_labels = torch.tensor([doc[1:] + [IGNORE_INDEX]])
        out = model(d_ids, labels=d_labels)
        total = total + losses(out)
        tokens += int(out.lm_tokens)
        mtp_tokens += int(out.mtp_tokens[0])
    total.backward()

    assert int(packed.lm_tokens) == tokens and int(packed.mtp_tokens[0]) == mtp_tokens
    torch.testing.assert_close(losses(packed), total, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is None:
            assert name not in packed_grads
            continue
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_packed_logits_equal_per_document_logits():
    model = build(tiny_config(mtp_num_layers=0))
    docs = [list(range(3, 3 + n)) for n in (7, 11, 4)]
    ids, _, pos = pack(docs, row_len=22)
    logits = model(ids, position_ids=pos).logits
    start = 0
    for doc in docs:
        alone = model(torch.tensor([doc])).logits[0]
        torch.testing.assert_close(logits[0, start : start + len(doc)], alone, rtol=1e-5, atol=1e-5)
        start += len(doc)


def test_always_packed_layout_computes_the_unpacked_model():
    """Single-document rows in the packed form (the training loop's) give the plain causal paths' result."""
    model = build()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    pos = torch.arange(40).expand(2, 40)
    layout = DocumentLayout.from_position_ids(pos, 2, 40, ids.device, always_packed=True)
    assert layout.is_packed and layout.cu_seqlens_n1.tolist() == [0, 40, 80]
    packed = model(ids, labels=labels, documents=layout)
    plain = model(ids, labels=labels)
    torch.testing.assert_close(losses(packed), losses(plain), rtol=1e-5, atol=1e-5)


def test_documents_must_come_alone_and_fit_the_batch():
    model = build()
    ids, labels, pos = pack(random_documents(), row_len=80)
    layout = DocumentLayout.from_position_ids(pos, *ids.shape, ids.device)
    with pytest.raises(ValueError, match="not both"):
        model(ids, position_ids=pos, labels=labels, documents=layout)
    with pytest.raises(ValueError, match="documents describe a batch of shape"):
        model(ids[:1], labels=labels[:1], documents=layout)


def test_row_starting_mid_document_is_one_fresh_segment():
    """A window opening inside a long document keeps its RoPE positions (checked against
    transformers in test_hf_interop) but is a single unpacked segment starting at index 0."""
    pos = torch.arange(100, 112)[None]
    layout = DocumentLayout.from_position_ids(pos, 1, 12, pos.device)
    assert not layout.is_packed
    assert torch.equal(layout.segment_pos_bt[0], torch.arange(12))
    assert torch.equal(layout.position_ids_bt, pos)


def test_init_is_seeded_and_independent_of_device_order():
    config = tiny_config()
    a, b, c = Qwen3NextForCausalLM(config), Qwen3NextForCausalLM(config), Qwen3NextForCausalLM(config)
    init_weights(a, config, seed=7)
    with torch.device("meta"):
        meta = Qwen3NextForCausalLM(config)
    meta.to_empty(device="cpu")
    init_weights(meta, config, seed=7)
    init_weights(c, config, seed=8)
    # b initialised in reverse order, parameter by parameter
    from model.init import initial_value

    with torch.no_grad():
        for name, p in reversed(list(b.named_parameters())):
            p.copy_(initial_value(name, p.shape, config, seed=7))
    for (name, pa), pb, pm, pc in zip(
        a.named_parameters(), b.parameters(), meta.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb) and torch.equal(pa, pm), name
        if pa.numel() > 8 and "norm" not in name:
            assert not torch.equal(pa, pc), name
    norms = {n: p for n, p in a.named_parameters() if n.endswith("layernorm.weight")}
    assert norms and all(torch.all(p == 0) for p in norms.values())


def test_bad_input_ids_are_named():
    model = build(tiny_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="-1"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), position_ids=torch.zeros(1, 5, dtype=torch.long))


def test_router_stats_reported_for_every_moe_layer_against_its_logits():
    """Each MoE layer's RouterStats against its gate's logits (caught by a hook): top-k counts, the
    softmax sums, the squared logsumexp; in call order, with graphs."""
    config = tiny_config()
    model = build(config)
    logits = []
    for block in moe_blocks(model):
        block.gate.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
    out = model(torch.randint(0, 97, (2, 10)), labels=torch.randint(0, 97, (2, 10)))
    assert len(out.router_stats) == len(logits) == config.num_hidden_layers + config.mtp_num_layers
    for stats, logits_te in zip(out.router_stats, logits, strict=True):
        chosen = logits_te.softmax(-1).topk(config.num_experts_per_tok, dim=-1).indices
        expected_e = torch.bincount(chosen.flatten(), minlength=config.num_experts)
        assert stats.counts_e.tolist() == expected_e.tolist()
        torch.testing.assert_close(stats.prob_sums_e, logits_te.softmax(-1).sum(0))
        torch.testing.assert_close(stats.z_sum, logits_te.logsumexp(-1).square().sum())
        assert stats.prob_sums_e.requires_grad and stats.z_sum.requires_grad


def test_router_stats_and_their_gradients_are_the_same_under_activation_checkpointing():
    config = tiny_config()
    ids = torch.randint(0, 97, (2, 10))
    results = []
    for checkpointing in (False, True):
        model = build(config)
        model.model.activation_checkpointing = checkpointing
        out = model(ids, labels=ids)
        loss = out.lm_loss_sum + sum(s.z_sum + s.prob_sums_e[0] for s in out.router_stats)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.router_stats, grads))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    assert len(recomputed) == config.num_hidden_layers + config.mtp_num_layers
    for a, b in zip(plain, recomputed, strict=True):
        assert torch.equal(a.counts_e, b.counts_e)
        torch.testing.assert_close(a.z_sum, b.z_sum)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, msg=name)


def test_attention_op_matches_explicit_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 19, 8, generator=gen) for h in (4, 2, 2))
    segments = torch.tensor([[0] * 7 + [1] * 12, [2] * 19])
    for seg in (None, segments):
        got = causal_attention(q, k, v, scale=0.3, segment_ids_bt=seg)
        torch.testing.assert_close(got, causal_attention_reference(q, k, v, scale=0.3, segment_ids_bt=seg))


def _varlen_forms(record):
    """torch's varlen_attn as its three signatures have been: (2.10) `is_causal`, KV heads must match
    the query heads; (2.11) a window, grouped KV heads handed to flash as they are; (later) a window
    and `enable_gqa`, which the wrapper checks head counts against."""

    def with_is_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False):
        return record(query, key, scale=scale, is_causal=is_causal)

    def with_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        return record(query, key, scale=scale, window_size=window_size)

    def with_gqa(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
    ):
        return record(query, key, scale=scale, window_size=window_size, enable_gqa=enable_gqa)

    return {"is_causal": with_is_causal, "window": with_window, "window+enable_gqa": with_gqa}


@pytest.mark.parametrize(
    "form, kv_heads_seen, options",
    [
        ("is_causal", 4, {"is_causal": True}),
        ("window", 2, {"window_size": (-1, 0)}),
        ("window+enable_gqa", 2, {"window_size": (-1, 0), "enable_gqa": True}),
    ],
)
def test_varlen_attention_hands_over_grouped_kv_heads_where_the_kernel_takes_them(
    monkeypatch, form, kv_heads_seen, options
):
    """Repeating the KV heads for the kernel copies K and V (and sums their gradients back): only
    for the first varlen form, which needs as many KV heads as query heads."""
    import torch.nn.attention.varlen as varlen

    from model.ops import attention

    seen = {}

    def record(query, key, **kwargs):
        seen.update(kv_heads=key.shape[1], **kwargs)
        return torch.zeros_like(query)

    monkeypatch.setattr(varlen, "varlen_attn", _varlen_forms(record)[form])
    monkeypatch.setattr(attention, "_varlen_enabled", True)
    attention._find_varlen_kernel.cache_clear()
    try:
        q, k, v = (torch.randn(2, h, 5, 8) for h in (4, 2, 2))
        out = attention.varlen_causal_attention(
            q, k, v, scale=0.5, cu_seqlens_n1=torch.tensor([0, 3, 10]), max_seqlen=7
        )
    finally:
        attention._find_varlen_kernel.cache_clear()  # the real kernel again for the tests after
    assert out.shape == q.shape
    assert seen == {"kv_heads": kv_heads_seen, "scale": 0.5, **options}


def test_conv_op_matches_nn_conv1d_and_restarts_at_boundaries():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 13, 6, generator=gen), torch.randn(6, 1, 4, generator=gen)
    seg_pos = torch.arange(13).expand(2, 13)
    torch.testing.assert_close(causal_conv1d_silu(x, w, seg_pos), causal_conv1d_silu_reference(x, w))
    # two segments in row 0: the second must equal the conv of that piece alone
    seg_pos = torch.tensor([list(range(5)) + list(range(8)), list(range(13))])
    got = causal_conv1d_silu(x, w, seg_pos)
    torch.testing.assert_close(got[0, 5:], causal_conv1d_silu_reference(x[:1, 5:], w)[0])
    torch.testing.assert_close(got[0, :5], causal_conv1d_silu_reference(x[:1, :5], w)[0])


def test_recompute_layers_recomputes_exactly_the_first_n_layers():
    """trainer.recompute_layers=N: in backward the first N decoder layers run their forward again and
    no other does; the gradients are the ones without recomputation."""
    config = tiny_config()
    ids = torch.randint(0, 97, (2, 10))
    plain = build(config)
    plain(ids, labels=ids).lm_loss_sum.backward()
    for count in (0, 1, 3):
        model = build(config)
        model.model.activation_checkpointing, model.model.recompute_layers = True, count
        calls = []
        for index, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(lambda _m, _a, index=index, calls=calls: calls.append(index))
        model(ids, labels=ids).lm_loss_sum.backward()
        forward_calls = len(model.model.layers)
        assert calls[forward_calls:] == list(reversed(range(count)))  # backward recomputes last-first
        for name, param in plain.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(dict(model.named_parameters())[name].grad, param.grad, msg=name)


def test_mtp_accept_counts_the_positions_whose_draft_argmax_is_the_target():
    """mtp_accept=True: MTP depth 1's argmax over the vocabulary (from its hidden states through the
    LM head, caught by a hook) against the depth-1 targets, counted by hand."""
    config = tiny_config()
    model = build(config)
    ids = torch.randint(0, 97, (2, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)  # two documents a row
    hidden = []
    model.mtp.norm.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    with torch.no_grad():
        out = model(ids, position_ids=pos, labels=ids, mtp_accept=True)
    from model.documents import DocumentLayout
    from model.qwen3_next import mtp_targets

    targets = mtp_targets(ids, 1, DocumentLayout.from_position_ids(pos, 2, 12, ids.device))
    drafts = (hidden[0] @ model.lm_head.weight.T).argmax(dim=-1)
    kept = targets != -100
    assert int(out.mtp_accept[1]) == int(kept.sum()) < 24  # no target across a document end
    assert int(out.mtp_accept[0]) == int(((drafts == targets) & kept).sum())
