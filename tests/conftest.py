"""Shared helpers for the model / kernels / losses tests: a tiny config and a synthetic batch."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
torch.set_num_threads(1)  # 2 shared cores: many threads only add contention at these sizes

from model import ModelConfig  # noqa: E402

V = 100                                   # tiny vocabulary; specials are its last 4 ids
CLS, SEP, PAD, MASK = V - 4, V - 3, V - 2, V - 1


def tiny_cfg(**kw):
    base = dict(img_size=32, patch_size=8, width=32, vision_layers=1, text_layers=2, heads=2, vocab_size=V,
                max_len=16, embed_dim=16, queue_size=10, momentum=0.9)
    return ModelConfig(**{**base, **kw})


def make_batch(cfg, B=4, T=10, seed=0, lengths=None, ids=None):
    """The collate format of data.py: [CLS] words [SEP] [PAD]..., 15%-ish MLM, random patch mask."""
    g = torch.Generator().manual_seed(seed)
    N = (cfg.img_size // cfg.patch_size) ** 2
    lengths = lengths or [T - i % 4 for i in range(B)]        # real tokens incl. CLS and SEP, varied
    text_ids = torch.full((B, T), PAD, dtype=torch.long)
    for b, n in enumerate(lengths):
        text_ids[b, 0], text_ids[b, n - 1] = CLS, SEP
        text_ids[b, 1:n - 1] = torch.randint(0, V - 4, (n - 2,), generator=g)
    text_mask = text_ids != PAD
    mlm_ids, mlm_labels = text_ids.clone(), torch.full((B, T), -100, dtype=torch.long)
    for b, n in enumerate(lengths):                          # mask positions 1 and 2 of every caption
        mlm_labels[b, 1:3], mlm_ids[b, 1:3] = text_ids[b, 1:3], MASK
    patch_mask = torch.rand(B, N, generator=g) < 0.3
    patch_mask[:, 0] = True                                  # at least one masked patch per image
    return dict(image=torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g), text_ids=text_ids,
                text_mask=text_mask, mlm_ids=mlm_ids, mlm_labels=mlm_labels, patch_mask=patch_mask,
                image_id=torch.arange(B) if ids is None else torch.as_tensor(ids))


@pytest.fixture
def cfg():
    return tiny_cfg()
