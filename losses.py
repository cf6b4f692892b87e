"""SIMLA's objectives as pure functions of tensors (SIMLA.md, "Objectives"). model.py runs the passes.

Every distilled term has the same shape: (1 - alpha) * loss(prediction, ground truth)
                                          + alpha   * loss(prediction, momentum model's prediction).
alpha ramps from 0 (train.py, `alpha_at`): early on the momentum model knows nothing worth distilling.
"""
import torch
import torch.nn.functional as F


def alpha_at(step, ramp_steps, alpha_max=0.4):
    """Linear ramp 0 -> alpha_max over `ramp_steps` (the paper: the first epoch), then constant."""
    return alpha_max * min(1.0, step / max(1, ramp_steps))


# ----------------------------------------------------------------------------------------------
# Level 1, global: image-text contrastive (ITC) and image-text matching (ITM).
# ----------------------------------------------------------------------------------------------
def itc_loss(image_feat, text_feat, image_keys, text_keys, image_feat_m, text_feat_m, ids, keys_id, temp,
             alpha):
    """Contrastive loss against the batch plus the queue, with momentum distillation.

    image_feat, text_feat (B, E): online, L2-normalised. image_keys, text_keys (K, E): momentum features
    of the global batch followed by the queue. image_feat_m, text_feat_m (B, E): momentum queries.
    ids (B,), keys_id (K,): image ids; every key of the query's image is a positive (a queue that holds
    an older caption of the same image must not push it away), -1 marks never-filled queue slots.
    """
    pos = (ids[:, None] == keys_id[None, :]).float()                   # (B, K)
    onehot = pos / pos.sum(1, keepdim=True)                             # uniform over the positives
    # Never-filled slots are no keys at all. (ALBEF fills the queue with random unit vectors instead:
    # from scratch, those easy negatives teach every feature to huddle away from them, and the
    # collapsed features never separate; see the README, "What differs".)
    empty = (keys_id < 0)[None, :]                                      # (1, K)
    def sims(q, k):
        return (q @ k.t() / temp).float().masked_fill(empty, float("-inf"))  # (B, K)
    with torch.no_grad():
        t_i2t = alpha * F.softmax(sims(image_feat_m, text_keys), dim=1) + (1 - alpha) * onehot
        t_t2i = alpha * F.softmax(sims(text_feat_m, image_keys), dim=1) + (1 - alpha) * onehot
    sim_i2t, sim_t2i = sims(image_feat, text_keys), sims(text_feat, image_keys)  # (B, K) each
    # nan_to_num: -inf * 0 at the empty slots must count as 0, not NaN.
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * t_i2t).nan_to_num(0.0).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t_t2i).nan_to_num(0.0).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def sample_hard_negatives(sim, ids):
    """sim (B_img, B_txt) similarities of a batch whose image i goes with text i; ids (B,) image ids.
    Returns (neg_img (B,) for each text, neg_txt (B,) for each image), drawn with probability
    softmax(sim) over the pairs of DIFFERENT images. One multinomial call per direction: no Python loop
    and no host sync (the official code loops over samples)."""
    same = ids[:, None] == ids[None, :]                                 # (B, B) positives incl. diagonal
    # Mask BEFORE the softmax: at a small temperature the positive takes all the mass and every
    # negative underflows to 0, which would send the row to the uniform fallback below.
    w_i2t = F.softmax(sim.float().masked_fill(same, float("-inf")), dim=1)      # image -> candidate texts
    w_t2i = F.softmax(sim.float().t().masked_fill(same, float("-inf")), dim=1)  # text -> candidate images
    # A batch where every sample shows the same image has no negative: fall back to "anything but
    # yourself" rather than crash (multinomial rejects an all-zero or NaN row).
    eye = torch.eye(len(ids), dtype=torch.bool, device=sim.device)
    has_neg = (~same).any(1, keepdim=True)                              # (B, 1); `same` is symmetric
    w_i2t = torch.where(has_neg, w_i2t, (~eye).float())
    w_t2i = torch.where(has_neg, w_t2i, (~eye).float())
    neg_txt = torch.multinomial(w_i2t, 1).squeeze(1)
    neg_img = torch.multinomial(w_t2i, 1).squeeze(1)
    return neg_img, neg_txt


def itm_loss(logits):
    """logits (3B, 2) for B positive pairs then 2B negative pairs; label 1 = match."""
    B = logits.shape[0] // 3
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
    return F.cross_entropy(logits.float(), labels)


# ----------------------------------------------------------------------------------------------
# Level 2, fine-grained: symmetric cross-modality reconstruction (XMM = MLM + MIM).
# ----------------------------------------------------------------------------------------------
def mlm_loss(logits, labels, logits_m=None, alpha=0.0):
    """logits, logits_m (M, V) at the masked positions only; labels (M,).
    The soft term is a cross-entropy over the VOCABULARY axis (dim=-1) for each masked token. The
    official SIMLA code took the softmax over the sequence axis, which distils nothing meaningful
    (SIMLA.md, "MLM"); tests/test_losses.py pins the axis."""
    if logits.shape[0] == 0:  # a batch with no masked token: zero loss that still touches the graph
        return logits.sum() * 0.0
    logp = F.log_softmax(logits.float(), dim=-1)
    hard = F.nll_loss(logp, labels)
    if logits_m is None or alpha == 0:
        return hard
    soft = -(logp * F.softmax(logits_m.float(), dim=-1)).sum(-1).mean()
    return (1 - alpha) * hard + alpha * soft


def patch_targets(image, patch_size):
    """image (B, 3, S, S) -> (B, N, P) pixels of each patch, normalised per patch (MAE's target):
    zero mean, unit variance over the P = p*p*3 values, so the regression cares about the patch's
    structure, not its brightness. Patch order matches the ViT's (row-major), channels last."""
    B, _, S, _ = image.shape
    g = S // patch_size
    x = image.float().reshape(B, 3, g, patch_size, g, patch_size)       # (B, 3, g, p, g, p)
    x = x.permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, -1)               # (B, N, p*p*3)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / (var + 1e-6).sqrt()


def mim_loss(pred, target, pred_m=None, alpha=0.0):
    """pred, target, pred_m (M, P): masked patches only. Mean squared error per value, mixed with the
    momentum model's prediction as the other targets are (our stand-in for DALL-E token CE)."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    hard = F.mse_loss(pred.float(), target)
    if pred_m is None or alpha == 0:
        return hard
    return (1 - alpha) * hard + alpha * F.mse_loss(pred.float(), pred_m.float())


# ----------------------------------------------------------------------------------------------
# Level 3, conceptual: pseudo-keyword prediction (PSL).
# ----------------------------------------------------------------------------------------------
def psl_targets(cls_attn, ids, valid, vocab_size, per_head=4, keep=5):
    """Multi-hot keyword targets from the momentum model's last-layer CLS self-attention.

    cls_attn (B, H, T): attention of the CLS query over caption positions. ids (B, T). valid (B, T):
    True at positions that may be keywords (real, non-special tokens; the official code excluded only
    CLS, so SEP and PAD leaked in as "keywords"). Each head votes for its top `per_head` valid
    positions; the `keep` most voted positions become targets (ties: higher summed attention wins).
    A caption with fewer than `keep` valid tokens gives fewer targets, never a special token.
    Returns (B, V) float multi-hot.
    """
    B, H, T = cls_attn.shape
    att = cls_attn.masked_fill(~valid[:, None, :], -1.0)                # invalid never in a top-k
    k = min(per_head, T)
    top = att.topk(k, dim=-1)                                           # (B, H, k)
    chosen = top.values >= 0                                            # a valid position was picked
    votes = torch.zeros(B, T, device=ids.device)
    votes.scatter_add_(1, top.indices.flatten(1), chosen.flatten(1).float())  # (B, T) vote counts
    # Break ties by total attention mass (always < 1 per head, so it never outweighs one vote).
    score = votes + cls_attn.clamp(min=0).mean(1) * 0.5
    score = score.masked_fill(votes == 0, -1.0)                         # only voted positions count
    best = score.topk(min(keep, T), dim=-1)                             # (B, keep)
    targets = torch.zeros(B, vocab_size, device=ids.device)
    hit = (best.values >= 0).float()
    # amax, not a plain scatter: a repeated token id, or an unvoted slot (hit 0), never erases a hit.
    targets.scatter_reduce_(1, ids.gather(1, best.indices), hit, reduce="amax")  # ids of chosen positions
    return targets


def psl_loss(logits, targets, soft_m=None, alpha=0.0):
    """Multi-label BCE of the concept head, averaged over all B x V entries; soft_m = sigmoid of the
    momentum concept head. Why the plain mean: the concept head's first job is the keyword marginals,
    and a loss scaled per keyword (sum over V / #keywords, ~V/5 times larger) made that job's gradient
    dominate the image feature it shares with ITC: from scratch, every image feature collapsed onto the
    "average keywords" direction and ITC never left log(batch) (measured; README, "What differs")."""
    hard = F.binary_cross_entropy_with_logits(logits.float(), targets)
    if soft_m is None or alpha == 0:
        return hard
    return (1 - alpha) * hard + alpha * F.binary_cross_entropy_with_logits(logits.float(), soft_m.float())
