"""Byte-level BPE tokenizer for captions: train, save, load, encode, decode, batch.

Why our own BPE and not BERT's WordPiece (what ALBEF/SIMLA use): BERT's vocabulary is a download
(and the `transformers` package), and this project runs with no downloads. A byte-level BPE trained
on the captions themselves takes seconds, has no [UNK] (every byte is a token, so emoji and any
unicode round-trip exactly) and spends its vocabulary on caption words. Training is plain Python
(minbpe-style); encoding is tiktoken's Rust core, loaded with the very same ranks.

Ids: BPE ranks 0..n_bpe-1 (0..255 are the single bytes), then [CLS]=n_bpe, [SEP]=n_bpe+1,
[PAD]=n_bpe+2, [MASK]=n_bpe+3; vocab_size = n_bpe + 4.

Measured on one core: 100k synthetic captions (6-14 words from an 18k-word Zipf lexicon) train a
4096 vocab in 2.2 s (8192: 2.3 s); tokenizer(captions, 32) then takes 1.1 s for all 100k.
"""
import base64
import heapq
import json
import os
import re
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable

import tiktoken
import torch

SPECIALS = ["[CLS]", "[SEP]", "[PAD]", "[MASK]"]
RANKS_FILE, SPECIALS_FILE = "bpe.tiktoken", "bpe_special.json"

# GPT-2-style pre-tokenisation: contractions, ` ?letters`, ` ?digits`, ` ?other`, whitespace. BPE never
# merges across these chunks. Python's `re` has no \p{..}, so we spell the same classes with \w:
# [^\W\d_] is exactly Unicode L + Nl + No, \d is Nd, and (?:[^\s\w]|_) is everything else (the `_`
# alternative keeps underscores, which [^\s\w] alone would silently drop). tiktoken gets the \p{..}
# spelling; tests/test_tokenizer.py checks both split text identically.
SPLIT_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")
PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}\p{Nl}\p{No}]+| ?\p{Nd}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class _PunctTable(dict):
    """str.translate table built lazily: apostrophes -> deleted, other punctuation (P*) -> space."""

    def __missing__(self, c: int):
        v = None if chr(c) in "'\u2019" else ord(" ") if unicodedata.category(chr(c))[0] == "P" else c
        self[c] = v
        return v


_PUNCT = _PunctTable()


def normalize_caption(text: str, max_words: int = 30) -> str:
    """The caption cleaning of ALBEF/SIMLA, in our words: lower-case; drop apostrophes ("man's" ->
    "mans") and turn every other punctuation character (unicode category P*, so also "-", "/", "_",
    "«") into a space; collapse whitespace; keep the first `max_words` words. NFKC folds look-alike
    forms (full-width letters, ligatures) into plain ones. Emoji and symbols (category S*) are kept:
    they carry meaning and the byte-level BPE encodes them losslessly."""
    # NFKC before stripping, so look-alikes ("！", "ﬁ") are plain characters by then, and again after,
    # because deleting an apostrophe or lower-casing can leave a letter and an accent that compose:
    # the result must be a fixed point, as encode() normalizes text that may be normalized already.
    text = unicodedata.normalize("NFKC", text).translate(_PUNCT).lower()  # translate: 7x a char loop
    text = unicodedata.normalize("NFKC", text)
    return " ".join(text.split()[:max_words])


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids` (left to right) by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class Tokenizer:
    max_words = 30  # captions are cut to this many words before encoding (SIMLA uses 30)

    def __init__(self, ranks: dict[bytes, int], pat_str=PAT_STR, n_bpe: int | None = None, name="bpe"):
        self.ranks, self.pat_str, self.name = ranks, pat_str, name
        self.n_bpe = len(ranks) if n_bpe is None else n_bpe  # gpt2: its <|endoftext|> slot is unused
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = self.special_ids = [
            self.n_bpe + i for i in range(len(SPECIALS))]
        self.vocab_size = self.n_bpe + len(SPECIALS)
        self.enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks,
                                     special_tokens=dict(zip(SPECIALS, self.special_ids)))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> "Tokenizer":
        if vocab_size < 256 + len(SPECIALS):
            raise ValueError(f"vocab_size must be >= {256 + len(SPECIALS)} (256 bytes + specials)")
        # Captions repeat the same words endlessly, so count each unique chunk once with its frequency.
        chunks = Counter(c for t in texts for c in SPLIT_RE.findall(normalize_caption(t, cls.max_words)))
        words, freqs = [list(c.encode()) for c in chunks], list(chunks.values())  # ids, count per chunk
        counts: Counter = Counter()  # pair -> occurrences in the corpus
        where: dict[tuple[int, int], set[int]] = {}  # pair -> chunks that (may) contain it
        for w, (ids, f) in enumerate(zip(words, freqs)):
            for p in zip(ids, ids[1:]):
                counts[p] += f
                where.setdefault(p, set()).add(w)
        # Max-heap of (-count, pair) with lazy deletion: a stale entry (count changed since it was
        # pushed) is skipped when popped. Ties go to the smallest pair, so training is deterministic.
        heap = [(-c, p) for p, c in counts.items()]
        heapq.heapify(heap)
        vocab = [bytes([i]) for i in range(256)]
        ranks = {b: i for i, b in enumerate(vocab)}
        while len(vocab) < vocab_size - len(SPECIALS) and heap:
            neg, pair = heapq.heappop(heap)
            if counts.get(pair, 0) != -neg or neg == 0:
                continue
            # Should two pairs ever spell the same bytes ("ab"+"c", "a"+"bc"; not seen in practice),
            # reuse the id: tiktoken needs one rank per byte string, and merges by the rank of the bytes.
            token = vocab[pair[0]] + vocab[pair[1]]
            if token not in ranks:
                ranks[token] = len(vocab)
                vocab.append(token)
            new_id, changed = ranks[token], set()
            # Incremental update: only the chunks containing the pair are re-counted.
            for w in where.pop(pair):
                old = words[w]
                new = _merge(old, pair, new_id)
                if len(new) == len(old):
                    continue  # stale entry in `where`: an earlier merge already consumed the pair
                for p in zip(old, old[1:]):
                    counts[p] -= freqs[w]
                    changed.add(p)
                for p in zip(new, new[1:]):
                    counts[p] += freqs[w]
                    changed.add(p)
                    where.setdefault(p, set()).add(w)
                words[w] = new
            counts.pop(pair, None)
            for p in changed - {pair}:
                heapq.heappush(heap, (-counts[p], p))
        tok = cls(ranks)
        tok.requested = vocab_size  # a small corpus can run out of merges before reaching it
        return tok

    def save(self, dir) -> None:
        """tiktoken's text format (one "base64(token bytes) rank" line per token) + a JSON of specials."""
        d = Path(dir)
        d.mkdir(parents=True, exist_ok=True)
        lines = (f"{base64.b64encode(b).decode()} {r}" for b, r in sorted(self.ranks.items(), key=lambda x: x[1]))
        (d / RANKS_FILE).write_text("\n".join(lines) + "\n")
        meta = {"name": self.name, "pat_str": self.pat_str, "special_tokens": dict(zip(SPECIALS, self.special_ids)),
                "requested_vocab_size": getattr(self, "requested", self.vocab_size)}
        (d / SPECIALS_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, dir) -> "Tokenizer":
        d = Path(dir)
        if not (d / RANKS_FILE).is_file() or not (d / SPECIALS_FILE).is_file():
            raise FileNotFoundError(f"no tokenizer in {d}: expected {RANKS_FILE} and {SPECIALS_FILE} there")
        # Parsed here rather than with tiktoken.load.load_tiktoken_bpe, which copies any file it reads
        # into tiktoken's cache keyed by path, so a re-trained file at the same path would load stale.
        ranks = {base64.b64decode(b64): int(r) for b64, r in
                 (line.split() for line in (d / RANKS_FILE).read_text().splitlines() if line)}
        meta = json.loads((d / SPECIALS_FILE).read_text())
        tok = cls(ranks, meta["pat_str"], n_bpe=meta["special_tokens"]["[CLS]"], name=meta["name"])
        tok.requested = meta.get("requested_vocab_size", tok.vocab_size)
        return tok

    def encode(self, text: str) -> list[int]:
        """Normalized caption -> BPE ids, no specials. encode_ordinary treats "[MASK]" as plain text."""
        return self.enc.encode_ordinary(normalize_caption(text, self.max_words))

    def decode(self, ids) -> str:
        """Ids (list or tensor) -> text; special ids (and gpt2's unused <|endoftext|>) are skipped."""
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        return self.enc.decode([i for i in ids if i < len(self.ranks)])

    def __call__(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch -> ids (B, max_len) long = [CLS] tokens [SEP] [PAD]..., mask (B, max_len) bool, True = real."""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        # A plain loop, not enc.encode_ordinary_batch: that one submits every caption to a thread
        # pool, and for short captions the overhead dominates (100k captions: 4.4 s vs 0.8 s).
        rows = [[self.cls_id] + self.enc.encode_ordinary(normalize_caption(t, self.max_words))[: max_len - 2]
                + [self.sep_id] for t in texts]  # truncation keeps CLS and SEP
        ids = torch.tensor([r + [self.pad_id] * (max_len - len(r)) for r in rows], dtype=torch.long)
        ids = ids.view(len(texts), max_len)  # (B, T), also when B == 0
        return ids, ids != self.pad_id


def get_tokenizer(name: str, cache_dir, texts: Iterable[str] | None = None, vocab_size: int = 4096) -> Tokenizer:
    """"bpe": load from cache_dir, else train on `texts` and save there; "gpt2": tiktoken's GPT-2 BPE
    if it is already in tiktoken's local cache, plus our four specials after its 50257 ids; any other
    name is taken as a directory holding a saved tokenizer. vocab_size is checked against a cached
    BPE only when `texts` are given (a call that would train); without texts, whatever is cached loads."""
    if name == "bpe":
        d = Path(cache_dir)
        if (d / RANKS_FILE).is_file():
            tok = Tokenizer.load(d)
            if texts is not None and tok.requested != vocab_size:
                raise ValueError(f"tokenizer in {d} was trained for vocab_size {tok.requested}, asked for "
                                 f"{vocab_size}: pass vocab_size={tok.requested}, or delete {d} to re-train")
            return tok
        if texts is None:
            raise FileNotFoundError(f"no trained BPE in {d} ({RANKS_FILE}) and no captions given to train one")
        tok = Tokenizer.train(texts, vocab_size)
        tok.save(d)
        return tok
    if name == "gpt2":
        try:
            base = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: tiktoken tries to download and fails (requests/OS error)
            cache = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                     or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
            raise FileNotFoundError(f"the gpt2 tokenizer is not in tiktoken's cache ({cache}) and could not "
                                    f"be downloaded ({type(e).__name__}); use --tokenizer bpe") from e
        return Tokenizer(base._mergeable_ranks, base._pat_str, n_bpe=base.n_vocab, name="gpt2_simla")
    if Path(name, RANKS_FILE).is_file():
        return Tokenizer.load(name)
    raise ValueError(f"unknown tokenizer {name!r}: use 'bpe', 'gpt2' or a directory containing {RANKS_FILE}")
