"""Tests for tokenizer.py: BPE training (against a naive reference), tiktoken agreement, specials,
batching, save/load, caption normalization and the get_tokenizer error paths. All CPU, a few seconds."""
import base64
import json
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import tiktoken
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tokenizer as T  # noqa: E402
from tokenizer import PAT_STR, SPLIT_RE, Tokenizer, get_tokenizer, normalize_caption  # noqa: E402

WORDS = ("a the of on in with and two man woman dog cat giraffe sitting standing next to red blue "
         "white black table street grass field bus train pizza plate umbrella kite surfboard").split()

# Strings that exercise every character class of the pre-tokeniser, incl. raw (un-normalized) text.
TRICKY = ["a giraffe standing next to a tree", "🦒🦒 with 👨‍👩‍👧 family 🐶", "一只长颈鹿站在树旁",
          "café crème brûlée e\u0301", "κάμηλος και σκύλος", "कुत्ता घास पर", "مرحبا بالعالم",
          "2 dogs 35 cats ²³ ½ Ⅻ x²", "snake_case __init__ a-b", "don't he's they'll i'm",
          "[MASK] [cls] <|endoftext|>", "  lead  and tail  ", "tab\tand\nnewline  end ",
          "ＦＵＬＬ ｗｉｄｔｈ ！", "mixed123abc 4x4 1,000.5"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(captions(2000) + TRICKY, vocab_size=400)


def reference_train(texts, vocab_size):
    """Naive BPE: recount every pair before every merge. Same tie-break and byte-reuse rule."""
    chunks = Counter(c for t in texts for c in SPLIT_RE.findall(normalize_caption(t)))
    words, freqs = [list(c.encode()) for c in chunks], list(chunks.values())
    vocab = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(vocab)}
    while len(vocab) < vocab_size - 4:
        counts = Counter()
        for ids, f in zip(words, freqs):
            for p in zip(ids, ids[1:]):
                counts[p] += f
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        token = vocab[pair[0]] + vocab[pair[1]]
        if token not in ranks:
            ranks[token] = len(vocab)
            vocab.append(token)
        words = [T._merge(ids, pair, ranks[token]) for ids in words]
    return ranks


def tiktoken_chunks(text: str) -> list[bytes]:
    """How tiktoken splits `text` under PAT_STR. With every substring of `text` in the vocabulary,
    each pre-token chunk is one whole-chunk token (tiktoken looks the chunk up before running BPE)."""
    b = text.encode()
    ranks = {bytes([i]): i for i in range(256)}
    for s in sorted({b[i:j] for i in range(len(b)) for j in range(i + 2, len(b) + 1)}):
        ranks[s] = len(ranks)
    enc = tiktoken.Encoding("probe", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    return [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)]


def test_learns_expected_merges():
    # The classic example: ug (20) > un (16) > hug (15) > ...
    texts = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
    tok = Tokenizer.train(texts, vocab_size=256 + 3 + 4)
    learned = sorted((r, b) for b, r in tok.ranks.items() if r >= 256)
    assert [b for _, b in learned] == [b"ug", b"un", b"hug"]
    assert tok.enc.decode_single_token_bytes(tok.encode("hug")[0]) == b"hug"


def test_frequent_word_becomes_one_token(tok):
    ids = tok.encode("a giraffe")
    assert [tok.enc.decode_single_token_bytes(i) for i in ids] == [b"a", b" giraffe"]


def test_incremental_counts_match_naive_reference():
    texts = captions(300, seed=1) + TRICKY
    assert Tokenizer.train(texts, 330).ranks == reference_train(texts, 330)


def test_training_is_deterministic_and_stops_when_corpus_is_exhausted():
    assert Tokenizer.train(captions(200), 300).ranks == Tokenizer.train(captions(200), 300).ranks
    # chunks "ab" x1, " ab" x2: merge a+b (3), then " "+ab (2); nothing is left to merge after that
    small = Tokenizer.train(["ab ab ab"], vocab_size=1000)
    assert sorted((r, b) for b, r in small.ranks.items() if r >= 256) == [(256, b"ab"), (257, b" ab")]
    assert small.vocab_size == 258 + 4
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["x"], vocab_size=100)


@pytest.mark.parametrize("text", TRICKY + [normalize_caption(t) for t in TRICKY] + captions(5))
def test_training_split_equals_tiktoken_split(text):
    assert [c.encode() for c in SPLIT_RE.findall(text)] == tiktoken_chunks(text)


def test_split_classes_are_unicode_categories():
    # What PAT_STR says with \p{..}, SPLIT_RE must say with \w for every code point (in Python's tables).
    letter, digit = re.compile(r"[^\W\d_]"), re.compile(r"\d")
    other = re.compile(r"[^\s\w]|_")
    for i in range(0x30000):
        c = chr(i)
        cat = unicodedata.category(c)
        if cat == "Cs":
            continue
        assert bool(letter.match(c)) == (cat[0] == "L" or cat in ("Nl", "No")), hex(i)
        assert bool(digit.match(c)) == (cat == "Nd"), hex(i)
        assert bool(other.match(c)) == (not c.isspace() and cat[0] not in "LN"), hex(i)


def test_roundtrip(tok):
    rng = random.Random(0)
    ranges = [(0x20, 0x7F), (0xA0, 0x2FF), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4F00), (0x1F300, 0x1F6FF)]
    fuzz = ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for raw in TRICKY + captions(200, seed=2) + fuzz:
        text = normalize_caption(raw)
        assert tok.decode(tok.encode(text)) == text, repr(raw)
        assert tok.decode(torch.tensor(tok.encode(text))) == text


def test_special_looking_text_is_ordinary(tok):
    for text in ["[MASK]", "[cls] a dog [SEP]", "[PAD][PAD]", "a [mask] on [MASK]"]:
        assert not set(tok.encode(text)) & set(tok.special_ids)
        assert not set(tok.enc.encode_ordinary(text)) & set(tok.special_ids)  # even un-normalized
    ids, _ = tok(["[MASK] [CLS] [SEP] [PAD]"], max_len=16)
    assert (ids == tok.mask_id).sum() == 0 and (ids == tok.cls_id).sum() == 1 and (ids == tok.sep_id).sum() == 1


def test_fixed_special_ids(tok):
    n = tok.vocab_size - 4
    assert tok.vocab_size == 400 and tok.n_bpe == n == len(tok.ranks)
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id) == (n, n + 1, n + 2, n + 3)
    assert tok.special_ids == [n, n + 1, n + 2, n + 3]
    assert sorted(tok.ranks.values()) == list(range(n))
    assert tok.decode([tok.cls_id] + tok.encode("a dog") + [tok.sep_id, tok.pad_id, tok.mask_id]) == "a dog"


def test_batch_call_shapes_padding_truncation(tok):
    texts = ["a dog", "", " ".join(["giraffe"] * 30), "A Dog!"]
    ids, mask = tok(texts, max_len=8)
    assert ids.shape == mask.shape == (4, 8) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert (ids[:, 0] == tok.cls_id).all()
    for b, text in enumerate(texts):
        body = tok.encode(text)[:6]
        n = len(body) + 2
        assert ids[b, :n].tolist() == [tok.cls_id] + body + [tok.sep_id]
        assert (ids[b, n:] == tok.pad_id).all()
        assert mask[b].tolist() == [True] * n + [False] * (8 - n)
    assert ids[1, :2].tolist() == [tok.cls_id, tok.sep_id]  # empty caption
    assert mask[2].all() and ids[2, -1] == tok.sep_id  # truncated: SEP kept last
    assert torch.equal(ids[0], ids[3])  # normalization happens inside
    assert tok([], max_len=5)[0].shape == (0, 5)
    with pytest.raises(ValueError, match="max_len"):
        tok(["a"], max_len=1)


def test_save_load_identical(tok, tmp_path):
    tok.save(tmp_path)
    line = (tmp_path / T.RANKS_FILE).read_text().splitlines()[300]
    b64, rank = line.split()
    assert tok.ranks[base64.b64decode(b64)] == int(rank)
    meta = json.loads((tmp_path / T.SPECIALS_FILE).read_text())
    assert meta["special_tokens"] == {"[CLS]": 396, "[SEP]": 397, "[PAD]": 398, "[MASK]": 399}
    loaded = Tokenizer.load(tmp_path)
    assert loaded.ranks == tok.ranks and loaded.special_ids == tok.special_ids
    texts = TRICKY + captions(50, seed=3)
    for a, b in zip(tok(texts, 20), loaded(texts, 20)):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        Tokenizer.load(tmp_path / "nope")


def test_get_tokenizer_bpe_trains_caches_and_loads(tmp_path):
    d = tmp_path / "tok"
    with pytest.raises(FileNotFoundError, match=str(d)):
        get_tokenizer("bpe", d)
    trained = get_tokenizer("bpe", d, texts=iter(captions(300)), vocab_size=300)
    assert (d / T.RANKS_FILE).is_file() and (d / T.SPECIALS_FILE).is_file()
    cached = get_tokenizer("bpe", d)  # no texts: loads what is cached, whatever its size
    again = get_tokenizer("bpe", d, texts=captions(10), vocab_size=300)  # cached: not re-trained
    by_path = get_tokenizer(str(d), cache_dir=None)
    assert trained.ranks == cached.ranks == again.ranks == by_path.ranks and by_path.vocab_size == 300
    with pytest.raises(ValueError, match="vocab_size 300"):  # would train at 4096, but 300 is cached
        get_tokenizer("bpe", d, texts=captions(10), vocab_size=4096)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("wordpiece", d)


def test_gpt2_offline_gives_clear_error(tmp_path, monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(T.tiktoken, "get_encoding", offline)
    with pytest.raises(FileNotFoundError, match="use --tokenizer bpe"):
        get_tokenizer("gpt2", tmp_path)


def test_gpt2_specials_follow_its_vocab(tmp_path, monkeypatch):
    # A stand-in for tiktoken's gpt2 (bytes + <|endoftext|>), so the test needs no download.
    fake = tiktoken.Encoding("gpt2", pat_str=PAT_STR, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(T.tiktoken, "get_encoding", lambda name: fake)
    tok = get_tokenizer("gpt2", tmp_path)
    assert tok.n_bpe == fake.n_vocab == 257 and tok.special_ids == [257, 258, 259, 260]
    assert tok.vocab_size == 261 and tok.decode(tok.encode("[MASK] ok") + [256, 257]) == "mask ok"
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).special_ids == tok.special_ids


def test_normalize_caption():
    assert normalize_caption('A Dog, running! (fast) "outside"; the man\'s hat.') == \
        "a dog running fast outside the mans hat"
    assert normalize_caption("t-shirt/jeans  \t\n on_a  bench...") == "t shirt jeans on a bench"
    assert normalize_caption("  ") == ""
    assert normalize_caption("A 🐶 DOG!! 😀") == "a 🐶 dog 😀"  # emoji are kept, not punctuation
    assert normalize_caption("ＡＢＣ！ ﬁne Ⅻ") == "abc fine xii"  # NFKC look-alikes
    assert normalize_caption("Ünïcödé ÇA") == "ünïcödé ça"
    long = " ".join(f"w{i}" for i in range(500))
    assert normalize_caption(long) == " ".join(f"w{i}" for i in range(30))
    assert normalize_caption(long, max_words=5) == "w0 w1 w2 w3 w4"
    for raw in TRICKY + ["e'\u0301", "Ϊ\u0301", "ℌello"]:  # a fixed point: encode() may re-normalize
        once = normalize_caption(raw)
        assert normalize_caption(once) == once
