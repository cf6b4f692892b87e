"""Training-step benchmark: step time, throughput, FLOPs, MFU, memory and where the time goes.

    python kernels/bench.py --preset tiny --batch-size 32 --steps 5 --warmup 2          # CPU, minutes
    python kernels/bench.py --preset base --precision bf16 --compile                    # one GPU
    python kernels/bench.py --preset base --precision bf16 --attn reference             # SDPA vs explicit
    python kernels/bench.py --preset tiny --sweep --steps 3 --warmup 1                  # scaling table
    python kernels/bench.py --preset tiny --tactics --steps 5 --warmup 2                # each tactic on/off

One timed step is a full training step: forward of the enabled terms
(`model(batch, alpha, terms)`, SIMLA.forward runs every pass), backward, AdamW step, EMA update of the
momentum twin. The batch is synthetic (random pixels and tokens) with the collate format of data.py and
realistic proportions: ~65% real caption tokens, 15% of the words masked for MLM, 75/256 of the
patches masked for MIM. Step cost depends on these shapes only, never on the values.

Printed: median step time, samples/s, analytic FLOPs per step, achieved FLOP/s and MFU against the
device's dense peak (GPU; a CPU has no meaningful peak, so only FLOP/s), peak memory (CUDA
max_memory_allocated over the timed steps; on CPU the process's max RSS), and a per-component table.
The very last stdout line is one JSON object (numbers in ms, FLOPs, MiB) for machines.

Per-component time: each group of SIMLA.forward's passes is re-run IN ISOLATION at the step's shapes
(trained passes forward + backward, momentum passes forward under no_grad), plus AdamW's step and the
EMA update + queue write alone. "other" = step - sum of components: autograd bookkeeping of the joined
graph, launch gaps, Python. The breakdown is always eager, even with --compile.

-----------------------------------------------------------------------------------------------------
The analytic FLOP model (`step_flops`): MODEL FLOPs, i.e. the matmuls the algorithm needs, not what a
particular kernel executes (PaLM's MFU definition, appendix B).
  * A matmul (m x k) @ (k x n) costs 2*m*k*n FLOPs; a Linear over L tokens costs 2*L*in*out.
  * Counted: every Linear, the patch-embedding conv (a Linear over each p*p*3 patch), attention's two
    matmuls (scores q k^T and probs @ v: 2 * 2*Tq*Tk*D per head = 4*Tq*Tk*C per layer per sample),
    and the ITC similarity matmuls. Ignored: LayerNorm, softmax, GELU, residual adds, embedding
    lookups, loss arithmetic, AdamW and the EMA update (elementwise, O(params), a few % at most).
  * One block, per sample, forward (C width, F = mlp_ratio*C, Lq queries, Lk memory tokens):
        self-attention  qkv 2*Lq*C*3C + scores/values 4*Lq*Lq*C + proj 2*Lq*C*C
        cross-attention q 2*Lq*C*C + kv 2*Lk*C*2C (on the MEMORY tokens) + 4*Lq*Lk*C + proj 2*Lq*C*C
        MLP             2 * 2*Lq*C*F
    Modes: ViT Lq = N+1 (no cross); text Lq = T (no cross); text->image Lq = T, Lk = N+1;
    image->text Lq = N+1, Lk = T (memory = the caption's token embeddings).
  * Trained (online) matmuls cost 3x forward: forward, grad wrt the input, grad wrt the weight. Two
    exceptions where autograd computes only one of the two gradients (tests/test_bench.py checks the
    whole count against torch's FlopCounterMode): the patch conv (the image needs no gradient: 2x) and
    the ITC similarities against the no-grad momentum keys (2x). A pass whose output only reaches a
    no-grad computation is forward only (1x), e.g. the online text encoder when ITM is on but ITC off.
  * Momentum (EMA twin) passes run under no_grad: 1x forward.
  * Activation checkpointing (--grad-ckpt) recomputes block forwards; that is hardware work, not model
    FLOPs, so it lowers MFU instead of raising the count.
  * The passes, as SIMLA.forward runs them (B samples, K queue, E embed, V vocab, M masked):
        always     online image encode (3x, conv 2x; 1x if MIM is the only term) + vision_proj (3x
                   if itc else 1x); momentum image encode + vision_proj (1x)
        itc | itm  online text encode + text_proj (3x if itc else 1x); momentum text encode (1x)
        itc        i2t and t2i similarities B x (B+K) x E: online 2x + momentum 1x, both directions
                   (B keys = the global batch; one process here)
        itm        text->image fusion over 3B pairs (3x); ITM head on 3B CLS (3x); hard-negative
                   similarity B x B x E (no_grad, 1x)
        mlm        text->image fusion online (3x) + momentum (1x); MLM transform C->C and tied
                   decoder C->V on the M masked tokens, online 3x + momentum 1x
        mim        masked image encode online (3x) + momentum (1x); image->text fusion online (3x) +
                   momentum (1x); MIM head C->P on the masked patches, 3x + 1x
        psl        momentum text->image fusion (1x; the last layer's explicit attention has the same
                   FLOPs); concept head (vision_proj C->E, then E->V) on B, online 3x + momentum 1x
"""
import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere: `python kernels/bench.py`

import torch  # noqa: E402

import losses as L  # noqa: E402
import model as model_module  # noqa: E402
from kernels import attention_reference, ema_update_, ema_update_reference_, gather_masked  # noqa: E402
from model import PRESETS, SIMLA, ModelConfig  # noqa: E402

TERMS = ("itc", "itm", "mlm", "mim", "psl")
COMPONENTS = ("image_encoder", "text_encoder", "fusion_itm", "fusion_mlm", "fusion_mim", "fusion_psl",
              "heads", "ema_queue", "optimizer")
DEFAULT_BATCH = {"tiny": 32, "small": 32, "base": 64}  # base: the paper's 64 per GPU


# ---------------------------------------------------------------------------------------------------
# The analytic FLOP model (derivation in the module docstring).
# ---------------------------------------------------------------------------------------------------
def block_flops(Lq, C, F, Lk=None):
    """Forward FLOPs of one block for ONE sample: self-attention over Lq tokens and the MLP, plus
    cross-attention to Lk memory tokens when Lk is given."""
    flops = 2 * Lq * C * 3 * C + 4 * Lq * Lq * C + 2 * Lq * C * C + 2 * 2 * Lq * C * F
    if Lk is not None:
        flops += 2 * Lq * C * C + 2 * Lk * C * 2 * C + 4 * Lq * Lk * C + 2 * Lq * C * C
    return flops


def step_flops(cfg: ModelConfig, B, T, terms, n_mlm, n_mim):
    """Model FLOPs of one training step (forward + backward of every enabled pass), per component.
    B batch, T text length, n_mlm / n_mim masked tokens / patches in the whole batch.
    Returns {component: FLOPs} for every name in COMPONENTS plus "total" (EMA/optimizer are 0)."""
    terms = set(terms)
    C, F, E, V, K = cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.embed_dim, cfg.vocab_size, cfg.queue_size
    N = (cfg.img_size // cfg.patch_size) ** 2
    I, P = N + 1, 3 * cfg.patch_size ** 2       # image tokens incl. CLS, pixels per patch
    conv = B * 2 * N * P * C                    # patch embedding: a P -> C Linear on every patch
    vit = B * cfg.vision_layers * block_flops(I, C, F)
    text = B * cfg.text_layers * block_flops(T, C, F)
    t2i = B * cfg.text_layers * block_flops(T, C, F, Lk=I)
    i2t = B * cfg.text_layers * block_flops(I, C, F, Lk=T)
    proj = 2 * B * C * E                        # vision_proj / text_proj on the B CLS tokens
    f = dict.fromkeys(COMPONENTS, 0)

    # The online image embedding feeds every term but MIM (which encodes its own masked copy).
    grad_image = bool(terms & {"itc", "itm", "mlm", "psl"})
    f["image_encoder"] = (3 * vit + 2 * conv if grad_image else vit + conv) + (vit + conv)  # + momentum
    f["heads"] += (3 if "itc" in terms else 1) * proj + proj         # image_feat online, momentum
    if terms & {"itc", "itm"}:
        f["text_encoder"] = (3 if "itc" in terms else 1) * text + text
        f["heads"] += (3 if "itc" in terms else 1) * proj + proj     # text_feat online, momentum
    if "itc" in terms:  # i2t and t2i against B momentum keys + K queue: online 2x, momentum targets 1x
        f["heads"] += 2 * (2 + 1) * 2 * B * (B + K) * E
    if "itm" in terms:
        f["fusion_itm"] = 3 * (3 * t2i)                              # 3B pairs, trained
        f["heads"] += 2 * B * B * E + 3 * 2 * (3 * B) * C * 2        # hard-negative sims, ITM head
    if "mlm" in terms:
        f["fusion_mlm"] = 3 * t2i + t2i
        f["heads"] += (3 + 1) * (2 * n_mlm * C * C + 2 * n_mlm * C * V)  # transform + tied decoder
    if "mim" in terms:
        f["image_encoder"] += (3 * vit + 2 * conv) + (vit + conv)
        f["fusion_mim"] = 3 * i2t + i2t
        f["heads"] += (3 + 1) * 2 * n_mim * C * P
    if "psl" in terms:
        f["fusion_psl"] = t2i
        f["heads"] += (3 + 1) * (proj + 2 * B * E * V)               # vision_proj + concept head
    f["total"] = sum(f.values())
    return f


# ---------------------------------------------------------------------------------------------------
# Device peaks: dense (no 2:4 sparsity) datasheet numbers in FLOP/s. "fp32" = plain FP32 cores,
# "tf32" = FP32 matmuls on tensor cores. First matching name wins, so longer names come first.
# ---------------------------------------------------------------------------------------------------
PEAKS = [  # (substrings that must all be in torch.cuda.get_device_name(), {precision: FLOP/s})
    (("H200",), {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (("GH200",), {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (("H100", "PCIe"), {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    (("H100", "NVL"), {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (("H100",), {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM
    (("A100",), {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (("L40S",), {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (("L4",), {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (("A10",), {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),    # A10 (not A10G: unpublished)
    (("4090",), {"bf16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
]


def device_peak(device, precision):
    """Dense peak FLOP/s of `device` at `precision`, or None (CPU, unknown GPU: use --peak-tflops)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "A10G" in name:
        return None
    for keys, peaks in PEAKS:
        if all(k in name for k in keys):
            return peaks[precision]
    return None


# ---------------------------------------------------------------------------------------------------
# A synthetic batch in data.py's collate format.
# ---------------------------------------------------------------------------------------------------
def synthetic_batch(cfg, B, device="cpu", seed=0, real_frac=(0.55, 0.75), mlm_prob=0.15, mim_ratio=75 / 256):
    """Random pixels and tokens with real proportions; T = cfg.max_len, N from cfg.img_size.
    Specials are the vocabulary's last 4 ids (CLS, SEP, PAD, MASK), as tokenizer.py assigns them."""
    g = torch.Generator().manual_seed(seed)
    V, T, S = cfg.vocab_size, cfg.max_len, cfg.img_size
    N = (S // cfg.patch_size) ** 2
    CLS, SEP, PAD, MASK = V - 4, V - 3, V - 2, V - 1
    # Caption lengths (CLS and SEP included) drawn from real_frac of T: padding is ~1/3, as in COCO.
    lo, hi = max(3, round(real_frac[0] * T)), max(3, round(real_frac[1] * T))
    lengths = torch.randint(min(lo, T), min(hi, T) + 1, (B,), generator=g)
    real = torch.arange(T)[None, :] < lengths[:, None]                         # (B, T)
    ids = torch.randint(0, V - 4, (B, T), generator=g)
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    ids[~real] = PAD
    # MLM: round(15%) of each caption's words (at least one), 80% -> MASK, 10% -> random, 10% kept.
    mlm_ids, labels = ids.clone(), torch.full((B, T), -100, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        words = 1 + torch.randperm(n - 2, generator=g)[:max(1, round(mlm_prob * (n - 2)))]
        labels[b, words] = ids[b, words]
        r = torch.rand(len(words), generator=g)
        swap = torch.randint(0, V - 4, (len(words),), generator=g)
        mlm_ids[b, words] = torch.where(r < 0.8, MASK, torch.where(r < 0.9, swap, ids[b, words]))
    # MIM: the paper's 75 of 256 patches, scaled to this grid; which ones does not change the cost.
    n_mask = round(mim_ratio * N)
    order = torch.rand(B, N, generator=g).argsort(dim=1)
    patch_mask = torch.zeros(B, N, dtype=torch.bool).scatter_(1, order[:, :n_mask], True)  # (B, N)
    batch = dict(image=torch.randn(B, 3, S, S, generator=g), text_ids=ids, text_mask=real, mlm_ids=mlm_ids,
                 mlm_labels=labels, patch_mask=patch_mask, image_id=torch.arange(B))
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------
# Setup helpers.
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def attention_impl(name):
    """--attn reference: every layer takes the explicit softmax path. Attention.forward looks up the
    name `attention` in model.py's globals at call time, so rebinding it there reaches every layer."""
    saved = model_module.attention
    if name == "reference":
        model_module.attention = lambda q, k, v, key_mask=None: attention_reference(q, k, v, key_mask)[0]
    try:
        yield
    finally:
        model_module.attention = saved


def set_precision(device, precision):
    """Returns a factory of the autocast context. fp32 is strict FP32; tf32 lets CUDA matmuls and convs
    use TF32 tensor cores (no effect on CPU); bf16 is autocast to bfloat16."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, reps, device, before=None):
    """Seconds of `reps` calls of fn, each fenced by device synchronisation; `before` runs untimed."""
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


# ---------------------------------------------------------------------------------------------------
# The per-component passes: SIMLA.forward split into groups, each runnable alone at the step's shapes.
# ---------------------------------------------------------------------------------------------------
def component_fns(model, batch, terms, alpha, amp, opt):
    """{component: zero-arg fn}. Trained passes run forward + backward (a ones gradient: the cost of a
    backward does not depend on its values), momentum passes forward under no_grad. Inputs that come
    from an earlier pass are precomputed once and re-entered as fresh leaves that require grad, so each
    backward stops at its component's boundary but still computes the input gradient it would compute
    inside the full step."""
    m, terms = model.momentum, set(terms)
    image, ids, mask, pm = batch["image"], batch["text_ids"], batch["text_mask"], batch["patch_mask"]
    mlm_ids, image_id, B = batch["mlm_ids"], batch["image_id"], batch["image"].shape[0]
    grad_image = bool(terms & {"itc", "itm", "mlm", "psl"})
    neg = torch.roll(torch.arange(B, device=image.device), 1)  # stand-in hard negatives: same shapes

    def backward(t):
        t.backward(torch.ones_like(t))

    def leaf(t):
        return t.detach().requires_grad_()

    with torch.no_grad(), amp():  # inputs of the later components, computed once, untimed
        img, img_m = model.encode_image(image), m.encode_image(image)
        txt, txt_m = model.encode_text(ids, mask), m.encode_text(ids, mask)
        fused = model.fuse(ids, mask, img)[0]                                     # (B, T, C)
        img_masked, img_masked_m = model.encode_image(image, pm), m.encode_image(image, pm)
        fused_image = model.fuse_image(img_masked, ids, mask)[:, 1:]              # (B, N, C)
        cls_probs = m.fuse(ids, mask, img_m, probs_layer=-1)[1]                   # (B, H, T, T)
        feat_m_img, feat_m_txt = m.image_feat(img_m), m.text_feat(txt_m)

    def image_encoder():
        with amp():
            e = model.encode_image(image)
        if grad_image:
            backward(e)
        with torch.no_grad(), amp():
            m.encode_image(image)
        if "mim" in terms:
            with amp():
                e = model.encode_image(image, pm)
            backward(e)
            with torch.no_grad(), amp():
                m.encode_image(image, pm)

    def text_encoder():
        with amp():
            t = model.encode_text(ids, mask)
        if "itc" in terms:
            backward(t)
        with torch.no_grad(), amp():
            m.encode_text(ids, mask)

    def fusion_itm():
        x = leaf(img)
        with amp():
            h = model.fuse(torch.cat([ids, ids, ids[neg]]), torch.cat([mask, mask, mask[neg]]),
                           torch.cat([x, x[neg], x]))[0]                          # (3B, T, C)
        backward(h)

    def fusion_mlm():
        with amp():
            h = model.fuse(mlm_ids, mask, leaf(img))[0]
        backward(h)
        with torch.no_grad(), amp():
            m.fuse(mlm_ids, mask, img_m)

    def fusion_mim():
        with amp():
            h = model.fuse_image(leaf(img_masked), ids, mask)
        backward(h)
        with torch.no_grad(), amp():
            m.fuse_image(img_masked_m, ids, mask)

    def fusion_psl():
        with torch.no_grad(), amp():
            m.fuse(ids, mask, img_m, probs_layer=-1)

    def heads():  # everything of SIMLA.forward that is not an encoder or fusion pass, same order
        x_img, losses = leaf(img), []
        with amp():
            image_feat = model.image_feat(x_img)
            with torch.no_grad():
                m.image_feat(img_m)
            if terms & {"itc", "itm"}:
                text_feat = model.text_feat(leaf(txt))
                with torch.no_grad():
                    keys_id = torch.cat([image_id, model.id_queue])
                    image_keys = torch.cat([feat_m_img, model.image_queue])
                    text_keys = torch.cat([m.text_feat(txt_m), model.text_queue])
                if "itc" in terms:
                    losses.append(L.itc_loss(image_feat, text_feat, image_keys, text_keys, feat_m_img,
                                             feat_m_txt, image_id, keys_id, model.temp, alpha))
                if "itm" in terms:
                    with torch.no_grad():
                        L.sample_hard_negatives(image_feat @ text_feat.t() / model.temp, image_id)
                    losses.append(L.itm_loss(model.itm_head(leaf(fused[:, 0].repeat(3, 1)))))
            if "mlm" in terms:
                sel = batch["mlm_labels"] != -100
                logits = model.mlm_logits(gather_masked(leaf(fused), sel))
                with torch.no_grad():
                    logits_m = m.mlm_logits(gather_masked(fused, sel))
                losses.append(L.mlm_loss(logits, batch["mlm_labels"][sel], logits_m, alpha))
            if "mim" in terms:
                pred = model.mim_head(gather_masked(leaf(fused_image), pm))
                with torch.no_grad():
                    pred_m = m.mim_head(gather_masked(fused_image, pm))
                    target = gather_masked(L.patch_targets(image, model.cfg.patch_size), pm)
                losses.append(L.mim_loss(pred, target, pred_m, alpha))
            if "psl" in terms:
                with torch.no_grad():
                    ok = mask & (ids < model.cfg.vocab_size - 4)
                    targets = L.psl_targets(cls_probs[:, :, 0].float(), ids, ok, model.cfg.vocab_size)
                    soft = torch.sigmoid(m.concept_logits(img_m))
                losses.append(L.psl_loss(model.concept_logits(x_img), targets, soft, alpha))
        sum(losses).backward()

    def ema_queue():
        model.momentum_update()
        if terms & {"itc", "itm"}:
            model._enqueue(feat_m_img, feat_m_txt, image_id)

    fns = dict(image_encoder=image_encoder, text_encoder=text_encoder, fusion_itm=fusion_itm,
               fusion_mlm=fusion_mlm, fusion_mim=fusion_mim, fusion_psl=fusion_psl, heads=heads,
               ema_queue=ema_queue, optimizer=opt.step)
    enabled = dict(text_encoder=bool(terms & {"itc", "itm"}), fusion_itm="itm" in terms,
                   fusion_mlm="mlm" in terms, fusion_mim="mim" in terms, fusion_psl="psl" in terms)
    return {k: fn for k, fn in fns.items() if enabled.get(k, True)}


# ---------------------------------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------------------------------
def build_config(args):
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)
                 if getattr(args, f.name) is not None}
    return dataclasses.replace(PRESETS[args.preset], **overrides)


def count_flops(model, batch, terms, alpha, amp):
    """FLOPs torch's FlopCounterMode sees in one eager forward + backward with explicit attention (the
    CPU fused SDPA kernel is invisible to the counter; flash's backward recomputes the scores)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with attention_impl("reference"), counter:
        with amp():
            loss = model(batch, alpha, terms)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def setup(args):
    """What every mode shares: (device, terms, cfg, B, model, AdamW as train.py builds it, batch)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    terms = tuple(t for t in args.terms.split(",") if t)
    assert terms and set(terms) <= set(TERMS), f"--terms: a comma list of {TERMS}"
    cfg = build_config(args)
    B = args.batch_size or DEFAULT_BATCH.get(args.preset, 32)
    torch.manual_seed(args.seed)
    model = SIMLA(cfg).to(device)
    model.set_trainable(terms)
    opt = model.configure_optimizers(lr=1e-4, weight_decay=0.02, device_type=device.type)
    return device, terms, cfg, B, model, opt, synthetic_batch(cfg, B, device, seed=args.seed)


def train_step(fwd, model, opt, batch, alpha, terms, amp):
    """One full training step; fwd is the model or its compiled wrapper."""
    with amp():
        loss = fwd(batch, alpha, terms)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.momentum_update()


def run_bench(args):
    """Runs the benchmark described by parsed `args`; returns the result dict (the JSON line)."""
    device, terms, cfg, B, model, opt, batch = setup(args)
    amp = set_precision(device, args.precision)
    n_mlm, n_mim = int((batch["mlm_labels"] != -100).sum()), int(batch["patch_mask"].sum())
    flops = step_flops(cfg, B, cfg.max_len, terms, n_mlm, n_mim)
    alpha = 0.4  # the paper's final value: every distillation term is computed, as in most of training

    with attention_impl(args.attn):
        fwd = torch.compile(model, dynamic=False) if args.compile else model

        def step():
            train_step(fwd, model, opt, batch, alpha, terms, amp)

        for _ in range(args.warmup):  # compile, cuBLAS/allocator warm-up, CPU caches
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_calls(step, args.steps, device)
        memory = peak_memory_mib(device)

        breakdown = {}
        if not args.no_breakdown:
            fns = component_fns(model, batch, terms, alpha, amp, opt)
            reps = max(3, min(args.steps, 5))  # medians: this often runs on shared machines
            for name, fn in fns.items():
                zero = lambda: model.zero_grad(set_to_none=True)  # noqa: E731
                if name == "optimizer":  # AdamW needs the gradients of a full step in place
                    with amp():
                        loss = model(batch, alpha, terms)["loss"]
                    loss.backward()
                    zero = None
                time_calls(fn, 1, device, before=zero)  # warm-up of this path alone
                breakdown[name] = statistics.median(time_calls(fn, reps, device, before=zero)) * 1e3
            opt.zero_grad(set_to_none=True)
    counted = None if args.no_flop_check else count_flops(model, batch, terms, alpha, amp)

    step_s = statistics.median(times)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak(device, args.precision)
    res = dict(
        preset=args.preset, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(), precision=args.precision, attn=args.attn, compile=args.compile,
        grad_ckpt=cfg.grad_ckpt, terms=",".join(terms), batch_size=B, img_size=cfg.img_size,
        patches=(cfg.img_size // cfg.patch_size) ** 2, text_len=cfg.max_len, n_mlm=n_mlm, n_mim=n_mim,
        params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        steps=args.steps, warmup=args.warmup,
        step_ms=step_s * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
        samples_per_s=B / step_s, flops_per_step=flops["total"], gflops_per_s=flops["total"] / step_s / 1e9,
        peak_flops=peak, mfu=None if peak is None else flops["total"] / step_s / peak,
        peak_mem_mib=memory, flops=flops, time_ms=breakdown,
        other_ms=step_s * 1e3 - sum(breakdown.values()) if breakdown else None,
        flops_counted=counted, flops_counted_ratio=None if counted is None else counted / flops["total"])
    return res


def report(res):
    """The human-readable summary (everything here is also in the JSON line)."""
    mfu = f"MFU {100 * res['mfu']:.1f}%" if res["mfu"] is not None else \
        "MFU n/a (" + ("CPU" if res["device"] == "cpu" else "unknown peak: --peak-tflops") + ")"
    mem = "peak CUDA alloc" if res["device"].startswith("cuda") else "peak RSS"
    print(f"nanoSIMLA bench | preset {res['preset']} | {res['device_name']} ({res['threads']} threads) | "
          f"{res['precision']} | attn {res['attn']} | {'compiled' if res['compile'] else 'eager'}"
          f"{' | grad-ckpt' if res['grad_ckpt'] else ''} | terms {res['terms']}")
    print(f"B {res['batch_size']} | image {res['img_size']} px ({res['patches']} patches) | text "
          f"{res['text_len']} tokens | masked: {res['n_mlm']} tokens, {res['n_mim']} patches | "
          f"{res['params'] / 1e6:.2f}M trained params")
    print(f"step {res['step_ms']:.1f} ms median (min {res['step_ms_min']:.1f}, max {res['step_ms_max']:.1f}, "
          f"{res['steps']} steps after {res['warmup']} warm-up) | {res['samples_per_s']:.1f} samples/s | "
          f"{res['flops_per_step'] / 1e9:.2f} GFLOP/step | {res['gflops_per_s']:.1f} GFLOP/s | {mfu} | "
          f"{mem} {res['peak_mem_mib']:.0f} MiB")
    if res["time_ms"]:
        print("\n| component | ms (isolated) | % of step | GFLOP | % of FLOPs | GFLOP/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, ms in res["time_ms"].items():
            f = res["flops"][name]
            rate = f"{f / ms / 1e6:.1f}" if f else "-"
            print(f"| {name} | {ms:.1f} | {100 * ms / res['step_ms']:.1f} | {f / 1e9:.3f} | "
                  f"{100 * f / res['flops_per_step']:.1f} | {rate} |")
        print(f"| other (step - sum) | {res['other_ms']:.1f} | {100 * res['other_ms'] / res['step_ms']:.1f} "
              f"| | | |")
        print(f"| **step** | {res['step_ms']:.1f} | 100 | {res['flops_per_step'] / 1e9:.3f} | 100 | "
              f"{res['gflops_per_s']:.1f} |")
    if res["flops_counted"] is not None:
        print(f"\nFLOP model check: FlopCounterMode counted {res['flops_counted'] / 1e9:.4f} GFLOP in one eager "
              f"fwd+bwd (explicit attention) = {res['flops_counted_ratio']:.4f} x the analytic model"
              + (" (> 1: --grad-ckpt recomputes forwards)" if res["grad_ckpt"] else ""))


# ---------------------------------------------------------------------------------------------------
# --sweep: step time and memory vs batch, resolution and text length, each point in a fresh process
# (a CPU's max RSS only ever grows), with the FLOP model's prediction alongside.
# ---------------------------------------------------------------------------------------------------
def _ints(text):
    return [int(x) for x in text.split(",") if x]


def run_child(argv):
    """One step-time run (no breakdown) in a fresh process; returns its JSON line as a dict."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--json", "--no-breakdown", "--no-flop-check"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench run failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep(args, argv):
    cfg = build_config(args)
    B = args.batch_size or DEFAULT_BATCH.get(args.preset, 32)
    S, T, p = cfg.img_size, cfg.max_len, cfg.patch_size
    batches = _ints(args.sweep_batch) if args.sweep_batch else (B // 2, 2 * B)
    sizes = _ints(args.sweep_img) if args.sweep_img else (max(p, S // 2 // p * p), 2 * S)
    lengths = _ints(args.sweep_len) if args.sweep_len else (max(4, T // 2), 2 * T)
    grid = [("base", B, S, T)] + [("batch", b, S, T) for b in batches if b not in (B, 0)] \
        + [("image", B, s, T) for s in sizes if s != S] + [("text", B, S, t) for t in lengths if t != T]
    child = [a for a in argv if a not in ("--sweep", "--json")]
    rows = []
    for kind, b, s, t in grid:
        res = run_child([*child, "--batch-size", str(b), "--img-size", str(s), "--max-len", str(t)])
        rows.append(dict(vary=kind, B=b, img_size=s, text_len=t, step_ms=res["step_ms"],
                         step_ms_min=res["step_ms_min"], samples_per_s=res["samples_per_s"],
                         peak_mem_mib=res["peak_mem_mib"], flops=res["flops_per_step"],
                         gflops_per_s=res["gflops_per_s"]))
        if not args.json:
            print(f"  {kind:5s} B {b} S {s} T {t}: {res['step_ms']:.1f} ms", file=sys.stderr)
    # Predicted time = the point's FLOPs at the sweep's median achieved rate (more robust on a shared
    # machine than the base point alone). Ratio > 1: this shape runs less efficiently than FLOPs say.
    rate = statistics.median(r["flops"] / r["step_ms"] for r in rows)
    for r in rows:
        r["predicted_ms"] = r["flops"] / rate
        r["ratio"] = r["step_ms"] / r["predicted_ms"]
    if not args.json:
        on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
        print(f"\nScaling, preset {args.preset} ({args.precision}, attn {args.attn}, terms {args.terms}); "
              f"predicted ms = GFLOP / the sweep's median GFLOP/s ({rate / 1e6:.1f})")
        print("| vary | B | image px | text len | GFLOP/step | step ms | min ms | predicted ms | measured/predicted "
              f"| samples/s | GFLOP/s | {'peak RSS MiB' if on_cpu else 'peak CUDA MiB'} |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['vary']} | {r['B']} | {r['img_size']} | {r['text_len']} | {r['flops'] / 1e9:.2f} | "
                  f"{r['step_ms']:.1f} | {r['step_ms_min']:.1f} | {r['predicted_ms']:.1f} | {r['ratio']:.2f} | "
                  f"{r['samples_per_s']:.1f} | {r['gflops_per_s']:.1f} | {r['peak_mem_mib']:.0f} |")
    return dict(sweep=rows)


# ---------------------------------------------------------------------------------------------------
# --tactics: every speed tactic of this codebase, before vs after at the same shapes, in one process.
# Each row is the median of --steps timed calls after --warmup untimed ones.
# ---------------------------------------------------------------------------------------------------
TACTICS = ("sdpa", "masked_heads", "psl_one_layer", "itm_negatives", "ema_foreach", "adamw_foreach",
           "adamw_fused", "bf16", "grad_ckpt", "data_workers", "compile")


def masked_heads(model, hidden, hidden_image, sel, pm, gather_first=True):
    """MLM logits (M, V) and MIM predictions (M', P) at the masked positions. hidden (B, T, C),
    hidden_image (B, N, C). gather_first=False runs both heads on every position and selects after,
    as the official code's BERT MLM head does (then cross-entropy with ignore_index)."""
    if gather_first:
        return model.mlm_logits(gather_masked(hidden, sel)), model.mim_head(gather_masked(hidden_image, pm))
    return model.mlm_logits(hidden)[sel], model.mim_head(hidden_image)[pm]


def sample_hard_negatives_loop(sim, ids):
    """losses.sample_hard_negatives as the official ALBEF/SIMLA code writes it: softmax + 1e-5, the
    same-image pairs zeroed, then one multinomial and one .item() (a host sync on GPU) per sample."""
    same = ids[:, None] == ids[None, :]                                   # (B, B)
    w_i2t = (torch.softmax(sim.float(), dim=1) + 1e-5).masked_fill(same, 0)
    w_t2i = (torch.softmax(sim.float().t(), dim=1) + 1e-5).masked_fill(same, 0)
    neg_txt = [torch.multinomial(w_i2t[b], 1).item() for b in range(len(ids))]
    neg_img = [torch.multinomial(w_t2i[b], 1).item() for b in range(len(ids))]
    return torch.tensor(neg_img, device=sim.device), torch.tensor(neg_txt, device=sim.device)


def tactics(args, argv):
    """--tactics: one row per tactic (TACTICS), before vs after; returns the result dict (the JSON line)."""
    device, terms, cfg, B, model, opt, batch = setup(args)
    amp, alpha, m = set_precision(device, args.precision), 0.4, model.momentum
    ids, mask, pm, sel = batch["text_ids"], batch["text_mask"], batch["patch_mask"], batch["mlm_labels"] != -100
    rows = []

    def ms(fn, before=None):
        time_calls(fn, args.warmup, device, before)
        return statistics.median(time_calls(fn, args.steps, device, before)) * 1e3

    def row(name, before, after, before_ms, after_ms, what, **extra):
        rows.append(dict(tactic=name, before=before, after=after, before_ms=before_ms, after_ms=after_ms,
                         speedup=before_ms / after_ms if before_ms and after_ms else None, what=what, **extra))

    def step_ms(attn="sdpa", autocast=amp):
        with attention_impl(attn):
            return ms(lambda: train_step(model, model, opt, batch, alpha, terms, autocast))

    # 1. SDPA never materialises the (Tq, Tk) probabilities: fused kernels, less memory traffic.
    step = step_ms()
    row("sdpa", "explicit softmax", "SDPA", step_ms("reference"), step, "full training step")

    # 2. MLM predicts 15% of the words and MIM 75/256 of the patches: gathering first saves ~85% of the
    # MLM head's FLOPs (its C x V decoder is the text side's largest matmul) and ~70% of the MIM head's.
    h = torch.randn(B, cfg.max_len, cfg.width, device=device, requires_grad=True)     # (B, T, C)
    hi = torch.randn(B, pm.shape[1], cfg.width, device=device, requires_grad=True)    # (B, N, C)

    def heads(gather_first):
        with amp():
            logits, pred = masked_heads(model, h, hi, sel, pm, gather_first)
        (logits.float().sum() + pred.float().sum()).backward()

    def zero():
        model.zero_grad(set_to_none=True)
        h.grad = hi.grad = None
    row("masked_heads", "all positions", "masked only", ms(lambda: heads(False), zero), ms(lambda: heads(True), zero),
        f"MLM + MIM heads fwd+bwd, {int(sel.sum())} of {sel.numel()} tokens, {int(pm.sum())} of {pm.numel()} patches")

    # 3. PSL reads one layer's CLS attention map: only that layer takes the explicit path.
    with torch.no_grad(), amp():
        img_m = m.encode_image(batch["image"])

    def psl_pass():
        with torch.no_grad(), amp():
            m.fuse(ids, mask, img_m, probs_layer=-1)
    with attention_impl("reference"):
        every = ms(psl_pass)
    row("psl_one_layer", "every layer explicit", "last layer only", every, ms(psl_pass),
        "momentum text->image fusion, no grad")

    # 4. ITM hard negatives: one multinomial per direction instead of 2B calls (and 2B host syncs on GPU).
    feats = torch.nn.functional.normalize(torch.randn(2, B, cfg.embed_dim, device=device), dim=-1)
    sim, image_id = feats[0] @ feats[1].t() / cfg.temp, batch["image_id"]             # (B, B)
    row("itm_negatives", "per-sample loop", "vectorised", ms(lambda: sample_hard_negatives_loop(sim, image_id)),
        ms(lambda: L.sample_hard_negatives(sim, image_id)), f"sample ITM hard negatives, batch {B}")

    # 5. The EMA touches every parameter every step: a few multi-tensor kernels, not two per tensor.
    pairs = [(p, model.get_parameter(n)) for n, p in m.named_parameters()]
    mom, onl = [a for a, _ in pairs], [b for _, b in pairs]
    row("ema_foreach", "per-tensor loop", "foreach lerp", ms(lambda: ema_update_reference_(mom, onl, 0.99)),
        ms(lambda: ema_update_(mom, onl, 0.99)), f"momentum EMA over {len(pairs)} tensors")

    # 6. AdamW: torch's default is the per-tensor loop on CPU, foreach on CUDA; configure_optimizers asks
    # for fused on CUDA (one kernel for all parameters). Random gradients: the cost is shape-only.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)

    def adamw(**kw):
        try:
            o = torch.optim.AdamW(params, lr=1e-5, **kw)
            o.step()  # creates the state: not a steady-state step
        except (RuntimeError, TypeError, ValueError):  # fused unsupported on this device or torch
            return None
        return ms(o.step)
    loop, foreach, fused = adamw(foreach=False), adamw(foreach=True), adamw(fused=True)
    model.zero_grad(set_to_none=True)
    what = f"optimizer.step over {len(params)} tensors"
    row("adamw_foreach", "for-loop", "foreach", loop, foreach, what)
    row("adamw_fused", "foreach", "fused", foreach, fused, what + (" (fused unsupported)" if fused is None else ""))

    # 7. bf16 autocast: half the bytes and tensor-core matmuls on GPU; a CPU without bf16 units loses.
    fp32 = step_ms(autocast=set_precision(device, "fp32"))
    row("bf16", "fp32", "bf16 autocast", fp32, step_ms(autocast=set_precision(device, "bf16")), "full training step")
    set_precision(device, args.precision)

    # 8. Activation checkpointing trades a recomputed forward for every block's activations. Each setting
    # runs in a fresh process: a CPU's max RSS only ever grows.
    if args.tactics_fast:
        row("grad_ckpt", "off", "on", None, None, "skipped (--tactics-fast)")
    else:
        child = [a for a in argv if a not in ("--tactics", "--tactics-fast", "--json", "--grad-ckpt")]
        off, on = run_child(child), run_child(child + ["--grad-ckpt"])
        row("grad_ckpt", "off", "on", off["step_ms"], on["step_ms"], "full step + peak memory, fresh processes",
            before_mib=off["peak_mem_mib"], after_mib=on["peak_mem_mib"])

    # 9. Loading must keep up with the step or the accelerator waits. Loader throughput over one epoch of a
    # small synthetic world, after an untimed epoch (worker start-up, file cache). With workers the
    # batches overlap the step; without, their time adds to it.
    if args.tactics_fast:
        row("data_workers", "workers 0", "workers 2", None, None, "skipped (--tactics-fast)")
    else:
        import tempfile
        import data as D
        from tokenizer import Tokenizer
        with tempfile.TemporaryDirectory() as tmp:
            D.synth(tmp, n_train=max(256, 2 * B), n_test=4, n_ground=4, img_size=cfg.img_size, procs=1)
            dc = D.DataConfig(img_size=cfg.img_size, patch_size=cfg.patch_size, max_len=cfg.max_len)
            tok = Tokenizer.train([c for _, caps in D.read_annotations(f"{tmp}/train.json", dc) for c in caps], 300)

            def per_batch_ms(workers):
                loader = D.build_loader(f"{tmp}/train.json", tok, dc, B, workers=workers)
                for _ in range(2):  # the first epoch is the untimed one
                    t0 = time.perf_counter()
                    for _ in loader:
                        pass
                return (time.perf_counter() - t0) / len(loader) * 1e3
            w0, w2 = per_batch_ms(0), per_batch_ms(2)
        row("data_workers", "workers 0", "workers 2", w0, w2, f"ms per batch vs the step's {step:.1f} ms: "
            f"{'keeps up' if w2 <= step else 'the step waits'}", step_ms=step, keeps_up=w2 <= step)
    row("compile", "eager", "torch.compile", None, None, "see --compile (compiling takes minutes on CPU)")
    return dict(preset=args.preset, device=str(device), threads=torch.get_num_threads(), precision=args.precision,
                batch_size=B, terms=",".join(terms), steps=args.steps, warmup=args.warmup, tactics=rows)


def report_tactics(res):
    def cell(label, ms, mib=None):
        return f"{label}: " + ("-" if ms is None else f"{ms:.2f} ms") + (f", {mib:.0f} MiB" if mib else "")
    print(f"nanoSIMLA speed tactics | preset {res['preset']} | {res['device']} ({res['threads']} threads) | "
          f"{res['precision']} | B {res['batch_size']} | median of {res['steps']} after {res['warmup']} warm-up")
    print("\n| tactic | before | after | speed-up | what is measured |\n|---|---|---|---:|---|")
    for r in res["tactics"]:
        up = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"| {r['tactic']} | {cell(r['before'], r['before_ms'], r.get('before_mib'))} | "
              f"{cell(r['after'], r['after_ms'], r.get('after_mib'))} | {up} | {r['what']} |")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, default=None, help=f"default per preset: {DEFAULT_BATCH}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (static shapes)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                    help="fp32 strict; tf32 = FP32 matmuls on tensor cores (CUDA); bf16 autocast")
    ap.add_argument("--terms", default=",".join(TERMS), help="comma list of loss terms to train")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "reference"),
                    help="reference: the explicit softmax attention in every layer")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, overrides the table")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-component timing")
    ap.add_argument("--no-flop-check", action="store_true", help="skip the FlopCounterMode cross-check")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--sweep", action="store_true", help="scaling table over batch, resolution, text length")
    ap.add_argument("--sweep-batch", default=None, help="batch sizes, e.g. 16,64 (default B/2, 2B)")
    ap.add_argument("--sweep-img", default=None, help="image sizes, e.g. 32,128 (default S/2, 2S)")
    ap.add_argument("--sweep-len", default=None, help="text lengths, e.g. 16,64 (default T/2, 2T)")
    ap.add_argument("--tactics", action="store_true", help="each speed tactic before vs after, one row each")
    ap.add_argument("--tactics-fast", action="store_true", help="--tactics without the subprocess and data rows")
    # Every ModelConfig field can be overridden on top of the preset (--img-size, --max-len, --width...).
    for f in dataclasses.fields(ModelConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            ap.add_argument(flag, action="store_true", default=None, help=f"ModelConfig.{f.name}")
        else:
            ap.add_argument(flag, type=type(f.default), default=None, help=f"ModelConfig.{f.name} (preset's)")
    return ap.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.sweep:
        res = sweep(args, argv)
    elif args.tactics or args.tactics_fast:
        res = tactics(args, argv)
        if not args.json:
            report_tactics(res)
    else:
        res = run_bench(args)
        if not args.json:
            report(res)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
