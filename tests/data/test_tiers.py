"""Tier steps: each keeps ordinary documents and drops its kind of junk with a reason; run_tiers records why."""

import random

from hyloom.data import document, reason_pattern, run_tiers
from hyloom.plugins.data import dedup, filters
from hyloom.plugins.data.sources import StdlibConfig, StdlibSource

PROSE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch, "
         "wondering whether the weather will hold until the harvest is in. ") * 3


def doc(text, id="d"):
    return document(text, id, "test")


def judge(name, **cfg):
    build = getattr(filters, name, None) or getattr(dedup, name)
    config = {"length": filters.LengthConfig, "symbols": filters.SymbolsConfig, "digits": filters.DigitsConfig,
              "repeated_lines": filters.RepeatedLinesConfig, "non_text": filters.NonTextConfig,
              "dedup_exact": dedup.DedupExactConfig, "dedup_near": dedup.DedupNearConfig}[name]
    return build(config(**cfg))


def test_length():
    j = judge("length", min_chars=20, max_chars=1000, min_words=4)
    assert j(doc(PROSE)) is None
    assert j(doc("tiny")) == "too short: 4 chars < 20"
    assert j(doc("x" * 1001)) == "too long: 1001 chars > 1000"
    assert j(doc("supercalifragilistic expialidocious")) == "too few words: 2 < 4"


def test_symbols_drop_symbol_soup():
    j = judge("symbols")
    assert j(doc(PROSE)) is None
    soup = "{}[]<>!@#$%^&*()_+=|\\/?~`;:" * 20 + " ok words here"
    reason = j(doc(soup))
    assert reason.startswith("symbol ratio 0.9") and reason.endswith("> 0.45")


def test_digits_drop_tables():
    j = judge("digits", max_ratio=0.3)
    assert j(doc(PROSE + " in 1999 and 2024")) is None
    table = "\n".join(f"    0x{i:04X}: 0x{i * 7:04X},  # {i}" for i in range(200))
    assert j(doc(table)).startswith("digit ratio 0.")


def test_repeated_lines():
    j = judge("repeated_lines", max_fraction=0.5)
    assert j(doc("a = 1\nb = 2\nreturn\n\nreturn\n")) is None  # 1 of 4 lines repeats
    assert j(doc("spam\n" * 9 + "eggs\n")) == "repeated lines 0.80 > 0.5"
    assert j(doc("\n\n")) is None


def test_non_text_drops_binaries():
    j = judge("non_text")
    assert j(doc(PROSE + "\tcol\r\n\x0cpage")) is None  # tabs, CRLF and form feeds are text
    binary = bytes(random.Random(0).randrange(256) for _ in range(2000)).decode("utf-8", errors="replace")
    assert j(doc(binary)).startswith("non-text characters ")
    assert j(doc("text with a NUL\x00 in it")) == "non-text characters 0.045 > 0.001"  # 1 of 22


def test_dedup_exact_normalises_case_and_spacing():
    j = judge("dedup_exact")
    assert j(doc("Hello   World\n", "a")) is None
    assert j(doc("hello world", "b")) == "exact duplicate of 'a'"
    assert j(doc("hello world!", "c")) is None
    raw = judge("dedup_exact", normalise=False)
    assert raw(doc("Hello World", "a")) is None and raw(doc("hello world", "b")) is None


def words(n, seed):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(500)]
    return [rng.choice(vocab) for _ in range(n)]


def test_dedup_near_catches_an_edited_copy_only():
    base = words(300, 1)
    edited = list(base)
    edited[100], edited[200] = "changed", "edited"  # 2 of 300 words: Jaccard of 5-shingles ≈ 0.94
    j = judge("dedup_near")
    assert j(doc(" ".join(base), "orig")) is None
    assert j(doc(" ".join(words(300, 2)), "other")) is None
    reason = j(doc("\n".join(edited), "copy"))
    assert reason.startswith("near-duplicate of 'orig' (estimated Jaccard 0.9")
    half = base[:150] + words(150, 3)  # shares half its words: Jaccard ≈ 1/3, below the threshold
    assert j(doc(" ".join(half), "half")) is None


def test_minhash_estimates_jaccard():
    hasher = dedup.MinHasher(num_perm=256, shingle_words=1, seed=0)
    a, b = set(range(0, 600)), set(range(200, 800))  # Jaccard 400 / 800 = 0.5
    sig_a = hasher.signature(" ".join(map(str, sorted(a))))
    sig_b = hasher.signature(" ".join(map(str, sorted(b))))
    assert abs((sig_a == sig_b).mean() - 0.5) < 0.1


def test_choose_bands_puts_the_s_curve_below_the_threshold():
    bands, rows = dedup.choose_bands(128, 0.8)
    assert bands * rows <= 128 and (1 / bands) ** (1 / rows) <= 0.8
    assert (1 / (128 // (rows + 1))) ** (1 / (rows + 1)) > 0.8  # the most rows that still fits


def test_run_tiers_records_the_step_and_reason():
    steps = [("length", "length", judge("length", min_chars=10)),
             ("dedup_exact", "dedup_exact", judge("dedup_exact"))]
    docs = [doc(PROSE, "a"), doc("short", "b"), doc(PROSE, "c")]
    kept, records, reports = run_tiers(docs, steps)
    assert [d["meta"]["id"] for d in kept] == ["a"]
    assert records[0] == {"id": "a", "source": "test", "chars": len(PROSE),
                          "tier": 1, "dropped_by": None, "reason": None}
    assert records[1]["tier"] == 0 and records[1]["dropped_by"] == "length"
    assert records[1]["reason"] == "too short: 5 chars < 10"
    assert (records[2]["dropped_by"], records[2]["reason"]) == ("dedup_exact", "exact duplicate of 'a'")
    assert [(r.seen, r.dropped) for r in reports] == [(3, 1), (2, 1)]  # a dropped document goes no further
    assert reports[0].reasons == {"too short: # chars < #": 1}


def test_reason_pattern_groups_by_wording():
    assert reason_pattern("symbol ratio 0.41 > 0.3") == "symbol ratio # > #"
    assert reason_pattern("near-duplicate of 'x.py' (estimated Jaccard 0.93 >= 0.8)") == \
        "near-duplicate of '…' (estimated Jaccard # >= #)"


def test_defaults_keep_most_of_the_stdlib():
    docs = list(StdlibSource(StdlibConfig(max_bytes=3_000_000)))
    for name in ("length", "symbols", "digits", "repeated_lines", "non_text", "dedup_exact", "dedup_near"):
        j = judge(name)
        dropped = [d["meta"]["id"] for d in docs if j(d) is not None]
        assert len(dropped) <= 0.05 * len(docs), (name, dropped)
