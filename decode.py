"""Batch-1 decoding on a CPU: the per-token steps generate.py runs, computed as llama2.c's run.c does. Two of them:
FastDecoder (eager, fp32, no compile wait; below) and CompiledDecoder (--compile=True: fp32 or int8 weights, the
whole step compiled ahead of time into run.c's loops and kept on disk; the fastest, see its docstring and README).

At batch 1 a decode step is a string of matrix-vector products (GEMV) plus a few hundred tiny tensor ops. The
profile of the eager step (model.decode_step, 15M shape, 1 thread): matmuls 69% of the time, the 32000x288 head
alone ~6 ms; the rest per-op overhead (some 200 aten calls a token; 12% the masked attention over the whole
pre-allocated cache). So this step changes:
  - weight layout: every matrix transposed, (in, out) row-major, which MKL's GEMV streams 2.3x faster on the head;
    wq/wk/wv side by side and w1/w3 side by side, so a layer is four GEMVs; the model's own parameters become
    views of the packed matrices (no second copy; the eager path and the state dict unchanged);
  - attention over the filled prefix only, written straight into the KV cache the model's prefill filled;
  - per-op overhead: ~25 ops a layer (rotary as one complex multiply for q and k together, fused RMSNorm, in-place
    adds), no autograd, no dropout, no shape checks.
fp32 results equal the eager path's to float tolerance (tests compare logits and greedy tokens).
"""
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import warnings

import torch
import torch.nn.functional as F

from quant import from_words, to_words
from compile_cache import cache_dir, compiler, cpu_flags, prune
from runtime import UsageError


def rms_norm(x, weight, eps):
    """model.RMSNorm on a vector, in one fused op where torch has it (2.4+)."""
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, x.shape, weight, eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def pack(model):
    """Lay every matrix out transposed, (in, out) row-major, with q/k/v and gate/up side by side: a GEMV then
    streams the weight row by row, adding x[i] * row i into the output (what run.c's loop does in its own
    order), which MKL runs 2.3x faster than the dot-product form on the 32000x288 head (measured: 2.6 vs
    5.9 ms a token, 1 thread). The model's parameters become views of these matrices, so there is one copy
    and the eager path and state dict keep working. Done once; a packed model is left as it is."""
    if getattr(model, "packed", None) is not None:
        return model.packed

    def side_by_side(mods):
        packed = torch.cat([m.weight.detach().t() for m in mods], dim=1).contiguous()  # (in, sum of outs)
        start = 0
        for m in mods:
            rows = m.weight.shape[0]
            m.weight = torch.nn.Parameter(packed[:, start:start + rows].t(), requires_grad=False)
            start += rows
        return packed

    layers = [(side_by_side([ly.attention.wq, ly.attention.wk, ly.attention.wv]), side_by_side([ly.attention.wo]),
               side_by_side([ly.feed_forward.w1, ly.feed_forward.w3]), side_by_side([ly.feed_forward.w2]))
              for ly in model.layers]
    head = side_by_side([model.output])
    if model.args.tie_embeddings:
        model.tok_embeddings.weight = model.output.weight  # one tensor again: a column of head is a token's row
    model.packed = (layers, head)
    return model.packed


def check_plain(model, what, fix):
    """Both CPU steps run a plain model (no LoRA hooks) with fp32 parameters on a CPU (norm.weight tells: an int8
    model's matrices are buffers)."""
    w = model.norm.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        raise UsageError(f"{what} on a CPU, not {w.dtype} on {w.device.type}; {fix}")
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise UsageError(f"{what}, without LoRA hooks; merge the adapter first (lora.merge_lora)")


class FastDecoder:
    """A decode step for Engine (engine.Engine(..., decode_step=FastDecoder(model))): token (1, 1), pos (1,) ->
    logits (1, 1, V), reading and writing the KV cache the engine attached to the model (its prefill runs the
    model itself). Batch 1, fp32, CPU; anything else is refused (use the model's own decode_step)."""

    def __init__(self, model):
        check_plain(model, "the fast decoder runs fp32 weights", "pass --fast=False (int8: --compile=True)")
        if any(hasattr(m, "q") for m in model.modules()):
            raise UsageError("the fast decoder runs fp32 weights, not int8; pass --compile=True (or --fast=False)")
        self.layers, self.head = pack(model)
        self.model, a = model, model.args
        self.hd, self.nh, self.nkv = a.dim // a.n_heads, a.n_heads, a.n_kv_heads
        self.qk = (a.n_heads + a.n_kv_heads) * self.hd  # q and k lead wqkv's columns, v follows
        self.eps, self.scale = a.norm_eps, 1.0 / math.sqrt(self.hd)
        self.norms = [(ly.attention_norm.weight.detach(), ly.ffn_norm.weight.detach()) for ly in model.layers]
        self.rotation = torch.complex(model.rope_cos, model.rope_sin)  # (context, head_dim / 2): e^(i angle)

    @torch.no_grad()
    def __call__(self, token, pos):
        if token.shape[0] != 1:
            raise UsageError(f"the fast decoder decodes one sequence at a time, not {token.shape[0]}; "
                             f"pass --fast=False for batched decoding")
        m, p, hd, nkv = self.model, int(pos.reshape(-1)[0]), self.hd, self.nkv
        x = m.tok_embeddings.weight[int(token[0, 0])].clone()  # a strided row of the packed head when tied
        rot = self.rotation[p]
        for layer, (wqkv, wo, w13, w2), (n1, n2) in zip(m.layers, self.layers, self.norms):
            qkv = torch.matmul(rms_norm(x, n1, self.eps), wqkv)
            # q and k rotated together: pairs (x[2i], x[2i+1]) as complex numbers times e^(i angle), model's rope
            qk = torch.view_as_real(torch.view_as_complex(qkv[:self.qk].view(-1, hd // 2, 2)) * rot).view(-1, hd)
            cache = layer.attention.cache
            cache_k, cache_v = cache.k[0], cache.v[0]  # (kv heads, context, head_dim), filled by the prefill
            cache_k[:, p] = qk[self.nh:]
            cache_v[:, p] = qkv[self.qk:].view(nkv, hd)
            scores = torch.matmul(qk[:self.nh].view(nkv, -1, hd), cache_k[:, :p + 1].transpose(1, 2))
            y = torch.matmul(torch.softmax(scores.mul_(self.scale), dim=-1), cache_v[:, :p + 1])
            x += torch.matmul(y.view(-1), wo)
            gate, up = torch.matmul(rms_norm(x, n2, self.eps), w13).chunk(2)
            x += torch.matmul(F.silu(gate).mul_(up), w2)
        return torch.matmul(rms_norm(x, m.norm.weight, self.eps), self.head).view(1, 1, -1)


def stored(v):
    """v as a tensor in memory: inductor inlines a GEMV's input (a norm, the rotary, an int8 embedding row) into the
    GEMV's loop and recomputes it for every row, but must store a tensor it views with as_strided. (Its own knob for
    this, a lower realize-opcount threshold, also stores the int8 GEMV's per-weight terms: a full-size buffer.)"""
    return torch.as_strided(v, v.shape, v.stride())


def gemv(w, x):
    """w @ x as run.c computes it, one dot product per row, written so inductor compiles it to a vectorised loop
    over the rows, split across the threads (MKL's GEMV runs on one thread and streams (out, in) at half speed):
    w (out, in) fp32, or (q, scale) int8 in groups along the row, q as quant.to_words lays it out and seen as fp32
    (4 bytes a value), or, for groups not a multiple of 4, int8 in the values' order."""
    x = stored(x)
    if not isinstance(w, tuple):
        # four partial sums a row (each whole AVX2 vectors): four chains of dependent adds, not run.c's one (36 for
        # 288 values). 15M step, alternated call by call: +1.5% at 1 and 2 threads (6 of 7 runs); AVX-512: one sum
        if w.shape[1] % 32 or torch.backends.cpu.get_cpu_capability() != "AVX2":
            return (w * x).sum(-1)
        return (w.view(w.shape[0], 4, -1) * x.view(4, -1)).sum(-1).sum(-1)
    q, scale = w
    if q.dtype == torch.float32:
        # 4 weights a word: each byte shifted to the top and back (sign kept) is a lane of 8 (AVX2) or 16 ints, times
        # a run of consecutive activations. Loaded as fp32 and bit-cast: inductor loads int8 and int32 vectors
        # through a stack copy on AVX2 (8x slower; 32000x288 head, 1 thread: 14.4 ms as int8, 1.8 ms so)
        words = q.view(torch.int32).view(*scale.shape, -1)  # (out, groups, gs / 4)
        xs = x.view(scale.shape[1], 4, -1)  # (groups, 4, gs / 4): run b is the values byte b of the words holds
        terms = sum(((words << (24 - 8 * b)) >> 24).float() * xs[:, b] for b in range(4))
        return (terms * scale[..., None]).sum((-2, -1))
    # one reduction over the whole row (groups and their values), the group's scale broadcast inside it: 2x
    # faster here than a sum per group then a sum of the scaled groups (measured, 32000x288 head, 1 thread)
    return (q.view(*scale.shape, -1) * x.view(scale.shape[1], -1) * scale[..., None]).sum((-2, -1))


def words_layout():
    """Whether the compiled int8 step reads its weights regrouped into 4-byte words (quant.to_words): on AVX2, where
    inductor loads int8 vectors through a stack copy. Elsewhere the int8 values are read in order: on AVX-512 their
    loads are vectorised and the words' shifts are not (32000x288 head, 1 thread: 0.54 ms in order, 6.1 as words)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def pack_rows(model):
    """q/k/v and gate/up stacked along their rows (one GEMV each), in place: the model's weights (fp32 parameters
    or quant.Int8Linear's q and scale) become row slices of the stacked tensors, one copy, eager code unchanged.
    int8 q in groups of a multiple of 4 is regrouped into words (quant.to_words) where words_layout() says so, the
    head and embedding too, which Int8Linear reads back in order. Returns [(wqkv, wo, w13, w2)] per layer, each a
    tensor or a (q, scale) pair."""
    if getattr(model, "packed_rows", None) is not None:
        return model.packed_rows
    if getattr(model, "packed", None) is not None:
        raise UsageError("this model was packed for the eager fast step; load it afresh for the compiled one")

    int8 = hasattr(model.layers[0].attention.wq, "q")
    parts = ("q", "scale") if int8 else ("weight",)
    gs = model.tok_embeddings.q.shape[1] // model.tok_embeddings.scale.shape[1] if int8 else 0
    if int8 and model.tok_embeddings.words:
        raise UsageError("this model's int8 weights were regrouped by an earlier packing; load it afresh")
    words = int8 and gs % 4 == 0 and words_layout()

    def laid_out(m, n):
        t = getattr(m, n).detach()
        return to_words(t, gs) if words and n == "q" else t

    # every layer's matrices side by side in one tensor per part (views of it): a tensor of 2 MB or more is backed by
    # 2 MB pages (runtime.huge_pages), a matrix of its own here (0.3-1.8 MB in the 15M shape) by 4 KB ones, and the
    # TLB misses of streaming those cost 5-8% of a token (measured, 15M shape, 1 and 2 threads)
    every = [m for ly in model.layers for m in (ly.attention.wq, ly.attention.wk, ly.attention.wv, ly.attention.wo,
                                                ly.feed_forward.w1, ly.feed_forward.w2, ly.feed_forward.w3)]
    arena = {n: torch.empty(sum(getattr(m, n).numel() for m in every), dtype=getattr(every[0], n).dtype) for n in parts}
    used = dict.fromkeys(parts, 0)

    def stacked(mods):
        whole = []
        for n in parts:
            pieces = [laid_out(m, n) for m in mods]
            rows, cols = sum(p.shape[0] for p in pieces), pieces[0].shape[1]
            whole.append(torch.cat(pieces, out=arena[n][used[n]:used[n] + rows * cols].view(rows, cols)))
            used[n] += rows * cols
        start = 0
        for m in mods:
            rows = m.q.shape[0] if int8 else m.weight.shape[0]
            for n, w in zip(parts, whole):
                piece = w[start:start + rows]
                setattr(m, n, piece if int8 else torch.nn.Parameter(piece, requires_grad=False))
            if int8:
                m.words = words
            start += rows
        return tuple(whole) if int8 else whole[0]

    model.packed_rows = [(stacked([ly.attention.wq, ly.attention.wk, ly.attention.wv]), stacked([ly.attention.wo]),
                          stacked([ly.feed_forward.w1, ly.feed_forward.w3]), stacked([ly.feed_forward.w2]))
                         for ly in model.layers]
    if words:  # the head and the embedding (one tensor when tied), regrouped in their own memory, once each
        for q in {id(m.q): m.q for m in (model.tok_embeddings, model.output)}.values():
            q.copy_(to_words(q, gs))
        model.tok_embeddings.words = model.output.words = True
    return model.packed_rows


def weights_of(m):
    return (m.q, m.scale) if hasattr(m, "q") else m.weight.detach()


class CompiledDecoder:
    """generate.py --compile=True on a CPU: a batch-1 decode step for engine.Engine. The engine calls
    decode_ids(token id, position) -> (logits (1, V), their argmax as an int), Python ints in and out: the kernel
    is the one torch call of a token (each tensor op around it costs tens of microseconds with the CPU caches cold
    from the weights; measured). Called as a step, token (1, 1), pos (1,) -> (logits (1, 1, V), argmax (1,)), as
    model.decode_step is (model.generate's decode_step wants logits alone: use the engine). fp32 or int8
    weights (quant.Int8Linear), compiled ahead of time by AOTInductor into one C++ kernel a step (the GEMVs as
    run.c writes them, rows split across threads, the int8 ones reading 1 byte a weight) and kept on disk as a
    .pt2 package. The package takes the weights and the KV cache as inputs, so it serves every model of the same
    shape: the first run of a shape compiles (20-30 s on 2 cores), every later one loads it in milliseconds,
    without importing torch's compiler. fp32 logits equal the eager step's to float tolerance; int8 equals the
    eager step of the dequantized model to float tolerance (the same products, summed in another order). Compiled for
    torch's thread count at construction (part of the package's key); the position is a dynamic size, so one
    package serves every cache length up to the context."""

    def __init__(self, model, folder=""):
        check_plain(model, "the compiled CPU decoder runs fp32 or int8 weights",
                    "on CUDA --compile=True compiles the model's own step")
        a, self.model = model.args, model
        layers = pack_rows(model)
        words = getattr(model.output, "words", False)  # int8 regrouped into words: gemv reads them seen as fp32

        def for_gemv(w):
            return (w[0].view(torch.float32), w[1]) if words else w
        layers = [tuple(map(for_gemv, ly)) for ly in layers]
        hd, nh, nkv, hidden, eps = a.dim // a.n_heads, a.n_heads, a.n_kv_heads, a.hidden_dim, a.norm_eps
        scale = 1.0 / math.sqrt(hd)

        def rms(x, weight):
            return x * torch.rsqrt(x.pow(2).mean() + eps) * weight

        class Step(torch.nn.Module):
            def forward(self, token, filled, best, emb, layers, norms, final_norm, head, cos, sin, caches):
                p = filled.shape[0] - 2  # the position, as the length of an empty (pos + 2, 0) tensor: a dynamic size
                token = token.view(1)
                if isinstance(emb, tuple):  # an int8 row: put in order and dequantized on its own
                    row = emb[0][token].view(-1)
                    row = from_words(row, row.shape[0] // emb[1].shape[1]) if words else row
                    x = (row.float().view(emb[1].shape[1], -1) * emb[1][token].view(-1, 1)).view(-1)
                else:
                    x = emb[token].view(-1)
                c, s = cos[p], sin[p]
                # the filled prefix and position p once more, its score masked out: at position 0 a prefix of one
                # would be a size-1 dim, which export specializes. index_select: a slice could be the whole cache,
                upto, extra = torch.arange(p + 2).clamp(max=p), torch.arange(p + 2) > p  # which export refuses
                for (wqkv, wo, w13, w2), (n1, n2), (ck, cv) in zip(layers, norms, caches):
                    ck, cv = ck[0], cv[0]  # (kv heads, context, head_dim) of the one row
                    qkv = gemv(wqkv, rms(x, n1))
                    qk = qkv[:(nh + nkv) * hd].view(nh + nkv, hd // 2, 2)  # rotary on q and k together, model's pairs
                    qk = torch.stack([qk[..., 0] * c - qk[..., 1] * s, qk[..., 0] * s + qk[..., 1] * c], -1)
                    q, k = qk[:nh].view(nkv, nh // nkv, hd), qk[nh:].view(nkv, hd)
                    ck[:, p:p + 1] = k[:, None]
                    cv[:, p:p + 1] = qkv[(nh + nkv) * hd:].view(nkv, 1, hd)
                    keys, values = ck.index_select(1, upto), cv.index_select(1, upto)
                    scores = ((keys[:, None] * q[:, :, None]).sum(-1) * scale).masked_fill(extra, -math.inf)
                    # softmax by hand: inductor inlines its division into the sum over the values below, a division
                    # per vector of values read (hd / 8 per probability on AVX2); times the sum's reciprocal, computed
                    # once a head (15M shape, alternated call by call: 1 thread +3.7-4% a token; 2 threads -2.0-2.4%,
                    # though the C++ differs by that multiplication alone: code placement, see BENCHMARKS.md)
                    e = torch.exp(scores - scores.amax(-1, keepdim=True))
                    probs = e * (1 / e.sum(-1, keepdim=True))
                    x = x + gemv(wo, (probs[..., None] * values[:, None]).sum(-2).view(-1))
                    gate_up = gemv(w13, rms(x, n2))
                    x = x + gemv(w2, F.silu(gate_up[:hidden]) * gate_up[hidden:])
                logits = gemv(head, rms(x, final_norm))
                best.copy_(logits.argmax().view(1))  # vectorised (torch's argmax takes 28 us), read by the caller
                return logits.view(1, -1)  # from the buffer it shares with Python, no tensor op

        self.step = Step()
        self.args = (weights_of(model.tok_embeddings), layers,
                     [(ly.attention_norm.weight.detach(), ly.ffn_norm.weight.detach()) for ly in model.layers],
                     model.norm.weight.detach(), for_gemv(weights_of(model.output)), model.rope_cos, model.rope_sin)
        # the KV cache the engine will attach (model.setup_cache(1)): its shape is part of the package
        self.kind = [(torch.float32, (nkv, a.max_seq_len, hd))] * (2 * a.n_layers)
        code = hashlib.sha256()  # this code, as it computes the step, and quant's layout of the int8 words
        for path in (__file__, sys.modules[to_words.__module__].__file__):
            with open(path, "rb") as f:
                code.update(f.read())
        code = code.hexdigest()
        self.threads, self.vocab, self.context = torch.get_num_threads(), a.vocab_size, a.max_seq_len
        key = json.dumps([torch.__version__, self.threads, eps, _cpu_flags(), _compiler(), code,
                          [(str(t.dtype), tuple(t.shape), t.stride()) for t in _tensors(self.args)],
                          [(str(d), s) for d, s in self.kind]])
        folder = folder or cache_dir()
        self.path = os.path.join(folder, f"decode-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt2")
        self.cached = os.path.exists(self.path)  # else the first call compiles
        try:  # checked now, not at the first token: a caller may have started printing by then
            os.makedirs(folder, exist_ok=True)
            problem = None if self.cached or os.access(folder, os.W_OK) else "not writable"
        except OSError as e:  # a file in the way, a path through a file
            problem = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror.lower()
        if problem:
            raise UsageError(f"the compile cache {folder} cannot hold the compiled step ({problem}); pass "
                             f"--compile_cache=<a folder you can write> (or set $LLAMAFORGE_CACHE)")
        self.runner, self.marked = None, None
        self.attention = [ly.attention for ly in model.layers]  # read every step: no nn.Module lookups then
        # the token in and the argmax out live in a bytearray Python reads and writes as ints (ids[0], ids[1]); the
        # position is passed as the length of an empty tensor (filled), one made per position, once
        buffer = bytearray(16)
        self.ids, both = memoryview(buffer).cast("q"), torch.frombuffer(buffer, dtype=torch.long)
        self.token, self.best, self.filled = both[:1].view(1, 1), both[1:], [None] * self.context

    def notice(self):
        """What a script says before the first call of a step that is not on disk yet."""
        return (f"compiling the decode step for this shape and {self.threads} thread(s), once (20-30 s on 2 cores; "
                f"kept in {os.path.dirname(self.path)}) ...")

    def compile(self, caches):
        """Export the step for these inputs and compile it into self.path (a temporary file, then renamed: a
        killed compile leaves no half package, and two processes compiling the same shape both end well)."""
        from torch.export import Dim, export
        n = caches[0][0].shape[2]
        token, best = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        example = (token, torch.empty(max(2, n // 2), 0), best, *self.args, caches)
        shapes = [torch.utils._pytree.tree_map(lambda t: None, x) for x in example]
        shapes[1] = {0: Dim("filled", min=2, max=n + 1)}  # sizes 0 and 1 are special to export
        # the key's thread count, whatever torch's is by the first call; multiply-adds fused (FMA), as run.c's -Ofast
        # does (inductor compiles with -ffp-contract=off): fewer instructions a weight, so more of the weights' loads
        # in flight (15M shape, alternated call by call: fp32 +1% at 1 thread, +3.7-5.8% at 2; int8 +13-15%)
        options = {"cpp.threads": self.threads, "cpp.enable_floating_point_contract_flag": "fast"}
        tmp = f"{self.path}.{os.getpid()}.tmp.pt2"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations, not the user's
                program = export(self.step, example, dynamic_shapes=tuple(shapes), strict=False)
                torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=options)
            os.replace(tmp, self.path)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UsageError(f"compiling the decode step failed ({first}); install a C++ compiler (g++) or pass "
                             f"--compile=False") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        with contextlib.suppress(OSError):  # housekeeping: it never fails a compile that succeeded
            prune(os.path.dirname(self.path), keep=self.path)

    def __call__(self, token, pos):
        if token.shape != (1, 1) or token.dtype != torch.long:
            raise UsageError(f"the compiled CPU decoder takes one int64 token of one sequence, shape (1, 1), not "
                             f"{tuple(token.shape)} {token.dtype}; pass --compile=False for batched decoding")
        logits, best = self.decode_ids(int(token), int(pos))
        return logits.view(1, 1, -1), torch.tensor([best])

    def decode_ids(self, token, pos):
        """(logits (1, V), their argmax) for token id `token` at position `pos`, into the KV cache attached."""
        # the kernel checks no bounds: a position past the cache or a token past the vocab would write or read
        # outside their tensors, where the eager step raises
        if not (0 <= pos < self.context and 0 <= token < self.vocab):
            raise UsageError(f"position {pos} or token {token} is outside the compiled step's range (positions 0 to "
                             f"{self.context - 1}, tokens below {self.vocab})")
        # the engine attaches the same caches every step: the input list is made when they change. The KVCache
        # modules are compared, not their buffers: nothing here swaps a buffer inside an attached cache
        kv = [a.cache for a in self.attention]
        if kv != self.marked:
            caches = [(c.k, c.v) for c in kv]
            if [(t.dtype, tuple(t.shape[1:])) for pair in caches for t in pair] != self.kind or \
                    not all(t.shape[0] == 1 and t.is_contiguous() for pair in caches for t in pair):
                raise UsageError("the compiled decoder runs the fp32 KV cache of model.setup_cache(1); make a new "
                                 "CompiledDecoder for another one")
            if self.runner is None:
                self.runner = self.load(caches)
            self.inputs = _tensors((self.args, caches))
            self.marked = kv
        filled = self.filled[pos]
        if filled is None:
            filled = self.filled[pos] = torch.empty(pos + 2, 0)
        self.ids[0] = token
        (logits,) = self.runner.boxed_run([self.token, filled, self.best, *self.inputs])
        return logits, self.ids[1]

    def ensure(self):
        """Have the package on disk (compiled now if need be) and loading; for a caller that runs it itself (quick.py
        reads its library). Returns (its path, the step's inputs but the KV cache, the cache's [(dtype, shape)])."""
        caches = [torch.zeros(1, *shape, dtype=dtype) for dtype, shape in self.kind]
        self.load(list(zip(caches[::2], caches[1::2])))
        return self.path, _tensors(self.args), [(str(d).split(".")[1], [1, *s]) for d, s in self.kind]

    def load(self, caches):
        """The package's runner, compiled first if it is not on disk; a package that no longer loads (a torch
        update not in its name, a damaged file) is compiled again, once."""
        for attempt in (0, 1):
            if not os.path.exists(self.path):
                self.compile(caches)
            with contextlib.suppress(OSError):  # its time is its last use (compile_cache.prune keeps what is used); a
                os.utime(self.path)  # read-only cache folder serves as it is
            try:
                return torch._C._aoti.AOTIModelPackageLoader(self.path, "model", False, 1, -1)
            except RuntimeError as e:
                if attempt:
                    raise UsageError(f"the compiled decode step {self.path} does not load ({str(e)[:200]}); "
                                     f"pass --compile=False") from None
                with contextlib.suppress(FileNotFoundError):  # another process removed it first
                    os.remove(self.path)


def _tensors(tree):
    """The tensors of nested tuples and lists, in the order the exported step takes them."""
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _cpu_flags():
    """The CPU's instruction sets (the package's kernels are compiled for them), and the vector width torch picks."""
    return [platform.machine(), torch.backends.cpu.get_cpu_capability(), cpu_flags()]


def _compiler():
    """The C++ compiler inductor builds the step with, as a file, its size and time: another compiler, or an upgrade,
    gets a package of its own (they differ, e.g. on where -ffp-contract=fast fuses). inductor's choice is its config's
    cpp.cxx, read from $CXX (else g++; clang++ on macOS) at the config's import: found so, without importing it (a
    cached step never imports the compiler). None without a compiler (nothing then compiles)."""
    config = sys.modules.get("torch._inductor.config")
    cxx = config.cpp.cxx if config is not None else None
    return compiler(cxx[-1] if isinstance(cxx, (list, tuple)) else cxx)
