"""eval.py: recall metrics, ITM re-ranking, Grad-CAM, box scoring, IoU, the RefCOCO+ adapter, checkpoint
loading, a 2-process gloo evaluation and the CLI end to end on a tiny generated dataset."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data as D  # noqa: E402
import eval as E  # noqa: E402
from model import SIMLA, ModelConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

torch.set_num_threads(1)
TINY = ModelConfig(img_size=32, patch_size=8, width=32, vision_layers=1, text_layers=2, heads=2, max_len=24,
                   embed_dim=16, queue_size=32, vocab_size=300)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return SIMLA(dataclasses.replace(TINY, **kw)).eval()


# ---------------------------------------------------------------------------------------------------
# Recall@K against a brute-force restatement of SIMLA.md's definitions
# ---------------------------------------------------------------------------------------------------
def brute_recall(i2t, t2i, txt2img, img2txt):
    def ranking(row):  # best first, ties by lower index (a stable sort)
        return sorted(range(len(row)), key=lambda j: -row[j])
    out = {}
    for k in (1, 5, 10):
        hits = 0
        for i, gts in enumerate(img2txt):
            order = ranking(i2t[i])
            hits += min(order.index(j) for j in gts) < k
        out[f"tr_r{k}"] = 100.0 * hits / len(img2txt)
    for k in (1, 5, 10):
        hits = sum(ranking(t2i[j]).index(txt2img[j]) < k for j in range(len(txt2img)))
        out[f"ir_r{k}"] = 100.0 * hits / len(txt2img)
    out["r_mean"] = sum(out.values()) / 6
    return out


@pytest.mark.parametrize("seed", range(4))
def test_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, size=12)  # 12 images with 1..4 captions each
    img2txt, txt2img = [], []
    for i, c in enumerate(counts):
        img2txt.append(list(range(len(txt2img), len(txt2img) + c)))
        txt2img += [i] * c
    # Sharpen the diagonal a little so the recalls are neither 0 nor 100.
    i2t = rng.normal(size=(12, len(txt2img)))
    i2t[np.asarray(txt2img), np.arange(len(txt2img))] += rng.uniform(0, 2, len(txt2img))
    t2i = i2t.T + rng.normal(scale=0.5, size=(len(txt2img), 12))
    got = E.recall_metrics(torch.tensor(i2t), t2i, txt2img, img2txt)
    want = brute_recall(i2t.tolist(), t2i.tolist(), txt2img, img2txt)
    assert set(got) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean"}
    for k in want:
        assert got[k] == pytest.approx(want[k]), k
    assert 0 < got["r_mean"] < 100


def test_recall_perfect_and_best_caption_counts():
    img2txt, txt2img = [[0, 1], [2, 3]], [0, 0, 1, 1]
    i2t = np.array([[0.1, 0.9, 0.0, 0.5], [0.0, 0.2, 0.3, 0.1]])  # image 1: text 2 best (a true one)
    m = E.recall_metrics(i2t, i2t.T, txt2img, img2txt)
    assert m["tr_r1"] == 100.0  # only the BEST true caption has to be in the top K
    assert m["ir_r1"] == 75.0   # caption 3 ranks image 0 (0.5) above image 1 (0.1)


# ---------------------------------------------------------------------------------------------------
# ITM re-ranking touches the top k only
# ---------------------------------------------------------------------------------------------------
def test_itm_rerank_scores_only_top_k(monkeypatch):
    model = tiny_model()
    n_img, n_txt, k = 5, 9, 3
    torch.manual_seed(1)
    emb = model.encode_image(torch.randn(n_img, 3, 32, 32)).detach()
    ids = torch.randint(0, 296, (n_txt, 24))
    mask = torch.arange(24)[None] < torch.randint(3, 24, (n_txt, 1))
    sim = torch.randn(n_img, n_txt)
    pairs = []

    def spy(m, e, i, msk):
        pairs.append(len(e))
        return real(m, e, i, msk)
    real = E.itm_logits
    monkeypatch.setattr(E, "itm_logits", spy)
    with torch.no_grad():
        i2t = E.itm_rerank(model, sim, k, emb, ids, mask, batch_size=4, images_are_queries=True)
        assert sum(pairs) == n_img * k and max(pairs) <= 4
        pairs.clear()
        t2i = E.itm_rerank(model, sim.t(), k, emb, ids, mask, batch_size=4, images_are_queries=False)
        assert sum(pairs) == n_txt * k
        for scores, s in ((i2t, sim), (t2i, sim.t())):
            top = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(k, dim=1).indices, True)
            assert (scores[~top] == E.FLOOR).all() and (scores[top] != E.FLOOR).all()
        # A re-scored entry is exactly that pair's ITM positive logit.
        i, j = 2, int(sim[2].argmax())
        assert i2t[i, j] == pytest.approx(real(model, emb[i:i + 1], ids[j:j + 1], mask[j:j + 1]).item(), abs=1e-5)
        j, i = 4, int(sim[:, 4].argmax())
        assert t2i[j, i] == pytest.approx(real(model, emb[i:i + 1], ids[j:j + 1], mask[j:j + 1]).item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# Grad-CAM, heat maps, box scores, IoU
# ---------------------------------------------------------------------------------------------------
class LinearCamModel:
    """fuse() returns probs and an ITM logit = sum(probs * G), so d logit / d probs = G exactly."""

    def __init__(self, probs, G):
        self.probs, self.G = probs, G

    def fuse(self, ids, mask, image_embeds, probs_layer=None):
        probs = self.probs + 0 * image_embeds.sum()  # in the graph of the input, as the real one is
        pos = (probs * self.G).sum(dim=(1, 2, 3))     # (B,)
        hidden = torch.stack([torch.zeros_like(pos), pos], dim=1)[:, None].expand(-1, ids.shape[1], -1)
        return hidden, None, probs

    def itm_head(self, x):
        return x  # hidden already holds (neg, pos) logits


def test_gradcam_formula():
    B, H, T, N = 2, 3, 5, 4
    torch.manual_seed(0)
    probs, G = torch.rand(B, H, T, 1 + N).softmax(-1), torch.randn(B, H, T, 1 + N)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cam = E.gradcam(LinearCamModel(probs, G), torch.zeros(B, T, dtype=torch.long), mask, torch.zeros(B, 1 + N, 8), 0)
    want = torch.stack([(probs[b] * G[b].clamp(min=0)).mean(0)[mask[b]].mean(0)[1:] for b in range(B)])
    assert cam.shape == (B, N)
    assert torch.allclose(cam, want, atol=1e-6)


def test_gradcam_real_model_is_per_sample_and_leaves_no_grads():
    model = tiny_model()
    torch.manual_seed(2)
    with torch.no_grad():
        emb = model.encode_image(torch.randn(3, 3, 32, 32))
    ids = torch.randint(0, 296, (3, 24))
    mask = torch.arange(24)[None] < torch.tensor([[5], [24], [9]])
    cams = E.gradcam(model, ids, mask, emb, layer=1)
    assert cams.shape == (3, 16) and (cams >= 0).all() and cams.sum() > 0
    one = E.gradcam(model, ids[1:2], mask[1:2], emb[1:2], layer=1)
    assert torch.allclose(cams[1:2], one, atol=1e-6)  # samples do not interact
    assert all(p.grad is None for p in model.parameters())  # only the probs got a gradient


def test_default_layer_scales_index_8_of_12():
    assert E.default_layer(12) == 8 and E.default_layer(6) == 4 and E.default_layer(4) == 3
    assert E.default_layer(1) == 0


def test_heatmap_and_box_scoring():
    cam = torch.zeros(16)
    cam[1 * 4 + 2] = 1.0  # all relevance in patch (row 1, col 2) of a 4x4 grid
    heat = E.heatmap(cam, 40, 80)  # a 80 x 40 (w x h) original image: patches are 20 x 10 px
    assert heat.shape == (40, 80)
    # Bilinear upsampling spreads the patch a little, but its centre is where the patch is.
    y, x = divmod(int(heat.argmax()), 80)
    assert 10 <= y < 20 and 40 <= x < 60
    assert torch.allclose(E.heatmap(torch.full((16,), 2.0), 7, 9), torch.full((7, 9), 2.0))
    on, off, tight, huge = [40, 10, 20, 10], [0, 30, 20, 10], [30, 5, 40, 20], [0, 0, 80, 40]
    s = E.box_scores(heat, [off, on])
    assert s[1] > s[0] and s[0] == pytest.approx(0.0, abs=1e-6)
    # Bilinear spreads the patch over half of each neighbour; both boxes hold all of that mass, and
    # mass / sqrt(area) prefers the tight box.
    s = E.box_scores(heat, [huge, tight])
    assert heat[5:25, 30:70].sum() == pytest.approx(heat.sum().item())
    assert s[0] == pytest.approx(heat.sum().item() / np.sqrt(80 * 40))
    assert s[1] == pytest.approx(heat.sum().item() / np.sqrt(40 * 20)) and s[1] > s[0]
    assert E.box_scores(heat, [[3, 3, 0, 5]])[0] == -np.inf


def test_iou():
    assert E.iou([0, 0, 10, 10], [0, 0, 10, 10]) == pytest.approx(1.0)
    assert E.iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    assert E.iou([0, 0, 10, 10], [10, 0, 10, 10]) == 0.0  # touching edges
    assert E.iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert E.iou([0, 0, 10, 10], [2, 2, 5, 5]) == pytest.approx(25 / 100)  # contained
    assert E.iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


# ---------------------------------------------------------------------------------------------------
# RefCOCO+ adapter on a hand-made sample of ALBEF's files and REFER's annotations
# ---------------------------------------------------------------------------------------------------
def test_convert_refcoco(tmp_path):
    refer = tmp_path / "refcoco+"
    refer.mkdir()
    refs = [{"ref_id": 7, "ann_id": 70, "image_id": 1, "split": "testA", "sentences": []},
            {"ref_id": 8, "ann_id": 80, "image_id": 2, "split": "testB", "sentences": []},
            {"ref_id": 9, "ann_id": 90, "image_id": 3, "split": "val", "sentences": []}]
    (refer / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (refer / "instances.json").write_text(json.dumps({"images": [], "annotations": [
        {"id": 70, "image_id": 1, "bbox": [10.5, 20.0, 30.0, 40.0]},
        {"id": 80, "image_id": 2, "bbox": [1, 2, 3, 4]}, {"id": 90, "image_id": 3, "bbox": [0, 0, 5, 5]}]}))
    albef = [{"image": "coco/train2014/COCO_train2014_000000000001.jpg", "text": "left guy", "ref_id": 7},
             {"image": "coco/train2014/COCO_train2014_000000000002.jpg", "text": "red cup", "ref_id": 8},
             {"image": "coco/train2014/COCO_train2014_000000000003.jpg", "text": "no dets", "ref_id": 9}]
    (tmp_path / "refcoco+_test.json").write_text(json.dumps(albef))
    (tmp_path / "dets.json").write_text(json.dumps({"1": [[10, 20, 30, 40, 0.9, 1], [0, 0, 5, 5, 0.2, 3]],
                                                     "2": [[1, 2, 3, 4]]}))
    out = tmp_path / "out" / "ground.json"
    out.parent.mkdir()
    n = E.convert_refcoco(tmp_path / "refcoco+_test.json", tmp_path / "dets.json", out, refer,
                          image_root=tmp_path / "img")
    got = json.loads(out.read_text())
    assert n == 2 and len(got) == 2  # ref 9's image has no proposals: skipped
    assert got[0] == {"image": "../img/coco/train2014/COCO_train2014_000000000001.jpg", "text": "left guy",
                      "bbox": [10.5, 20.0, 30.0, 40.0], "proposals": [[10, 20, 30, 40], [0, 0, 5, 5]],
                      "split": "testA", "ref_id": 7}
    assert got[1]["bbox"] == [1, 2, 3, 4] and got[1]["split"] == "testB"
    # data.load_grounding reads the output, images resolved against the output's folder.
    e = D.load_grounding(out)[0]
    assert Path(e["image"]).resolve() == (tmp_path / "img/coco/train2014/COCO_train2014_000000000001.jpg").resolve()
    # A refs file that would construct objects (i.e. run code) is refused.
    (refer / "refs(unc).p").write_bytes(pickle.dumps([Path("x")]))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        E.convert_refcoco(tmp_path / "refcoco+_test.json", tmp_path / "dets.json", out, refer)


# ---------------------------------------------------------------------------------------------------
# Checkpoints, distributed evaluation and the CLI on a tiny generated world
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 6-image retrieval set (5 captions each), 5 grounding entries and a random tiny checkpoint."""
    root = tmp_path_factory.mktemp("eval_world")
    D.synth(root / "data", n_train=0, n_test=6, n_ground=5, img_size=32, seed=0, procs=1)
    caps = [c for e in json.loads((root / "data/test.json").read_text()) for c in e["caption"]]
    run = root / "run"
    tok = Tokenizer.train(caps * 3, vocab_size=300)
    tok.save(run / "tokenizer")
    model = tiny_model(vocab_size=tok.vocab_size)
    torch.save({"model": model.state_dict(), "step": 3,
                "config": {"model": dataclasses.asdict(model.cfg), "train": {"tokenizer": "bpe"},
                           "data": {"img_size": 32, "patch_size": 8, "max_len": 24}}}, run / "ckpt_0000003.pt")
    return root


def test_load_model_and_clear_errors(world, tmp_path):
    model, tok, dcfg = E.load_model(world / "run", "cpu")  # a run directory: its newest checkpoint
    assert not model.training and dcfg["max_len"] == 24 and tok.vocab_size == model.cfg.vocab_size
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        E.load_model(tmp_path / "nope.pt", "cpu")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt.*train.py"):
        E.load_model(tmp_path / "notes.pt", "cpu")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*not a nanoSIMLA checkpoint"):
        E.load_model(tmp_path / "other.pt", "cpu")


def _worker(rank, world_size, init, world, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world_size)
    model, tok, _ = E.load_model(world / "run", "cpu")
    m = E.evaluate_retrieval(model, tok, world / "data/test.json", 32, 24, "cpu", k=4, batch_size=4,
                             save_scores=out / f"scores{world_size}.npz")
    m |= E.evaluate_grounding(model, tok, world / "data/grounding_test.json", 32, 24, "cpu", batch_size=2)
    if rank == 0:
        (out / f"metrics{world_size}.json").write_text(json.dumps(m))
    dist.destroy_process_group()


def test_two_process_gloo_matches_one_process(world, tmp_path):
    """Uneven shards (6 images, 30 captions, 5 grounding entries over 2 ranks) gather to the same result."""
    mp.spawn(_worker, args=(2, tmp_path / "init", world, tmp_path), nprocs=2, join=True)
    model, tok, _ = E.load_model(world / "run", "cpu")
    one = E.evaluate_retrieval(model, tok, world / "data/test.json", 32, 24, "cpu", k=4, batch_size=4,
                               save_scores=tmp_path / "scores1.npz")
    one |= E.evaluate_grounding(model, tok, world / "data/grounding_test.json", 32, 24, "cpu", batch_size=2)
    two = json.loads((tmp_path / "metrics2.json").read_text())
    assert two.keys() == one.keys() and all(two[k] == pytest.approx(one[k]) for k in one)
    s1, s2 = np.load(tmp_path / "scores1.npz"), np.load(tmp_path / "scores2.npz")
    for key in ("i2t", "t2i"):
        assert s1[key].shape == s2[key].shape and np.allclose(s1[key], s2[key], atol=1e-4)
    assert s1["i2t"].shape == (6, 30) and (s1["i2t"] == E.FLOOR).sum(1).tolist() == [26] * 6


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    return r


def test_cli_end_to_end(world, tmp_path):
    r = run_cli("--ckpt", world / "run/ckpt_0000003.pt", "--data", world / "data/test.json", "--k", 8,
                "--vis", tmp_path / "vis", "--save-scores", tmp_path / "s.npz", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(m) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean"}
    assert "R@1" in r.stdout and 0 <= m["r_mean"] <= 100
    s = np.load(tmp_path / "s.npz")
    assert s["i2t"].shape == (6, 30) and s["t2i"].shape == (30, 6) and s["txt2img"].tolist() == sorted(s["txt2img"])

    r = run_cli("--ckpt", world / "run", "--data", world / "data/grounding_test.json", "--task", "grounding",
                "--vis", tmp_path / "vis", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(m) == {"grounding_acc"} and 0 <= m["grounding_acc"] <= 100
    from PIL import Image
    for name in ("retrieval.png", "grounding.png"):
        with Image.open(tmp_path / "vis" / name) as im:
            assert im.width > 100 and im.height > 50

    r = run_cli("--ckpt", tmp_path / "missing.pt", "--data", world / "data/test.json")
    assert r.returncode != 0 and "missing.pt" in r.stderr and "Traceback" not in r.stderr


def test_summarize_groups_seeds_and_averages_the_last_eval(tmp_path):
    """`eval.py summarize`: NAME_s<seed> runs are grouped by NAME; the LAST eval line of each counts."""
    for name, r1s in (("albef_s0", (1.0, 4.0)), ("albef_s1", (2.0, 6.0)), ("itc_s0", (0.5, 3.0))):
        run = tmp_path / name
        run.mkdir()
        lines = [{"config": {}}, {"step": 1, "loss": 2.0}] + [
            {"step": 10 * (i + 1), "eval": {"tr_r1": v, "ir_r1": v, "r_mean": v, "grounding_acc": 30.0}}
            for i, v in enumerate(r1s)]
        (run / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text(json.dumps({"config": {}}) + "\n")
    rows = E.summarize([str(p) for p in tmp_path.iterdir()])
    assert set(rows) == {"albef", "itc"}
    assert rows["albef"]["seeds"] == 2 and rows["albef"]["tr_r1"] == (5.0, 1.0)  # mean, std of 4 and 6
    assert rows["itc"]["r_mean"] == (3.0, 0.0)
    assert "| albef | 2 | 5.0 ± 1.0" in E.summary_table(rows)
    E.draw_summary(tmp_path / "plot.png", rows)
    from PIL import Image
    assert Image.open(tmp_path / "plot.png").size[0] > 0
