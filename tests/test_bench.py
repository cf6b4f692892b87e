"""kernels/bench.py: the analytic FLOP model against a hand count and against torch's FlopCounterMode,
the synthetic batch's format, the --attn reference switch, a tiny end-to-end run of the CLI, and the
--tactics mode with its "before" variants (per-sample hard negatives, heads on every position)."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
torch.set_num_threads(1)

import losses as L  # noqa: E402
import model as model_module  # noqa: E402
from kernels import bench  # noqa: E402
from model import SIMLA, ModelConfig  # noqa: E402

ALL = ("itc", "itm", "mlm", "mim", "psl")


# ---------------------------------------------------------------------------------------------
# The FLOP model against a count done by hand, matmul by matmul.
# Config: C = 8, 2 heads (D = 4), MLP 32, 1 ViT layer + 1 text layer, 8 px images of 4 px patches
# (N = 4 patches, 5 tokens with CLS, 48 pixels per patch), V = 20, E = 4, queue K = 16.
# Batch B = 2, T = 6 text tokens, 3 masked tokens (MLM), 2 masked patches (MIM).
# ---------------------------------------------------------------------------------------------
HAND_CFG = ModelConfig(img_size=8, patch_size=4, width=8, vision_layers=1, text_layers=1, heads=2, mlp_ratio=4.0,
                       vocab_size=20, max_len=6, embed_dim=4, queue_size=16)


def mm(m, k, n):
    """(m x k) @ (k x n)."""
    return 2 * m * k * n


# One sample, forward. Attention per head: scores (Lq x 4) @ (4 x Lk), values (Lq x Lk) @ (Lk x 4).
VIT_LAYER = (mm(5, 8, 24)                              # qkv
             + 2 * mm(5, 4, 5) + 2 * mm(5, 5, 4)       # scores, values (2 heads)
             + mm(5, 8, 8)                             # proj
             + mm(5, 8, 32) + mm(5, 32, 8))            # MLP
CONV = mm(4, 48, 8)                                    # 4 patches of 48 pixels -> 8 channels
TEXT_LAYER = mm(6, 8, 24) + 2 * mm(6, 4, 6) + 2 * mm(6, 6, 4) + mm(6, 8, 8) + mm(6, 8, 32) + mm(6, 32, 8)
CROSS_T2I = (mm(6, 8, 8) + mm(5, 8, 16)                # q on 6 text tokens, kv on 5 image tokens
             + 2 * mm(6, 4, 5) + 2 * mm(6, 5, 4) + mm(6, 8, 8))
CROSS_I2T = (mm(5, 8, 8) + mm(6, 8, 16)                # q on 5 image tokens, kv on 6 caption embeddings
             + 2 * mm(5, 4, 6) + 2 * mm(5, 6, 4) + mm(5, 8, 8))
T2I_LAYER = TEXT_LAYER + CROSS_T2I
I2T_LAYER = VIT_LAYER + CROSS_I2T
B = 2


def test_hand_count_building_blocks():
    # The same numbers summed by hand on paper, so the test does not only re-express itself.
    assert (VIT_LAYER, CONV, TEXT_LAYER, CROSS_T2I, CROSS_I2T) == (8480, 3072, 10368, 3776, 3776)


def test_step_flops_itc_only_by_hand():
    # Online passes 3x (fwd + grad input + grad weight); the conv 2x (the image needs no gradient);
    # ITC similarities against no-grad keys 2x; momentum passes 1x.
    image = 3 * B * VIT_LAYER + 2 * B * CONV + (B * VIT_LAYER + B * CONV)
    text = 3 * B * TEXT_LAYER + B * TEXT_LAYER
    proj = mm(B, 8, 4)                                        # vision_proj / text_proj on B CLS
    sims = mm(B, 4, B + 16)                                   # B x (B + K) x E, one direction
    heads = (3 + 1) * proj + (3 + 1) * proj + 2 * (2 * sims) + 2 * sims
    f = bench.step_flops(HAND_CFG, B, 6, ("itc",), n_mlm=3, n_mim=2)
    assert f["image_encoder"] == image == 86272
    assert f["text_encoder"] == text == 82944
    assert f["heads"] == heads == 2752
    assert f["fusion_itm"] == f["fusion_mlm"] == f["fusion_mim"] == f["fusion_psl"] == 0
    assert f["total"] == image + text + heads == 171968


def test_step_flops_all_terms_by_hand():
    image = 2 * (3 * B * VIT_LAYER + 2 * B * CONV + B * VIT_LAYER + B * CONV)   # plain + MIM-masked encodes
    text = 3 * B * TEXT_LAYER + B * TEXT_LAYER
    itm = 3 * (3 * B) * T2I_LAYER                             # 3B pairs, trained
    mlm = 3 * B * T2I_LAYER + B * T2I_LAYER                   # online + momentum
    mim = 3 * B * I2T_LAYER + B * I2T_LAYER
    psl = B * T2I_LAYER                                       # momentum only
    proj, sims = mm(B, 8, 4), mm(B, 4, B + 16)
    heads = (8 * proj + 6 * sims                              # ITC as above
             + mm(B, 4, B) + 3 * mm(3 * B, 8, 2)              # hard-negative sims (no grad), ITM head
             + 4 * (mm(3, 8, 8) + mm(3, 8, 20))               # MLM transform + tied decoder, 3 tokens
             + 4 * mm(2, 8, 48)                               # MIM head, 2 patches
             + 4 * (proj + mm(B, 4, 20)))                     # concept head: vision_proj, E -> V
    f = bench.step_flops(HAND_CFG, B, 6, ALL, n_mlm=3, n_mim=2)
    expected = dict(image_encoder=image, text_encoder=text, fusion_itm=itm, fusion_mlm=mlm, fusion_mim=mim,
                    fusion_psl=psl, heads=heads)
    assert {k: f[k] for k in expected} == expected
    assert (image, itm, mlm, mim, psl, heads) == (172544, 254592, 113152, 98048, 28288, 16672)
    assert f["ema_queue"] == f["optimizer"] == 0
    assert f["total"] == sum(expected.values()) == 766240


# ---------------------------------------------------------------------------------------------
# The FLOP model against what torch actually runs: FlopCounterMode over one eager step.
# ---------------------------------------------------------------------------------------------
def small_cfg(**kw):
    base = dict(img_size=16, patch_size=4, width=16, vision_layers=1, text_layers=2, heads=2, vocab_size=40,
                max_len=8, embed_dim=8, queue_size=12)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("terms", [("itc",), ("itm",), ("mim",), ("mlm", "psl"), ALL])
def test_step_flops_equals_flop_counter(terms):
    torch.manual_seed(0)
    cfg = small_cfg()
    model = SIMLA(cfg)
    model.set_trainable(terms)
    batch = bench.synthetic_batch(cfg, 3)
    n_mlm, n_mim = int((batch["mlm_labels"] != -100).sum()), int(batch["patch_mask"].sum())
    counted = bench.count_flops(model, batch, terms, 0.4, bench.set_precision(torch.device("cpu"), "fp32"))
    assert counted == bench.step_flops(cfg, 3, cfg.max_len, terms, n_mlm, n_mim)["total"]


# ---------------------------------------------------------------------------------------------
# The synthetic batch has data.py's collate format and realistic proportions.
# ---------------------------------------------------------------------------------------------
def test_synthetic_batch_format():
    cfg = small_cfg(img_size=64, patch_size=4, max_len=32, vocab_size=200)   # N = 256, the paper's grid
    b = bench.synthetic_batch(cfg, 16, seed=3)
    V, T, N = 200, 32, 256
    CLS, SEP, PAD, MASK = V - 4, V - 3, V - 2, V - 1
    ids, real = b["text_ids"], b["text_mask"]
    assert b["image"].shape == (16, 3, 64, 64) and b["image"].dtype == torch.float32
    assert ids.shape == real.shape == b["mlm_ids"].shape == b["mlm_labels"].shape == (16, T)
    assert ids.dtype == torch.long and real.dtype == torch.bool
    assert (ids[:, 0] == CLS).all()
    lengths = real.sum(1)
    assert (real == (torch.arange(T) < lengths[:, None])).all()              # real tokens first
    assert (ids[torch.arange(16), lengths - 1] == SEP).all() and (ids[~real] == PAD).all()
    assert 0.5 <= real.float().mean() <= 0.8                                  # ~65% real tokens
    words = real & (ids < V - 4)
    assert int(words.sum()) == int((lengths - 2).sum())                        # specials only at the ends
    sel = b["mlm_labels"] != -100
    assert (sel <= words).all() and (b["mlm_labels"][sel] == ids[sel]).all()  # only words are targets
    assert 0.10 <= sel.sum() / words.sum() <= 0.20                            # ~15%
    assert (b["mlm_ids"][~sel] == ids[~sel]).all() and (b["mlm_ids"][sel] == MASK).float().mean() > 0.5
    assert b["patch_mask"].shape == (16, N) and (b["patch_mask"].sum(1) == 75).all()  # 75 of 256
    assert b["image_id"].unique().numel() == 16


# ---------------------------------------------------------------------------------------------
# --attn reference: every attention layer takes the explicit path, and the switch is undone after.
# ---------------------------------------------------------------------------------------------
def test_attention_reference_reaches_every_layer(monkeypatch):
    cfg = small_cfg()
    model, batch = SIMLA(cfg), bench.synthetic_batch(cfg, 2)
    calls = []
    real_reference = bench.attention_reference
    monkeypatch.setattr(bench, "attention_reference", lambda *a: calls.append(1) or real_reference(*a))

    def no_sdpa(*a, **kw):
        raise AssertionError("SDPA called under --attn reference")

    saved = model_module.attention
    with bench.attention_impl("reference"):
        with monkeypatch.context() as m:
            m.setattr(F, "scaled_dot_product_attention", no_sdpa)
            model(batch, 0.4, ALL)["loss"].backward()
    assert model_module.attention is saved
    # Calls through the switch (1 ViT layer; 2 text layers, self + cross each in the fused modes):
    # ViT plain + MIM-masked, online + momentum 4; text mode online + momentum 4; ITM 4; MLM online +
    # momentum 8; MIM image->text online + momentum 8; PSL 2 (its last, read layer already calls
    # model.attention_reference itself, so it does not pass through the switch).
    assert len(calls) == 4 + 4 + 4 + 8 + 8 + 2


# ---------------------------------------------------------------------------------------------
# Device peaks for MFU.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H200", "bf16", 989e12), ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12), ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
    ("NVIDIA L4", "bf16", 121e12), ("NVIDIA L40S", "bf16", 362e12), ("NVIDIA A10G", "bf16", None),
    ("Some Future GPU", "bf16", None)])
def test_device_peak(monkeypatch, name, precision, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert bench.device_peak(torch.device("cuda"), precision) == peak
    assert bench.device_peak(torch.device("cpu"), precision) is None


# ---------------------------------------------------------------------------------------------
# The CLI end to end on a tiny model: the last stdout line is the JSON result.
# ---------------------------------------------------------------------------------------------
TINY_ARGS = ["--batch-size", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--device", "cpu",
             "--width", "16", "--heads", "2", "--vision-layers", "1", "--text-layers", "1", "--img-size", "16",
             "--patch-size", "4", "--max-len", "8", "--vocab-size", "40", "--embed-dim", "8", "--queue-size", "8"]


def test_cli_full_step(capsys):
    res = bench.main(TINY_ARGS)
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(res))
    assert "| component |" in "\n".join(out)
    assert res["step_ms"] > 0 and res["samples_per_s"] == pytest.approx(2 / res["step_ms"] * 1e3)
    assert res["flops_per_step"] == res["flops"]["total"] > 0
    assert res["gflops_per_s"] == pytest.approx(res["flops_per_step"] / res["step_ms"] / 1e6)
    assert res["mfu"] is None and res["peak_mem_mib"] > 0                     # CPU: FLOP/s, no MFU
    assert set(res["time_ms"]) == set(bench.COMPONENTS) and all(t > 0 for t in res["time_ms"].values())
    assert res["other_ms"] == pytest.approx(res["step_ms"] - sum(res["time_ms"].values()))
    assert res["flops_counted_ratio"] == 1.0


def test_cli_json_only_itc_reference_bf16(capsys):
    saved = model_module.attention
    res = bench.main(TINY_ARGS + ["--terms", "itc", "--attn", "reference", "--precision", "bf16", "--json",
                                  "--no-flop-check"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["terms"] == "itc"
    assert set(res["time_ms"]) == {"image_encoder", "text_encoder", "heads", "ema_queue", "optimizer"}
    assert res["flops"]["fusion_itm"] == 0 and res["attn"] == "reference" and res["precision"] == "bf16"
    assert model_module.attention is saved  # the switch is undone


def test_sweep_table(capsys, monkeypatch):
    """The sweep's bookkeeping, with the child processes replaced by a fake whose time is 2x FLOPs."""
    seen = []

    class Done:
        returncode, stderr = 0, ""

        def __init__(self, cmd):
            args = bench.parse_args(cmd[2:])
            seen.append(args)
            cfg = bench.build_config(args)
            f = bench.step_flops(cfg, args.batch_size, cfg.max_len, ALL, 3, 3)["total"]
            ms = f / 1e6 * (2 if args.batch_size == 4 else 1)  # batch 4 runs 2x slower than predicted
            self.stdout = "table\n" + json.dumps(dict(step_ms=ms, step_ms_min=ms, samples_per_s=1.0, peak_mem_mib=1.0,
                                                      flops_per_step=f, gflops_per_s=1.0))

    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: Done(cmd))
    res = bench.main(TINY_ARGS + ["--sweep", "--sweep-batch", "1,4", "--sweep-img", "32", "--sweep-len", "4"])
    rows = res["sweep"]
    assert [(r["vary"], r["B"], r["img_size"], r["text_len"]) for r in rows] == [
        ("base", 2, 16, 8), ("batch", 1, 16, 8), ("batch", 4, 16, 8), ("image", 2, 32, 8), ("text", 2, 16, 4)]
    assert all(a.json and a.no_breakdown and not a.sweep for a in seen)
    assert [r["ratio"] for r in rows] == pytest.approx([1, 1, 2, 1, 1])
    assert "| measured/predicted |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# --tactics: each speed tactic before vs after; the "before" variants must compute the same thing.
# ---------------------------------------------------------------------------------------------
def test_tactics_fast_end_to_end(capsys):
    saved = model_module.attention
    res = bench.main(TINY_ARGS + ["--warmup", "0", "--tactics-fast"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(res))
    assert "| tactic | before | after | speed-up | what is measured |" in out
    rows = {r["tactic"]: r for r in res["tactics"]}
    assert list(rows) == list(bench.TACTICS)
    skipped = {"grad_ckpt", "data_workers", "compile"}           # fresh processes, a data set; see --compile
    for name, r in rows.items():
        if name in skipped:
            assert r["before_ms"] is r["after_ms"] is r["speedup"] is None
        else:
            assert r["before_ms"] > 0 and r["after_ms"] > 0, name
            assert r["speedup"] == pytest.approx(r["before_ms"] / r["after_ms"])
    assert model_module.attention is saved  # the --attn reference switch is undone


def test_tactics_grad_ckpt_and_data_rows(monkeypatch, capsys):
    """The two rows --tactics-fast skips: the children are faked, the data world is cut to 16 images."""
    import data as D
    children, real_synth = [], D.synth

    class Done:
        returncode, stderr = 0, ""

        def __init__(self, cmd):
            children.append(cmd)
            ckpt = "--grad-ckpt" in cmd
            self.stdout = json.dumps(dict(step_ms=3.0 if ckpt else 2.0, peak_mem_mib=50.0 if ckpt else 80.0))

    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: Done(cmd))
    monkeypatch.setattr(D, "synth", lambda out, **kw: real_synth(out, **{**kw, "n_train": 16}))
    args = TINY_ARGS + ["--warmup", "0", "--tactics", "--json"]
    rows = {r["tactic"]: r for r in bench.main(args)["tactics"]}
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    parsed = [bench.parse_args(c[2:]) for c in children]          # same shapes, fresh processes, ckpt off/on
    assert [a.grad_ckpt for a in parsed] == [None, True]
    assert all(a.json and not a.tactics and a.warmup == 0 and a.width == 16 and a.batch_size == 2 for a in parsed)
    ck = rows["grad_ckpt"]
    assert (ck["before_ms"], ck["after_ms"], ck["before_mib"], ck["after_mib"]) == (2.0, 3.0, 80.0, 50.0)
    data = rows["data_workers"]
    assert data["before_ms"] > 0 and data["after_ms"] > 0 and data["step_ms"] == rows["sdpa"]["after_ms"]
    assert data["keeps_up"] == (data["after_ms"] <= data["step_ms"])


@pytest.mark.parametrize("sampler", [bench.sample_hard_negatives_loop, L.sample_hard_negatives])
def test_hard_negative_samplers_valid(sampler):
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])                  # repeated images are positives too
    g = torch.Generator().manual_seed(0)
    for temp in (1.0, 0.01):                                      # 0.01: the positives take nearly all mass
        for _ in range(20):
            sim = torch.randn(8, 8, generator=g) / temp
            sim += 10 * (ids[:, None] == ids[None, :])            # make the forbidden pairs the most similar
            neg_img, neg_txt = sampler(sim, ids)
            assert neg_img.shape == neg_txt.shape == (8,) and neg_img.dtype == neg_txt.dtype == torch.long
            assert (ids[neg_img] != ids).all() and (ids[neg_txt] != ids).all()


def test_masked_heads_match_all_positions():
    torch.manual_seed(0)
    cfg = small_cfg(img_size=32, max_len=16)
    model, batch = SIMLA(cfg), bench.synthetic_batch(cfg, 3)
    sel, pm = batch["mlm_labels"] != -100, batch["patch_mask"]
    grads = []
    for gather_first in (True, False):
        h = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)  # (B, T, C)
        hi = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)  # (B, N, C)
        logits, pred = bench.masked_heads(model, h, hi, sel, pm, gather_first)
        assert logits.shape == (int(sel.sum()), 40) and pred.shape == (int(pm.sum()), 48)
        (logits.square().sum() + pred.square().sum()).backward()
        grads.append((logits.detach(), pred.detach(), h.grad, hi.grad, model.mlm_transform[0].weight.grad.clone()))
        model.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
