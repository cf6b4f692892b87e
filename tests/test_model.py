"""model.py: shapes of every mode, padding invariance, SDPA == explicit path, timm weight loading,
MIM masking, the momentum twin, optimizer groups, set_trainable, the base preset, a tiny overfit."""
import itertools
import math
import os

import pytest
import torch

from conftest import PAD, V, make_batch, tiny_cfg
from model import PRESETS, SIMLA, Block, ModelConfig, VisionTransformer, load_vit_weights

TERMS = ("itc", "itm", "mlm", "mim", "psl")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "timm_vit_tiny.pt")


def _model(cfg=None, seed=0, scramble=False):
    """scramble: add N(0, 0.2^2) to every online weight (momentum twin too) so that every branch matters;
    at the std-0.02 init the network is close to the identity and hides small wiring errors."""
    torch.manual_seed(seed)
    model = SIMLA(cfg or tiny_cfg()).eval()
    if scramble:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if not n.startswith("momentum.") and n != "temp":
                    p.add_(torch.randn_like(p) * 0.2)
                    model.momentum.get_parameter(n).copy_(p)
    return model


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def test_mode_shapes(cfg):
    model, b = _model(cfg), make_batch(cfg, B=3, T=9)
    B, T, N, C, H, E = 3, 9, 16, cfg.width, cfg.heads, cfg.embed_dim
    with torch.no_grad():
        img = model.encode_image(b["image"])
        assert img.shape == (B, 1 + N, C)
        assert model.encode_image(b["image"], b["patch_mask"]).shape == (B, 1 + N, C)
        assert model.encode_text(b["text_ids"], b["text_mask"]).shape == (B, T, C)
        hidden, sp, cp = model.fuse(b["text_ids"], b["text_mask"], img, probs_layer=-1)
        assert hidden.shape == (B, T, C) and sp.shape == (B, H, T, T) and cp.shape == (B, H, T, 1 + N)
        assert model.fuse(b["text_ids"], b["text_mask"], img)[1:] == (None, None)
        assert model.fuse_image(img, b["text_ids"], b["text_mask"]).shape == (B, 1 + N, C)
        for feat in (model.image_feat(img), model.text_feat(hidden)):
            assert feat.shape == (B, E)
            torch.testing.assert_close(feat.norm(dim=-1), torch.ones(B))
        assert model.mlm_logits(hidden[:, :2].reshape(-1, C)).shape == (2 * B, V)
        assert model.concept_logits(img).shape == (B, V)
        # A probability map: rows sum to 1, padded caption positions get nothing.
        torch.testing.assert_close(sp.sum(-1), torch.ones(B, H, T))
        assert (sp.masked_select(~b["text_mask"][:, None, None, :].expand_as(sp)) == 0).all()
        torch.testing.assert_close(cp.sum(-1), torch.ones(B, H, T))
        out = model(b, alpha=0.4)
    assert set(out) == set(TERMS) | {"loss"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], sum(out[k] for k in TERMS))


# ---------------------------------------------------------------------------------------------
# padding never changes the outputs at real positions
# ---------------------------------------------------------------------------------------------
def _repad(ids, mask, extra, seed=1):
    """Append `extra` PAD positions and overwrite every padded id with garbage (even specials)."""
    g = torch.Generator().manual_seed(seed)
    B, T = ids.shape
    ids2 = torch.cat([ids, torch.full((B, extra), PAD)], dim=1)
    mask2 = torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    garbage = torch.randint(0, V, (B, T + extra), generator=g)
    return torch.where(mask2, ids2, garbage), mask2


@pytest.mark.parametrize("extra", [0, 4])
def test_padding_invariance(cfg, extra):
    model, b = _model(cfg, scramble=True), make_batch(cfg, B=4, T=10)
    ids, mask = b["text_ids"], b["text_mask"]
    assert (~mask).any()  # the batch really has padding
    ids2, mask2 = _repad(ids, mask, extra)
    assert not torch.equal(ids2[:, :10], ids) or extra
    real = mask[..., None].expand(-1, -1, cfg.width)
    with torch.no_grad():
        img = model.encode_image(b["image"])
        # text mode
        a, z = model.encode_text(ids, mask), model.encode_text(ids2, mask2)[:, :10]
        torch.testing.assert_close(a[real], z[real], atol=1e-5, rtol=0)
        # text -> image mode (and its maps at real positions)
        (a, sa, ca), (z, sz, cz) = model.fuse(ids, mask, img, -1), model.fuse(ids2, mask2, img, -1)
        torch.testing.assert_close(a[real], z[:, :10][real], atol=1e-5, rtol=0)
        rows = mask[:, None].expand(-1, cfg.heads, -1)  # (B, H, T): maps of real queries only
        torch.testing.assert_close(sa[rows], sz[:, :, :10, :10][rows], atol=1e-6, rtol=0)
        torch.testing.assert_close(ca[rows], cz[:, :, :10][rows], atol=1e-6, rtol=0)
        assert (sz[:, :, :, 10:] == 0).all()  # the appended keys get no attention at all
        # image -> text mode: the caption is memory; its padding must be invisible
        torch.testing.assert_close(model.fuse_image(img, ids, mask), model.fuse_image(img, ids2, mask2),
                                   atol=1e-5, rtol=0)
        # Sanity (so the checks above can fail): changing a REAL token does change all three modes.
        ids3 = ids.clone()
        ids3[:, 1] = (ids3[:, 1] + 1) % (V - 4)
        assert (model.encode_text(ids3, mask)[:, 0] - model.encode_text(ids, mask)[:, 0]).abs().max() > 1e-4
        assert (model.fuse(ids3, mask, img)[0][:, 0] - model.fuse(ids, mask, img)[0][:, 0]).abs().max() > 1e-4
        assert (model.fuse_image(img, ids3, mask) - model.fuse_image(img, ids, mask)).abs().max() > 1e-4


def test_forward_losses_ignore_padding(cfg):
    """The full training forward: extra padding and garbage pad ids change no loss term."""
    b = make_batch(cfg, B=4, T=10)
    b2 = dict(b)
    b2["text_ids"], b2["text_mask"] = _repad(b["text_ids"], b["text_mask"], 3)
    b2["mlm_ids"] = torch.where(b2["text_mask"], torch.cat([b["mlm_ids"], b2["text_ids"][:, 10:]], 1),
                                b2["text_ids"])
    b2["mlm_labels"] = torch.cat([b["mlm_labels"], torch.full((4, 3), -100)], 1)
    outs = []
    for batch in (b, b2):
        model = _model(cfg, scramble=True)
        torch.manual_seed(5)  # same ITM negatives
        with torch.no_grad():
            outs.append(model(batch, alpha=0.4))
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=1e-5, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------------
# SDPA path == explicit path
# ---------------------------------------------------------------------------------------------
def test_block_sdpa_equals_explicit():
    torch.manual_seed(0)
    blk = Block(32, 4, 4.0, cross=True)
    x, mem = torch.randn(3, 7, 32), torch.randn(3, 11, 32)
    mask = torch.arange(7)[None] < torch.tensor([[7], [3], [1]])
    mem_mask = torch.arange(11)[None] < torch.tensor([[11], [5], [2]])
    for kw in (dict(mask=mask), dict(mask=mask, memory=mem), dict(mask=mask, memory=mem, memory_mask=mem_mask),
               dict(memory=mem)):
        fast, none1, none2 = blk(x, **kw)
        slow, sp, cp = blk(x, need_probs=True, **kw)
        assert none1 is None and none2 is None and sp is not None
        assert (cp is not None) == ("memory" in kw)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_stack_sdpa_equals_explicit(cfg):
    model, b = _model(cfg, scramble=True), make_batch(cfg)
    ids, mask = b["text_ids"], b["text_mask"]
    with torch.no_grad():
        img = model.encode_image(b["image"])
        ref = model.fuse(ids, mask, img)[0]
        for layer in range(cfg.text_layers):  # any layer on the explicit path: same hidden states
            torch.testing.assert_close(model.fuse(ids, mask, img, probs_layer=layer)[0], ref, atol=1e-5, rtol=0)
        h, sp, _ = model.text(model.text.embed(ids), mask, probs_layer=-1)
        torch.testing.assert_close(h, model.encode_text(ids, mask), atol=1e-5, rtol=0)


def test_grad_checkpointing_same_outputs_and_grads(cfg):
    b = make_batch(cfg)
    res = []
    for ckpt in (False, True):
        model = _model(tiny_cfg(grad_ckpt=ckpt)).train()
        torch.manual_seed(3)
        out = model(b, alpha=0.4)
        out["loss"].backward()
        res.append((out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-6, rtol=0)
    assert res[0][1].keys() == res[1][1].keys()
    for n in res[0][1]:
        torch.testing.assert_close(res[0][1][n], res[1][1][n], atol=1e-5, rtol=1e-4, msg=n)


# ---------------------------------------------------------------------------------------------
# timm / DeiT weights
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


def _vit(img_size=32):
    torch.manual_seed(0)
    return VisionTransformer(ModelConfig(img_size=img_size, patch_size=8, width=48, vision_layers=2,
                                         heads=3)).eval()


@pytest.mark.parametrize("wrap", [False, True])
def test_timm_weights_reproduce_timm_forward(fixture, wrap):
    fx = fixture
    assert fx["config"]["embed_dim"] == 48 and fx["config"]["depth"] == 2 and fx["config"]["eps"] == 1e-6
    vit = _vit()
    sd = fx["state_dict"]
    missing, unexpected = load_vit_weights(vit, {"model": sd} if wrap else sd)
    assert missing == ["mask_token"] and unexpected == []
    with torch.no_grad():
        assert (vit(fx["input"]) - fx["output"]).abs().max() < 1e-4
    # The caller's dict is not mutated (the pos-embed resize works on a copy).
    assert fx["state_dict"]["pos_embed"].shape == (1, 17, 48)


def test_timm_weights_module_prefix_and_distilled_deit(fixture):
    """DDP-saved ("module.") and distilled DeiT (dist_token, head_dist) checkpoints load too."""
    sd = {f"module.{k}": v for k, v in fixture["state_dict"].items()}
    pos = sd["module.pos_embed"]
    sd["module.pos_embed"] = torch.cat([pos[:, :1], torch.randn(1, 1, 48), pos[:, 1:]], 1)  # + dist position
    sd["module.dist_token"], sd["module.head_dist.weight"] = torch.randn(1, 1, 48), torch.randn(10, 48)
    vit = _vit()
    missing, unexpected = load_vit_weights(vit, {"model": sd})
    assert missing == ["mask_token"] and unexpected == ["dist_token", "head_dist.weight"]
    with torch.no_grad():
        assert (vit(fixture["input"]) - fixture["output"]).abs().max() < 1e-4


def test_timm_weights_at_48px(fixture):
    fx = fixture
    # (a) an encoder built at 48 px loads the 32-px weights: positions resampled as timm does.
    vit48 = _vit(48)
    assert load_vit_weights(vit48, fx["state_dict"]) == (["mask_token"], [])
    assert (vit48.pos_embed.detach() - fx["pos_embed_48"]).abs().max() < 1e-5
    with torch.no_grad():
        assert (vit48(fx["input_48"]) - fx["output_48"]).abs().max() < 1e-4
    # (b) the 32-px encoder fed a 48-px image interpolates its positions on the fly.
    vit32 = _vit(32)
    load_vit_weights(vit32, fx["state_dict"])
    with torch.no_grad():
        assert (vit32(fx["input_48"]) - fx["output_48"]).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# MIM masking: a masked patch contributes its position, never its pixels
# ---------------------------------------------------------------------------------------------
def test_masked_patches_only_through_mask_token(cfg):
    model, b = _model(cfg, scramble=True), make_batch(cfg)
    enc, image, pm = model.image_encoder, b["image"], b["patch_mask"]
    p, g = cfg.patch_size, cfg.img_size // cfg.patch_size
    # Pixel-level mask: patch n = (row n // g, col n % g), as Conv2d(stride p) + flatten orders them.
    pix = pm.view(-1, g, g).repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None].expand_as(image)
    with torch.no_grad():
        out = enc(image, pm)
        # Restatement: embed, swap masked rows for mask_token, add CLS and positions, run the blocks.
        x = enc.patch_embed.proj(image).flatten(2).transpose(1, 2)
        x = torch.where(pm[..., None], enc.mask_token, x)
        x = torch.cat([enc.cls_token.expand(len(x), -1, -1), x], 1) + enc.pos_embed
        for blk in enc.blocks:
            x = blk(x)[0]
        torch.testing.assert_close(out, enc.norm(x), atol=1e-5, rtol=0)
        # New pixels inside masked patches: output unchanged, bit for bit.
        torch.testing.assert_close(enc(torch.where(pix, torch.randn_like(image) * 5, image), pm), out,
                                   atol=0, rtol=0)
        # New pixels inside an UNMASKED patch do change it.
        assert (enc(torch.where(pix, image, torch.randn_like(image)), pm) - out).abs().max() > 1e-3
        # Changing mask_token changes the masked output, and nothing at all without a mask.
        plain = enc(image)
        enc.mask_token.add_(torch.randn_like(enc.mask_token))  # (a constant shift would be hidden by LN)
        assert (enc(image, pm) - out).abs().max() > 1e-3
        torch.testing.assert_close(enc(image), plain, atol=0, rtol=0)
        # An all-False mask is the same as no mask.
        torch.testing.assert_close(enc(image, torch.zeros_like(pm)), plain, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# momentum twin, optimizer groups
# ---------------------------------------------------------------------------------------------
def test_momentum_twin_starts_equal_and_ema_matches_formula(cfg):
    model = _model(cfg)
    online = dict(model.named_parameters())
    mom = dict(model.momentum.named_parameters())
    assert set(mom) == {n for n in online if not n.startswith("momentum.") and n != "temp"} == \
        {n[len("momentum."):] for n in online if n.startswith("momentum.")}
    for n, pm in mom.items():
        torch.testing.assert_close(pm, online[n], atol=0, rtol=0)
        assert not pm.requires_grad
    with torch.no_grad():  # move the online model so that the update is visible
        for n, p in model.named_parameters():
            if not n.startswith("momentum."):
                p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in mom.items()}
    model.momentum_update()
    m = cfg.momentum
    for n, pm in mom.items():
        torch.testing.assert_close(pm, m * before[n] + (1 - m) * online[n].detach(), atol=1e-6, rtol=0, msg=n)
        assert not torch.equal(pm, before[n])


def test_momentum_params_get_no_grad(cfg):
    model = _model(cfg).train()
    model(make_batch(cfg), alpha=0.4)["loss"].backward()
    for n, p in model.named_parameters():
        if n.startswith("momentum."):
            assert p.grad is None and not p.requires_grad, n
    assert model.temp.grad is not None


def test_configure_optimizers_groups(cfg):
    model = _model(cfg)
    opt = model.configure_optimizers(lr=1e-3, weight_decay=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, other = opt.param_groups
    assert decay["weight_decay"] == 0.02 and other["weight_decay"] == 0.0
    dn, on = [names[id(p)] for p in decay["params"]], [names[id(p)] for p in other["params"]]
    trainable = {n for n, p in model.named_parameters() if not n.startswith("momentum.")}
    assert set(dn) | set(on) == trainable and not set(dn) & set(on)  # every trained param once, no twin
    assert all(not n.startswith("momentum.") for n in dn + on)
    for n in dn:
        assert model.get_parameter(n).dim() >= 2 and not n.endswith(("bias", "pos_embed", "cls_token", "mask_token"))
    for n in ("temp", "mlm_bias", "text.pos_embed", "image_encoder.pos_embed", "image_encoder.cls_token",
              "image_encoder.mask_token", "text.norm.weight", "text.blocks.0.attn.qkv.bias",
              "image_encoder.blocks.0.norm1.weight", "mlm_transform.2.weight"):
        assert n in on, n
    for n in ("text.tok_embed.weight", "text.blocks.0.cross_attn.kv.weight", "image_encoder.patch_embed.proj.weight",
              "concept_head.weight"):
        assert n in dn, n
    # Frozen parameters (set_trainable) are left out of the optimizer entirely.
    model.set_trainable(("itc",))
    opt = model.configure_optimizers(lr=1e-3, weight_decay=0.02)
    kept = {names[id(p)] for g in opt.param_groups for p in g["params"]}
    assert "itm_head.weight" not in kept and "text.blocks.0.cross_attn.q.weight" not in kept and "temp" in kept


# ---------------------------------------------------------------------------------------------
# set_trainable: exactly the parameters the enabled terms reach
# ---------------------------------------------------------------------------------------------
def test_set_trainable_itc_freezes_fusion_and_heads(cfg):
    model = _model(cfg).train()
    model.set_trainable(("itc",))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("momentum.")}
    for pat in (".cross_attn.", ".norm_cross.", "itm_head", "mlm_transform", "mlm_bias", "mim_head",
                "image_encoder.mask_token", "concept_head"):
        assert any(pat in n for n in frozen), pat
    for n, p in model.named_parameters():
        if any(pat in n for pat in (".cross_attn.", ".norm_cross.", "itm_head", "mlm_", "mim_head", "mask_token",
                                    "concept_head")):
            assert not p.requires_grad, n
    model(make_batch(cfg), alpha=0.4, terms=("itc",))["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_set_trainable_matches_the_graph_for_every_term_subset(cfg):
    """For every subset of terms, trainable == reached by the loss (DDP without unused-parameter search)."""
    b = make_batch(cfg)
    torch.manual_seed(0)
    base = SIMLA(cfg).train()
    state = base.state_dict()
    for r in range(1, len(TERMS) + 1):
        for terms in itertools.combinations(TERMS, r):
            model = base
            model.load_state_dict(state)
            model.requires_grad_(True).momentum.requires_grad_(False)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            model(b, alpha=0.4, terms=terms)["loss"].backward()
            reached = {n for n, p in model.named_parameters() if p.grad is not None}
            model.set_trainable(terms)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert trainable == reached, (terms, trainable ^ reached)


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------
def _param_count(c: ModelConfig):
    """Trained parameters restated from the architecture (SIMLA.md "Architecture"), no module built."""
    C, F_, Ppx = c.width, int(c.width * c.mlp_ratio), c.patch_size ** 2 * 3
    lin = lambda i, o: i * o + o
    ln = 2 * C
    self_attn, mlp = lin(C, 3 * C) + lin(C, C), lin(C, F_) + lin(F_, C)
    cross_attn = lin(C, C) + lin(C, 2 * C) + lin(C, C)  # q, fused kv, proj
    N = (c.img_size // c.patch_size) ** 2
    vit = 3 * C * c.patch_size ** 2 + C + 2 * C + (1 + N) * C  # patch conv, cls + mask tokens, positions
    vit += c.vision_layers * (self_attn + mlp + 2 * ln) + ln  # blocks, final norm
    text = c.vocab_size * C + c.max_len * C + ln + c.text_layers * (self_attn + cross_attn + mlp + 3 * ln) + ln
    heads = 2 * C * c.embed_dim + lin(C, 2) + lin(C, C) + ln + c.vocab_size + lin(C, Ppx) + \
        lin(c.embed_dim, c.vocab_size) + 1  # projections (no bias, as CLIP), ITM, MLM transform + bias, MIM, concept, temp
    return vit, text, vit + text + heads


def test_base_preset_has_the_paper_sizes():
    c = PRESETS["base"]
    assert (c.width, c.vision_layers, c.heads, c.patch_size) == (768, 12, 12, 16)  # ViT-B/16
    assert (c.text_layers, c.embed_dim, c.img_size, c.momentum) == (12, 256, 256, 0.995)
    assert c.width // c.heads == 64 and c.mlp_ratio == 4.0
    with torch.device("meta"):
        model = SIMLA(c)
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    trained = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("momentum."))
    vit, text, total = _param_count(c)
    assert (count(model.image_encoder), count(model.text), trained) == (vit, text, total)
    # timm's vit_base_patch16_224 without its head has 85,798,656 parameters; ours at 256 px has
    # 60 more positions and the MASK embedding.
    assert vit == 85_798_656 + (256 - 196) * 768 + 768
    assert count(model.momentum) == trained - 1  # the twin has everything but the temperature
    print(f"\nbase preset: {trained:,} trained parameters (ViT {vit:,}, text stack {text:,})")
    # The tiny presets follow the same arithmetic.
    for c in (PRESETS["tiny"], tiny_cfg()):
        assert _param_count(c)[2] == sum(p.numel() for n, p in SIMLA(c).named_parameters()
                                         if not n.startswith("momentum."))


# ---------------------------------------------------------------------------------------------
# a real learning check
# ---------------------------------------------------------------------------------------------
def test_overfit_one_batch_itc():
    """20 AdamW steps at lr 1e-3 on one batch of 8 pairs drive ITC far down (measured: 2.13 -> 0.04).
    In-batch contrast, as the tiny preset: with a queue of stale keys a from-scratch model first has to
    break the symmetry of its near-identical CLS features (README, "What differs")."""
    cfg = tiny_cfg(queue_size=0)
    b = make_batch(cfg, B=8, T=10, seed=3)
    model = _model(cfg).train()
    model.set_trainable(("itc",))
    opt = model.configure_optimizers(lr=1e-3, weight_decay=0.0)
    losses = []
    for step in range(20):
        loss = model(b, alpha=0.0, terms=("itc",))["itc"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.momentum_update()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.25 * losses[0], losses
