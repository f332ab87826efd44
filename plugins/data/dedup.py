"""Deduplication steps. The first document of a group is kept; later copies are dropped, naming it.

`dedup_near` is MinHash with LSH banding: each document becomes `num_perm` minima of hashed word shingles
(the chance two documents share one minimum is their Jaccard similarity); documents that agree on a whole band
of rows become candidates, and a candidate whose signatures agree on at least `threshold` of the rows is a
near-duplicate. Banding finds candidates without comparing every pair.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydantic import BaseModel, Field, PositiveInt

_MASK64 = (1 << 64) - 1


def normalise(text: str) -> str:
    """Lower-cased, whitespace collapsed: copies differing only in case or spacing hash alike."""
    return " ".join(text.lower().split())


class DedupExactConfig(BaseModel):
    normalise: bool = Field(True, description="compare lower-cased text with whitespace collapsed (false: raw text)")


def dedup_exact(cfg: DedupExactConfig):
    first_of: dict[bytes, str] = {}

    def judge(doc: dict) -> str | None:
        text = normalise(doc["text"]) if cfg.normalise else doc["text"]
        key = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=16).digest()
        if key in first_of:
            return f"exact duplicate of '{first_of[key]}'"
        first_of[key] = doc["meta"]["id"]
        return None

    return judge


class DedupNearConfig(BaseModel):
    threshold: float = Field(0.8, gt=0, le=1, description="drop a document whose estimated Jaccard similarity "
                             "(over word shingles) to an earlier kept one is at least this")
    shingle_words: PositiveInt = Field(5, description="words per shingle")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash signature length (more: finer estimates, slower)")
    bands: PositiveInt | None = Field(None, description="LSH bands (null: chosen from threshold and num_perm)")
    seed: int = Field(0, description="seed of the MinHash hash functions")


def choose_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with the most rows whose S-curve midpoint (1/bands)^(1/rows) is still at or below the
    threshold: pairs at the threshold become candidates with high probability (recall first; the signature
    comparison then removes false candidates)."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if (1 / bands) ** (1 / rows) <= threshold:
            best = (bands, rows)
    return best


class MinHasher:
    def __init__(self, num_perm: int, shingle_words: int, seed: int):
        rng = np.random.default_rng(seed)
        self.mul = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)  # odd: a bijection mod 2**64
        self.xor = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.k = shingle_words
        self._word_hash: dict[str, int] = {}
        # Distinct odd multipliers per position in the shingle, so word order matters.
        self._position = rng.integers(1, 2**63, shingle_words, dtype=np.uint64) | np.uint64(1)

    def _words(self, text: str) -> np.ndarray:
        cache = self._word_hash
        out = []
        for w in text.lower().split():
            h = cache.get(w)
            if h is None:
                digest = hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                h = cache[w] = int.from_bytes(digest, "little")
            out.append(h)
        return np.array(out, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        words = self._words(text)
        if len(words) == 0:
            return words
        k = min(self.k, len(words))
        n = len(words) - k + 1
        acc = np.zeros(n, dtype=np.uint64)
        for j in range(k):  # uint64 arithmetic wraps mod 2**64, which is what a hash wants
            acc ^= words[j:j + n] * self._position[j]
            acc = (acc << np.uint64(7)) | (acc >> np.uint64(57))
        return np.unique(acc)

    def signature(self, text: str) -> np.ndarray | None:
        shingles = self.shingles(text)
        if len(shingles) == 0:
            return None
        sig = np.full(len(self.mul), np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), 4096):  # bounded memory for very long documents
            h = (shingles[start:start + 4096, None] ^ self.xor) * self.mul
            h ^= h >> np.uint64(29)
            np.minimum(sig, h.min(axis=0), out=sig)
        return sig


def dedup_near(cfg: DedupNearConfig):
    hasher = MinHasher(cfg.num_perm, cfg.shingle_words, cfg.seed)
    bands, rows = (cfg.bands, cfg.num_perm // cfg.bands) if cfg.bands else choose_bands(cfg.num_perm, cfg.threshold)
    if rows < 1:
        raise ValueError(f"dedup_near: bands={cfg.bands} is more than num_perm={cfg.num_perm}")
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    kept_sigs: list[np.ndarray] = []
    kept_ids: list[str] = []

    def judge(doc: dict) -> str | None:
        sig = hasher.signature(doc["text"])
        if sig is None:
            return None
        keys = [sig[b * rows:(b + 1) * rows].tobytes() for b in range(bands)]
        candidates = sorted({i for b, key in enumerate(keys) for i in buckets[b].get(key, ())})
        if candidates:
            similarity = (np.stack([kept_sigs[i] for i in candidates]) == sig).mean(axis=1)
            best = int(np.argmax(similarity))  # the first of the most similar: deterministic
            if similarity[best] >= cfg.threshold:
                return (f"near-duplicate of '{kept_ids[candidates[best]]}' "
                        f"(estimated Jaccard {similarity[best]:.2f} >= {cfg.threshold})")
        index = len(kept_sigs)
        kept_sigs.append(sig)
        kept_ids.append(doc["meta"]["id"])
        for b, key in enumerate(keys):
            buckets[b].setdefault(key, []).append(index)
        return None

    return judge
