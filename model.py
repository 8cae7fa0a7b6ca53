"""The one Llama 2 model every llamaforge script shares.

Token embedding -> n_layers x (RMSNorm -> grouped-query attention with rotary embeddings -> residual,
RMSNorm -> SwiGLU feed-forward -> residual) -> RMSNorm -> vocabulary head. Parameter names follow
llama2.c (tok_embeddings, layers.N.attention.wq, ..., output) so export to other tools is a rename,
not a reshuffle. This file imports nothing of ours: it is the ground floor.
"""
import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

IGNORE_INDEX = -100  # the target of positions the loss skips (prompt and padding in fine-tuning data)


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    vocab_size: int = 32000
    hidden_dim: int | None = None  # None = Llama's rule from dim and multiple_of
    multiple_of: int = 32          # SwiGLU hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True    # llama2.c ties the head to the embedding; saves vocab*dim params
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                     "norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.hidden_dim is not None and self.hidden_dim <= 0:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                             f"pick n_heads that divides dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                             f"pick n_kv_heads that divides n_heads")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head size dim/n_heads={self.dim // self.n_heads} is odd; "
                             f"rotary embeddings need an even head size")
        if self.hidden_dim is None:
            # Llama: 2/3 of 4*dim (SwiGLU has three matrices, so this keeps FLOPs near a 4x MLP)
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self):
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: under bf16 autocast the mean of squares loses too many bits (an fp32 x skips the two
        # conversions, calls that copy nothing but cost their dispatch: decoding a token is ~1000 such calls)
        fp32 = x.dtype == torch.float32
        xf = x if fp32 else x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y if fp32 else y.type_as(x)) * self.weight


def precompute_rope(head_dim, max_seq_len, theta):
    """cos and sin tables of shape (max_seq_len, head_dim/2), in fp32, on the CPU (also under a meta device
    context: meta arange/outer would import ~1 s of torch's meta kernels); the model moves them with itself."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device="cpu").float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate (x[2i], x[2i+1]) pairs by position-dependent angles; x is (B, T, H, head_dim).
    Interleaved pairs are Meta's/llama2.c's layout; Hugging Face permutes wq/wk to use halves instead.
    cos, sin: (1 or B, T, 1, head_dim/2), as Transformer.forward shapes them once a call (B: each row at its own
    positions, batched decoding), or (T, head_dim/2) for every row at the same positions."""
    xf = (x if x.dtype == torch.float32 else x.float()).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out if out.dtype == x.dtype else out.type_as(x)


class KVCache(nn.Module):
    """Pre-allocated keys and values for incremental decoding: no torch.cat per token, fixed shapes. k and v,
    if given, are the (batch, kv heads, context, head_dim) tensors to use, e.g. views of some rows of a larger
    pool that a serving engine keeps for many requests."""
    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device, k=None, v=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        k = torch.zeros(shape, dtype=dtype, device=device) if k is None else k
        v = torch.zeros(shape, dtype=dtype, device=device) if v is None else v
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    def update(self, start_pos, k, v):
        T = k.shape[2]
        self.k[:, :, start_pos:start_pos + T] = k
        self.v[:, :, start_pos:start_pos + T] = v
        return self.k[:, :, :start_pos + T], self.v[:, :, :start_pos + T]

    def write(self, pos, k, v):
        """Static-shape variant for decode_step: write one token per row at a tensor position (one for all
        rows, or one per row), return the whole buffers."""
        if pos.numel() == 1:
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[rows, :, pos] = k[:, :, 0]
            self.v[rows, :, pos] = v[:, :, 0]
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)
        self.cache = None  # a KVCache while generating

    def forward(self, x, cos, sin, start_pos=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if isinstance(start_pos, torch.Tensor):
            # decode_step: attend over the whole pre-allocated cache with a mask of the filled positions,
            # so every step has identical shapes (what torch.compile/CUDA graphs need); costs reading
            # the unfilled part of the cache too
            k, v = self.cache.write(start_pos, k, v)
            filled = (torch.arange(k.shape[2], device=x.device)[None, :] <= start_pos[:, None])[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=filled, enable_gqa=self.n_kv_heads != self.n_heads)
            y = self.wo(y.transpose(1, 2).reshape(B, T, -1))
            return self.resid_dropout(y) if self.dropout else y
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        # SDPA picks the flash / memory-efficient kernel; enable_gqa lets it read the shared kv heads
        # directly instead of materialising n_heads copies with repeat_interleave.
        gqa = self.n_kv_heads != self.n_heads
        if T == 1 or start_pos == 0:
            # a single new token may attend to everything cached; a fresh sequence is plainly causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            # a chunk of T new tokens after start_pos cached ones: causal within the chunk, all of the past
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = self.wo(y.transpose(1, 2).reshape(B, T, -1))
        return self.resid_dropout(y) if self.dropout else y  # a dropout of 0 is a module call that does nothing


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        y = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.dropout(y) if self.dropout.p else y


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos=0):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # _weight: no init of its own (ours follows), so a model built on the meta device to be loaded
        # (checkpoint.build_model) runs no normal_ there, whose first call imports ~1 s of torch's meta kernels
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        if not self.tok_embeddings.weight.is_meta:
            nn.init.normal_(self.tok_embeddings.weight)  # nn.Embedding's own init: the same random stream as ever
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = precompute_rope(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # the first checkpoint_blocks blocks recompute their activations in backward instead of keeping them:
        # each costs one more forward of the block (~1/3 of its compute) and frees all but its input
        self.checkpoint_blocks = 0
        if self.output.weight.is_meta:
            return  # built to be loaded: random init would be thrown away
        self.apply(self._init_weights)
        # GPT-2/llama2.c: scale the init of projections that write into the residual stream by depth
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets=None, start_pos=0, ignore_index=IGNORE_INDEX, reduction="mean", loss_chunk=0):
        """tokens (B, T) -> logits. With targets: logits (B, T, V) and the cross-entropy over positions
        whose target is not ignore_index (reduction "mean", or "sum" so a trainer can normalise by the
        token count of a whole accumulation step, or "none": each position's -log p(target), 0 where ignored).
        Without targets: logits of the last position only (B, 1, V), which is all sampling needs and avoids a
        (B, T, V) tensor.
        loss_chunk > 0 (training memory saver): the loss is computed loss_chunk tokens at a time and each
        chunk's logits are recomputed in backward, so the (B, T, V) logits never exist; returns (None, loss).
        start_pos may be a long tensor, of 1 or B elements, for static-shape decoding (see decode_step)."""
        B, T = tokens.shape
        static = isinstance(start_pos, torch.Tensor)  # no bounds check then: it would sync with the GPU
        if not static and start_pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds the model's context of "
                             f"{self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        h = self.dropout(h) if self.dropout.p else h
        if static:  # (1 or B, T=1, 1, head_dim/2): shaped here once for apply_rope, not in each of its 2L calls
            cos, sin = self.rope_cos[start_pos][:, None, None], self.rope_sin[start_pos][:, None, None]
        else:
            at = slice(start_pos, start_pos + T)
            cos, sin = self.rope_cos[None, at, None], self.rope_sin[None, at, None]
        for i, layer in enumerate(self.layers):
            if i < self.checkpoint_blocks and self.training:
                h = activation_checkpoint(layer, h, cos, sin, start_pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, start_pos)
        h = self.norm(h)
        if targets is None:
            return self.output(h[:, [-1], :]), None
        if loss_chunk > 0:
            # one extra head matmul per token (~2*dim*vocab FLOPs) buys never holding B*T*V logits,
            # their fp32 copy and the softmax saved for backward: gigabytes at vocab 32000, seq 1024
            hf, tf, each = h.reshape(-1, h.size(-1)), targets.reshape(-1), "none" if reduction == "none" else "sum"
            parts = [activation_checkpoint(self._chunk_loss, hf[i:i + loss_chunk], tf[i:i + loss_chunk], ignore_index,
                                           each, use_reentrant=False) for i in range(0, hf.size(0), loss_chunk)]
            loss = torch.cat(parts) if each == "none" else sum(parts)
            if reduction == "mean":
                loss = loss / (tf != ignore_index).sum().clamp(min=1)
            return None, loss
        logits = self.output(h)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction)
        return logits, loss

    def _chunk_loss(self, h, targets, ignore_index, reduction="sum"):
        return F.cross_entropy(self.output(h).float(), targets, ignore_index=ignore_index, reduction=reduction)

    # ---- bookkeeping ----
    def num_params(self, non_embedding=False):
        """Parameter count; shared (tied) tensors counted once. non_embedding drops the token embedding
        (the number scaling laws and MFU use, since an embedding lookup costs no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        n += sum({id(b): b.numel() for name, b in self.named_buffers() if name.endswith(".q")}.values())  # int8
        if non_embedding:
            embedding = self.args.vocab_size * self.args.dim  # (an int8 model has no .weight to count)
            n -= embedding
            if self.args.tie_embeddings:  # the head still does a matmul with those weights
                n += embedding
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls (2 forward, 4 backward) plus attention's
        QK^T and AV, 12 * n_layers * dim * seq_len (PaLM appendix B)."""
        a = self.args
        return 6 * self.num_params(non_embedding=True) + 12 * a.n_layers * a.dim * seq_len

    # ---- decoding ----
    def setup_cache(self, batch_size, dtype=None, device=None, reuse=False):
        """Attach a KV cache to every attention layer. reuse=True keeps the previous call's buffers when
        batch, dtype and device match: CUDA-graph replay of a compiled decode step treats module buffers
        as fixed addresses, and new buffers on every generate() call would make it re-record the graph."""
        a = self.args
        dtype = dtype or self.norm.weight.dtype  # a plain parameter even when the matrices are int8
        device = torch.device(device) if device is not None else self.norm.weight.device
        pool = getattr(self, "_kv_pool", None) if reuse else None
        if pool is None or (pool[0].k.shape[0], pool[0].k.dtype, pool[0].k.device) != (batch_size, dtype, device):
            pool = [KVCache(batch_size, a.max_seq_len, a.n_kv_heads, a.dim // a.n_heads, dtype, device)
                    for _ in self.layers]
        self._kv_pool = pool if reuse else None  # kept only when asked: it holds B*context*layers of keys and values
        for layer, cache in zip(self.layers, pool):
            layer.attention.cache = cache

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def decode_step(self, token, pos):
        """One new token per row, token (B, 1), at position pos (a long tensor on the model's device: one
        position for every row, or B of them, one per row) -> logits (B, 1, V). Rows at different positions
        are how a server decodes requests of different lengths together. Every call has the same shapes and no
        host sync, so
        torch.compile(mode="reduce-overhead") can replay it as one CUDA graph: at batch 1 decoding is
        bound by kernel-launch overhead, not by the GPU. Needs setup_cache and a filled prefix."""
        return self(token, start_pos=pos)[0]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 generator=None, on_token=None, decode_step=None):
        """Extend idx (B, T) by up to max_new_tokens. temperature 0 is greedy. Uses the KV cache:
        one forward over the prompt, then one token at a time. Stops early when every row has
        produced one of eos_id (an id or a collection of ids). on_token(next_ids) is called after each
        step (for streaming). decode_step: a compiled model.decode_step (the caller compiles it, e.g.
        torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)) to run each new token
        through; the KV buffers are then kept between calls, as a replayed CUDA graph needs."""
        check_sampling(temperature, top_k, top_p)
        B, T = idx.shape
        max_new_tokens = min(max_new_tokens, self.args.max_seq_len - T)
        if max_new_tokens < 0:
            raise ValueError(f"prompt of {T} tokens is longer than the model's context of {self.args.max_seq_len}")
        autocast = torch.is_autocast_enabled(idx.device.type)  # then the cache holds what attention computes in
        self.setup_cache(B, dtype=torch.get_autocast_dtype(idx.device.type) if autocast else None,
                         reuse=decode_step is not None)
        stops = None if eos_id is None else torch.tensor(sorted({eos_id} if isinstance(eos_id, int) else set(eos_id)),
                                                         device=idx.device)
        try:
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            logits, _ = self(idx, start_pos=0)
            pos = T
            step, pos_t = decode_step, (torch.tensor([T], device=idx.device) if decode_step is not None else None)
            for _ in range(max_new_tokens):
                next_ids = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
                if stops is not None:  # a finished row repeats its stop token
                    next_ids = torch.where(done, idx[:, -1], next_ids)
                    done |= torch.isin(next_ids, stops)
                idx = torch.cat([idx, next_ids[:, None]], dim=1)
                if on_token is not None:
                    on_token(next_ids)
                if stops is not None and bool(done.all()):
                    break
                if pos >= self.args.max_seq_len:
                    break
                if step is not None:
                    logits = step(next_ids[:, None], pos_t).clone()  # clone: a CUDA graph reuses its output buffer
                    pos_t += 1
                else:
                    logits, _ = self(next_ids[:, None], start_pos=pos)
                pos += 1
        finally:
            self.clear_cache()
        return idx


def check_sampling(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is negative; use 0 for greedy or a positive value")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None to disable)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None to disable)")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest set of tokens whose probability mass reaches top_p
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # mass before this token already >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- scoring: what evaluation, training logs and preference training share --------------------------

def token_logprobs(logits, targets, ignore_index=IGNORE_INDEX):
    """log p(target) at each position (B, T), in fp32, and 0 where the target is ignore_index."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(targets == ignore_index, torch.zeros_like(logp), logp)


@torch.no_grad()
def score_batch(model, x, y, ignore_index=IGNORE_INDEX):
    """(summed loss, correct next-token guesses, scored positions) of one batch, as Python numbers; the
    sums of several batches make a loss, perplexity and accuracy over all of them (loss_metrics)."""
    logits, loss = model(x, y, ignore_index=ignore_index, reduction="sum")
    valid = y != ignore_index
    return loss.item(), ((logits.argmax(-1) == y) & valid).sum().item(), valid.sum().item()


def evaluate_batches(model, batches):
    """Loss, perplexity and next-token accuracy over an iterable of (x, y) batches, every scored token counting
    once (not a mean of batch means: masked batches hold different numbers of targets)."""
    sums = [0.0, 0, 0]
    for x, y in batches:
        sums = [a + b for a, b in zip(sums, score_batch(model, x, y))]
    return loss_metrics(*sums)


def loss_metrics(loss_sum, correct, count):
    """Mean loss per scored token, its perplexity (capped so a diverged model does not overflow) and accuracy.
    Nothing scored is nan, never a perfect 0 loss."""
    if count == 0:
        return {"loss": math.nan, "ppl": math.nan, "acc": math.nan}
    return {"loss": loss_sum / count, "ppl": math.exp(min(loss_sum / count, 50.0)), "acc": correct / count}
