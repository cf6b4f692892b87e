"""Attention: the fused hot path and the explicit reference that also returns the probabilities.

Shapes: q (B, H, Tq, D), k and v (B, H, Tk, D); key_mask (B, Tk) bool, True = a real key.

Why two paths: `F.scaled_dot_product_attention` picks a fused kernel (flash / memory-efficient on CUDA,
a fused C++ loop on CPU) and never materialises the (Tq, Tk) probabilities, so nothing can read them.
SIMLA needs those probabilities in exactly two places: PSL reads the last layer's CLS self-attention row
(SIMLA.md, "PSL"), and grounding takes Grad-CAM of one layer's cross-attention. Those callers ask for the
explicit path for ONE layer; every other layer stays on SDPA.

Masks: a mask is passed only when the keys are text (padding exists). Image keys get no mask at all,
which keeps SDPA free to choose its fastest kernel (flash attention takes no arbitrary mask).
"""
import torch
import torch.nn.functional as F


def attention(q, k, v, key_mask=None):
    """Fused attention. key_mask (B, Tk) bool or None."""
    # (B, Tk) -> (B, 1, 1, Tk): broadcast over heads and queries; bool True means "may attend".
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def attention_reference(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(D)) v written out; returns (out (B, H, Tq, D), probs (B, H, Tq, Tk))."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    # softmax in fp32 even under bf16 autocast: the probabilities are read as maps and pseudo-labels.
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return probs @ v, probs
