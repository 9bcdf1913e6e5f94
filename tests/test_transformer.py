"""Invariants of the generic token transformer (core/nn)."""

from __future__ import annotations

import pytest
import torch

from core.nn import (
    LabelEmbedder,
    RotaryEmbedding,
    TokenTransformer,
    TransformerConfig,
    apply_rotary,
    grid_positions,
    sincos_pos_embed_1d,
    sincos_pos_embed_3d,
    sincos_pos_embed_nd,
)
from image.dit import DiT

D, H = 32, 4  # head_dim 8


def _net(seed=0, perturb=True, **kw) -> TokenTransformer:
    """Tiny transformer; ``perturb`` adds noise to every parameter (as the fixture recipe) so
    that the zero-initialised adaLN branches are open."""
    torch.manual_seed(seed)
    net = TokenTransformer(TransformerConfig(**{"dim": D, "depth": 2, "num_heads": H, **kw}))
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def _inputs(B=2, N=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g), torch.randn(B, D, generator=g)


def test_blocks_are_identity_at_init():
    net = _net(perturb=False, depth=3, context_dim=5)
    x, c = _inputs()
    out = net(x, c, context=torch.randn(2, 3, 5))
    torch.testing.assert_close(out, x, atol=0, rtol=0)


def test_rope_preserves_norms_and_is_relative():
    for axes in (1, 2, 3):
        rope = RotaryEmbedding(12 * axes, axes)
        pos = torch.randn(7, axes) * 5
        q, k = torch.randn(2, 3, 7, 12 * axes), torch.randn(2, 3, 7, 12 * axes)
        rq = apply_rotary(q, *rope(pos))
        torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
        shift = torch.randn(axes) * 3
        scores = apply_rotary(q, *rope(pos)) @ apply_rotary(k, *rope(pos)).transpose(-1, -2)
        shifted = apply_rotary(q, *rope(pos + shift)) @ apply_rotary(k, *rope(pos + shift)).transpose(-1, -2)
        torch.testing.assert_close(scores, shifted, atol=1e-4, rtol=1e-4)
    # 1-D with one query/key vector for every token: score matrix is Toeplitz in i - j.
    rope = RotaryEmbedding(8, 1)
    v = torch.randn(8).expand(1, 1, 5, 8)
    s = (apply_rotary(v, *rope(grid_positions(5))) @ apply_rotary(v, *rope(grid_positions(5))).transpose(-1, -2))[0, 0]
    for d in range(-4, 5):
        diag = torch.diagonal(s, d)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-5, rtol=1e-5)


def test_transformer_with_rope_is_shift_invariant_not_permutation_equivariant():
    net = _net(rope_axes=2)
    x, c = _inputs(N=6)
    pos = grid_positions(2, 3)
    out = net(x, c, positions=pos)
    torch.testing.assert_close(net(x, c, positions=pos + torch.tensor([5.0, -2.0])), out, atol=1e-5, rtol=1e-5)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert not torch.allclose(net(x[:, perm], c, positions=pos)[:, perm.argsort()], out, atol=1e-4)
    # per-sample positions (B, N, axes) give the same as shared ones
    torch.testing.assert_close(net(x, c, positions=pos.expand(2, -1, -1)), out)
    with pytest.raises(ValueError, match="positions"):
        net(x, c)


def test_a_rope_model_cast_to_bf16_runs_and_keeps_float32_frequencies():
    """model.to(bf16): q and k came out of the rotation as float32 (cos/sin are), v stayed bf16 and SDPA
    refused the mix; the cast also rounded the frequency buffer (0.44 rad off at position 1000)."""
    net = _net(rope_axes=2)
    x, c = _inputs(N=6)
    pos = grid_positions(2, 3)
    ref = net(x, c, positions=pos)
    half = _net(rope_axes=2).to(torch.bfloat16)
    out = half(x.bfloat16(), c.bfloat16(), positions=pos)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    rope = RotaryEmbedding(64, 1).to(torch.bfloat16)
    assert rope.freqs.dtype == torch.float32
    cos, _ = rope(torch.tensor([[1000.0]]))
    torch.testing.assert_close(cos, RotaryEmbedding(64, 1)(torch.tensor([[1000.0]]))[0])


def test_permutation_equivariance_without_positions():
    net = _net(qk_norm="rms")
    x, c = _inputs(N=7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(net(x[:, perm], c), net(x, c)[:, perm], atol=1e-5, rtol=1e-5)


def test_causal_mode():
    net = _net(causal=True, rope_axes=1)
    x, c = _inputs(N=8)
    pos = grid_positions(8)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 3, D)
    out, out2 = net(x, c, positions=pos), net(x2, c, positions=pos)
    torch.testing.assert_close(out[:, :5], out2[:, :5], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out[:, 5:], out2[:, 5:], atol=1e-3)
    bidir = _net(rope_axes=1)  # same seed, same weights, not causal: the future leaks
    assert not torch.allclose(bidir(x, c, positions=pos)[:, :5], bidir(x2, c, positions=pos)[:, :5], atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask(causal):
    net = _net(causal=causal)
    x, c = _inputs(N=6)
    pad = torch.tensor([[True] * 6, [False, False, True, True, True, True]])  # left padding in sample 1
    x2 = x.clone()
    x2[1, :2] = 100 * torch.randn(2, D)
    out, out2 = net(x, c, padding_mask=pad), net(x2, c, padding_mask=pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1, 2:], out2[1, 2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], out2[0], atol=1e-5, rtol=1e-5)
    # sample 1's real tokens equal running it alone without the padding
    torch.testing.assert_close(net(x[1:, 2:], c[1:])[0], out[1, 2:], atol=1e-5, rtol=1e-5)


def test_cross_attention_and_context_mask():
    net = _net(context_dim=5)
    x, c = _inputs(N=4)
    ctx = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = net(x, c, context=ctx, context_mask=mask)
    other = ctx.clone()
    other[:, 0] = torch.randn(2, 5)
    assert not torch.allclose(net(x, c, context=other, context_mask=mask), out, atol=1e-4)
    masked_changed = ctx.clone()
    masked_changed[:, 2] = 50 * torch.randn(2, 5)
    masked_changed[1, 1] = 50 * torch.randn(5)
    torch.testing.assert_close(net(x, c, context=masked_changed, context_mask=mask), out)
    # dropping the masked tokens altogether gives the same answer
    torch.testing.assert_close(net(x[:1], c[:1], context=ctx[:1, :2]), out[:1], atol=1e-5, rtol=1e-5)
    # an all-masked context contributes nothing (no NaN)
    none = net(x, c, context=ctx, context_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(none).all()
    nocross = net(x, c)  # context None skips cross-attention
    torch.testing.assert_close(none, nocross)


def test_uvit_long_skips():
    depth = 5
    net = _net(depth=depth, long_skip=True)
    assert len(net.skip_linears) == 2
    x, c = _inputs()
    out = net(x, c)
    # by hand: blocks 0, 1 push their outputs; block 2 is the middle; block 3 <- block 1, block 4 <- block 0
    s = torch.nn.functional.silu(c)
    b = net.blocks
    h0 = b[0](x, s)
    h1 = b[1](h0, s)
    h2 = b[2](h1, s)
    h3 = b[3](net.skip_linears[1](torch.cat([h2, h1], -1)), s)
    h4 = b[4](net.skip_linears[0](torch.cat([h3, h0], -1)), s)
    torch.testing.assert_close(out, h4)
    plain = TokenTransformer(TransformerConfig(dim=D, depth=depth, num_heads=H)).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("skip_linears")})
    assert not torch.allclose(plain(x, c), out, atol=1e-3)


def test_mdt_token_masking():
    net = _net(depth=3, mask_ratio=0.5, mask_decoder_depth=1)
    x, c = _inputs(N=8)
    pos = torch.randn(8, D)
    keep = net.sample_keep_idx(2, 8, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (2, 4) and (keep.diff(dim=1) > 0).all()
    out = net(x, c, pos_embed=pos, keep_idx=keep)
    assert out.shape == x.shape
    # The dropped tokens' content never reaches the network.
    dropped = torch.ones(2, 8, dtype=torch.bool).scatter(1, keep, False)
    x2 = torch.where(dropped[..., None], torch.randn_like(x) * 10, x)
    torch.testing.assert_close(net(x2, c, pos_embed=pos, keep_idx=keep), out)
    assert not torch.allclose(net(x, c, pos_embed=pos), out, atol=1e-3)  # unmasked forward differs
    # Image level: forward_masked returns the pixel mask of visible patches.
    dit = DiT(input_size=8, patch_size=2, hidden_size=D, depth=2, num_heads=H, num_classes=3, mask_ratio=0.25,
              mask_decoder_depth=1)
    y = torch.tensor([0, 2])
    img, kept = dit.forward_masked(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), y, torch.Generator().manual_seed(1))
    assert img.shape == (2, 8, 8, 8) and kept.shape == (2, 1, 8, 8)
    assert (kept.float().mean(dim=(1, 2, 3)) == 0.75).all()
    with pytest.raises(ValueError, match="mask_ratio"):
        _net()(x, c, keep_idx=keep)


def test_tread_routing():
    cfg = dict(depth=4, route_ratio=0.5, route_start=1, route_end=3)
    net = _net(**cfg)
    x, c = _inputs(N=8)
    plain = TokenTransformer(TransformerConfig(dim=D, depth=4, num_heads=H))
    plain.load_state_dict(net.state_dict())
    torch.testing.assert_close(net.eval()(x, c), plain.eval()(x, c))  # eval: no routing

    seen = {}
    hooks = [net.blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0], o)))
             for i in range(4)]
    net.train()
    out = net(x, c, generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    assert seen[1][0].shape == (2, 4, D) and seen[2][1].shape == (2, 4, D)  # the span sees half the tokens
    after0, before3 = seen[0][1], seen[3][0]
    same = (after0 == before3).all(dim=-1)  # routed tokens come back exactly as they left
    assert (same.sum(dim=1) == 4).all()
    # The processed tokens are those that entered block 1, in order.
    torch.testing.assert_close(seen[1][0], after0[~same].view(2, 4, D))
    torch.testing.assert_close(seen[2][1], before3[~same].view(2, 4, D))
    # Span up to the last block: routed tokens of the output equal the input.
    net_all = _net(depth=2, route_ratio=0.25, route_start=0, route_end=2).train()
    routed = (net_all(x, c, generator=torch.Generator().manual_seed(1)) == x).all(dim=-1)
    assert (routed.sum(dim=1) == 2).all()
    # Same generator, same routes.
    torch.testing.assert_close(net(x, c, generator=torch.Generator().manual_seed(0)), out)


def test_grad_checkpointing_same_grads():
    grads = []
    for flag in (False, True):
        net = _net(depth=3, grad_checkpointing=flag, context_dim=5, rope_axes=1).train()
        x, c = _inputs(N=5)
        x.requires_grad_(True)
        out = net(x, c, positions=grid_positions(5), context=torch.ones(2, 2, 5))
        out.square().sum().backward()
        grads.append([x.grad] + [p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_label_dropout_and_null_class():
    emb = LabelEmbedder(10, D, dropout_prob=0.1)
    y = torch.tensor([1, 2, 3, 4])
    out = emb(y, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    null = emb.embedding_table.weight[10]
    torch.testing.assert_close(out[0], null)
    torch.testing.assert_close(out[2], null)
    torch.testing.assert_close(out[1], emb.embedding_table.weight[2])
    # random dropout only in training; eval is deterministic
    emb.eval()
    torch.testing.assert_close(emb(y), emb.embedding_table.weight[y])
    emb.train()
    big = torch.zeros(4000, dtype=torch.long)
    frac = (emb(big, generator=torch.Generator().manual_seed(0)) == null).all(-1).float().mean()
    assert 0.08 < frac < 0.12
    with pytest.raises(ValueError, match="null class"):
        LabelEmbedder(10, D)(y, force_drop_ids=torch.ones(4))
    # The transformer's conditioning vector: t embedding + (null) label + (null) global condition.
    net = _net(num_classes=10, class_dropout_prob=0.1, cond_dim=3)
    t, cond = torch.tensor([0.0, 10.0]), torch.randn(2, 3)
    c = net.condition(t, torch.tensor([4, 5]), cond, force_drop_ids=torch.tensor([1, 1]))
    expected = net.t_embedder(t) + net.y_embedder.embedding_table.weight[10] + net.cond_embedder.null
    torch.testing.assert_close(c, expected)


def test_sincos_tables():
    t1 = sincos_pos_embed_1d(8, 5, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    ang = torch.arange(5, dtype=torch.float64)[:, None] * omega
    torch.testing.assert_close(t1, torch.cat([ang.sin(), ang.cos()], 1))
    t3 = sincos_pos_embed_3d(24, 2, 3, 4, dtype=torch.float64)
    assert t3.shape == (24, 24)
    f, r, col = 1, 2, 3  # token index (f * 3 + r) * 4 + col; thirds encode col, row, frame
    row = t3[(f * 3 + r) * 4 + col]
    one = sincos_pos_embed_1d(8, 4, dtype=torch.float64)
    torch.testing.assert_close(row, torch.cat([one[col], one[r], one[f]]))
    with pytest.raises(ValueError, match="divisible"):
        sincos_pos_embed_nd(30, (2, 2))


def test_residual_dropout_training_only():
    """Dropout acts on both residual branches in training only; in eval the net is the same
    function as the dropout-free net with the same weights (dropout adds no parameters)."""
    plain, drop = _net(rope_axes=1), _net(rope_axes=1, dropout=0.5)
    x, c = _inputs(N=8)
    pos = grid_positions(8)
    torch.testing.assert_close(drop(x, c, positions=pos), plain(x, c, positions=pos), atol=0, rtol=0)
    drop.train()
    torch.manual_seed(0)
    a = drop(x, c, positions=pos)
    torch.manual_seed(0)
    torch.testing.assert_close(drop(x, c, positions=pos), a, atol=0, rtol=0)  # global RNG drives it
    b = drop(x, c, positions=pos)
    assert not torch.allclose(a, b, atol=1e-3)
    assert not torch.allclose(a, plain(x, c, positions=pos), atol=1e-3)
    # each branch on its own: with the other branch's output projection zeroed, dropout still acts
    for closed in ("attn", "mlp"):
        net = _net(rope_axes=1, dropout=0.5).train()
        with torch.no_grad():
            for blk in net.blocks:
                lin = blk.attn.proj if closed == "attn" else blk.mlp.fc2
                lin.weight.zero_()
                lin.bias.zero_()
        outs = [net(x, c, positions=pos) for _ in range(2)]
        assert not torch.allclose(outs[0], outs[1], atol=1e-3), closed
    with pytest.raises(ValueError, match="dropout"):
        TransformerConfig(dim=D, num_heads=H, dropout=1.0)


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        TransformerConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="route_end"):
        TransformerConfig(dim=D, num_heads=H, depth=2, route_ratio=0.5, route_start=1, route_end=5)
    with pytest.raises(ValueError, match="long_skip"):
        TransformerConfig(dim=D, num_heads=H, long_skip=True, mask_ratio=0.5)
    with pytest.raises(ValueError, match="qk_norm"):
        TransformerConfig(dim=D, num_heads=H, qk_norm="l2")
    net, (x, c) = _net(), _inputs()
    with pytest.raises(ValueError, match="context_dim"):
        net(x, c, context=torch.randn(2, 3, D))
    with pytest.raises(TypeError, match="padding_mask"):
        net(x, c, padding_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="rope_axes"):
        TransformerConfig(dim=40, num_heads=4, rope_axes=3)  # head_dim 10 is not divisible by 6


@pytest.mark.parametrize("ratio, match", [
    (0, r"mlp_ratio=0: must be a positive finite number"),
    (-1.0, r"mlp_ratio=-1.0: must be a positive finite number"),
    (float("nan"), r"mlp_ratio=nan: must be a positive finite number"),
    (float("inf"), r"mlp_ratio=inf: must be a positive finite number"),
    (0.01, r"mlp_ratio=0.01: gives an MLP of int\(dim \* mlp_ratio\) = 0 hidden units"),
])
def test_mlp_ratio_is_validated(ratio, match):
    # mlp_ratio=0 built zero-width MLPs that trained silently; a negative one failed deep in nn.Linear
    with pytest.raises(ValueError, match=match):
        TransformerConfig(dim=D, num_heads=H, mlp_ratio=ratio)
    cfg = TransformerConfig(dim=D, num_heads=H, depth=1, mlp_ratio=0.5)
    assert TokenTransformer(cfg).blocks[0].mlp.fc1.out_features == cfg.mlp_hidden == D // 2
