"""The one quantizer: weights rounded exactly as each export format stores them, used by the exporters
(formats.py), by quantization-aware training (train.py --qat) and by int8 inference (Int8Linear, to_int8).

Formats (FORMATS), each a group of values sharing one scale along a weight's rows:
  llama2c_q8  llama2.c's version-2 file (runq.c): int8 in groups of group_size, scale = absmax/127 in fp32,
              q = round-half-to-even(w / scale), as llama2.c's export.py computes it
  q8_0        GGUF Q8_0: int8 in blocks of 32, scale d = absmax/127 stored as fp16, q = round-half-away(w * (1/d)),
              as gguf-py and ggml's reference quantizer compute it (q is rounded with the fp32 d, dequantized
              with the fp16 one)
  q4_0        GGUF Q4_0: 4-bit in blocks of 32, d = (the value of largest magnitude) / -8 as fp16,
              q = min(15, trunc(w / d + 8.5)), w ~ (q - 8) * d
dequantize(*quantize(w, fmt)) is bit for bit what a reader of the file gets back (tests compare with gguf's
reader and runq.c). Activations can be fake-quantized the way the format's C runtime quantizes them before its
integer dot products (runq.c's quantize(); ggml's Q8_0 rows for Q8_0 and Q4_0 weights).
"""
import itertools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import UsageError

FORMATS = ("llama2c_q8", "q8_0", "q4_0")
GGUF_BLOCK = 32  # values per Q8_0 / Q4_0 block
LLAMA2C_GROUPS = (64, 32, 16, 8, 4, 2, 1)  # the llama2.c v2 export's group: the largest of these that fits


def check_format(fmt):
    if fmt not in FORMATS:
        raise UsageError(f"quantization format {fmt!r} is not one of {', '.join(FORMATS)}")


def group_size(fmt, args, requested=0):
    """The group a format quantizes in for a model: 32 for GGUF; for llama2.c the largest of 64, 32, ... that
    divides both dim and hidden_dim (runq.c quantizes activations of both widths in the same groups)."""
    check_format(fmt)
    sizes = [requested] if requested else LLAMA2C_GROUPS if fmt == "llama2c_q8" else [GGUF_BLOCK]
    if fmt != "llama2c_q8" and requested not in (0, GGUF_BLOCK):
        raise UsageError(f"group_size={requested}: {fmt} always quantizes in blocks of {GGUF_BLOCK}; drop group_size")
    for gs in sizes:
        if gs > 0 and args.dim % gs == 0 and args.hidden_dim % gs == 0:
            return gs
    raise UsageError(f"group_size={sizes[0] if len(sizes) == 1 else 0} does not divide dim={args.dim} and "
                     f"hidden_dim={args.hidden_dim}" + ("; pass a divisor of both or group_size=0 to pick one"
                                                        if fmt == "llama2c_q8" else
                                                        f"; {fmt} needs both to be multiples of {GGUF_BLOCK}"))


def _groups(w, gs):
    w = w.detach().float()  # rounding has no gradient of its own: fake_quantize hands one straight through
    if w.shape[-1] % gs:
        raise UsageError(f"a tensor of shape {tuple(w.shape)} has rows of {w.shape[-1]}, not a multiple of the "
                         f"quantization group {gs}; pick a group size that divides the dimension")
    return w.reshape(-1, gs)


def round_half_away(x):
    """C's roundf (halves away from zero), computed as gguf-py's np_roundf does so the results agree bit for bit."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + (2 * (a - f)).floor())


def quantize(w, fmt, gs=0):
    """(q, scale) of w in fmt, grouped along its last dimension: q (n_groups, gs) int8 (q4_0: uint8 0..15),
    scale (n_groups,) float32 (llama2c_q8) or float16 (GGUF)."""
    check_format(fmt)
    if fmt == "llama2c_q8":
        g = _groups(w, gs or LLAMA2C_GROUPS[0])
        scale = g.abs().amax(1) / 127.0
        q = torch.round(g / torch.where(scale == 0, 1.0, scale)[:, None])  # an all-zero group stays 0, not nan
        return q.to(torch.int8), scale
    g = _groups(w, GGUF_BLOCK)
    if fmt == "q8_0":
        d = g.abs().amax(1, keepdim=True) / 127
        q = round_half_away(g * torch.where(d == 0, 0.0, 1 / d)).to(torch.int8)
    else:
        d = g.gather(1, g.abs().argmax(1, keepdim=True)) / -8  # argmax: the first of equal magnitudes, as numpy's
        q = torch.trunc(g * torch.where(d == 0, 0.0, 1 / d) + 8.5).clamp(0, 15).to(torch.uint8)
    return q, d[:, 0].half()


def dequantize(q, scale, fmt, shape=None):
    """The float32 weight a reader of fmt reconstructs from (q, scale), in shape (default: q's)."""
    check_format(fmt)
    values = (q.to(torch.int8) - 8) if fmt == "q4_0" else q
    w = values.float() * scale.float()[:, None]
    return w.reshape(shape if shape is not None else q.shape)


def roundtrip(w, fmt, gs=0):
    """dequantize(quantize(w)): w as the file stores it, in w's shape."""
    return dequantize(*quantize(w, fmt, gs), fmt, w.shape)


def ggml_blocks(q, scale, fmt, rows):
    """GGUF's bytes of a quantized tensor, (rows, bytes per row) uint8: per block the fp16 scale, then 32 int8
    (Q8_0) or 16 bytes of nibbles, value j in the low and value j + 16 in the high nibble of byte j (Q4_0)."""
    d = scale.numpy().astype("<f2").view(np.uint8).reshape(-1, 2)
    qs = q.numpy()
    if fmt == "q4_0":
        qs = qs[:, :GGUF_BLOCK // 2] | (qs[:, GGUF_BLOCK // 2:] << 4)
    elif fmt != "q8_0":
        raise UsageError(f"{fmt} is not a GGUF block format (q8_0, q4_0)")
    return np.concatenate([d, qs.view(np.uint8)], axis=1).reshape(rows, -1)


def fake_quantize(w, fmt, gs=0):
    """w rounded to fmt in the forward pass; in backward the straight-through estimator: the gradient passes to
    w unchanged, as if the rounding were the identity (Bengio et al. 2013; Jacob et al. 2018)."""
    return w + (roundtrip(w, fmt, gs) - w).detach()


def quantize_activations(x, fmt, gs):
    """x as the format's C runtime sees it before a matmul: runq.c quantizes each group of gs values to int8 with
    scale = absmax/127 (fp32, q = roundf(x / scale)); ggml quantizes the activations for Q8_0 and Q4_0 weights to
    Q8_0 rows (its reference quantizer). Returns the dequantized values, with a straight-through gradient."""
    g = _groups(x, gs if fmt == "llama2c_q8" else GGUF_BLOCK)
    if fmt == "llama2c_q8":
        scale = g.abs().amax(1, keepdim=True) / 127.0
        xq = round_half_away(g / torch.where(scale == 0, 1.0, scale)) * scale
    else:
        d = g.abs().amax(1, keepdim=True) / 127
        xq = round_half_away(g * torch.where(d == 0, 0.0, 1 / d)) * d.half().float()
    return x + (xq.reshape(x.shape) - x).detach()


# ---- quantization-aware training: the model's linear layers and embedding see their weights as the file will

class QATLinear(nn.Linear):
    """An nn.Linear whose forward rounds its weight (and, with activations, its input) to the export format; the
    parameter, its name and the checkpoint are those of the plain layer."""

    def forward(self, x):
        if not self.qat_on:
            return F.linear(x, self.weight)
        if self.qat_activations:
            x = quantize_activations(x, self.qat_format, self.qat_gs)
        return F.linear(x, fake_quantize(self.weight, self.qat_format, self.qat_gs))


class QATEmbedding(nn.Embedding):
    """The token embedding, rounded as the file stores it: groups run along rows, so rounding the looked-up rows
    equals looking up the rounded table (and costs B*T rows, not the vocabulary)."""

    def forward(self, idx):
        rows = F.embedding(idx, self.weight)
        return fake_quantize(rows, self.qat_format, self.qat_gs) if self.qat_on else rows


def check_qat(fmt, start_iter=0, lora_rank=0):
    """train.py's qat settings, before any work: fmt '' (off) or a format."""
    if start_iter < 0:
        raise UsageError(f"qat_start_iter={start_iter} must be >= 0")
    if fmt and fmt not in FORMATS:
        raise UsageError(f"qat={fmt!r} is not one of '', {', '.join(map(repr, FORMATS))}")
    if fmt and lora_rank:
        raise UsageError("qat rounds the full weights, which a LoRA run does not train; use lora_rank=0 with qat")


def qat(model, fmt, activations, on):
    """Fake quantization of every linear layer and the embedding in fmt (nothing when fmt is ''), on or off. The
    first call swaps the layers' classes (QATLinear, QATEmbedding), so the state dict keeps its keys; later calls
    only switch, so train.py calls it each iteration with on = (iter_num >= qat_start_iter) and a resumed run
    quantizes from the same iteration."""
    if not fmt:
        return
    gs = group_size(fmt, model.args)
    for m in model.modules():
        if type(m) in (nn.Linear, nn.Embedding):
            m.__class__ = QATLinear if isinstance(m, nn.Linear) else QATEmbedding
            m.qat_format, m.qat_gs, m.qat_activations = fmt, gs, activations
        if isinstance(m, (QATLinear, QATEmbedding)):
            m.qat_on = on


def check_export(trained, fmt, args, requested_gs=0):
    """Refuse to round a model trained for one quantized format into another: its QAT would be wasted, silently.
    trained is the checkpoint's qat setting ('' or None: anything goes), fmt the quant format of the export (None
    for float exports, which keep the trained weights)."""
    if not trained or fmt is None:
        return
    if fmt != trained:
        raise UsageError(f"the checkpoint was trained with qat={trained!r} but the export rounds to {fmt}; export "
                         f"to the format it was trained for ({EXPORT_OF[trained]}) or to a float format")
    if fmt == "llama2c_q8" and requested_gs and requested_gs != group_size(fmt, args):
        raise UsageError(f"the checkpoint was trained in groups of {group_size(fmt, args)} (qat={trained!r}); "
                         f"drop group_size={requested_gs} or pass group_size={group_size(fmt, args)}")


EXPORT_OF = {"llama2c_q8": "--format=llama2c_q8", "q8_0": "--format=gguf_q8", "q4_0": "--format=gguf_q4"}


# ---- int8 inference: weights kept as llama2.c's version-2 file keeps them (llama2c_q8 groups along the rows)

def to_words(q, gs):
    """q's values regrouped for a CPU loop that reads them 4 bytes at a time (decode.CompiledDecoder): each group of
    gs values (gs a multiple of 4) as gs/4 words of 4 bytes, byte b of word k holding the group's value b*gs/4 + k,
    so the 4 bytes of consecutive words meet 4 runs of consecutive activations. Along q's last dimension. Byte b
    is the word's bits 8b..8b+7 on a little-endian CPU (x86, ARM: what the compiled step runs on)."""
    return q.unflatten(-1, (-1, 4, gs // 4)).transpose(-1, -2).flatten(-3)


def from_words(q, gs):
    """to_words undone: the values in their own order."""
    return q.unflatten(-1, (-1, gs // 4, 4)).transpose(-1, -2).flatten(-3)


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8, q (out, in), with one fp32 scale per group of gs along each row, scale
    (out, in // gs): a quarter of fp32's memory. forward dequantizes the weight for F.linear, so every path runs
    (prefill, batched serving, the GPU, compile=True's CUDA graphs; one row under torch.compile: a reduction the
    dequantization fuses into); decode.CompiledDecoder's batch-1 CPU step
    instead reads the int8 bytes directly in its fused loops, from q regrouped in place (to_words; words=True),
    which the weight, the embedding's rows and the state dict read back in the values' own order."""
    words = False

    def __init__(self, q, scale):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def values(self, q=None):
        """q (or rows of it) in the values' own order, whatever the layout in memory."""
        q = self.q if q is None else q
        return from_words(q, self.q.shape[1] // self.scale.shape[1]) if self.words else q

    @property
    def weight(self):
        """The float32 weight a reader of the v2 file reconstructs (quant.dequantize's values, same bits)."""
        return (self.values().reshape(*self.scale.shape, -1).float() * self.scale[..., None]).view(self.q.shape)

    def forward(self, x):
        w = self.weight.to(x.dtype)
        if x.numel() == x.shape[-1] and torch.compiler.is_compiling():
            # one row (batch-1 decoding) under torch.compile (generate.py --compile=True on CUDA): the products summed
            # as a reduction, into which inductor fuses the dequantization, so the GEMV reads 1 byte a weight;
            # F.linear would read a dequantized copy written first (under autocast, a cast copy of that too)
            return (x.unsqueeze(-2) * w).sum(-1)
        return F.linear(x, w)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.words:  # a checkpoint or export written from a decoding model gets the file's order
            destination[prefix + "q"] = self.values()


class Int8Embedding(Int8Linear):
    """The token embedding in int8: a looked-up row is dequantized on its own (groups run along rows)."""

    def forward(self, idx):
        gs = self.q.shape[1] // self.scale.shape[1]
        return (self.values(self.q[idx]).float().unflatten(-1, (-1, gs)) * self.scale[idx][..., None]).flatten(-2)


def to_int8(model, gs=0, state=None):
    """Swap the model's linear layers and token embedding for int8 ones in llama2.c's v2 grouping (gs=0: the
    export's own choice, quant.group_size), quantizing the current weights with quantize(..., 'llama2c_q8'); with
    state, take each layer's q and scale from it instead (a v2 file read without dequantizing, where the model was
    built on the meta device and has no weights yet). A tied head stays one tensor. Returns the model."""
    if any(isinstance(m, (QATLinear, QATEmbedding)) for m in model.modules()) or \
            getattr(model, "packed", None) is not None or getattr(model, "packed_rows", None) is not None:
        raise UsageError("int8 weights need a plain model (no QAT layers, not packed by decode.py); load it afresh")
    if state is None:
        gs = group_size("llama2c_q8", model.args, gs)
    done = {}
    for prefix, parent in list(model.named_modules()):
        for name, m in list(parent.named_children()):
            if type(m) not in (nn.Linear, nn.Embedding):
                continue
            key = id(m.weight)
            if key not in done:  # the tied head and embedding share one weight: quantize it once
                if state is not None:
                    full = f"{prefix}.{name}" if prefix else name
                    q, scale = state[full + ".q"], state[full + ".scale"]
                else:
                    q, scale = quantize(m.weight, "llama2c_q8", gs)
                    q, scale = q.view(m.weight.shape), scale.view(m.weight.shape[0], -1)
                done[key] = (q, scale)  # on the weight's device (quantize computes there)
            cls = Int8Embedding if isinstance(m, nn.Embedding) else Int8Linear
            setattr(parent, name, cls(*done[key]))
    return model


def is_int8(model):
    return any(isinstance(m, Int8Linear) for m in model.modules())


def weight_bytes(model):
    """(bytes the model's weights take, bytes they would take in fp32), each tensor once (a tied head, packed
    views). Read from the module's own tensors: a state dict of regrouped int8 (Int8Linear.words) is a copy."""
    seen, fp32, saved = {}, 0, set(model.state_dict())  # persistent tensors only, not the rotary tables
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if name in saved and t.data_ptr() not in seen:
            seen[t.data_ptr()] = t.numel() * t.element_size()
            fp32 += 0 if name.endswith(".scale") else 4 * t.numel()
    return sum(seen.values()), fp32
