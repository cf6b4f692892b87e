"""Tests for data.py: synthetic world, readers, image decoding, masking, collate, sampler, bad input.
Everything is generated into tmp_path (tiny sizes): no downloads, no fixtures on disk."""
import io
import json
import re
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data as D  # noqa: E402
from data import DataConfig, DataError, BadSample  # noqa: E402

torch.set_num_threads(1)
S = 64


class FakeTokenizer:
    """Stand-in with the tokenizer.py interface (used only if tokenizer.py is missing or broken)."""
    vocab_size, n_bpe = 104, 100
    cls_id, sep_id, pad_id, mask_id = special_ids = [100, 101, 102, 103]

    def __call__(self, texts, max_len):
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for b, t in enumerate(texts):
            row = [self.cls_id] + [zlib.crc32(w.encode()) % 100 for w in D.normalize_caption(t).split()][: max_len - 2]
            ids[b, : len(row) + 1] = torch.tensor(row + [self.sep_id])
        return ids, ids != self.pad_id


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    D.synth(out, n_train=48, n_test=12, n_ground=40, img_size=S, seed=0, procs=1)
    return out


@pytest.fixture(scope="module")
def tok(world):
    try:
        from tokenizer import Tokenizer
        caps = [c for e in json.loads((world / "train.json").read_text()) for c in e["caption"]]
        return Tokenizer.train(caps + ["a cat 🐱 ünïcödé"], vocab_size=400)
    except Exception:  # tokenizer.py not there (yet): the data code only needs the interface
        return FakeTokenizer()


def write_png(path, color=(200, 30, 30), size=(16, 16)):
    Image.new("RGB", size, color).save(path)
    return path


# ----------------------------------------------------------------------------- synthetic world
def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_synth_deterministic(tmp_path):
    a, b, c = (D.synth(tmp_path / n, 10, 4, 6, S, seed=s, procs=pr) and tree_bytes(tmp_path / n)
               for n, s, pr in [("a", 3, 1), ("b", 3, 2), ("c", 4, 1)])
    assert a == b  # same seed -> same bytes, whatever the number of processes
    assert a.keys() == c.keys() and a["train.json"] != c["train.json"]


SIZE_W = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
SHAPE_W = {w: s for s in D.SHAPES for w in D.SYNONYMS.get(s, [s])}
NP = rf"(?:({'|'.join(SIZE_W)}) )?({'|'.join(D.COLORS)}) ({'|'.join(SHAPE_W)})"
REL = {"left of": "left", "right of": "right", "above": "above", "over": "above", "below": "below",
       "under": "below", "beneath": "below"}


def find(objs, color, shape, size=None):
    size = size or None  # re.findall gives "" for a missing size
    hits = [o for o in objs if o["color"] == color and o["shape"] == SHAPE_W[shape]
            and (size is None or o["size"] == SIZE_W[size])]
    assert len(hits) == 1, (color, shape, size, objs)
    return hits[0]


def test_synth_scenes_and_captions(world):
    n_caps = {"train.json": (3, 5), "test.json": (5, 5)}
    for name, (lo, hi) in n_caps.items():
        for e in json.loads((world / name).read_text()):
            objs, img = e["objects"], np.asarray(Image.open(world / e["image"]))
            assert img.shape == (S, S, 3) and 1 <= len(objs) <= 4 and lo <= len(e["caption"]) <= hi
            for i, o in enumerate(objs):
                x, y, w, h = o["bbox"]
                assert 0 <= x and 0 <= y and x + w <= S and y + h <= S  # boxes inside the image
                for p in objs[i + 1:]:  # never overlapping
                    px, py, pw, ph = p["bbox"]
                    assert x + w <= px or px + pw <= x or y + h <= py or py + ph <= y
                # the rendering agrees with the metadata: the box centre has the object's colour
                assert np.abs(img[y + h // 2, x + w // 2].astype(int) - D.COLORS[o["color"]]).max() <= 14
            for cap in e["caption"]:
                assert len(cap.split()) <= 22  # ~1 BPE token per word: < 25 tokens
                named = {(o["color"], o["shape"]) for o in (find(objs, c, s, z) for z, c, s in re.findall(NP, cap))}
                assert named == {(o["color"], o["shape"]) for o in objs}, cap  # every object named, nothing else
                assert {w for w in cap.split() if w in D.COLORS} <= {o["color"] for o in objs}
                for m in re.finditer(rf"{NP} (?:to the )?({'|'.join(REL)}) (?:a|an|the) {NP}", cap):
                    a, b = find(objs, *m.group(2, 3, 1)), find(objs, *m.group(6, 7, 5))
                    (ax, ay), (bx, by) = D.center(a), D.center(b)
                    assert {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}[REL[m[4]]], cap
                if cap.startswith("from left to right"):
                    xs = [D.center(find(objs, c, s, z))[0] for z, c, s in re.findall(NP, cap)]
                    assert xs == sorted(xs), cap
                if len(objs) == 1:
                    cx, cy = D.center(objs[0])
                    assert ("left" in cap) == (cx < S / 3) and ("right" in cap) == (cx >= 2 * S / 3), cap
                    assert ("top" in cap) == (cy < S / 3) and ("bottom" in cap) == (cy >= 2 * S / 3), cap


def test_synth_grounding_unique(world):
    entries = D.load_grounding(world / "grounding_test.json")
    assert len(entries) == 40
    for e in entries:
        objs, words = e["objects"], e["text"].split()
        assert Path(e["image"]).is_file() and e["bbox"] in e["proposals"]
        assert len(e["proposals"]) >= len(objs) + 1 and all(o["bbox"] in e["proposals"] for o in objs)
        # an independent reading of the expression must find exactly the target
        hits = [o for o in objs
                if all(o["color"] == w for w in words if w in D.COLORS)
                and all(o["shape"] == SHAPE_W[w] for w in words if w in SHAPE_W)
                and all(o["size"] == SIZE_W[w] for w in words if w in SIZE_W)]
        for side, axis, sign in [("left", 0, -1), ("right", 0, 1), ("top", 1, -1), ("bottom", 1, 1)]:
            if side in words:
                best = max(sign * D.center(o)[axis] for o in hits)
                hits = [o for o in hits if sign * D.center(o)[axis] == best]
        assert len(hits) == 1 and hits[0]["bbox"] == e["bbox"], e["text"]


def test_load_retrieval(world):
    paths, caps, txt2img, img2txt = D.load_retrieval(world / "test.json")
    assert len(paths) == 12 and len(caps) == 60 and all(Path(p).is_file() for p in paths)
    assert all(txt2img[t] == i for i, ts in enumerate(img2txt) for t in ts) and len(txt2img) == len(caps)


# ----------------------------------------------------------------------------- readers
@pytest.fixture
def imgdir(tmp_path):
    (tmp_path / "img").mkdir()
    for n in "abc":
        write_png(tmp_path / "img" / f"{n}.png")
    return tmp_path


def test_formats_agree(imgdir):
    rows = [("img/a.png", "a red square"), ("img/a.png", "a square"), ("img/b.png", "b, with \"quotes\"")]
    want = [(str(imgdir / "img/a.png"), ["a red square", "a square"]),
            (str(imgdir / "img/b.png"), ['b, with "quotes"'])]
    (imgdir / "x.json").write_text(json.dumps([{"image": i, "caption": c} for i, c in rows]))
    (imgdir / "x.jsonl").write_text("\n".join(json.dumps({"image": i, "caption": c}) for i, c in rows) + "\n\n")
    for ext, sep in [("csv", ","), ("tsv", "\t")]:
        import csv
        with open(imgdir / f"x.{ext}", "w", newline="") as f:
            w = csv.writer(f, delimiter=sep)
            w.writerow(["filepath", "title"])
            w.writerows(rows)
    cfg = DataConfig()
    for ext in ["json", "jsonl"]:
        assert D.read_annotations(imgdir / f"x.{ext}", cfg) == want
    for ext in ["csv", "tsv"]:
        assert D.read_annotations(imgdir / f"x.{ext}", DataConfig(image_key="filepath", caption_key="title")) == want
    # a list of captions per entry, and an explicit image root
    (imgdir / "y.json").write_text(json.dumps([{"image": "c.png", "caption": ["one", "two"]}]))
    assert D.read_annotations(imgdir / "y.json", DataConfig(image_root=str(imgdir / "img"))) == \
        [(str(imgdir / "img/c.png"), ["one", "two"])]
    with pytest.raises(DataError, match="title"):
        D.read_annotations(imgdir / "x.csv", cfg)  # wrong column names: a clear error


def test_malformed_annotations_name_file_and_line(tmp_path):
    (tmp_path / "bad.json").write_text('[{"image": "a.png", "caption": "x"},\n {"image": oops}]')
    with pytest.raises(DataError, match=r"bad\.json: line 2"):
        D.read_annotations(tmp_path / "bad.json", DataConfig())
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png", "caption"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3"):
        D.read_annotations(tmp_path / "bad.jsonl", DataConfig())
    with pytest.raises(DataError, match="line 2"):
        D.load_retrieval(tmp_path / "bad.json")


def test_expand_braces():
    assert D.expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert D.expand_braces("{a,b}/{8..9}.tar") == ["a/8.tar", "a/9.tar", "b/8.tar", "b/9.tar"]
    assert D.expand_braces("plain.tar") == ["plain.tar"]


def make_shards(root, n_shards=4, per=3, bad=()):
    """webdataset shards: even samples png + txt, odd ones jpg + json caption; keys listed in `bad` get a
    text file named .jpg."""
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tf:
            for i in range(per):
                key = f"dir/s{s}_{i}"
                buf = io.BytesIO()
                Image.new("RGB", (20, 12), (10 * s, 20 * i, 99)).save(buf, "PNG" if i % 2 == 0 else "JPEG")
                img = b"not an image" if key in bad else buf.getvalue()
                cap = (f"shard {s} sample {i}" if i % 2 == 0 else json.dumps({"caption": [f"s {s} i {i}"]})).encode()
                for ext, payload in [("png" if i % 2 == 0 else "jpg", img), ("txt" if i % 2 == 0 else "json", cap)]:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return str(root / ("shard-{000..%03d}.tar" % (n_shards - 1)))


def test_tar_shards_split_covers_all_once(tmp_path, monkeypatch, tok):
    pattern = make_shards(tmp_path)
    shards = D.expand_braces(pattern)
    seen = []
    for rank in range(2):
        for wid in range(2):  # dataloader workers, simulated in-process
            monkeypatch.setattr(D, "get_worker_info", lambda: type("W", (), {"id": wid, "num_workers": 2}))
            ds = D.ShardDataset(shards, DataConfig(shuffle_buffer=2), batch_size=1, seed=0, rank=rank, world=2, epoch=1)
            seen += [s["image_id"] for s in ds]
    assert sorted(seen) == sorted(s << 32 | i for s in range(4) for i in range(3))
    monkeypatch.undo()
    # the real loader path: captions from .txt and from .json lists, static batches
    loader = D.build_loader(pattern, tok, DataConfig(), batch_size=3)
    batches = list(loader)
    assert len(batches) == 4 and all(b["image"].shape == (3, 3, S, S) for b in batches)
    assert sorted(int(i) for b in batches for i in b["image_id"]) == sorted(seen)


def test_tar_bad_sample_skipped_and_reported(tmp_path, tok, capsys):
    pattern = make_shards(tmp_path, bad={"dir/s1_1"})
    batches = list(D.build_loader(pattern, tok, DataConfig(max_bad_frac=0.2), batch_size=1))
    assert len(batches) == 11
    out = capsys.readouterr().out
    assert "skipped 1 of 12" in out and "shard-001.tar:dir/s1_1" in out


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def messy(imgdir):
    """6 good samples and 5 bad ones."""
    d = imgdir / "img"
    good = [write_png(d / f"g{i}.png", (40 * i, 100, 50)) for i in range(6)]
    (d / "zero.png").write_bytes(b"")
    (d / "trunc.png").write_bytes(good[0].read_bytes()[:60])
    (d / "text.jpg").write_text("this is not a jpeg")
    rows = [{"image": f"img/{p.name}", "caption": f"picture {i} on the left"} for i, p in enumerate(good)]
    rows += [{"image": f"img/{n}", "caption": "x"} for n in ["missing.png", "zero.png", "trunc.png", "text.jpg"]]
    rows += [{"image": "img/a.png", "caption": [" ", "!!!"]}]  # empty after normalisation
    (imgdir / "messy.json").write_text(json.dumps(rows))
    return imgdir / "messy.json"


def test_each_bad_input_is_a_clear_bad_sample(messy):
    ds = D.PairDataset(D.read_annotations(messy, DataConfig()), DataConfig())
    reasons = {Path(s["bad"].split(":")[0]).name: s["bad"] for s in (ds[i] for i in range(len(ds))) if "bad" in s}
    assert set(reasons) == {"missing.png", "zero.png", "trunc.png", "text.jpg", "a.png"}
    assert "No such file" in reasons["missing.png"] and "empty caption" in reasons["a.png"]
    assert all("unreadable image" in reasons[n] for n in ["zero.png", "trunc.png", "text.jpg"])


def test_bad_samples_replaced_counted_reported(messy, tok, capsys):
    cfg = DataConfig(max_bad_frac=0.9)
    bad_ids = {6, 7, 8, 9, 10}
    batches = list(D.build_loader(messy, tok, cfg, batch_size=4, train=False))  # in order: every item is tried
    assert [len(b["image_id"]) for b in batches] == [4, 4, 3]  # sizes kept: bad ones were replaced
    assert not bad_ids & {int(i) for b in batches for i in b["image_id"]}
    assert all(torch.isfinite(b["image"]).all() for b in batches)
    out = capsys.readouterr().out
    assert out.count("skipped") == 1  # one report per epoch ...
    assert all(n in out for n in ["missing.png", "zero.png", "trunc.png", "text.jpg", "a.png"])  # ... naming each
    with pytest.raises(DataError, match="max_bad_frac"):
        list(D.build_loader(messy, tok, DataConfig(max_bad_frac=0.1), batch_size=4, train=False))


def test_odd_captions(imgdir, tok):
    caps = ["word " * 500, "a cat 🐱 ünïcödé — “quotes”", "[MASK] [CLS] [PAD] [SEP]"]
    (imgdir / "odd.json").write_text(json.dumps([{"image": f"img/{n}.png", "caption": c} for n, c in zip("abc", caps)]))
    b = next(iter(D.build_loader(imgdir / "odd.json", tok, DataConfig(max_len=16), batch_size=3, train=False)))
    assert b["text_ids"].shape == (3, 16) and b["text_mask"][0].all()  # 500 words: cut to max_len, not an error
    assert b["text_mask"][1].sum() > 4  # unicode and emoji survive as tokens
    assert not (b["text_ids"] == tok.mask_id).any()  # only MLM may put MASK ids in ...
    assert not (b["mlm_ids"][b["mlm_labels"] == -100] == tok.mask_id).any()  # ... and only where it masked
    ids, mask = tok(["[MASK] [CLS] [PAD] [SEP]"], 16)  # special-looking text is ordinary text
    assert 4 <= mask.sum() - 2 and not set(ids[0, 1:mask.sum() - 1].tolist()) & set(tok.special_ids)


# ----------------------------------------------------------------------------- images
def roundtrip(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    buf.seek(0)
    return D.load_image(buf, "mem")


def test_image_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent -> white, not black/blue
    im = roundtrip(rgba)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == (255, 0, 0)
    assert roundtrip(rgba.convert("P")).getpixel((1, 1)) == (255, 0, 0)
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.putpixel((0, 0), 0)
    im = roundtrip(p, transparency=0)
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == (0, 200, 0)
    assert roundtrip(Image.new("L", (4, 4), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert roundtrip(Image.new("LA", (4, 4), (100, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert roundtrip(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "TIFF").getpixel((0, 0)) == (255, 255, 255)
    i16 = Image.fromarray(np.full((4, 4), 257 * 100, np.uint16))
    assert i16.mode == "I;16" and roundtrip(i16).getpixel((0, 0)) == (100, 100, 100)  # scaled, not clipped
    assert D.to_rgb(Image.fromarray(np.full((4, 4), 65535, np.int32))).getpixel((0, 0)) == (255, 255, 255)
    assert D.to_rgb(Image.fromarray(np.full((4, 4), 30, np.int32))).getpixel((0, 0)) == (30, 30, 30)


def test_exif_orientation():
    im = Image.new("RGB", (20, 10), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    out = roundtrip(im, exif=exif)
    assert out.size == (10, 20) and out.getpixel((5, 2)) == (255, 0, 0) and out.getpixel((5, 17)) == (0, 0, 255)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    for side in (8, 20):  # > limit: Pillow warns; > 2x limit: Pillow raises. Both are bad samples.
        with pytest.raises(BadSample, match="DecompressionBomb"):
            roundtrip(Image.new("RGB", (side, side)))


def test_crop_params():
    rng = np.random.default_rng(0)
    for _ in range(300):
        x, y, w, h = D.crop_params(100, 60, (0.2, 0.5), (3 / 4, 4 / 3), rng)
        assert 0 <= x and 0 <= y and x + w <= 100 and y + h <= 60
        assert 0.2 * 6000 * 0.9 <= w * h <= 0.5 * 6000 * 1.1 and 0.7 <= w / h <= 1.4
    assert D.crop_params(100, 100, (0.9, 1.0), (10, 20), rng) == (0, 45, 100, 10)  # impossible: centre fallback


def test_hflip_swaps_left_right():
    assert D.swap_left_right("the leftmost star, Left of a disk, right of it; bright lights") == \
        "the rightmost star, Right of a disk, left of it; bright lights"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (S, S, 3), dtype=np.uint8))
    cfg = DataConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    outs = [D.train_transform(img, "a circle left of a star", cfg, np.random.default_rng(s)) for s in range(8)]
    flipped = [x for x, t in outs if t == "a circle right of a star"]
    kept = [x for x, t in outs if t == "a circle left of a star"]
    assert flipped and kept and len(flipped) + len(kept) == 8
    assert all(torch.equal(x, D.to_tensor(img.transpose(Image.FLIP_LEFT_RIGHT))) for x in flipped)
    assert all(torch.equal(x, D.to_tensor(img)) for x in kept)
    cfg.hflip = False
    assert all(D.train_transform(img, "left", cfg, np.random.default_rng(s))[1] == "left" for s in range(8))


# ----------------------------------------------------------------------------- masking
def test_mlm_masking_statistics():
    rng = np.random.default_rng(0)
    V, specials, B, T = 104, [100, 101, 102, 103], 400, 32
    ids = rng.integers(0, 100, (B, T))
    lens = rng.integers(20, T + 1, B)
    ids[:, 0] = 100
    ids[np.arange(B), lens - 1] = 101
    mask = np.arange(T)[None] < lens[:, None]
    ids[~mask] = 102
    mlm, labels = D.mask_tokens(torch.tensor(ids), torch.tensor(mask), specials, 103, V, 0.15, rng)
    mlm, labels = mlm.numpy(), labels.numpy()
    cand = mask & (ids < 100)
    picked = labels != -100
    assert not (picked & ~cand).any()  # never special or padding
    assert (labels[picked] == ids[picked]).all() and picked.any(1).all()  # >= 1 per caption
    assert (mlm[~picked] == ids[~picked]).all()  # untouched elsewhere
    assert abs(picked.sum() / cand.sum() - 0.15) < 0.015
    masked, same = (mlm[picked] == 103).mean(), (mlm[picked] == ids[picked]).mean()
    assert abs(masked - 0.8) < 0.03 and abs(same - 0.1) < 0.03 and abs(1 - masked - same - 0.1) < 0.03
    assert not np.isin(mlm[picked & (mlm != 103)], specials).any()  # random tokens are ordinary


def components(m):
    """Sizes of the 4-connected components of a 2-D bool array."""
    seen, sizes = np.zeros_like(m), []
    for start in zip(*np.nonzero(m)):
        if seen[start]:
            continue
        stack, n = [start], 0
        seen[start] = True
        while stack:
            i, j = stack.pop()
            n += 1
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < m.shape[0] and 0 <= b < m.shape[1] and m[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    stack.append((a, b))
        sizes.append(n)
    return sizes


@pytest.mark.parametrize("grid,count,min_block", [(8, 19, 4), (16, 75, 16)])
def test_block_mask_exact_count_and_min_block(grid, count, min_block):
    col = D.Collator(FakeTokenizer(), DataConfig(img_size=grid * 8, patch_size=8))
    assert (col.num_masked, col.min_block) == (count, min_block)  # scaled from the paper's 75/256, 16
    rng, shapes = np.random.default_rng(0), set()
    for _ in range(100):
        m = D.block_mask(grid, count, min_block, rng)
        assert m.shape == (grid * grid,) and m.sum() == count
        assert min(components(m.reshape(grid, grid))) >= min_block
        shapes.add(m.tobytes())
    assert len(shapes) > 90  # varied (one 5 x 15 block can repeat)


# ----------------------------------------------------------------------------- collate, sampler, loader
def test_collate_shapes_and_dtypes(world, tok):
    b = next(iter(D.build_loader(world / "train.json", tok, DataConfig(), batch_size=4)))
    want = {"image": ((4, 3, S, S), torch.float32), "text_ids": ((4, 32), torch.long),
            "text_mask": ((4, 32), torch.bool),
            "mlm_ids": ((4, 32), torch.long), "mlm_labels": ((4, 32), torch.long),
            "patch_mask": ((4, 64), torch.bool), "image_id": ((4,), torch.long)}
    assert {k: (tuple(v.shape), v.dtype) for k, v in b.items()} == want
    assert (b["patch_mask"].sum(1) == 19).all()
    sel = b["mlm_labels"] != -100
    assert b["text_mask"][sel].all() and (b["mlm_labels"][sel] == b["text_ids"][sel]).all()
    assert (b["mlm_ids"][~sel] == b["text_ids"][~sel]).all() and sel.any(1).all()
    assert -2.5 < b["image"].mean() < 2.5 and b["image"].std() > 0.1  # normalised, not raw 0..255


def as_list(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def same(a, b):
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_resume_and_rank_split(world, tok):
    cfg, p = DataConfig(), world / "train.json"
    full = as_list(D.build_loader(p, tok, cfg, batch_size=4, seed=1, epoch=2))
    assert len(full) == 12
    resumed = D.build_loader(p, tok, cfg, batch_size=4, seed=1, epoch=2, skip=5)
    assert len(resumed) == 7 and same(as_list(resumed), full[5:])  # exactly the remaining batches
    resumed.set_epoch(3)  # the next epoch starts at its first batch
    assert len(resumed) == 12 and not same(as_list(resumed), full)
    resumed.set_epoch(2, skip=11)
    assert len(resumed) == 1 and same(as_list(resumed), full[11:])
    ranks = [{int(i) for b in D.build_loader(p, tok, cfg, batch_size=4, rank=r, world=2, epoch=2)
              for i in b["image_id"]} for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 24 and not ranks[0] & ranks[1]


def test_same_batches_for_any_worker_count(world, tok):
    p = world / "train.json"
    a = as_list(D.build_loader(p, tok, DataConfig(workers=0), batch_size=8, epoch=1))
    b = as_list(D.build_loader(p, tok, DataConfig(workers=2), batch_size=8, epoch=1))
    assert same(a, b)


def test_tar_resume(tmp_path, tok):
    pattern = make_shards(tmp_path, n_shards=2, per=6)
    cfg = DataConfig(shuffle_buffer=4)
    full = as_list(D.build_loader(pattern, tok, cfg, batch_size=2, epoch=1))
    assert len(full) == 6
    assert same(as_list(D.build_loader(pattern, tok, cfg, batch_size=2, epoch=1, skip=2)), full[2:])


def test_synth_cli(tmp_path):
    import subprocess
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "data.py"), "synth", "--out", str(tmp_path), "--n-train", "5",
                          "--n-test", "2", "--n-ground", "2", "--img-size", "32", "--procs", "1"],
                         capture_output=True, text=True, check=True).stdout
    assert "train.json: 5 entries" in out and "grounding_test.json: 2 entries" in out and " s " in out
    assert Image.open(tmp_path / "images/train/000004.png").size == (32, 32)
