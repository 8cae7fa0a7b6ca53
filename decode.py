"""Batch-1 decoding on a CPU: the per-token step generate.py runs in fp32, computed as llama2.c's run.c does.

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
import math

import torch
import torch.nn.functional as F

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


class FastDecoder:
    """A decode step for Engine (engine.Engine(..., decode_step=FastDecoder(model))): token (1, 1), pos (1,) ->
    logits (1, 1, V), reading and writing the KV cache the engine attached to the model (its prefill runs the
    model itself). Batch 1, fp32, CPU; anything else is refused (use the model's own decode_step)."""

    def __init__(self, model):
        w = model.tok_embeddings.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            raise UsageError(f"the fast decoder runs fp32 weights on a CPU, not {w.dtype} on {w.device.type}; "
                             f"pass --fast=False")
        if any(hasattr(m, "lora_A") for m in model.modules()):
            raise UsageError("the fast decoder runs plain weights; merge the LoRA adapter first (lora.merge_lora)")
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
