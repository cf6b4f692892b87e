"""Evaluate a SIMLA checkpoint: image-text retrieval and weakly-supervised grounding.

    python eval.py --ckpt runs/default --data data/synth/test.json --task retrieval [--k 128] [--itc-only]
    python eval.py --ckpt runs/default/ckpt_0001500.pt --data data/synth/grounding_test.json --task grounding
    torchrun --nproc_per_node=8 eval.py ...        # every rank takes a shard, results are gathered
    python eval.py refcoco-convert --refcoco refcoco+_test.json --dets dets.json --refer-dir refcoco+
        --image-root coco/images --out refcoco+_test_ground.json      # ALBEF's RefCOCO+ -> our format

Both protocols are SIMLA.md, "Evaluation protocols" (they are ALBEF's):
- retrieval: ITC similarity for all pairs, then the top k candidates of every query re-scored with the
  ITM positive logit, everything else set to a floor; TR@K / IR@K / r_mean with several captions per image.
- grounding: Grad-CAM of one cross-attention layer w.r.t. the ITM positive logit; each proposal box is
  scored by heat-map mass / sqrt(area); the top box is correct when IoU >= 0.5 with the true box.
A readable table goes to stdout, and its LAST line is one JSON object of the metrics (percentages).
Evaluation runs in fp32 even on GPUs: bf16 rounds scores into ties that reorder the rankings.
"""
import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data as D
from kernels import all_gather_nograd
from model import SIMLA, ModelConfig
from tokenizer import Tokenizer, get_tokenizer

FLOOR = -100.0  # score of every pair outside a query's top k (ALBEF's fill value)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: train.py writes {"model": state_dict, "config": {"model", "train", "data"}, "step", ...}
# and the tokenizer into <run dir>/tokenizer. weights_only=True: loading a checkpoint never runs code.
# ---------------------------------------------------------------------------------------------------
def load_model(ckpt_path, device):
    """ckpt_*.pt file (or a run directory: its newest one) -> (model in eval mode, tokenizer, data cfg dict)."""
    path = Path(ckpt_path)
    if path.is_dir():
        found = sorted(path.glob("ckpt_*.pt"))
        if not found:
            raise FileNotFoundError(f"no ckpt_*.pt in {path}: pass a checkpoint file or a train.py run directory")
        path = found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a ckpt_*.pt file written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # (torch's unpickling message suggests weights_only=False: not for us)
        why = type(e).__name__ if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {str(e)[:150]}"
        raise ValueError(f"{path} is not a readable checkpoint ({why}); "
                         f"pass a ckpt_*.pt file written by train.py") from e
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise ValueError(f"{path} is not a nanoSIMLA checkpoint (no 'model' and 'config' entries); "
                         f"pass a ckpt_*.pt file written by train.py")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in ckpt["config"]["model"].items() if k in known})
    model = SIMLA(dataclasses.replace(cfg, grad_ckpt=False))  # eval keeps no activations to save
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model config stored in it ({str(e)[:300]})") from e
    # The tokenizer lives beside the checkpoint; "gpt2" runs save none (tiktoken has it).
    tok_dir = path.parent / "tokenizer"
    try:
        tok = Tokenizer.load(tok_dir) if tok_dir.is_dir() else \
            get_tokenizer(ckpt["config"].get("train", {}).get("tokenizer", "bpe"), tok_dir)
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(f"no tokenizer for {path}: expected train.py's {tok_dir} ({e})") from e
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer in {tok_dir} has {tok.vocab_size} ids, the model {cfg.vocab_size}")
    return model.to(device).eval(), tok, dict(ckpt["config"].get("data", {}))


@contextmanager
def eval_mode(model):
    """model.eval() (restored afterwards: train.py evaluates mid-run), and fp32 even inside an autocast."""
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(next(model.parameters()).device.type, enabled=False):
            yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------
# Distributed evaluation (the official code runs it on rank 0 only, SIMLA.md "defects"): each rank
# takes a contiguous shard; shards are padded to equal length for all_gather, the padding cut after.
# ---------------------------------------------------------------------------------------------------
def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def shard(n):
    """This rank's contiguous range of 0..n-1; all shards have ceil(n / world) items but the last ones."""
    rank, world = rank_world()
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def gather_rows(x, n):
    """This rank's shard rows (n_r, ...) -> all n rows (n, ...) in order, on every rank."""
    world = rank_world()[1]
    if world == 1:
        return x
    per = -(-n // world)
    pad = x.new_zeros((per - x.shape[0], *x.shape[1:]))
    return all_gather_nograd(torch.cat([x, pad]))[:n]  # only trailing shards are short, so [:n] is exact


def load_images(paths, size):
    """Load and eval-transform images (PIL decoding releases the GIL, so threads overlap the files)."""
    with ThreadPoolExecutor(8) as pool:
        imgs = list(pool.map(D.load_image, paths))
    return imgs, torch.stack([D.eval_transform(im, size) for im in imgs])  # (B, 3, S, S)


# ---------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------
def itm_logits(model, image_embeds, ids, mask):
    """ITM positive logit of P (image, text) pairs: image_embeds (P, 1 + N, C), ids/mask (P, T) -> (P,)."""
    hidden = model.fuse(ids, mask, image_embeds)[0]  # (P, T, C), text->image mode
    return model.itm_head(hidden[:, 0])[:, 1]


@torch.no_grad()
def itm_rerank(model, sim, k, image_embeds, ids, mask, batch_size, images_are_queries):
    """Re-score each query row's top-k ITC candidates with ITM; all other entries get FLOOR.
    sim (Q, K) ITC scores -> (Q, K). Rows are split over ranks, and gathered back."""
    k = min(k, sim.shape[1])
    rows = shard(sim.shape[0])
    top = sim[rows.start:rows.stop].topk(k, dim=1).indices  # (R, k) candidates of this rank's queries
    query = torch.arange(rows.start, rows.stop, device=sim.device).repeat_interleave(k)  # (R * k,)
    cand = top.flatten()
    img, txt = (query, cand) if images_are_queries else (cand, query)
    scores = [itm_logits(model, image_embeds[img[s:s + batch_size]], ids[txt[s:s + batch_size]],
                         mask[txt[s:s + batch_size]]) for s in range(0, len(query), batch_size)]
    out = torch.full((len(rows), sim.shape[1]), FLOOR, device=sim.device)
    if scores:
        out.scatter_(1, top, torch.cat(scores).view(len(rows), k))
    return gather_rows(out, sim.shape[0])


@torch.no_grad()
def retrieval_scores(model, tokenizer, image_paths, captions, img_size, max_len, device, k=128,
                     itc_only=False, batch_size=64):
    """-> (i2t (images, texts), t2i (texts, images)) score matrices, identical on every rank."""
    cfg, device = model.cfg, torch.device(device)
    ids, mask = (t.to(device) for t in tokenizer(captions, max_len))  # (T_all, L): cheap, every rank
    # Text features for this rank's shard of captions, in batches (text mode: no image involved).
    t_rows, txt_feat = shard(len(captions)), [torch.empty(0, cfg.embed_dim, device=device)]
    for s in range(t_rows.start, t_rows.stop, batch_size):
        e = min(s + batch_size, t_rows.stop)
        txt_feat.append(model.text_feat(model.encode_text(ids[s:e], mask[s:e])))
    txt_feat = gather_rows(torch.cat(txt_feat), len(captions))  # (n_txt, E)
    # Image features AND the full token sequences: ITM re-ranking needs any image as memory later.
    n_tok = (img_size // cfg.patch_size) ** 2 + 1
    i_rows = shard(len(image_paths))
    img_feat = [torch.empty(0, cfg.embed_dim, device=device)]
    img_emb = [torch.empty(0, n_tok, cfg.width, device=device)]
    for s in range(i_rows.start, i_rows.stop, batch_size):
        images = load_images(image_paths[s:min(s + batch_size, i_rows.stop)], img_size)[1].to(device)
        emb = model.encode_image(images)  # (B, 1 + N, C)
        img_feat.append(model.image_feat(emb))
        img_emb.append(emb)
    img_feat = gather_rows(torch.cat(img_feat), len(image_paths))  # (n_img, E)
    img_emb = gather_rows(torch.cat(img_emb), len(image_paths))    # (n_img, 1 + N, C)

    sim = img_feat @ txt_feat.t()  # (n_img, n_txt); the temperature does not change any ranking
    if itc_only:
        return sim, sim.t()
    i2t = itm_rerank(model, sim, k, img_emb, ids, mask, batch_size, images_are_queries=True)
    t2i = itm_rerank(model, sim.t(), k, img_emb, ids, mask, batch_size, images_are_queries=False)
    return i2t, t2i


def recall_metrics(i2t, t2i, txt2img, img2txt):
    """TR@K: % of images whose best-ranked true caption is in their top K; IR@K: % of captions whose
    image is in their top K; r_mean: the mean of the six (SIMLA.md). Ties rank the lower index first."""
    i2t, t2i = (np.asarray(x.cpu() if torch.is_tensor(x) else x) for x in (i2t, t2i))
    n_img, n_txt = i2t.shape
    order = np.argsort(-i2t, axis=1, kind="stable")  # (n_img, n_txt): texts best-first for each image
    rank_of = np.empty_like(order)                   # rank_of[i, j] = position of text j for image i
    np.put_along_axis(rank_of, order, np.broadcast_to(np.arange(n_txt), order.shape), axis=1)
    tr = np.array([rank_of[i, list(gts)].min() for i, gts in enumerate(img2txt)])  # best true caption
    order = np.argsort(-t2i, axis=1, kind="stable")  # (n_txt, n_img)
    ir = (order == np.asarray(txt2img)[:, None]).argmax(axis=1)  # position of the caption's image
    m = {f"tr_r{k}": 100.0 * float((tr < k).mean()) for k in (1, 5, 10)}
    m |= {f"ir_r{k}": 100.0 * float((ir < k).mean()) for k in (1, 5, 10)}
    m["r_mean"] = sum(m.values()) / 6
    return m


def evaluate_retrieval(model, tokenizer, data_path, img_size, max_len, device, k=128, itc_only=False,
                       batch_size=64, vis_dir=None, save_scores=None):
    """Retrieval on a data.load_retrieval file -> {tr_r1, tr_r5, tr_r10, ir_r1, ir_r5, ir_r10, r_mean}.
    Call on EVERY rank under torchrun (collectives inside); pass the raw model, not the DDP wrapper."""
    image_paths, captions, txt2img, img2txt = D.load_retrieval(data_path)
    with eval_mode(model):
        i2t, t2i = retrieval_scores(model, tokenizer, image_paths, captions, img_size, max_len, device, k,
                                    itc_only, batch_size)
    metrics = recall_metrics(i2t, t2i, txt2img, img2txt)
    if rank_world()[0] == 0:
        if save_scores:
            np.savez(save_scores, i2t=i2t.cpu().numpy(), t2i=t2i.cpu().numpy(), txt2img=np.asarray(txt2img))
        if vis_dir:
            draw_retrieval(Path(vis_dir) / "retrieval.png", t2i.cpu(), image_paths, captions, txt2img, img2txt)
    return metrics


# ---------------------------------------------------------------------------------------------------
# Grounding: Grad-CAM on the text->image cross-attention (SIMLA.md; ALBEF's "itm" gradcam mode)
# ---------------------------------------------------------------------------------------------------
def default_layer(text_layers):
    """The paper reads layer index 8 of 12; scaled to the depth of this stack."""
    return min(text_layers - 1, round(8 / 12 * text_layers))


def gradcam(model, ids, mask, image_embeds, layer):
    """-> (B, N) patch relevance: cross-attention probs * clamp(d ITM_pos / d probs, min 0), averaged over
    heads and the real (non-padding) text tokens, image CLS key dropped. Only the probs get a gradient."""
    with torch.enable_grad():
        # requires_grad on the input keeps the probs in a graph even if the weights are frozen.
        image_embeds = image_embeds.detach().requires_grad_(True)
        hidden, _, probs = model.fuse(ids, mask, image_embeds, probs_layer=layer)  # probs (B, H, T, 1 + N)
        logit = model.itm_head(hidden[:, 0])[:, 1]
        # Samples do not interact, so the gradient of the sum is each sample's own gradient.
        (grad,) = torch.autograd.grad(logit.sum(), probs)
    cam = (probs.detach() * grad.clamp(min=0)).mean(dim=1)  # (B, T, 1 + N), heads averaged
    w = mask.float()[:, :, None]                            # (B, T, 1)
    cam = (cam * w).sum(dim=1) / w.sum(dim=1)               # (B, 1 + N), real tokens averaged
    return cam[:, 1:]                                       # (B, N), CLS key dropped


def heatmap(cam, height, width):
    """(N,) patch relevance -> (height, width) map over the ORIGINAL image. eval_transform resizes the
    whole image to the square input, so the patch grid spans the whole original image: upsampling the
    grid straight to the original size undoes the eval resize and boxes stay in original pixels."""
    g = math.isqrt(cam.numel())
    grid = cam.float().view(1, 1, g, g)  # (1, 1, g, g)
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def box_scores(heat, boxes):
    """Score [x, y, w, h] boxes by heat mass inside / sqrt(area) (ALBEF: area ** 0.5), which favours a
    tight box over a huge one that contains the same mass. -> (P,) tensor; empty boxes get -inf."""
    out = []
    for x, y, w, h in (b[:4] for b in boxes):
        inside = heat[max(0, int(y)):max(0, int(y + h)), max(0, int(x)):max(0, int(x + w))]
        out.append(inside.sum().item() / math.sqrt(w * h) if w > 0 and h > 0 else -math.inf)
    return torch.tensor(out)


def iou(a, b):
    """Intersection over union of two [x, y, w, h] boxes (continuous coordinates)."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - iw * ih
    return iw * ih / union if union > 0 else 0.0


def evaluate_grounding(model, tokenizer, data_path, img_size, max_len, device, layer=None, vis_dir=None,
                       limit=None, batch_size=32):
    """Grounding accuracy (% top proposals with IoU >= 0.5) on a data.load_grounding file ->
    {"grounding_acc": ...} (+ grounding_acc_<split> when entries carry a "split"). Every rank calls it."""
    entries = D.load_grounding(data_path)[:limit]
    layer = default_layer(model.cfg.text_layers) if layer is None else layer
    rows, correct, shown = shard(len(entries)), [], []
    with eval_mode(model):
        for s in range(rows.start, rows.stop, batch_size):
            batch = entries[s:min(s + batch_size, rows.stop)]
            pil, images = load_images([e["image"] for e in batch], img_size)
            ids, mask = (t.to(device) for t in tokenizer([e["text"] for e in batch], max_len))
            with torch.no_grad():
                image_embeds = model.encode_image(images.to(device))  # (B, 1 + N, C)
            cams = gradcam(model, ids, mask, image_embeds, layer)   # (B, N)
            for e, im, cam in zip(batch, pil, cams):
                heat = heatmap(cam, im.height, im.width)  # PIL size is (width, height)
                best = e["proposals"][int(box_scores(heat, e["proposals"]).argmax())]
                correct.append(float(iou(best[:4], e["bbox"]) >= 0.5))
                if len(shown) < 8:
                    shown.append((im, heat.cpu(), best[:4], e["bbox"], e["text"]))
    correct = gather_rows(torch.tensor(correct, device=device).view(-1, 1), len(entries)).view(-1).cpu()
    metrics = {"grounding_acc": 100.0 * correct.mean().item() if len(entries) else 0.0}
    for split in sorted({e["split"] for e in entries if "split" in e}):
        sel = torch.tensor([e.get("split") == split for e in entries])
        metrics[f"grounding_acc_{split}"] = 100.0 * correct[sel].mean().item()
    if vis_dir and rank_world()[0] == 0 and shown:
        draw_grounding(Path(vis_dir) / "grounding.png", shown)
    return metrics


# ---------------------------------------------------------------------------------------------------
# RefCOCO+ adapter. ALBEF ships refcoco+_{val,test}.json = [{"image", "text", "ref_id", ...}] and
# dets.json = {str(image_id): [[x, y, w, h, ...], ...]} (MAttNet proposals); the true box of a ref is
# in the REFER annotation folder: refs(unc).p (ref_id -> ann_id, split) + instances.json (ann bbox).
# ---------------------------------------------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # refs(unc).p holds only lists/dicts/strings/numbers
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a REFER refs file holds plain data only")


def convert_refcoco(refcoco_json, dets_json, out_json, refer_dir, image_root=None):
    """Write our grounding JSON ({image, text, bbox, proposals, split, ref_id} list) -> entries written.
    image_root: where ALBEF's "image" paths start (default: the output JSON's folder)."""
    refer_dir, out_dir = Path(refer_dir), Path(out_json).resolve().parent
    refs_file = next((p for p in (refer_dir / "refs(unc).p", refer_dir / "refs(unc).json") if p.is_file()), None)
    if refs_file is None:
        raise FileNotFoundError(f"no refs(unc).p in {refer_dir}: pass REFER's refcoco+ folder as --refer-dir")
    with open(refs_file, "rb") as f:
        refs = json.load(f) if refs_file.suffix == ".json" else _PlainUnpickler(f, encoding="latin1").load()
    boxes = {a["id"]: a["bbox"] for a in json.loads((refer_dir / "instances.json").read_text())["annotations"]}
    refs = {r["ref_id"]: r for r in refs}
    dets = json.loads(Path(dets_json).read_text())
    root = Path(image_root).resolve() if image_root else out_dir
    out, skipped = [], 0
    for e in json.loads(Path(refcoco_json).read_text()):
        ref = refs[e["ref_id"]]
        proposals = [d[:4] for d in dets.get(str(ref["image_id"]), [])]
        if not proposals:  # nothing to rank (ALBEF would crash here)
            skipped += 1
            continue
        out.append({"image": os.path.relpath(root / e["image"], out_dir), "text": e["text"],
                    "bbox": boxes[ref["ann_id"]], "proposals": proposals, "split": ref["split"],
                    "ref_id": e["ref_id"]})
    Path(out_json).write_text(json.dumps(out))
    if skipped:
        print(f"convert_refcoco: skipped {skipped} entries whose image has no proposals in {dets_json}")
    return len(out)


# ---------------------------------------------------------------------------------------------------
# Pictures (PIL only) and the table
# ---------------------------------------------------------------------------------------------------
def _jet(h):
    """(H, W) in [0, 1] -> (H, W, 3) uint8, blue (cold) to red (hot)."""
    rgb = np.clip(1.5 - np.abs(4 * h[..., None] - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (255 * rgb).astype(np.uint8)


def _text_cell(text, size):
    cell = Image.new("RGB", size, "white")
    ImageDraw.Draw(cell).multiline_text((4, 4), "\n".join(textwrap.wrap(text, 28)[:8]), fill="black")
    return cell


def _tile(cells, cols):
    w, h = cells[0].size
    rows = -(-len(cells) // cols)
    canvas = Image.new("RGB", (cols * w, rows * h), "white")
    for i, c in enumerate(cells):
        canvas.paste(c, ((i % cols) * w, (i // cols) * h))
    return canvas


def draw_grounding(path, shown, size=192):
    """Heat map over each image, chosen box green, true box red, the expression below."""
    cells = []
    for im, heat, pred, true, text in shown:
        h = heat.numpy() / max(float(heat.max()), 1e-12)
        over = Image.blend(im.convert("RGB"), Image.fromarray(_jet(h)), 0.45).resize((size, size))
        sx, sy = size / im.width, size / im.height
        draw = ImageDraw.Draw(over)
        for (x, y, w, hh), color in ((true, "red"), (pred, "lime")):
            draw.rectangle([x * sx, y * sy, (x + w) * sx, (y + hh) * sy], outline=color, width=2)
        cell = Image.new("RGB", (size, size + 40), "white")
        cell.paste(over, (0, 0)), cell.paste(_text_cell(text, (size, 40)), (0, size))
        cells.append(cell)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _tile(cells, cols=4).save(path)


def draw_retrieval(path, t2i, image_paths, captions, txt2img, img2txt, n=4, size=96):
    """One row per query caption: the caption, then its top-5 images; the true image framed green."""
    cells = []
    for i in np.linspace(0, len(img2txt) - 1, min(n, len(img2txt))).astype(int):  # queries spread out
        j = img2txt[i][0]
        strip = Image.new("RGB", (7 * size, size), "white")
        strip.paste(_text_cell(captions[j], (2 * size, size)), (0, 0))
        draw = ImageDraw.Draw(strip)
        for q, r in enumerate(t2i[j].topk(min(5, t2i.shape[1])).indices.tolist()):
            x = (2 + q) * size
            strip.paste(D.load_image(image_paths[r]).resize((size - 8, size - 8)), (x + 4, 4))
            draw.rectangle([x, 0, x + size - 1, size - 1], width=4, outline="lime" if r == txt2img[j] else "gray")
        cells.append(strip)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _tile(cells, cols=1).save(path)


def format_table(metrics):
    """Human-readable table of whatever metrics are present."""
    lines = []
    if "r_mean" in metrics:
        lines += [f"{'retrieval':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
        for name, p in (("text (TR)", "tr"), ("image (IR)", "ir")):
            lines += [f"{name:<12}" + "".join(f"{metrics[f'{p}_r{k}']:>8.2f}" for k in (1, 5, 10))]
        lines += [f"{'r_mean':<12}{metrics['r_mean']:>8.2f}"]
    lines += [f"{k:<24}{v:>8.2f}" for k, v in metrics.items() if k.startswith("grounding_acc")]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def convert_main(argv):
    p = argparse.ArgumentParser(prog="eval.py refcoco-convert", description=convert_refcoco.__doc__)
    p.add_argument("--refcoco", required=True, help="ALBEF's refcoco+_val.json or refcoco+_test.json")
    p.add_argument("--dets", required=True, help="ALBEF's dets.json (image_id -> proposal boxes)")
    p.add_argument("--refer-dir", required=True, help="REFER's refcoco+ folder: refs(unc).p + instances.json")
    p.add_argument("--image-root", default=None, help="folder the 'image' paths start from (COCO images)")
    p.add_argument("--out", required=True, help="grounding JSON to write")
    a = p.parse_args(argv)
    print(f"wrote {convert_refcoco(a.refcoco, a.dets, a.out, a.refer_dir, a.image_root)} entries to {a.out}")


# ---------------------------------------------------------------------------------------------------
# Ablation summary: `python eval.py summarize runs/abl/* --plot ablation.png` reads each run's final
# metrics from its log.jsonl, groups runs by name without the trailing "_s<seed>", and reports
# mean +- std over seeds (README, "Does XMM + PSL help?").
# ---------------------------------------------------------------------------------------------------
def summarize(run_dirs, keys=("tr_r1", "ir_r1", "r_mean", "grounding_acc")):
    groups = {}
    for run in sorted(run_dirs):
        evals = [json.loads(line) for line in open(os.path.join(run, "log.jsonl")) if '"eval"' in line]
        if evals:
            name = re.sub(r"_s\d+$", "", os.path.basename(os.path.normpath(run)))
            groups.setdefault(name, []).append(evals[-1]["eval"])
    rows = {}
    for name, ms in groups.items():
        rows[name] = {k: (float(np.mean([m.get(k, np.nan) for m in ms])), float(np.std([m.get(k, np.nan) for m in ms])))
                      for k in keys}
        rows[name]["seeds"] = len(ms)
    return rows


def summary_table(rows, keys=("tr_r1", "ir_r1", "r_mean", "grounding_acc")):
    lines = ["| run | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['seeds']} | " + " | ".join(f"{r[k][0]:.1f} ± {r[k][1]:.1f}" for k in keys) + " |")
    return "\n".join(lines)


def draw_summary(path, rows, key="r_mean", width=560, bar=26):
    """Horizontal bars of `key` (mean, with a +-std whisker), PIL only."""
    top = max(max(r[key][0] + r[key][1] for r in rows.values()), 1e-6)
    img = Image.new("RGB", (width, 40 + bar * len(rows) * 3 // 2), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"{key} (mean over seeds, whisker = std)", fill="black")
    for i, (name, r) in enumerate(rows.items()):
        y, (mean, std) = 34 + i * bar * 3 // 2, r[key]
        x0, scale = 200, (width - 260) / top
        d.text((10, y + 6), name[:30], fill="black")
        d.rectangle([x0, y, x0 + mean * scale, y + bar], fill=(70, 130, 180))
        d.line([x0 + (mean - std) * scale, y + bar // 2, x0 + (mean + std) * scale, y + bar // 2], fill="black", width=2)
        d.text((x0 + mean * scale + 6, y + 6), f"{mean:.1f}", fill="black")
    img.save(path)


def summarize_main(argv):
    p = argparse.ArgumentParser(description="tabulate the final metrics of several runs (mean +- std over seeds)")
    p.add_argument("runs", nargs="+", help="run directories; NAME_s<seed> folders are grouped by NAME")
    p.add_argument("--plot", default=None, help="write a bar chart of r_mean here (PNG)")
    a = p.parse_args(argv)
    rows = summarize(a.runs)
    if not rows:
        sys.exit("eval.py summarize: no run with an evaluation in its log.jsonl")
    print(summary_table(rows))
    if a.plot:
        draw_summary(a.plot, rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["refcoco-convert"]:
        return convert_main(argv[1:])
    if argv[:1] == ["summarize"]:
        return summarize_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ckpt_*.pt written by train.py, or its run directory (newest)")
    p.add_argument("--data", required=True, help="retrieval or grounding JSON (data.py formats)")
    p.add_argument("--task", choices=["retrieval", "grounding"], default="retrieval")
    p.add_argument("--k", type=int, default=128, help="ITM re-rank depth (paper: 256 COCO, 128 Flickr)")
    p.add_argument("--itc-only", action="store_true", help="skip the ITM re-rank (fast, lower numbers)")
    p.add_argument("--batch-size", type=int, default=64, help="images / texts / pairs per forward")
    p.add_argument("--layer", type=int, default=None, help="Grad-CAM layer (default: index 8 of 12, scaled)")
    p.add_argument("--limit", type=int, default=None, help="grounding: only the first N entries")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the checkpoint's)")
    p.add_argument("--vis", default=None, metavar="DIR", help="write retrieval.png / grounding.png here")
    p.add_argument("--save-scores", default=None, metavar="FILE.npz", help="retrieval: save i2t, t2i, txt2img")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)

    device = a.device
    if "RANK" in os.environ:  # torchrun: one process per device
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if device.startswith("cuda") else device
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:  # a wrong path or file: one line naming it, not a traceback
        model, tok, dcfg = load_model(a.ckpt, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"eval.py: {e}")
    try:
        img_size = a.img_size or dcfg.get("img_size", model.cfg.img_size)
        max_len = dcfg.get("max_len", model.cfg.max_len)
        if a.task == "retrieval":
            metrics = evaluate_retrieval(model, tok, a.data, img_size, max_len, device, k=a.k, itc_only=a.itc_only,
                                         batch_size=a.batch_size, vis_dir=a.vis, save_scores=a.save_scores)
        else:
            metrics = evaluate_grounding(model, tok, a.data, img_size, max_len, device, layer=a.layer,
                                         vis_dir=a.vis, limit=a.limit, batch_size=a.batch_size)
    except (FileNotFoundError, D.DataError, D.BadSample) as e:
        sys.exit(f"eval.py: {e}")
    if rank_world()[0] == 0:
        print(format_table(metrics))
        print(json.dumps(metrics), flush=True)  # the last stdout line: machine-readable
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
