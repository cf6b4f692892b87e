"""SIMLA: a ViT image encoder and ONE single-stream multimodal transformer, in one file.

Paper: Khan et al., "Single-Stream Multi-Level Alignment for Vision-Language Pretraining", ECCV 2022.
Method summary and the official code's defects: ../shared/SIMLA.md ("Architecture", "Objectives").

Shape legend (used in every shape comment below)
    B batch   N image patches (+1 with CLS)   T text tokens   C width   H heads   D head dim (C / H)
    E ITC embedding dim   V vocabulary   P pixels per patch (patch_size**2 * 3)   M masked positions

The one idea to keep in mind while reading: the text stack below has self-attention, cross-attention
and an MLP in every layer, and the SAME weights run in three modes (SIMLA.md, "Architecture"):
    text        : text tokens attend to themselves only (cross-attention skipped) -> ITC text feature
    text->image : text tokens are queries, image tokens are cross-attention memory -> ITM, MLM, PSL
    image->text : image tokens are queries, caption TOKEN EMBEDDINGS are memory  -> MIM
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import losses as L
from kernels import all_gather_nograd, attention, attention_reference, ema_update_, gather_masked


@dataclass
class ModelConfig:
    img_size: int = 64         # pretraining resolution; other sizes interpolate the positions (bicubic)
    patch_size: int = 8
    width: int = 192           # C for BOTH the ViT and the text stack (the paper: 768 and 768)
    vision_layers: int = 4
    text_layers: int = 4       # the single-stream stack (the paper: 12)
    heads: int = 3
    mlp_ratio: float = 4.0
    vocab_size: int = 4100     # set from the tokenizer at run time
    max_len: int = 32          # text positions (the paper: 25 tokens; ours are BPE pieces, not WordPiece)
    embed_dim: int = 128       # E, ITC projection size (the paper: 256)
    queue_size: int = 4096     # ITC queue (the paper: 65,536 for 4M images; keep it below the data size)
    momentum: float = 0.995    # EMA decay of the momentum model
    temp: float = 0.07         # initial ITC temperature, learned, clamped to [0.001, 0.5]
    grad_ckpt: bool = False    # activation checkpointing of every block (memory for compute, base on GPU)


PRESETS = {
    # Trains usefully on 2 CPU cores in minutes: 64 px, 8 px patches -> 64 patches, 4 + 4 layers of 128.
    # From scratch and for a few hundred steps, a queue and a slow EMA let ITC collapse (README, "What
    # differs"), so tiny contrasts against the batch only and its momentum model follows faster.
    "tiny": ModelConfig(width=128, heads=4, queue_size=0, momentum=0.99),
    "small": ModelConfig(img_size=128, patch_size=16, width=384, vision_layers=6, text_layers=6, heads=6,
                         embed_dim=256, queue_size=0, momentum=0.99),
    # The paper's sizes: ViT-B/16 at 256 px, 12-layer width-768 single-stream stack, ITC dim 256, queue
    # 65,536, momentum 0.995 (meant to start from DeiT weights: --init-vit).
    "base": ModelConfig(img_size=256, patch_size=16, width=768, vision_layers=12, text_layers=12, heads=12,
                        vocab_size=30522, max_len=32, embed_dim=256, queue_size=65536),
}


# ---------------------------------------------------------------------------------------------------
# Building blocks. Parameter names follow timm's VisionTransformer (patch_embed.proj, cls_token,
# pos_embed, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm) so DeiT/timm weights load.
# ---------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Self-attention (fused qkv) or cross-attention (q from x, fused kv from memory)."""

    def __init__(self, dim, heads, cross=False):
        super().__init__()
        self.heads, self.cross = heads, cross
        if cross:
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, memory=None, key_mask=None, need_probs=False):
        B, T, C = x.shape
        H, D = self.heads, C // self.heads
        if self.cross:
            q = self.q(x).view(B, T, H, D).transpose(1, 2)                    # (B, H, T, D)
            k, v = self.kv(memory).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Tk, D)
        else:
            q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)    # 3 x (B, H, T, D)
        probs = None
        if need_probs:  # explicit softmax, only for the one layer whose map is read (PSL, Grad-CAM)
            out, probs = attention_reference(q, k, v, key_mask)
        else:
            out = attention(q, k, v, key_mask)
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.proj(out), probs


class MLP(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * ratio)), nn.Linear(int(dim * ratio), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: self-attention, [cross-attention], MLP, each as a residual branch."""

    def __init__(self, dim, heads, mlp_ratio, cross=False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        if cross:
            self.norm_cross, self.cross_attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads, cross=True)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, mlp_ratio)

    def forward(self, x, mask=None, memory=None, memory_mask=None, need_probs=False):
        a, self_probs = self.attn(self.norm1(x), key_mask=mask, need_probs=need_probs)
        x, cross_probs = x + a, None
        if memory is not None:  # memory None = text-only mode: cross-attention skipped entirely
            a, cross_probs = self.cross_attn(self.norm_cross(x), memory, memory_mask, need_probs)
            x = x + a
        return x + self.mlp(self.norm2(x)), self_probs, cross_probs


def run_blocks(blocks, x, grad_ckpt, probs_layer=None, **kw):
    """Apply blocks; return (x, self_probs, cross_probs) of layer `probs_layer` (negative = from end)."""
    want = None if probs_layer is None else probs_layer % len(blocks)
    maps = (None, None)
    for i, blk in enumerate(blocks):
        if i == want:  # never checkpoint the read layer: its maps must stay in this graph
            x, *maps = blk(x, need_probs=True, **kw)
        elif grad_ckpt and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(lambda t, b=blk: b(t, **kw)[0], x, use_reentrant=False)
        else:
            x = blk(x, **kw)[0]
    return x, maps[0], maps[1]


def resize_pos_embed(pos, new_grid, prefix=1):
    """(1, prefix + g*g, C) -> (1, prefix + new_grid**2, C); bicubic on the grid, as timm does."""
    old_grid = int(math.isqrt(pos.shape[1] - prefix))
    if old_grid == new_grid:
        return pos
    grid = pos[:, prefix:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", antialias=True,
                         align_corners=False).to(pos.dtype)
    return torch.cat([pos[:, :prefix], grid.flatten(2).transpose(1, 2)], dim=1)  # (1, prefix + n*n, C)


class VisionTransformer(nn.Module):
    """ViT with a learned MASK embedding for MIM (BEiT / SIMLA style)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, self.cfg = cfg.width, cfg
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, C, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (cfg.img_size // cfg.patch_size) ** 2, C))
        self.blocks = nn.ModuleList(Block(C, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.vision_layers))
        self.norm = nn.LayerNorm(C, eps=1e-6)

    def forward(self, image, patch_mask=None):
        """image (B, 3, S, S), patch_mask (B, N) bool (True = masked) -> (B, 1 + N, C)."""
        x = self.patch_embed.proj(image)      # (B, C, S/p, S/p)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)      # (B, N, C)
        if patch_mask is not None:
            # Masked patches are replaced BEFORE CLS and positions are added, so a masked patch still
            # knows where it is but not what it shows (SIMLA.md, "Architecture").
            x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, C)
        x = x + resize_pos_embed(self.pos_embed, grid)
        x = run_blocks(self.blocks, x, self.cfg.grad_ckpt)[0]
        return self.norm(x)


def load_vit_weights(encoder: VisionTransformer, state_dict):
    """Load a timm or DeiT ViT state dict (bare or under "model") into `encoder`; returns
    (missing, unexpected) key lists. Positions are interpolated to the encoder's grid; a distilled
    DeiT's dist_token and classifier heads are ignored (listed as unexpected)."""
    sd = state_dict.get("model", state_dict)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "pos_embed" in sd:
        prefix = 2 if "dist_token" in sd else 1
        pos = sd["pos_embed"]
        pos = torch.cat([pos[:, :1], pos[:, prefix:]], dim=1)  # keep the CLS position, drop dist's
        sd["pos_embed"] = resize_pos_embed(pos, encoder.cfg.img_size // encoder.cfg.patch_size)
    own = encoder.state_dict()
    unexpected = sorted(k for k in sd if k not in own or sd[k].shape != own[k].shape)
    missing = sorted(k for k in own if k not in sd)
    encoder.load_state_dict({k: v for k, v in sd.items() if k not in unexpected}, strict=False)
    return missing, unexpected


class TextStack(nn.Module):
    """Token + position embeddings and the single-stream stack (self + cross + MLP in every layer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, self.cfg = cfg.width, cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, C)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_len, C))
        # Normalises the token embeddings only where they serve as MIM memory (image->text mode), so
        # that memory is unit-scale like the image encoder's output. The stack's own input stays raw
        # (GPT-2 style, std 0.02): a LayerNorm there would make the CLS embedding ~50x larger than what
        # attention adds to it at init, and every caption would start with the same feature (cos 1.0).
        self.embed_norm = nn.LayerNorm(C, eps=1e-6)
        self.blocks = nn.ModuleList(Block(C, cfg.heads, cfg.mlp_ratio, cross=True)
                                    for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(C, eps=1e-6)

    def embed(self, ids):
        """ids (B, T) -> (B, T, C): the caption's token embeddings (uncontextualised)."""
        return self.tok_embed(ids) + self.pos_embed[:, :ids.shape[1]]

    def forward(self, x, mask=None, memory=None, memory_mask=None, probs_layer=None):
        x, sp, cp = run_blocks(self.blocks, x, self.cfg.grad_ckpt, probs_layer, mask=mask, memory=memory,
                               memory_mask=memory_mask)
        return self.norm(x), sp, cp


# ---------------------------------------------------------------------------------------------------
# One complete copy of every encoder and head. SIMLA below is this plus its momentum twin.
# ---------------------------------------------------------------------------------------------------
class SIMLANet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, self.cfg = cfg.width, cfg
        self.image_encoder = VisionTransformer(cfg)
        self.text = TextStack(cfg)
        # No bias, as in CLIP: features are unit-normalised, and Adam moves a shared bias by ~lr per
        # step, fast enough to swamp the small feature differences of a model trained from scratch.
        self.vision_proj = nn.Linear(C, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(C, cfg.embed_dim, bias=False)
        self.itm_head = nn.Linear(C, 2)
        # MLM: transform then a decoder tied to the token embedding (BERT style; V x C parameters saved).
        self.mlm_transform = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.LayerNorm(C, eps=1e-6))
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.mim_head = nn.Linear(C, cfg.patch_size ** 2 * 3)  # per-patch pixels (our MIM target)
        self.concept_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)  # PSL: image feature -> keywords

    # --- the three modes of the one stack, and the unimodal encoders -----------------------------
    def encode_image(self, image, patch_mask=None):
        return self.image_encoder(image, patch_mask)  # (B, 1 + N, C)

    def encode_text(self, ids, mask):
        """text mode -> (B, T, C)."""
        return self.text(self.text.embed(ids), mask)[0]

    def fuse(self, ids, mask, image_embeds, probs_layer=None):
        """text->image mode -> (hidden (B, T, C), self_probs, cross_probs) of layer `probs_layer`."""
        return self.text(self.text.embed(ids), mask, memory=image_embeds, probs_layer=probs_layer)

    def fuse_image(self, image_embeds, ids, mask):
        """image->text mode: image tokens query the caption's token embeddings -> (B, 1 + N, C)."""
        memory = self.text.embed_norm(self.text.embed(ids))  # (B, T, C), not contextualised (SIMLA.md)
        return self.text(image_embeds, None, memory=memory, memory_mask=mask)[0]

    # --- heads --------------------------------------------------------------------------------
    def image_feat(self, image_embeds):
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)  # (B, E), CLS

    def text_feat(self, text_embeds):
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)  # (B, E), CLS

    def mlm_logits(self, hidden):
        return self.mlm_transform(hidden) @ self.text.tok_embed.weight.t() + self.mlm_bias  # (M, V)

    def concept_logits(self, image_embeds):
        # From the projected (not yet normalised) image CLS feature, as SIMLA.md "Heads" says.
        return self.concept_head(self.vision_proj(image_embeds[:, 0]))  # (B, V)


def init_weights(net: SIMLANet):
    """Every parameter group and its initialisation:
    - Linear / Conv2d / Embedding weights: normal(0, 0.02); biases: 0 (GPT-2 / BERT / timm style).
    - Residual output projections (attn.proj, cross_attn.proj, mlp.fc2): normal(0, 0.02 / sqrt(2 L)),
      L = layers of that tower, so the residual stream's variance does not grow with depth (GPT-2).
    - cls_token, mask_token, pos_embed (both towers): normal(0, 0.02). LayerNorm: weight 1, bias 0.
    - concept_head bias: -log(V): every keyword starts at probability ~1/V, the right prior for a
      5-hot target over V words, so BCE does not spend its first steps pushing V logits down.
    """
    for name, p in net.named_parameters():
        tower_layers = net.cfg.vision_layers if name.startswith("image_encoder") else net.cfg.text_layers
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * tower_layers))
        else:
            nn.init.normal_(p, std=0.02)
    for m in net.modules():  # LayerNorms (including the one inside mlm_transform)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
    nn.init.constant_(net.concept_head.bias, -math.log(net.cfg.vocab_size))


class SIMLA(SIMLANet):
    """The trained model, its EMA (momentum) twin, the learnable temperature and the ITC queues."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        init_weights(self)
        # The momentum twin: same architecture, never trained by the optimizer, only EMA-updated.
        # A plain SIMLANet, so its state dict sits under "momentum." in checkpoints.
        momentum = SIMLANet(cfg)
        momentum.load_state_dict(self.state_dict())  # starts equal to the online model
        self.momentum = momentum.requires_grad_(False)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        # ITC queues of momentum features and their image ids (ids make repeated images positives).
        # Slots start empty (id -1) and are left out of the contrast until written (losses.itc_loss).
        self.register_buffer("image_queue", torch.zeros(cfg.queue_size, cfg.embed_dim))
        self.register_buffer("text_queue", torch.zeros(cfg.queue_size, cfg.embed_dim))
        self.register_buffer("id_queue", torch.full((cfg.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        """theta_m <- m theta_m + (1 - m) theta, fused foreach kernels (kernels/ops.py). Pairs are
        matched by name, so the two lists line up whatever the registration order."""
        pairs = [(p, self.get_parameter(n)) for n, p in self.momentum.named_parameters()]
        ema_update_([pm for pm, _ in pairs], [p for _, p in pairs], self.cfg.momentum)

    def set_trainable(self, terms):
        """Freeze parameters that the enabled loss terms never touch, so DDP needs no unused-parameter
        search and the optimizer carries no dead state (e.g. `--losses itc` trains no cross-attention)."""
        # PSL fuses only in the momentum model; the online side is image encoder -> vision_proj -> head.
        fusion, text = bool({"itm", "mlm", "mim"} & set(terms)), bool({"itc", "itm", "mlm", "mim"} & set(terms))
        for name, p in self.named_parameters():
            if name.startswith("momentum."):
                continue
            used = not ((".cross_attn." in name or ".norm_cross." in name) and not fusion
                        or name.startswith("text.") and not text
                        or name.startswith(("text_proj", "temp")) and "itc" not in terms
                        or name.startswith("vision_proj") and not {"itc", "psl"} & set(terms)
                        or name.startswith("itm_head") and "itm" not in terms
                        or name.startswith(("mlm_transform", "mlm_bias")) and "mlm" not in terms
                        or name.startswith(("mim_head", "image_encoder.mask_token", "text.embed_norm"))
                        and "mim" not in terms
                        or name.startswith("concept_head") and "psl" not in terms)
            p.requires_grad_(used)

    def configure_optimizers(self, lr, weight_decay, betas=(0.9, 0.999), device_type="cpu"):
        """AdamW; decay only on weight matrices (not biases, norms, temperature, tokens, positions)."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        no_decay = ("pos_embed", "cls_token", "mask_token")
        decay = [p for n, p in params if p.dim() >= 2 and not n.endswith(no_decay)]
        other = [p for n, p in params if not (p.dim() >= 2 and not n.endswith(no_decay))]
        # Fused AdamW: one kernel for all tensors (CUDA; CPU since torch 2.4, measured 3.7x faster than
        # foreach there: README "Performance").
        torch_ok = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)
        fused = (device_type == "cuda" or device_type == "cpu" and torch_ok) and \
            "fused" in inspect.signature(torch.optim.AdamW).parameters
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))

    @torch.no_grad()
    def _enqueue(self, image_feat_m, text_feat_m, image_id):
        """Write the GLOBAL batch's momentum features into the ring buffer, wrapping around, so the
        queue size need not divide the global batch (the official code asserts it does)."""
        img, txt, ids = all_gather_nograd(image_feat_m), all_gather_nograd(text_feat_m), all_gather_nograd(image_id)
        # A step whose loss is non-finite is skipped by train.py, but its forward already ran: rows with
        # non-finite features enter as empty slots (id -1), so they can never poison later steps.
        ok = torch.isfinite(img).all(1) & torch.isfinite(txt).all(1)
        img, txt, ids = img.nan_to_num(0.0), txt.nan_to_num(0.0), torch.where(ok, ids, -1)
        K, n = self.cfg.queue_size, min(img.shape[0], self.cfg.queue_size)
        if K == 0:  # queue_size 0: contrast against the (global) batch only
            return
        slots = (self.queue_ptr + torch.arange(n, device=img.device)) % K  # (n,), wraps around
        self.image_queue[slots], self.text_queue[slots], self.id_queue[slots] = img[-n:].to(self.image_queue.dtype), \
            txt[-n:].to(self.text_queue.dtype), ids[-n:]
        self.queue_ptr.copy_((self.queue_ptr + n) % K)

    def forward(self, batch, alpha, terms=("itc", "itm", "mlm", "mim", "psl"), weights=None):
        """One SIMLA training forward: returns {"loss": total, name: term} for the enabled terms.
        batch: data.py's collate output. alpha: momentum-distillation weight (ramped by train.py)."""
        image, ids, mask, image_id = batch["image"], batch["text_ids"], batch["text_mask"], batch["image_id"]
        m, out = self.momentum, {}
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)  # SIMLA.md: learnable temperature clamped to [0.001, 0.5]
        image_embeds = self.encode_image(image)                        # (B, 1 + N, C)
        image_feat = self.image_feat(image_embeds)                     # (B, E)
        with torch.no_grad():
            image_embeds_m = m.encode_image(image)
            image_feat_m = m.image_feat(image_embeds_m)

        if "itc" in terms or "itm" in terms:
            text_feat = self.text_feat(self.encode_text(ids, mask))    # (B, E)
            with torch.no_grad():
                text_feat_m = m.text_feat(m.encode_text(ids, mask))
                # Keys: the global batch of momentum features, then the queue (SIMLA.md "ITC").
                keys_id = torch.cat([all_gather_nograd(image_id), self.id_queue])
                image_keys = torch.cat([all_gather_nograd(image_feat_m), self.image_queue])
                text_keys = torch.cat([all_gather_nograd(text_feat_m), self.text_queue])
            if "itc" in terms:
                out["itc"] = L.itc_loss(image_feat, text_feat, image_keys, text_keys, image_feat_m, text_feat_m,
                                        image_id, keys_id, self.temp, alpha)
            if "itm" in terms:
                with torch.no_grad():  # hard negatives from the in-batch similarities (no host sync)
                    sim = image_feat @ text_feat.t() / self.temp      # (B_img, B_txt)
                    neg_img, neg_txt = L.sample_hard_negatives(sim, image_id)
                # One fused pass over 3B pairs: (text, its image), (text, hard image), (hard text, image).
                pair_ids = torch.cat([ids, ids, ids[neg_txt]])
                pair_mask = torch.cat([mask, mask, mask[neg_txt]])
                pair_img = torch.cat([image_embeds, image_embeds[neg_img], image_embeds])
                hidden = self.fuse(pair_ids, pair_mask, pair_img)[0]  # (3B, T, C)
                out["itm"] = L.itm_loss(self.itm_head(hidden[:, 0]))
            self._enqueue(image_feat_m, text_feat_m, image_id)

        if "mlm" in terms:  # XMM text side: reconstruct masked words with the image as context
            sel = batch["mlm_labels"] != -100                            # (B, T)
            hidden = self.fuse(batch["mlm_ids"], mask, image_embeds)[0]
            logits = self.mlm_logits(gather_masked(hidden, sel))       # (M, V), masked positions only
            with torch.no_grad():
                logits_m = m.mlm_logits(gather_masked(m.fuse(batch["mlm_ids"], mask, image_embeds_m)[0], sel))
            out["mlm"] = L.mlm_loss(logits, batch["mlm_labels"][sel], logits_m, alpha)

        if "mim" in terms:  # XMM image side: reconstruct masked patches with the caption as context
            pm = batch["patch_mask"]                                     # (B, N)
            hidden = self.fuse_image(self.encode_image(image, pm), ids, mask)[:, 1:]  # (B, N, C), drop CLS
            pred = self.mim_head(gather_masked(hidden, pm))            # (M, P)
            with torch.no_grad():
                hidden_m = m.fuse_image(m.encode_image(image, pm), ids, mask)[:, 1:]
                pred_m = m.mim_head(gather_masked(hidden_m, pm))
                # Target pixels from the SAME crop the ViT saw (the official code crops separately).
                target = gather_masked(L.patch_targets(image, self.cfg.patch_size), pm)  # (M, P)
            out["mim"] = L.mim_loss(pred, target, pred_m, alpha)

        if "psl" in terms:  # conceptual level: keywords picked by the momentum model's own attention
            with torch.no_grad():
                _, cls_probs, _ = m.fuse(ids, mask, image_embeds_m, probs_layer=-1)  # (B, H, T, T)
                # Specials (CLS, SEP, PAD, MASK) hold the last 4 ids (tokenizer.py) and are never targets.
                keyword_ok = mask & (ids < self.cfg.vocab_size - 4)                   # (B, T)
                targets = L.psl_targets(cls_probs[:, :, 0].float(), ids, keyword_ok, self.cfg.vocab_size)
                soft = torch.sigmoid(m.concept_logits(image_embeds_m))
            out["psl"] = L.psl_loss(self.concept_logits(image_embeds), targets, soft, alpha)

        weights = weights or {}
        out["loss"] = sum(weights.get(k, 1.0) * v for k, v in out.items())
        return out
