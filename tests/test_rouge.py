"""self_instruct.py's ROUGE-L novelty filter against Google's rouge_score: each score, the paper's keep/drop
decisions, and (opt-in) its speed on 10,000 x 10,000 instructions."""
import os
import random
import time

import pytest


def import_script(monkeypatch):
    monkeypatch.setattr("sys.argv", ["self_instruct.py"])  # it reads its --key=value flags at import
    import self_instruct
    return self_instruct


WORDS = ["the", "The", "cat", "sat", "on", "a", "mat", "dog's", "U.S.", "3.5", "e-mail", "naïve", "café", "ÉTÉ",
         "\u212a", "x2", "well-known", "(list)", "don't", "2024", "AI", "--", "given", "sentence", "Write", "poem"]


def sentence_pairs(n, seed=0):
    """Pairs of word sequences: unrelated, or the second a few edits away from the first (scores near 0.7)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a = [rng.choice(WORDS) for _ in range(rng.randint(0, 30))]
        b = list(a)
        for _ in range(rng.randint(0, 6)):
            op = rng.random()
            if op < 0.4 and b:
                b[rng.randrange(len(b))] = rng.choice(WORDS)
            elif op < 0.7 and b:
                del b[rng.randrange(len(b))]
            else:
                b.insert(rng.randint(0, len(b)), rng.choice(WORDS))
        pairs.append((" ".join(a), " ".join(b) if rng.random() < 0.8 else " ".join(rng.sample(WORDS, 8))))
    return pairs


def test_rouge_l_equals_rouge_score(monkeypatch):
    """Each pair's F1 from our tokens and rapidfuzz's LCS equals rouge_score's, within 1e-9 (in fact exactly),
    including the tokenizer's corners: punctuation, digits, accents, the Kelvin sign that lowercases to k."""
    from rouge_score import rouge_scorer, tokenizers
    si = import_script(monkeypatch)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = si.RougePool(0.0)
    pairs = sentence_pairs(400)
    near = 0
    for a, b in pairs:
        qa, qb = pool.encode(a), pool.encode(b)
        ref = scorer.score(a, b)["rougeL"].fmeasure
        lcs = si.LCSseq.similarity(qa, qb)
        ours = 2 * (lcs / len(qb)) * (lcs / len(qa)) / (lcs / len(qb) + lcs / len(qa)) if lcs else 0.0
        assert abs(ours - ref) < 1e-9, (a, b, ours, ref)
        assert si.rouge_tokens(a) == tokenizers.DefaultTokenizer(use_stemmer=False).tokenize(a)
        near += 0.5 < ref < 0.9
    assert near > 50  # the pairs do probe the threshold's neighbourhood


def test_filter_decisions_equal_the_papers_loop(monkeypatch):
    """keep_novel (length-pruned, batched cdist) keeps exactly what the paper's loop keeps: each candidate in turn
    scored by rouge_score against the seeds and every candidate kept before it, dropped above 0.7."""
    from rouge_score import rouge_scorer
    si = import_script(monkeypatch)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = sentence_pairs(160, seed=1)
    seeds = [a for a, _ in pairs[:80]]
    candidates = [b for _, b in pairs] + ["a b c d e f g h i j", "a b c d e f g x y z"]  # F1 exactly 0.7: kept
    pool = si.RougePool(0.7)
    pool.add(seeds)
    ours = pool.keep_novel(candidates)
    kept, theirs = list(seeds), []
    for c in candidates:
        theirs.append(max((scorer.score(c, k)["rougeL"].fmeasure for k in kept), default=0.0) <= 0.7)
        if theirs[-1]:
            kept.append(c)
    assert ours == theirs and 20 < sum(theirs) < len(candidates) - 20 and ours[-1] and ours[-2]
    assert pool.texts == set(kept)


def synthetic_instructions(n, rng, words):
    """Instruction-like word sequences (4-40 words, Zipf-like word choice), a tenth of them near-copies."""
    out = []
    for _ in range(n):
        if out and rng.random() < 0.1:
            w = rng.choice(out).split()
            w[rng.randrange(len(w))] = rng.choice(words)
            out.append(" ".join(w))
        else:
            out.append(" ".join(rng.choices(words, weights=[1 / (k + 1) for k in range(len(words))],
                                            k=rng.randint(4, 40))))
    return out


@pytest.mark.skipif(not os.environ.get("LLAMAFORGE_SLOW"), reason="a speed measurement; set LLAMAFORGE_SLOW=1")
def test_rouge_filter_speed(monkeypatch):
    """10,000 candidates against a pool of 10,000 (README: python -m pytest -s -k rouge_filter_speed)."""
    si = import_script(monkeypatch)
    rng = random.Random(0)
    words = [f"w{k}" for k in range(3000)]
    pool = si.RougePool(0.7)
    pool.add(synthetic_instructions(10_000, rng, words))
    candidates = synthetic_instructions(10_000, rng, words)
    t0, cpu0 = time.perf_counter(), time.process_time()
    keep = pool.keep_novel(candidates)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"\nROUGE-L filter: 10,000 candidates vs a pool of 10,000 in {seconds:.2f} s ({cpu:.2f} s of CPU time) on "
          f"{os.cpu_count()} cores; kept {sum(keep):,}")
    assert 5_000 < sum(keep) < 10_000 and seconds < 60
