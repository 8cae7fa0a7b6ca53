"""Token sampling in numpy, for the quick start (quick.py), which never imports torch: the same draw as
model.sample_next (top-k with ties, then the nucleus, then one draw), from a numpy Generator."""
import numpy as np


def sample(logits, temperature, top_k, top_p, rng, buffers=None):
    """A token id from logits (numpy, V) as model.sample_next draws one: the k most likely (ties with the k-th
    kept), the smallest set reaching top_p of the probability, then one draw from what is left. buffers: scratch(V)'s
    arrays, reused token to token (a fresh array of the vocab's size can cost an mmap and its page faults
    a token: 320 against 86 us here for top_k=200)."""
    x, work, cum = buffers or scratch(len(logits))
    np.divide(logits, np.float32(temperature), out=x)  # float32, as the runner's logits
    ids = None
    if top_k and top_k < len(x):
        np.copyto(work, x)
        work.partition(len(x) - top_k)
        ids = np.flatnonzero(x >= work[len(x) - top_k])
        x = x[ids]
    p = np.subtract(x, x.max(), out=work[:len(x)])
    np.exp(p, out=p)
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        # the nucleus without sorting the whole vocab: the m most likely (with their ties), sorted as a full
        # stable sort begins; a prefix of those kept is the whole sort's (cumsum adds in order), else m grows
        m = min(len(p), 256)
        while True:
            cand = np.arange(len(p)) if m >= len(p) else np.flatnonzero(p >= np.partition(p, len(p) - m)[len(p) - m])
            order = cand[descending(p[cand])]
            q = p[order]
            kept = np.cumsum(q) - q <= top_p  # the mass before each kept token is below top_p
            if not kept.all() or len(cand) == len(p):
                break
            # none left is likelier than q[-1]: at least (top_p - the mass so far) / q[-1] more are kept; past half
            # the vocab, sorting it all costs the same (a flat row goes there at once, not through 1024, 4096, ...)
            more = (float(top_p) - float(q.sum())) / float(q[-1]) if q[-1] > 0 else 0.0  # in float64: q[-1] may be
            m = max(4 * m, len(cand) + int(min(more, len(p))) + 1)  # denormal, and a float32 quotient infinite
            m = len(p) if m > len(p) // 2 else m
        order, p = order[kept], q[kept]
        ids = order if ids is None else ids[order]
    total = np.cumsum(p, dtype=np.float64, out=cum[:len(p)])
    k = min(int(np.searchsorted(total, rng.random() * total[-1], side="right")), len(p) - 1)
    return int(k if ids is None else ids[k])


def scratch(n):
    return np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float64)


def descending(p):
    """Indices of p (float32, >= 0) from the likeliest, ties in index order: np.argsort(-p, kind="stable"), but one
    quicksort of unique 64-bit keys (a float's bits above its index) takes 0.3 ms for 32000, a stable sort 2.1."""
    key = (np.uint64(0xFFFFFFFF) - p.view(np.uint32).astype(np.uint64)) << np.uint64(32)
    key |= np.arange(len(p), dtype=np.uint64)
    key.sort()
    return (key & np.uint64(0xFFFFFFFF)).astype(np.intp)
