"""Data for nanoSIMLA: a synthetic world, dataset readers, augmentation, masking and the loader.

Read top to bottom:
  1. The synthetic world (`python data.py synth --out DIR`): scenes of coloured shapes written as PNG
     files + the same JSON formats as real datasets, so the default run exercises the real loading path.
  2. Readers: ALBEF/BLIP JSON, JSONL, CSV/TSV, webdataset tar shards; retrieval and grounding test sets.
  3. Images without torchvision: robust decoding, RandomResizedCrop, flip, CLIP normalisation.
  4. Masking for XMM (SIMLA.md, "Objectives"): MLM token masking, BEiT blockwise patch masking.
  5. Datasets, collate, a resumable sampler and `build_loader`.
A bad sample (missing/corrupt image, empty caption) never stops training: it is replaced, counted and
reported once per epoch; only a bad fraction above `max_bad_frac` stops the run.
"""
import argparse, colorsys, csv, io, json, math, os, re, tarfile, time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from tokenizer import normalize_caption  # lower-case, strip punctuation, <= 30 words (SIMLA's cleaning)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class DataConfig:
    img_size: int = 64
    patch_size: int = 8
    max_len: int = 32              # captions padded/cut to this many tokens: static shapes
    crop_scale: tuple = (0.5, 1.0)  # the paper uses 0.2..1 on COCO/CC; small scenes lose objects below 0.5
    crop_ratio: tuple = (3 / 4, 4 / 3)
    hflip: bool = True             # flip + swap "left"/"right" in the caption, so relations stay true
    mlm_prob: float = 0.15
    mim_ratio: float = 75 / 256    # the paper: 75 of 256 patches
    mim_min_block: int = 16        # the paper's minimum block at 256 patches; scaled to our grid
    workers: int = 0
    max_bad_frac: float = 0.01     # stop the run when more samples than this are unreadable
    image_root: str = ""           # prefix of relative image paths (default: the annotation file's folder)
    image_key: str = "image"       # JSON key / CSV column of the image path
    caption_key: str = "caption"   # JSON key / CSV column of the caption (a string or a list of strings)
    shuffle_buffer: int = 1000     # tar shards: samples held for shuffling within a stream


class DataError(ValueError):
    """Malformed annotations, or too many bad samples: the run must stop with this message."""


class BadSample(Exception):
    """One unusable sample (its message names the file): skipped, counted, reported."""


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


# ---------------------------------------------------------------------------------------------------
# 1. The synthetic world. Every scene is drawn from its own RNG seeded by (seed, split, index), so the
# output is identical for any number of processes. Objects never overlap and no two objects in a scene
# share colour AND shape, so every object has a unique name and every caption names every object:
# a caption then identifies its image, and retrieval needs binding (which colour goes with which shape
# where), not a bag of colours.
# ---------------------------------------------------------------------------------------------------
COLORS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 70),
          "blue": (40, 90, 230), "purple": (150, 60, 200), "pink": (250, 140, 200), "white": (250, 250, 250)}
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "heart"]
SYNONYMS = {"circle": ["circle", "disk"], "square": ["square", "block"], "cross": ["cross", "plus"],
            "diamond": ["diamond", "rhombus"], "small": ["small", "little", "tiny"], "large": ["large", "big"]}
RELATIONS = {"left": ["left of", "to the left of"], "right": ["right of", "to the right of"],
             "above": ["above", "over"], "below": ["below", "under", "beneath"]}
NUMBERS = ["zero", "one", "two", "three", "four"]
N_OBJECTS_P = [0.12, 0.4, 0.38, 0.10]  # P(1..4 objects): mostly 1-3 keeps captions short (< 25 tokens)


def word(rng, w):
    return pick(rng, SYNONYMS.get(w, [w]))


def center(o):
    x, y, w, h = o["bbox"]
    return x + w / 2, y + h / 2


def make_scene(rng, S, n):
    """n non-overlapping objects as dicts {color, shape, size, bbox [x, y, w, h]}; None if they don't fit."""
    objs = []
    for _ in range(200):  # rejection sampling; 4 large objects in a small image may not fit
        if len(objs) == n:
            return objs
        o = {"color": pick(rng, list(COLORS)), "shape": pick(rng, SHAPES), "size": pick(rng, ["small", "large"])}
        side = round(S * (0.2 if o["size"] == "small" else 0.34) * rng.uniform(0.9, 1.1))
        x, y = (int(v) for v in rng.integers(1, S - side, size=2))
        o["bbox"] = [x, y, side, side]
        gap = 2  # boxes at least 2 px apart: no object can hide or touch another
        if all((o["color"], o["shape"]) != (p["color"], p["shape"]) and (
                x >= p["bbox"][0] + p["bbox"][2] + gap or p["bbox"][0] >= x + side + gap or
                y >= p["bbox"][1] + p["bbox"][3] + gap or p["bbox"][1] >= y + side + gap) for p in objs):
            objs.append(o)
    return None


def background(rng, S):
    """Muted solid colour, gentle gradient, or gentle smooth noise: never confusable with a named colour."""
    muted = lambda: np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.65))) * 255
    a, kind = muted(), int(rng.integers(3))
    img = np.broadcast_to(a, (S, S, 3)).copy()
    if kind == 1:
        yy, xx = np.mgrid[0:S, 0:S] / S
        ang = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(ang) + yy * math.sin(ang)
        t = (t - t.min()) / (t.max() - t.min())
        img = a + (muted() - a) * t[..., None]
    elif kind == 2:
        low = torch.from_numpy(rng.normal(0, 12, (1, 3, 4, 4)))  # coarse noise, upsampled = smooth blobs
        img = img + F.interpolate(low, size=(S, S), mode="bilinear")[0].permute(1, 2, 0).numpy()
    return Image.fromarray(np.clip(img + rng.normal(0, 2, (S, S, 3)), 0, 255).astype(np.uint8))


def draw_shape(d, shape, x, y, w, h, col):
    x1, y1, cx, cy = x + w - 1, y + h - 1, x + w / 2, y + h / 2
    if shape == "circle":
        d.ellipse([x, y, x1, y1], fill=col)
    elif shape == "square":  # a little inset: a full-box square looks much bigger than a circle
        d.rectangle([x + w * 0.08, y + h * 0.08, x1 - w * 0.08, y1 - h * 0.08], fill=col)
    elif shape == "triangle":
        d.polygon([(cx, y), (x1, y1), (x, y1)], fill=col)
    elif shape == "diamond":
        d.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=col)
    elif shape == "cross":
        d.rectangle([x + w / 3, y, x1 - w / 3, y1], fill=col)
        d.rectangle([x, y + h / 3, x1, y1 - h / 3], fill=col)
    elif shape == "star":  # 10 vertices alternating between the outer and the inner radius
        d.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for k in range(10)
                   for r, a in [((w / 2 if k % 2 == 0 else w / 5), -math.pi / 2 + k * math.pi / 5)]], fill=col)
    elif shape == "heart":  # two lobes + a triangle down to the tip
        r = w / 4
        d.ellipse([x, y, x + 2 * r, y + 2 * r], fill=col)
        d.ellipse([x1 - 2 * r, y, x1, y + 2 * r], fill=col)
        d.polygon([(x, y + 1.1 * r), (x1, y + 1.1 * r), (cx, y1)], fill=col)


def render(rng, objs, S, ss=4):
    """Draw at ss x the size and box-filter down: anti-aliased edges at 64 px."""
    img = background(rng, S).resize((S * ss, S * ss), Image.NEAREST)
    d = ImageDraw.Draw(img)
    for o in objs:
        col = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLORS[o["color"]])
        draw_shape(d, o["shape"], *[v * ss for v in o["bbox"]], col)
    return img.reduce(ss)


def noun(rng, o, size=False, det="a"):
    words = ([word(rng, o["size"])] if size else []) + [o["color"], word(rng, o["shape"])]
    det = "an" if det == "a" and words[0][0] in "aeiou" else det
    return f"{det} {' '.join(words)}"


def relation(a, b):
    """Where a is relative to b, along the axis on which they are further apart."""
    (ax, ay), (bx, by) = center(a), center(b)
    if abs(bx - ax) >= abs(by - ay):
        return "left" if ax < bx else "right"
    return "above" if ay < by else "below"


def where(o, S):
    cx, cy = center(o)
    col, row = ["left", "", "right"][min(2, int(3 * cx / S))], ["top", "", "bottom"][min(2, int(3 * cy / S))]
    if row and col:
        return f"{'in' if row == 'top' else 'at'} the {row} {col}"
    return f"on the {col}" if col else f"at the {row}" if row else "in the middle"


def and_list(xs):
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def caption(rng, objs, S):
    """One caption naming every object (colour + shape), with sizes, positions or relations as detail."""
    n = len(objs)
    objs = [objs[i] for i in rng.permutation(n)]
    size = rng.random() < [0.6, 0.4, 0.4, 0.0][n - 1]  # 4 objects with sizes would be too long
    nps = [noun(rng, o, size) for o in objs]
    if n == 1:  # position makes single-object captions (56 colour-shape pairs) nearly unique
        w = where(objs[0], S)
        return pick(rng, [f"{nps[0]} {w}", f"there is {nps[0]} {w}", f"one object: {nps[0]} {w}",
                          f"a picture of {nps[0]} {w}", f"{w} there is {nps[0]}"])
    t = int(rng.integers(5))
    xs = sorted(center(o)[0] for o in objs)
    if t == 2 and min(b - a for a, b in zip(xs, xs[1:])) > S * 0.08:  # an unambiguous left-to-right order
        return "from left to right: " + and_list([nps[objs.index(o)] for o in sorted(objs, key=lambda o: center(o)[0])])
    if t == 3 or (t == 4 and n == 4):
        rel = f"{nps[0]} {pick(rng, RELATIONS[relation(objs[0], objs[1])])} {nps[1]}"
        rest = "" if n == 2 else (" and " if n == 3 else ", with ") + and_list(nps[2:])
        return pick(rng, ["", "there is "]) + rel + rest
    if t == 4:  # a chain of relations: "a red circle left of a blue square and a star under the square"
        rel = lambda i, j: pick(rng, RELATIONS[relation(objs[i], objs[j])])
        out = f"{nps[0]} {rel(0, 1)} {nps[1]}"
        return out + (f" and {nps[2]} {rel(2, 1)} {noun(rng, objs[1], det='the')}" if n == 3 else "")
    if t == 1:
        return f"{NUMBERS[n]} {pick(rng, ['objects', 'shapes', 'things'])}: " + and_list(nps)
    return pick(rng, ["", "a picture of ", "an image with ", "a photo of "]) + and_list(nps)


def referring(rng, objs, S):
    """(target, text) where the text picks out exactly one object of the scene."""
    t = pick(rng, objs)
    shape, opts = word(rng, t["shape"]), [f"the {t['color']} {word(rng, t['shape'])}"]
    same = lambda *keys: [o for o in objs if all(o[k] == t[k] for k in keys)]
    if len(same("shape")) == 1:
        opts.append(f"the {shape}")
    if len(same("color")) == 1:
        opts.append(f"the {t['color']} {pick(rng, ['object', 'shape', 'thing'])}")
    if len(same("size", "shape")) == 1:
        opts.append(f"the {word(rng, t['size'])} {shape}")
    sides = [("on the left", 0, -1), ("on the right", 0, 1), ("at the top", 1, -1), ("at the bottom", 1, 1)]
    for side, axis, sign in sides:  # "the star on the left": the target is clearly the extreme one
        vals = sorted(sign * center(o)[axis] for o in same("shape"))
        if len(vals) > 1 and sign * center(t)[axis] == vals[-1] and vals[-2] < vals[-1] - S * 0.1:
            opts.append(f"the {word(rng, t['size']) + ' ' if rng.random() < 0.5 else ''}{shape} {side}")
    return t, pick(rng, opts)


def iou(a, b):
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


def synth_one(args):
    out, split, i, S, seed = args
    rng = np.random.default_rng([seed, ["train", "test", "ground"].index(split), i])
    p = [0, 0.45, 0.4, 0.15] if split == "ground" else N_OBJECTS_P  # grounding needs >= 2 objects
    objs = None
    while objs is None:
        objs = make_scene(rng, S, int(rng.choice(4, p=p)) + 1)
    rel = f"images/{split}/{i:06d}.png"
    render(rng, objs, S).save(os.path.join(out, rel))
    if split != "ground":
        k, caps = (5 if split == "test" else int(rng.integers(3, 6))), []
        for _ in range(100):  # distinct captions
            c = caption(rng, objs, S)
            caps += [c] if c not in caps else []
            if len(caps) == k:
                break
        return {"image": rel, "caption": caps, "objects": objs}
    target, text = referring(rng, objs, S)
    boxes = [o["bbox"] for o in objs]
    while len(boxes) < len(objs) + 3:  # distractor proposals that cannot count as a hit (IoU < 0.3)
        s = int(rng.integers(S // 7, S // 2))
        b = [int(v) for v in rng.integers(0, S - s, size=2)] + [s, s]
        boxes += [b] if all(iou(b, o["bbox"]) < 0.3 for o in objs) else []
    return {"image": rel, "text": text, "bbox": target["bbox"],
            "proposals": [boxes[j] for j in rng.permutation(len(boxes))], "objects": objs}


def synth(out_dir, n_train=20000, n_test=1000, n_ground=1000, img_size=64, seed=0, procs=2):
    """Write the synthetic world; returns {json file name: number of entries}."""
    out, counts = Path(out_dir), {}
    for split, n, name in [("train", n_train, "train.json"), ("test", n_test, "test.json"),
                           ("ground", n_ground, "grounding_test.json")]:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        tasks = [(str(out), split, i, img_size, seed) for i in range(n)]
        if procs > 1:
            with Pool(procs) as pool:
                entries = pool.map(synth_one, tasks, chunksize=256)  # ordered: same JSON for any procs
        else:
            entries = [synth_one(t) for t in tasks]
        (out / name).write_text(json.dumps(entries))
        counts[name] = len(entries)
    return counts


# ---------------------------------------------------------------------------------------------------
# 2. Readers. Every reader turns its format into items (absolute image path, [captions]), grouped by
# image. Errors in the annotation file itself are fatal and name the file and line.
# ---------------------------------------------------------------------------------------------------
def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno} column {e.colno}: malformed JSON ({e.msg})") from None


def read_annotations(path, cfg):
    """ALBEF/BLIP JSON list, JSONL, CSV or TSV -> [(image path, [captions])], one item per image."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: malformed JSON ({e.msg})") from None
    elif ext in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
    else:
        rows = read_json(path)
    root, items = Path(cfg.image_root) if cfg.image_root else path.parent, {}
    for n, r in enumerate(rows):
        if not isinstance(r, dict) or cfg.image_key not in r or cfg.caption_key not in r:
            raise DataError(f"{path}: entry {n} needs the keys {cfg.image_key!r} and {cfg.caption_key!r}, "
                            f"got {r!r:.200}")
        caps = r[cfg.caption_key]
        items.setdefault(str(root / r[cfg.image_key]), []).extend(caps if isinstance(caps, list) else [caps])
    return list(items.items())


def load_retrieval(path, image_root=None):
    """A test set with one entry per image and a list of captions -> (image_paths, captions,
    txt2img: image index of each caption, img2txt: caption indices of each image)."""
    root, paths, caps, txt2img, img2txt = Path(image_root or Path(path).parent), [], [], [], []
    for i, e in enumerate(read_json(path)):
        paths.append(str(root / e["image"]))
        cs = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        img2txt.append(list(range(len(caps), len(caps) + len(cs))))
        caps += cs
        txt2img += [i] * len(cs)
    return paths, caps, txt2img, img2txt


def load_grounding(path, image_root=None):
    """Entries {image, text, bbox [x, y, w, h], proposals [[x, y, w, h], ...]}, image made absolute."""
    root = Path(image_root or Path(path).parent)
    return [dict(e, image=str(root / e["image"])) for e in read_json(path)]


def expand_braces(pattern):
    """"shard-{000..009}.tar" -> ten names (zero-padding kept); "{a,b}" -> two; nested/several work."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m[1])
    parts = [str(i).zfill(len(r[1])) for i in range(int(r[1]), int(r[2]) + 1)] if r else m[1].split(",")
    return [p for part in parts for p in expand_braces(pattern[:m.start()] + part + pattern[m.end():])]


def iter_tar(path):
    """Yield (key, {extension: bytes}) per sample of a webdataset shard. As in webdataset, a sample's
    files are consecutive members whose key is the path up to the first dot of the file name."""
    key, files = None, {}
    with tarfile.open(path, "r|*") as tf:  # streaming mode: works on pipes, never seeks
        for m in tf:
            if not m.isfile():
                continue
            folder, name = os.path.split(m.name)
            k, ext = os.path.join(folder, name.split(".", 1)[0]), name.split(".", 1)[-1].lower()
            if k != key and files:
                yield key, files
                files = {}
            key, files[ext] = k, tf.extractfile(m).read()
    if files:
        yield key, files


# ---------------------------------------------------------------------------------------------------
# 3. Images. Pillow reads almost anything; these lines turn it into 8-bit RGB or a clear BadSample.
# ---------------------------------------------------------------------------------------------------
Image.MAX_IMAGE_PIXELS = 8192 * 8192  # above this a file is a decompression bomb (or useless at our size)


def to_rgb(im):
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: convert("RGB") would clip, not scale
        a = np.asarray(im, dtype=np.float64)
        a = a / 257 if im.mode.startswith("I;16") or a.max() > 255 else a
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or im.mode == "P" and "transparency" in im.info:
        # composite on white: converting RGBA straight to RGB turns transparent pixels into noise/black
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")  # L, P, 1, CMYK, YCbCr, ...


def load_image(src, name=None):
    """Path or file object -> PIL RGB, EXIF orientation applied; any failure raises BadSample."""
    name = name or str(src)
    try:
        with Image.open(src) as im:  # reads the header only
            # Pillow only WARNS between 1x and 2x the limit; we refuse (an explicit check rather than
            # warnings.catch_warnings, which is not thread-safe and eval.py decodes in threads).
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels > {Image.MAX_IMAGE_PIXELS}")
            im.load()  # decode now: truncated files fail here, not later in a worker
            return to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:  # Pillow's decoders raise many types on corrupt data (OSError, ValueError, ...)
        raise BadSample(f"{name}: unreadable image ({type(e).__name__}: {e})") from None


def crop_params(W, H, scale, ratio, rng):
    """RandomResizedCrop's box (x, y, w, h), torchvision's algorithm: up to 10 tries of a random area
    fraction in `scale` and log-uniform aspect in `ratio`, then the largest centred crop allowed."""
    for _ in range(10):
        area = W * H * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1)), w, h
    if W / H < min(ratio):
        w, h = W, round(W / min(ratio))
    elif W / H > max(ratio):
        w, h = round(H * max(ratio)), H
    else:
        w, h = W, H
    return (W - w) // 2, (H - h) // 2, w, h


def swap_left_right(text):
    """After a horizontal flip "left" is "right" (also "leftmost", "Left"). A rare "that's right" gets
    swapped too; the flag `hflip` turns the flip off for data where that matters."""
    def swap(m):
        new = "right" if m[0].lower() == "left" else "left"
        return new.capitalize() if m[0][0].isupper() else new
    return re.sub(r"\b(?:left|right)(?=most\b|\b)", swap, text, flags=re.IGNORECASE)


def to_tensor(img):
    """PIL RGB -> (3, H, W) float, CLIP mean/std normalised."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def train_transform(img, text, cfg, rng):
    """Random crop + optional flip. MIM targets are computed from this very tensor by the loss, so the
    ViT and the reconstruction target always see the same crop (the official code crops twice)."""
    x, y, w, h = crop_params(*img.size, cfg.crop_scale, cfg.crop_ratio, rng)
    img = img.resize((cfg.img_size, cfg.img_size), Image.BICUBIC, box=(x, y, x + w, y + h))
    if cfg.hflip and rng.random() < 0.5:
        img, text = ImageOps.mirror(img), swap_left_right(text)
    return to_tensor(img), text


def eval_transform(img, size):
    """Evaluation: resize the whole image to a square (no crop: an object near the edge must stay)."""
    return to_tensor(img.resize((size, size), Image.BICUBIC))


# ---------------------------------------------------------------------------------------------------
# 4. Masking for cross-modality reconstruction (XMM). Both run in the collate, seeded per batch.
# ---------------------------------------------------------------------------------------------------
def mask_tokens(ids, mask, special_ids, mask_id, vocab_size, prob, rng):
    """BERT masking. ids (B, T) long, mask (B, T) bool (True = real token) -> (mlm_ids, labels).
    `prob` of the real non-special tokens are picked (at least one per caption, so every caption
    contributes to MLM); of those 80% -> MASK, 10% -> a random ordinary token, 10% unchanged.
    labels hold the original id at picked positions and -100 elsewhere (ignored by the loss)."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    cand = mask & ~np.isin(ids, special_ids)                       # (B, T) maskable positions
    pick_ = cand & (rng.random(ids.shape) < prob)
    for b in np.flatnonzero(cand.any(1) & ~pick_.any(1)):
        pick_[b, rng.choice(np.flatnonzero(cand[b]))] = True
    r = rng.random(ids.shape)
    out = ids.copy()
    out[pick_ & (r < 0.8)] = mask_id
    rand = pick_ & (r >= 0.8) & (r < 0.9)
    new = rng.integers(0, vocab_size, int(rand.sum()))
    while (hit := np.isin(new, special_ids)).any():                # random tokens are never specials
        new[hit] = rng.integers(0, vocab_size, int(hit.sum()))
    out[rand] = new
    return torch.from_numpy(out), torch.from_numpy(np.where(pick_, ids, -100))


def block_mask(grid, num_masked, min_block, rng, max_aspect=1 / 0.3):
    """BEiT blockwise masking on a grid x grid patch grid -> (grid*grid,) bool, EXACTLY num_masked True.
    Rectangles of >= min_block patches and aspect in [0.3, 3.3] are added while they fit; BEiT may
    then stop short, so we grow the masked region one neighbouring patch at a time up to the exact
    count: every image masks the same number of patches (static MIM shapes, the paper's 75/256)."""
    m = np.zeros((grid, grid), dtype=bool)
    while m.sum() < num_masked:
        left, added = num_masked - m.sum(), False
        for _ in range(10):
            area = rng.uniform(min_block, max(min_block, left))
            aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h * w < min_block or h > grid or w > grid:
                continue
            top, lft = int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
            if 0 < h * w - m[top:top + h, lft:lft + w].sum() <= left:
                m[top:top + h, lft:lft + w], added = True, True
                break
        if not added:
            break
    while m.sum() < num_masked:
        nb = np.zeros_like(m)  # 4-neighbours of the masked region
        nb[1:] |= m[:-1]; nb[:-1] |= m[1:]; nb[:, 1:] |= m[:, :-1]; nb[:, :-1] |= m[:, 1:]
        cand = np.flatnonzero(nb & ~m) if m.any() else np.flatnonzero(~m)
        m.flat[rng.choice(cand)] = True
    return m.reshape(-1)


# ---------------------------------------------------------------------------------------------------
# 5. Datasets, collate, sampler, loader. Randomness of a sample (caption choice, crop, flip) comes from
# a generator seeded by (seed, rank, epoch, index), and masking from the batch's sample seeds: batches
# are identical for any number of workers, and a resumed run sees exactly the batches it would have.
# ---------------------------------------------------------------------------------------------------
def sample_seed(*xs):
    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(1)[0])


def make_sample(src, captions, name, image_id, seed, cfg, train=True):
    caps = [c for c in captions if isinstance(c, str) and normalize_caption(c)]
    if not caps:
        raise BadSample(f"{name}: empty caption")
    rng = np.random.default_rng(seed)
    text, img = pick(rng, caps), load_image(src, name)
    image, text = train_transform(img, text, cfg, rng) if train else (eval_transform(img, cfg.img_size), text)
    return {"image": image, "caption": text, "image_id": image_id, "seed": seed}


class PairDataset(Dataset):
    """One sample per IMAGE, with one of its captions drawn afresh each epoch. Not one per caption (as
    ALBEF): two captions of one image in a batch are false negatives for ITC and for ITM's hard
    negatives, and an epoch is then one pass over the images. Keys are (index, epoch) pairs from the
    sampler, because persistent workers hold copies of the dataset that never see a set_epoch call.
    A bad sample comes back as {"bad": message, "key": key} so the collate can name it and replace it."""

    def __init__(self, items, cfg, seed=0, rank=0, train=True):
        self.items, self.cfg, self.seed, self.rank, self.train = items, cfg, seed, rank, train

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, caps = self.items[index]
        try:
            seed = sample_seed(self.seed, self.rank, epoch, index)
            return make_sample(path, caps, path, index, seed, self.cfg, self.train)
        except BadSample as e:
            return {"bad": str(e), "key": (index, epoch)}


class ShardDataset(IterableDataset):
    """Webdataset-style tar shards, streamed. Shards are shuffled per epoch and dealt round-robin to
    (rank, worker), then samples pass a shuffle buffer. Bad samples are dropped from the stream and
    their messages ride along with the next good sample ("skipped") to be counted in the main process.
    image_id = shard index << 32 | position in shard: stable across epochs and unique."""

    def __init__(self, shards, cfg, batch_size, seed=0, rank=0, world=1, epoch=0, skip=0):
        self.shards, self.cfg, self.bs, self.seed, self.rank, self.world = shards, cfg, batch_size, seed, rank, world
        self.epoch, self.skip = epoch, skip

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def stream(self, shard_ids, rng, errors):
        buf = []
        for sid in shard_ids:
            try:
                for pos, (key, files) in enumerate(iter_tar(self.shards[sid])):
                    buf.append((sid, pos, key, files))
                    if len(buf) >= self.cfg.shuffle_buffer:
                        i = int(rng.integers(len(buf)))
                        buf[i], buf[-1] = buf[-1], buf[i]
                        yield buf.pop()
            except (tarfile.TarError, OSError, EOFError) as e:
                errors.append(f"{self.shards[sid]}: unreadable tar shard ({type(e).__name__}: {e})")
        yield from (buf[i] for i in rng.permutation(len(buf)))

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        order = [int(i) for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))]
        mine = order[self.rank * nw + wid::self.world * nw]
        # Resume: the DataLoader takes batches from workers in turn, so this worker had made batches
        # wid, wid + nw, ... of the first `skip`. Counted in raw samples (read, not decoded), so it is
        # exact when no sample was bad and the number of workers is unchanged.
        n_skip = max(0, -(-(self.skip - wid) // nw)) * self.bs
        errors, rng = [], np.random.default_rng([self.seed, self.rank, self.epoch, wid])
        for n, (sid, pos, key, files) in enumerate(self.stream(mine, rng, errors)):
            if n < n_skip:
                continue
            name, image_id = f"{self.shards[sid]}:{key}", sid << 32 | pos
            try:
                ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
                if ext is None:
                    raise BadSample(f"{name}: no .jpg/.jpeg/.png/.webp file")
                caps = files["txt"].decode("utf-8", "replace") if "txt" in files else \
                    json.loads(files["json"]).get("caption", "") if "json" in files else ""
                s = make_sample(io.BytesIO(files[ext]), caps if isinstance(caps, list) else [caps], name, image_id,
                                sample_seed(self.seed, self.rank, self.epoch, image_id), self.cfg)
            except (BadSample, ValueError, AttributeError) as e:  # ValueError: bad UTF-8/JSON in a .json
                errors.append(str(e) if isinstance(e, BadSample) else f"{name}: bad caption file ({e})")
                continue
            s["skipped"] = errors[:]
            errors.clear()  # the same list object: stream() appends shard errors to it
            yield s
        if errors:  # nothing followed them in this stream: report here, they cannot reach the main process
            print(f"data: skipped at the end of a shard stream: {errors}")


class Collator:
    """List of samples -> the batch dict of the spec. Bad samples are replaced by other indices drawn
    deterministically from their key (rather than duplicating a good sample of the batch, which would
    put the same image twice in one contrastive batch), so the batch keeps its static size."""

    def __init__(self, tokenizer, cfg, dataset=None):
        self.tok, self.cfg, self.dataset = tokenizer, cfg, dataset
        self.grid = cfg.img_size // cfg.patch_size
        n = self.grid ** 2                                         # N patches
        self.num_masked = round(cfg.mim_ratio * n)
        self.min_block = max(1, round(cfg.mim_min_block * n / 256))  # the paper's 16 of 256, scaled

    def __call__(self, samples):
        good, bad = [], []
        for s in samples:
            tries = 0
            while "bad" in s:
                bad.append(s["bad"])
                index, epoch = s["key"]
                tries += 1
                if self.dataset is None or tries > 20:
                    raise DataError(f"no readable replacement for a bad sample after 20 tries; last: {s['bad']}")
                s = self.dataset[(sample_seed(index, epoch, tries) % len(self.dataset), epoch)]
            bad += s.pop("skipped", [])
            good.append(s)
        ids, mask = self.tok([s["caption"] for s in good], self.cfg.max_len)  # (B, T) each
        rng = np.random.default_rng([s["seed"] for s in good])
        mlm_ids, labels = mask_tokens(ids, mask, self.tok.special_ids, self.tok.mask_id, self.tok.vocab_size,
                                      self.cfg.mlm_prob, rng)
        pm = np.stack([block_mask(self.grid, self.num_masked, self.min_block, rng) for _ in good])  # (B, N)
        return {"image": torch.stack([s["image"] for s in good]), "text_ids": ids, "text_mask": mask,
                "mlm_ids": mlm_ids, "mlm_labels": labels, "patch_mask": torch.from_numpy(pm),
                "image_id": torch.tensor([s["image_id"] for s in good], dtype=torch.long), "bad": bad}


class ResumableSampler:
    """Batches of (index, epoch) keys. The permutation depends only on (seed, epoch), so it is the same
    on every rank; rank r takes every world-th index of it (cut to a multiple of world, so every rank
    runs the same number of steps, which DDP needs). The first `skip` batches are dropped before
    anything is loaded: resuming from (epoch, skip) continues the interrupted order exactly."""

    def __init__(self, n, batch_size, rank=0, world=1, seed=0, epoch=0, skip=0, shuffle=True, drop_last=True):
        self.n, self.bs, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.epoch, self.skip, self.shuffle, self.drop_last = epoch, skip, shuffle, drop_last

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def batches(self):
        order = np.arange(self.n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        mine = order[: self.n // self.world * self.world][self.rank::self.world]
        n = len(mine) // self.bs if self.drop_last else -(-len(mine) // self.bs)
        return [mine[i * self.bs:(i + 1) * self.bs] for i in range(n)]

    def __iter__(self):
        for b in self.batches()[self.skip:]:
            yield [(int(i), self.epoch) for i in b]

    def __len__(self):
        return max(0, len(self.batches()) - self.skip)


class Loader:
    """The DataLoader plus bad-sample accounting: strips the messages from each batch, prints them once
    per epoch, and raises DataError when more than cfg.max_bad_frac of the samples tried were bad
    (checked at the end of the epoch, and along the way once 1000 samples were tried)."""

    def __init__(self, loader, cfg, source, rank=0):
        self.loader, self.cfg, self.source, self.rank = loader, cfg, source, rank  # source: sampler or ShardDataset
        self.sampler = source if isinstance(source, ResumableSampler) else None
        self.epoch = source.epoch

    def set_epoch(self, epoch, skip=0):
        """Position the next iteration at batch `skip` of `epoch` (skip > 0: resuming)."""
        self.source.set_epoch(epoch, skip)
        self.epoch = epoch

    def __len__(self):
        if self.sampler is None:
            raise TypeError("a tar-shard loader has no length: set the number of steps explicitly")
        return len(self.sampler)

    def check(self, bad, seen, final):
        frac = len(bad) / max(1, seen)
        if bad and (final or frac > self.cfg.max_bad_frac):
            more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
            print(f"data: rank {self.rank} epoch {self.epoch}: skipped {len(bad)} of {seen} samples ({frac:.2%}):\n  "
                  + "\n  ".join(bad[:50]) + more, flush=True)
        if frac > self.cfg.max_bad_frac:
            raise DataError(f"{len(bad)} of {seen} samples were bad ({frac:.1%} > max_bad_frac "
                            f"{self.cfg.max_bad_frac}); first: {bad[0]}")

    def __iter__(self):
        bad, seen = [], 0
        for batch in self.loader:
            msgs = batch.pop("bad")
            bad, seen = bad + msgs, seen + len(batch["image_id"]) + len(msgs)
            if msgs and seen >= 1000:
                self.check(bad, seen, final=False)
            yield batch
        self.check(bad, seen, final=True)


def build_loader(paths, tokenizer, cfg, batch_size, rank=0, world=1, seed=0, epoch=0, skip=0, train=True,
                 workers=None, pin_memory=None):
    """Annotation files (JSON/JSONL/CSV/TSV, concatenated) or tar shard patterns -> Loader, positioned
    at batch `skip` of `epoch`; later epochs: loader.set_epoch(e, skip). len(loader) = batches left.
    train=False: no augmentation, no shuffle, last partial batch kept. workers / pin_memory default
    to cfg.workers / "CUDA is available"."""
    paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    workers = cfg.workers if workers is None else workers
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory)
    if any(".tar" in p for p in paths):
        shards = [s for p in paths for s in expand_braces(p)]
        if not all(".tar" in s for s in shards) or len(shards) < world * max(1, workers):
            raise DataError(f"tar shards can't be mixed with other files, and need >= world * workers "
                            f"= {world * max(1, workers)} shards (got {len(shards)})")
        ds = ShardDataset(shards, cfg, batch_size, seed, rank, world, epoch, skip)
        # Not persistent: a fresh worker copy each epoch is how the workers learn the new epoch.
        dl = DataLoader(ds, batch_size=batch_size, drop_last=True, collate_fn=Collator(tokenizer, cfg), **common)
        return Loader(dl, cfg, ds, rank)
    ds = PairDataset([it for p in paths for it in read_annotations(p, cfg)], cfg, seed, rank, train)
    sampler = ResumableSampler(len(ds), batch_size, rank, world, seed, epoch, skip, shuffle=train, drop_last=train)
    dl = DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(tokenizer, cfg, ds),
                    persistent_workers=workers > 0, **common)
    return Loader(dl, cfg, sampler, rank)


class ImageFiles(Dataset):
    """Evaluation images (e.g. load_retrieval's paths) -> (3, size, size). A bad TEST image is an error."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return eval_transform(load_image(self.paths[i]), self.size)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="nanoSIMLA data tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the synthetic world (PNG files + train/test/grounding JSON)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n-train", type=int, default=20000, help="training images (3-5 captions each)")
    s.add_argument("--n-test", type=int, default=1000, help="retrieval test images (5 captions each)")
    s.add_argument("--n-ground", type=int, default=1000, help="grounding test expressions")
    s.add_argument("--img-size", type=int, default=64, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="same seed -> same bytes")
    s.add_argument("--procs", type=int, default=2, help="worker processes")
    a = ap.parse_args()
    t0 = time.time()
    counts = synth(a.out, a.n_train, a.n_test, a.n_ground, a.img_size, a.seed, a.procs)
    for name, n in counts.items():
        print(f"wrote {Path(a.out) / name}: {n} entries")
    print(f"wrote {sum(counts.values())} PNG images ({a.img_size} px) under {Path(a.out) / 'images'} "
          f"in {time.time() - t0:.1f} s with {a.procs} processes")
