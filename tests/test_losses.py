"""losses.py: every objective against a slow, loop-by-loop restatement of its formula (SIMLA.md,
"Objectives"), plus the model-level facts the losses rely on (queue, masks, which parameters learn)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import losses as L
from conftest import CLS, MASK, PAD, SEP, V, make_batch, tiny_cfg
from model import SIMLA


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---------------------------------------------------------------------------------------------
# ITC
# ---------------------------------------------------------------------------------------------
def itc_reference(image_feat, text_feat, image_keys, text_keys, image_feat_m, text_feat_m, ids, keys_id, temp,
                  alpha):
    """Both directions, one query and one key at a time, in float64 Python arithmetic. Slots with a
    negative id were never filled: they are no keys at all (left out of both softmaxes)."""
    B, total = len(ids), 0.0
    live = [j for j in range(len(keys_id)) if int(keys_id[j]) >= 0]
    image_keys, text_keys, keys_id = image_keys[live], text_keys[live], keys_id[live]
    K = len(live)
    for q, keys, q_m in ((image_feat, text_keys, image_feat_m), (text_feat, image_keys, text_feat_m)):
        for i in range(B):
            pos = [j for j in range(K) if int(keys_id[j]) == int(ids[i])]
            s = [float(q[i].double() @ keys[j].double()) / temp for j in range(K)]
            s_m = [float(q_m[i].double() @ keys[j].double()) / temp for j in range(K)]
            lse, lse_m = math.log(sum(math.exp(x) for x in s)), math.log(sum(math.exp(x) for x in s_m))
            for j in range(K):
                target = (1 - alpha) * (1 / len(pos) if j in pos else 0.0) + alpha * math.exp(s_m[j] - lse_m)
                total -= target * (s[j] - lse) / B
    return total / 2


def _itc_inputs(B=4, Q=6, ids=(0, 1, 2, 3), queue_ids=None, seed=0):
    imf, txf, imf_m, txf_m = (_unit(B, 8, seed=seed + k) for k in range(4))
    ids = torch.tensor(ids)
    queue_i, queue_t = _unit(Q, 8, seed=seed + 10), _unit(Q, 8, seed=seed + 11)
    qid = torch.full((Q,), -1) if queue_ids is None else torch.tensor(queue_ids)
    image_keys, text_keys = torch.cat([imf_m, queue_i]), torch.cat([txf_m, queue_t])
    return imf, txf, image_keys, text_keys, imf_m, txf_m, ids, torch.cat([ids, qid])


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("case", ["no_queue", "empty_queue", "queue_with_repeats", "duplicate_ids_in_batch"])
def test_itc_loss_matches_loop(alpha, case):
    torch.manual_seed(0)
    if case == "no_queue":
        args = list(_itc_inputs(Q=0))
    elif case == "empty_queue":                       # never-filled slots: id -1
        args = list(_itc_inputs())
    elif case == "queue_with_repeats":                # older captions of images 1 and 3 sit in the queue
        args = list(_itc_inputs(queue_ids=[1, 7, 3, -1, 1, 9]))
    else:                                             # two captions of image 5 in one batch
        args = list(_itc_inputs(ids=(5, 2, 5, 8), queue_ids=[5, -1, -1, 2, 4, 4]))
    temp = torch.tensor(0.07, requires_grad=True)
    loss = L.itc_loss(*args, temp, alpha)
    assert loss.shape == ()
    assert abs(loss.item() - itc_reference(*args, 0.07, alpha)) < 1e-4
    loss.backward()
    assert temp.grad is not None and temp.grad != 0  # the temperature is learned


def test_itc_positive_sets():
    """Duplicates are positives, -1 slots are not keys at all: checked against explicit relabelling."""
    args = list(_itc_inputs(queue_ids=[-1] * 6))
    temp = torch.tensor(0.07)
    base = L.itc_loss(*args, temp, 0.0)
    # -1 slots are left out entirely: the same loss as with no queue at all...
    no_queue = [a[:4] if a.shape[0] == 10 else a for a in args]
    torch.testing.assert_close(L.itc_loss(*no_queue, temp, 0.0), base)
    # ...and unlike slots of an image absent from the batch, which are negatives.
    args_absent = args[:-1] + [torch.cat([args[-1][:4], torch.full((6,), 999)])]
    assert L.itc_loss(*args_absent, temp, 0.0).item() > base.item() + 1e-3
    # ...and relabelling a queue slot with a batch id changes the loss (it became a positive).
    args_pos = args[:-1] + [torch.cat([args[-1][:4], torch.tensor([0, -1, -1, -1, -1, -1])])]
    assert abs(L.itc_loss(*args_pos, temp, 0.0).item() - base.item()) > 1e-3
    # Two captions of one image in the batch: each one's key is a positive of both queries, so
    # perfectly matched features give the entropy floor log(2) for those queries, not 0.
    f = _unit(2, 8, seed=3)
    feats = torch.stack([f[0], f[0], f[1]])
    ids = torch.tensor([0, 0, 1])
    loss = L.itc_loss(feats, feats, feats, feats, feats, feats, ids, ids, torch.tensor(1e-3), 0.0)
    assert abs(loss.item() - 2 / 3 * math.log(2)) < 1e-4


def test_queue_wraps_around():
    """queue_size 10, batches of 4: slots 0-3, 4-7, then 8, 9, 0, 1 and the pointer ends at 2."""
    torch.manual_seed(0)
    model = SIMLA(tiny_cfg(queue_size=10))
    E = model.cfg.embed_dim
    batches = [(_unit(4, E, seed=k), _unit(4, E, seed=10 + k), torch.arange(4) + 100 * k) for k in range(3)]
    ptrs = []
    for img, txt, ids in batches:
        model._enqueue(img, txt, ids)
        ptrs.append(int(model.queue_ptr))
    assert ptrs == [4, 8, 2]
    expect_slot = {}  # slot -> (batch, row), written in order so later writes win
    for k, start in enumerate([0, 4, 8]):
        for r in range(4):
            expect_slot[(start + r) % 10] = (k, r)
    for slot, (k, r) in expect_slot.items():
        torch.testing.assert_close(model.image_queue[slot], batches[k][0][r])
        torch.testing.assert_close(model.text_queue[slot], batches[k][1][r])
        assert int(model.id_queue[slot]) == int(batches[k][2][r])
    # A (global) batch larger than the queue keeps its last queue_size rows, each exactly once.
    img, txt, ids = _unit(13, E, seed=50), _unit(13, E, seed=51), torch.arange(13) + 1000
    model._enqueue(img, txt, ids)
    assert int(model.queue_ptr) == 2
    assert sorted(model.id_queue.tolist()) == list(range(1003, 1013))
    for slot in range(10):
        row = int(model.id_queue[slot]) - 1000
        torch.testing.assert_close(model.text_queue[slot], txt[row])


# ---------------------------------------------------------------------------------------------
# ITM
# ---------------------------------------------------------------------------------------------
def _neg_probs(sim, ids):
    """Expected sampling distributions: softmax over candidates of a DIFFERENT image, by loops."""
    B = len(ids)
    p_txt, p_img = torch.zeros(B, B, dtype=torch.float64), torch.zeros(B, B, dtype=torch.float64)
    for i in range(B):
        cand = [j for j in range(B) if ids[j] != ids[i]]
        z = sum(math.exp(sim[i, j]) for j in cand)
        zt = sum(math.exp(sim[j, i]) for j in cand)
        for j in cand:
            p_txt[i, j] = math.exp(sim[i, j]) / z  # image i -> negative text j
            p_img[i, j] = math.exp(sim[j, i]) / zt  # text i -> negative image j
    return p_img, p_txt


def test_hard_negatives_follow_the_similarity_distribution():
    torch.manual_seed(0)
    ids = torch.tensor([0, 1, 1, 2, 3])
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(1)) * 1.5
    p_img, p_txt = _neg_probs(sim.double(), ids)
    n = 3000
    c_img, c_txt = torch.zeros(5, 5, dtype=torch.float64), torch.zeros(5, 5, dtype=torch.float64)
    for _ in range(n):
        neg_img, neg_txt = L.sample_hard_negatives(sim, ids)
        c_img[torch.arange(5), neg_img] += 1
        c_txt[torch.arange(5), neg_txt] += 1
    for counts, p in ((c_img, p_img), (c_txt, p_txt)):
        assert (counts[p == 0] == 0).all()  # never the same image (incl. the duplicate pair 1, 2)
        exp = p * n
        chi2 = ((counts - exp) ** 2 / exp.clamp(min=1e-12))[p > 0].sum().item()
        dof = int((p > 0).sum()) - 5
        assert chi2 < dof + 6 * math.sqrt(2 * dof), chi2  # ~4 sigma of a chi-square
        # A uniform sampler over the same candidates would be rejected: the test has power.
        uni = (p > 0).double() / (p > 0).sum(1, keepdim=True) * n
        chi2_uni = ((counts - uni) ** 2 / uni.clamp(min=1e-12))[p > 0].sum().item()
        assert chi2_uni > dof + 6 * math.sqrt(2 * dof)


def test_hard_negatives_never_same_image_even_at_tiny_temperature():
    """sim / temp with temp -> 0.01: the positive holds all the softmax mass and the negatives
    underflow to exactly 0; sampling must still follow the negatives' own distribution."""
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.full((5, 5), -100.0)
    sim.fill_diagonal_(100.0)
    sim[0, 4] = sim[4, 0] = -40.0  # the clearly hardest negative of row/column 0
    for _ in range(200):
        neg_img, neg_txt = L.sample_hard_negatives(sim, ids)
        assert (ids[neg_img] != ids).all() and (ids[neg_txt] != ids).all()
        assert neg_img[0] == 4 and neg_txt[0] == 4
    # A batch of one image only has no negative: fall back to "anything but yourself".
    neg_img, neg_txt = L.sample_hard_negatives(torch.randn(3, 3), torch.tensor([7, 7, 7]))
    assert (neg_img != torch.arange(3)).all() and (neg_txt != torch.arange(3)).all()


def test_itm_loss_labels_first_b_positive():
    torch.manual_seed(0)
    B = 3
    logits = torch.randn(3 * B, 2)
    ref = 0.0
    for r in range(3 * B):
        label = 1 if r < B else 0
        ref -= (logits[r, label] - torch.logsumexp(logits[r], 0)).item() / (3 * B)
    assert abs(L.itm_loss(logits).item() - ref) < 1e-5
    # Confident and right -> ~0; swapping the label convention -> large.
    good = torch.cat([torch.tensor([[-9.0, 9.0]]).repeat(B, 1), torch.tensor([[9.0, -9.0]]).repeat(2 * B, 1)])
    assert L.itm_loss(good).item() < 1e-3 and L.itm_loss(-good).item() > 10


# ---------------------------------------------------------------------------------------------
# MLM
# ---------------------------------------------------------------------------------------------
def mlm_reference(logits, labels, logits_m, alpha):
    M, Vv = logits.shape
    hard = soft = 0.0
    for r in range(M):
        lse = math.log(sum(math.exp(x) for x in logits[r].tolist()))
        lse_m = math.log(sum(math.exp(x) for x in logits_m[r].tolist()))
        hard -= (logits[r, labels[r]].item() - lse) / M
        for v in range(Vv):
            soft -= math.exp(logits_m[r, v].item() - lse_m) * (logits[r, v].item() - lse) / M
    return (1 - alpha) * hard + alpha * soft


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_mlm_loss_soft_ce_over_vocabulary(alpha):
    torch.manual_seed(0)
    logits, logits_m = torch.randn(6, 11) * 2, torch.randn(6, 11) * 2
    labels = torch.randint(0, 11, (6,))
    assert abs(L.mlm_loss(logits, labels, logits_m, alpha).item() - mlm_reference(logits, labels, logits_m,
                                                                                   alpha)) < 1e-5
    if alpha:
        torch.testing.assert_close(L.mlm_loss(logits, labels, None, alpha), L.mlm_loss(logits, labels))


def test_mlm_loss_is_not_the_sequence_axis_version():
    """The official code's soft term: softmax over the SEQUENCE axis of (B, T, V). Ours must differ."""
    torch.manual_seed(0)
    B, T, Vv = 2, 5, 7
    pred, pred_m = torch.randn(B, T, Vv), torch.randn(B, T, Vv)
    labels = torch.randint(0, Vv, (B, T))
    vocab = -(F.log_softmax(pred, -1) * F.softmax(pred_m, -1)).sum(-1).mean()
    seq = -(F.log_softmax(pred, 1) * F.softmax(pred_m, 1)).sum(-1).mean()
    ours = L.mlm_loss(pred.flatten(0, 1), labels.flatten(), pred_m.flatten(0, 1), alpha=1.0)
    torch.testing.assert_close(ours, vocab)
    assert abs(ours.item() - seq.item()) > 0.1


def test_mlm_loss_no_masked_token():
    logits = torch.randn(0, 9, requires_grad=True)
    loss = L.mlm_loss(logits, torch.zeros(0, dtype=torch.long), torch.randn(0, 9), 0.4)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph: DDP sees the head used on every rank


# ---------------------------------------------------------------------------------------------
# MIM
# ---------------------------------------------------------------------------------------------
def test_patch_targets_normalised_and_in_vit_order():
    torch.manual_seed(0)
    B, S, p = 2, 16, 4
    image = torch.randn(B, 3, S, S) * 3 + 1
    t = L.patch_targets(image, p)
    N, P = (S // p) ** 2, p * p * 3
    assert t.shape == (B, N, P)
    torch.testing.assert_close(t.mean(-1), torch.zeros(B, N), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1, unbiased=False), torch.ones(B, N), atol=1e-4, rtol=0)
    # A Conv2d(stride p) that copies pixel (c, dy, dx) into channel (dy * p + dx) * 3 + c, flattened
    # as the ViT flattens its patch embeddings: the raw patches in the ViT's order, channels last.
    conv = torch.nn.Conv2d(3, P, p, stride=p, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for dy in range(p):
            for dx in range(p):
                for c in range(3):
                    conv.weight[(dy * p + dx) * 3 + c, c, dy, dx] = 1.0
        raw = conv(image).flatten(2).transpose(1, 2)  # (B, N, P)
    ref = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(t, ref, atol=1e-5, rtol=0)
    # Patch n = (row n // g, col n % g): a bright square in patch (1, 2) of a 4x4 grid is patch 6.
    img = torch.zeros(1, 3, S, S)
    img[:, :, 1 * p:2 * p, 2 * p:3 * p] = torch.rand(3, p, p)
    assert (L.patch_targets(img, p)[0].abs().sum(-1) > 0).nonzero().flatten().tolist() == [6]


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mim_loss_mixing_formula(alpha):
    torch.manual_seed(0)
    pred, target, pred_m = torch.randn(5, 12), torch.randn(5, 12), torch.randn(5, 12)
    hard = sum((pred[i, j] - target[i, j]).item() ** 2 for i in range(5) for j in range(12)) / 60
    soft = sum((pred[i, j] - pred_m[i, j]).item() ** 2 for i in range(5) for j in range(12)) / 60
    assert abs(L.mim_loss(pred, target, pred_m, alpha).item() - ((1 - alpha) * hard + alpha * soft)) < 1e-5
    assert L.mim_loss(torch.zeros(0, 12, requires_grad=True), torch.zeros(0, 12)).item() == 0.0


def test_mim_loss_only_sees_masked_patches():
    """Model level: the gradient of the MIM loss w.r.t. the image->text hidden states is exactly zero
    at every unmasked patch (and CLS), so no prediction there can change the loss; and the loss is
    the MSE of the head on the masked patches against per-patch-normalised pixels of the same image."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model, b = SIMLA(cfg), make_batch(cfg)
    pm = b["patch_mask"]
    assert pm.any() and (~pm).any()
    seen = []
    def keep(mod, inp, out):
        out[0].retain_grad()
        seen.append(out[0])
    hook = model.text.register_forward_hook(keep)
    loss = model(b, alpha=0.0, terms=("mim",))["mim"]
    hook.remove()
    assert len(seen) == 1  # the single image->text pass of the online model
    h = seen[0]
    loss.backward()
    g = h.grad.abs().sum(-1)  # (B, 1 + N)
    assert (g[:, 0] == 0).all() and (g[:, 1:][~pm] == 0).all()
    assert (g[:, 1:][pm] > 0).all()
    with torch.no_grad():
        pred = model.mim_head(h[:, 1:][pm])
        ref = ((pred - L.patch_targets(b["image"], cfg.patch_size)[pm]) ** 2).mean()
    torch.testing.assert_close(loss.detach(), ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# PSL
# ---------------------------------------------------------------------------------------------
def psl_reference(cls_attn, ids, valid, vocab_size, per_head=4, keep=5):
    """Votes by loops; ties in votes broken by mean attention over heads (strictly ordered inputs)."""
    B, H, T = cls_attn.shape
    out = torch.zeros(B, vocab_size)
    for b in range(B):
        votes = [0] * T
        for h in range(H):
            cand = sorted((t for t in range(T) if valid[b, t]), key=lambda t: -cls_attn[b, h, t].item())
            for t in cand[:per_head]:
                votes[t] += 1
        voted = [t for t in range(T) if votes[t] > 0]
        voted.sort(key=lambda t: (-votes[t], -cls_attn[b, :, t].mean().item()))
        for t in voted[:keep]:
            out[b, ids[b, t]] = 1.0
    return out


def test_psl_targets_constructed_map():
    Vv = 20
    ids = torch.tensor([[16, 3, 5, 7, 9, 11, 13, 17, 18, 18]])  # CLS=16 SEP=17 PAD=18
    valid = (ids < 16) & (ids != 18)
    # Specials get the largest attention in both heads; they must never be chosen.
    att = torch.tensor([[[.30, .05, .20, .15, .10, .02, .01, .10, .05, .02],    # head 0 -> 2, 3, 4, 1
                         [.40, .10, .05, .04, .01, .20, .15, .03, .02, .00]]])  # head 1 -> 5, 6, 1, 2
    t = L.psl_targets(att, ids, valid, Vv)
    # votes: pos 1, 2 -> 2; pos 3, 4, 5, 6 -> 1. Ties by mean attention: 5 (.11) > 3 (.095) > 6 (.08) > 4 (.055).
    assert t.shape == (1, Vv)
    assert t[0].nonzero().flatten().tolist() == sorted([3, 5, 11, 7, 13])
    assert t.sum() == 5 and t[0, 9] == 0 and t[0, 16:].sum() == 0
    torch.testing.assert_close(t, psl_reference(att, ids, valid, Vv))


def test_psl_targets_short_captions_duplicates_and_empty():
    Vv = 20
    ids = torch.tensor([[16, 4, 6, 17, 18, 18, 18, 18],     # two words
                        [16, 4, 4, 6, 4, 17, 18, 18],       # repeated word: one target, value 1
                        [16, 17, 18, 18, 18, 18, 18, 18],   # no word at all
                        [16, 19, 2, 17, 18, 18, 18, 18]])   # a MASK token (19) in the caption
    valid = ids < 16
    att = torch.zeros(4, 3, 8)
    att[:, :, 0], att[:, :, 3:] = 0.5, 0.1           # CLS / SEP / PAD soak up the attention
    att[:, :, 1:3] = 0.05
    t = L.psl_targets(att, ids, valid, Vv)
    assert t[0].nonzero().flatten().tolist() == [4, 6]
    assert t[1].nonzero().flatten().tolist() == [4, 6] and t.max() == 1
    assert t[2].sum() == 0
    assert t[3].nonzero().flatten().tolist() == [2]
    assert t[:, 16:].sum() == 0


def test_psl_targets_random_maps_match_loops():
    g = torch.Generator().manual_seed(0)
    B, H, T, Vv = 5, 3, 12, 30
    ids = torch.randint(0, 8, (B, T), generator=g)        # a small id range: many repeated words
    ids[:, 0] = Vv - 4
    lengths = torch.tensor([12, 9, 6, 3, 2])
    for b, n in enumerate(lengths):
        ids[b, n - 1], ids[b, n:] = Vv - 3, Vv - 2
    valid = (ids < Vv - 4) & (torch.arange(T) < lengths[:, None])
    att = torch.rand(B, H, T, generator=g).softmax(-1)
    t = L.psl_targets(att, ids, valid, Vv)
    torch.testing.assert_close(t, psl_reference(att, ids, valid, Vv))
    assert (t.sum(1) <= 5).all() and t[:, Vv - 4:].sum() == 0


def test_psl_targets_all_tied():
    """Uniform attention: ties everywhere. Still only real words, at most `keep`, at least per_head."""
    ids = torch.tensor([[16, 1, 2, 3, 4, 5, 6, 7, 17, 18]])
    valid = ids < 16
    t = L.psl_targets(torch.full((1, 2, 10), 0.1), ids, valid, 20)
    chosen = set(t[0].nonzero().flatten().tolist())
    assert chosen <= set(range(1, 8)) and 4 <= len(chosen) <= 5


def test_model_psl_targets_never_special(monkeypatch):
    """In the model, specials (last 4 ids) are never keywords, even as the model's top attention."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model, b = SIMLA(cfg), make_batch(cfg, B=4, T=10, lengths=[4, 10, 3, 7])
    captured = []
    real = L.psl_targets
    monkeypatch.setattr(L, "psl_targets", lambda *a, **k: captured.append(real(*a, **k)) or captured[-1])
    with torch.no_grad():
        model(b, alpha=0.0, terms=("psl",))
    t = captured[0]
    assert t[:, V - 4:].sum() == 0
    for r in range(4):
        words = set(b["text_ids"][r][b["text_mask"][r]].tolist()) - {CLS, SEP, PAD, MASK}
        assert set(t[r].nonzero().flatten().tolist()) <= words
        assert t[r].sum() >= 1 and t[r].sum() <= min(len(words), 5)
    assert t[2].sum() == 1  # [CLS] w [SEP]: one keyword


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_psl_loss_mixing_formula(alpha):
    torch.manual_seed(0)
    logits = torch.randn(3, 10) * 3
    targets = (torch.rand(3, 10) < 0.3).float()
    soft = torch.rand(3, 10)
    bce = lambda x, y: -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
    n = 3 * 10  # the mean over every (caption, word) entry (losses.psl_loss says why not per keyword)
    hard = sum(bce(logits[i, j].item(), targets[i, j].item()) for i in range(3) for j in range(10)) / n
    dist = sum(bce(logits[i, j].item(), soft[i, j].item()) for i in range(3) for j in range(10)) / n
    assert abs(L.psl_loss(logits, targets, soft, alpha).item() - ((1 - alpha) * hard + alpha * dist)) < 1e-4
    assert torch.isfinite(L.psl_loss(logits, torch.zeros(3, 10), soft, alpha))


def test_alpha_ramp():
    assert L.alpha_at(0, 100) == 0.0
    assert abs(L.alpha_at(25, 100) - 0.1) < 1e-12
    assert L.alpha_at(100, 100) == 0.4 and L.alpha_at(10_000, 100) == 0.4
    assert L.alpha_at(50, 100, alpha_max=1.0) == 0.5
    assert L.alpha_at(1, 0) == 0.4  # no ramp: full distillation after the first step
    steps = [L.alpha_at(s, 10) for s in range(15)]
    assert steps == sorted(steps)


# ---------------------------------------------------------------------------------------------
# which parameters each term trains
# ---------------------------------------------------------------------------------------------
GROUPS = {"fusion": (".cross_attn.", ".norm_cross."), "itm": ("itm_head",), "mlm": ("mlm_transform", "mlm_bias"),
          "mim": ("mim_head", "image_encoder.mask_token"), "psl": ("concept_head",), "text": ("text.",),
          "text_proj": ("text_proj",), "vision_proj": ("vision_proj",), "image": ("image_encoder.patch_embed",),
          "temp": ("temp",)}
REACHES = {  # term -> groups that must get a non-zero gradient; every other group gets none
    "itc": {"text", "text_proj", "vision_proj", "image", "temp"},
    "itm": {"fusion", "itm", "text", "image"},
    "mlm": {"fusion", "mlm", "text", "image"},
    "mim": {"fusion", "mim", "text", "image"},
    "psl": {"psl", "vision_proj", "image"},
}


@pytest.mark.parametrize("term", list(REACHES))
def test_gradients_reach_only_what_each_term_trains(term):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model, b = SIMLA(cfg).train(), make_batch(cfg)
    model(b, alpha=0.4, terms=(term,))["loss"].backward()
    for group, prefixes in GROUPS.items():
        grads = [p.grad for n, p in model.named_parameters()
                 if any(n.startswith(x) or (x.startswith(".") and x in n) for x in prefixes)
                 and not (group == "text" and any(c in n for c in GROUPS["fusion"]))]
        assert grads, group
        got = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert got == (group in REACHES[term]), (term, group)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("momentum."))


# ---------------------------------------------------------------------------------------------
# the model's forward feeds each loss the right tensors
# ---------------------------------------------------------------------------------------------
def test_forward_wires_every_term():
    """SIMLA.forward against each term recomputed from the model's parts. The online weights and the
    momentum twin are scrambled independently, so swapping an online and a momentum tensor shows."""
    cfg, alpha = tiny_cfg(queue_size=12), 0.4
    torch.manual_seed(0)
    model, b = SIMLA(cfg).eval(), make_batch(cfg, B=4, T=10, ids=[3, 8, 3, 5])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "temp":
                p.add_(torch.randn_like(p) * 0.2)
        E = cfg.embed_dim
        model._enqueue(_unit(5, E, seed=1), _unit(5, E, seed=2), torch.tensor([8, 1, 1, 2, 3]))  # repeats
    queue = [t.clone() for t in (model.image_queue, model.text_queue, model.id_queue)]
    ptr = int(model.queue_ptr)
    torch.manual_seed(7)
    with torch.no_grad():
        out = model(b, alpha=alpha)
    m, ids, mask, image, iid = model.momentum, b["text_ids"], b["text_mask"], b["image"], b["image_id"]
    temp = model.temp.item()
    with torch.no_grad():
        img, img_m = model.encode_image(image), m.encode_image(image)
        imf, imf_m = model.image_feat(img), m.image_feat(img_m)
        txf, txf_m = model.text_feat(model.encode_text(ids, mask)), m.text_feat(m.encode_text(ids, mask))
        # ITC: keys = momentum features of the batch, then the queue as it was before this step.
        ref = itc_reference(imf, txf, torch.cat([imf_m, queue[0]]), torch.cat([txf_m, queue[1]]), imf_m, txf_m,
                            iid, torch.cat([iid, queue[2]]), temp, alpha)
        assert abs(out["itc"].item() - ref) < 1e-4
        # ...and afterwards the queue holds the MOMENTUM features of this batch.
        slots = (ptr + torch.arange(4)) % cfg.queue_size
        torch.testing.assert_close(model.image_queue[slots], imf_m)
        torch.testing.assert_close(model.text_queue[slots], txf_m)
        assert model.id_queue[slots].tolist() == iid.tolist()
        # ITM: same draws (same seed), then pair by pair: (t_i, v_i)=1, (t_i, v_neg(i))=0, (t_neg(i), v_i)=0.
        torch.manual_seed(7)
        neg_img, neg_txt = L.sample_hard_negatives(imf @ txf.t() / temp, iid)
        logits = []
        for i_txt, i_img in [(i, i) for i in range(4)] + [(i, int(neg_img[i])) for i in range(4)] + \
                [(int(neg_txt[i]), i) for i in range(4)]:
            h = model.fuse(ids[i_txt:i_txt + 1], mask[i_txt:i_txt + 1], img[i_img:i_img + 1])[0]
            logits.append(model.itm_head(h[:, 0]))
        torch.testing.assert_close(out["itm"], L.itm_loss(torch.cat(logits)), atol=1e-5, rtol=0)
        # MLM: online text->image on the masked caption vs the momentum's, at the masked positions.
        sel = b["mlm_labels"] != -100
        lg = model.mlm_logits(model.fuse(b["mlm_ids"], mask, img)[0][sel])
        lg_m = m.mlm_logits(m.fuse(b["mlm_ids"], mask, img_m)[0][sel])
        assert abs(out["mlm"].item() - mlm_reference(lg, b["mlm_labels"][sel], lg_m, alpha)) < 1e-4
        # MIM: masked image -> caption embeddings, masked patches, same-image pixel targets.
        pm = b["patch_mask"]
        pred = model.mim_head(model.fuse_image(model.encode_image(image, pm), ids, mask)[:, 1:][pm])
        pred_m = m.mim_head(m.fuse_image(m.encode_image(image, pm), ids, mask)[:, 1:][pm])
        tgt = L.patch_targets(image, cfg.patch_size)[pm]
        ref = (1 - alpha) * ((pred - tgt) ** 2).mean() + alpha * ((pred - pred_m) ** 2).mean()
        torch.testing.assert_close(out["mim"], ref, atol=1e-5, rtol=0)
        # PSL: keywords from the momentum model's last-layer CLS self-attention over the real words.
        probs = m.fuse(ids, mask, img_m, probs_layer=-1)[1][:, :, 0]
        targets = psl_reference(probs, ids, mask & (ids < V - 4), V)
        ref = L.psl_loss(model.concept_logits(img), targets, torch.sigmoid(m.concept_logits(img_m)), alpha)
        torch.testing.assert_close(out["psl"], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["loss"], sum(out[k] for k in ("itc", "itm", "mlm", "mim", "psl")))


# ------------------------------------------------------------------------------------------------
# Under DDP: every rank's queue holds the GLOBAL batch's momentum features, identically everywhere,
# and the ITC keys of each rank are the gathered batch (SIMLA.md "ITC"; issue: queue filled from all ranks).
# ------------------------------------------------------------------------------------------------
def _queue_worker(rank, port, out_dir):
    import torch.distributed as dist
    from model import SIMLA
    from conftest import make_batch, tiny_cfg
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)                       # same weights on both ranks, as DDP guarantees
        cfg = tiny_cfg(queue_size=7)               # 7 is not divisible by the global batch of 6
        model = SIMLA(cfg)
        feats = []
        for step in range(2):                      # 2 steps x 6 = 12 > 7: wraps around
            batch = make_batch(cfg, B=3, seed=10 * step + rank, ids=[3 * rank + i + 100 * step for i in range(3)])
            with torch.no_grad():
                feats.append(model.momentum.image_feat(model.momentum.encode_image(batch["image"])))
            model(batch, 0.0, ("itc",))
        torch.save({"image_queue": model.image_queue, "id_queue": model.id_queue, "ptr": model.queue_ptr,
                    "feats": torch.stack(feats)}, os.path.join(out_dir, f"q{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_queue_agrees_across_ranks_two_process_gloo(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_queue_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    q = [torch.load(tmp_path / f"q{r}.pt", weights_only=True) for r in range(2)]
    for key in ("image_queue", "id_queue", "ptr"):
        torch.testing.assert_close(q[0][key], q[1][key], rtol=0, atol=0)
    # Step 0 wrote slots 0..5 with [rank 0 batch, rank 1 batch]; step 1 wrote 6,0,1,2,3,4 -> ptr 5.
    step1 = torch.cat([q[0]["feats"][1], q[1]["feats"][1]])      # (6, E) in rank order
    step0 = torch.cat([q[0]["feats"][0], q[1]["feats"][0]])
    expected_ids = torch.tensor([101, 102, 103, 104, 105, 5, 100])
    torch.testing.assert_close(q[0]["id_queue"], expected_ids, rtol=0, atol=0)
    torch.testing.assert_close(q[0]["image_queue"][[6, 0, 1, 2, 3, 4]], step1, rtol=0, atol=1e-6)
    torch.testing.assert_close(q[0]["image_queue"][5], step0[5], rtol=0, atol=1e-6)
    assert int(q[0]["ptr"]) == 5
