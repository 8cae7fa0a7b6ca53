"""quant.py, the one quantizer: each format rounds exactly as its file stores weights (checked against gguf-py's
own quantizer and reader, a hand computation of llama2.c's rounding, and runq.c itself), QAT trains against
those same numbers (a QAT model exported and read back gives the logits it gave in training), and bad input is
one line of error."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import export
import quant
from checkpoint import build_model, load_checkpoint
from conftest import TINY, make_dataset, one_line_error, run_script, shared
from model import ModelArgs, Transformer
from runtime import UsageError


def weights(rows=64, cols=256, seed=0):
    """Random rows over six orders of magnitude, plus the cases rounding rules differ on: an all-zero block, a
    block of exact halves after scaling, and ties between the largest magnitudes of opposite sign."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 10 ** torch.randn(rows, 1, generator=g)
    w[0, :32] = 0
    w[1, :32] = torch.arange(32) - 15.5  # absmax 16.5: q8 scale 16.5/127, lots of x.5 after scaling
    w[2, :32] = torch.tensor([2.0, -2.0] * 16)  # Q4_0 takes the first of equal magnitudes: +2 -> d = -0.25
    return w


def state(m):
    return {k: v.detach().float() for k, v in m.state_dict().items()}


def model(fmt=None, seed=0, vocab=512, tie=False):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=96,
                              max_seq_len=64, tie_embeddings=tie))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    if fmt:
        quant.qat(m, fmt, activations=False, on=True)
    return m


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_gguf_blocks_are_gguf_pys_and_its_reader_gives_back_our_dequantized_weights_bit_for_bit(tmp_path, fmt):
    gguf = pytest.importorskip("gguf")
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[fmt]
    w = weights()
    ours = quant.ggml_blocks(*quant.quantize(w, fmt), fmt, w.shape[0])
    assert np.array_equal(ours, gguf.quants.quantize(w.numpy(), qtype))  # the same bytes as gguf-py writes
    # through a file: every quantized tensor the reader dequantizes is our roundtrip, bit for bit
    from tokenizer import make_tokenizer
    m = model(vocab=512)
    export.export_gguf(state(m), m.args, make_tokenizer(str(shared("stories260K", "tok512.model"))),
                       tmp_path / "m.gguf", fmt)
    ours = {export.gguf_name(k): v for k, v in state(m).items()}
    tensors = gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors
    assert sum(t.tensor_type == qtype for t in tensors) == 2 * 7 + 2  # 7 matrices a layer, embedding, head
    for t in tensors:
        if t.tensor_type == qtype:
            theirs = gguf.quants.dequantize(t.data, t.tensor_type)
            mine = quant.roundtrip(ours[t.name], fmt).numpy()
            assert np.array_equal(theirs.view(np.uint32), mine.view(np.uint32)), t.name


def test_llama2c_q8_rounds_as_llama2cs_export_by_hand_and_its_file_reads_back_exactly(tmp_path):
    # scale = absmax / 127 = 0.25; w / scale: 127, 0.5 -> 0 and 1.5 -> 2 (torch.round: halves to even, as
    # llama2.c's export.py rounds), -2.4 -> -2; an all-zero group stays zero (not nan)
    w = torch.tensor([[31.75, 0.125, 0.375, -0.6], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quant.quantize(w, "llama2c_q8", 4)
    assert q.tolist() == [[127, 0, 2, -2], [0, 0, 0, 0]] and scale.tolist() == [0.25, 0.0]
    assert quant.dequantize(q, scale, "llama2c_q8").tolist() == [[31.75, 0.0, 0.5, -0.5], [0.0] * 4]
    m = model(tie=True)
    export.write_llama2c(state(m), m.args, tmp_path / "q.bin", version=2)
    back = load_checkpoint(str(tmp_path / "q.bin"))["model"]
    gs = quant.group_size("llama2c_q8", m.args)
    assert gs == 32  # the largest of 64, 32, ... that divides dim 64 and hidden_dim 96
    for name, t in state(m).items():
        expect = quant.roundtrip(t, "llama2c_q8", gs) if t.ndim == 2 else t
        assert torch.equal(back[name], expect), name


def test_fake_quantization_passes_gradients_straight_through():
    w = weights(8, 64).requires_grad_()
    for fmt in quant.FORMATS:
        w.grad = None
        x = torch.randn(3, 64)
        (x @ quant.fake_quantize(w, fmt, 32).t()).square().sum().backward()
        wq = quant.roundtrip(w, fmt, 32).requires_grad_()
        (x @ wq.t()).square().sum().backward()
        assert torch.equal(w.grad, wq.grad)  # the gradient at the rounded weights, handed to the float ones


@pytest.mark.parametrize("fmt,export_format", [("llama2c_q8", "llama2c_q8"), ("q8_0", "gguf_q8"), ("q4_0", "gguf_q4")])
def test_a_qat_model_exported_and_read_back_gives_its_training_logits(tmp_path, fmt, export_format):
    m = model(fmt, tie=fmt == "q4_0").train()  # dropout 0: training mode's forward is the one QAT optimizes
    assert set(m.state_dict()) == set(model().state_dict())  # the checkpoint keeps its keys
    x = torch.randint(0, 512, (2, 32))
    trained, _ = m(x, x)
    ckpt = {"model": state(m), "model_args": m.args.to_dict(), "config": {"qat": fmt}, "tokenizer": None}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    tok = ["--tokenizer=" + str(shared("stories260K", "tok512.model"))] if export_format.startswith("gguf") else []
    run_script("export.py", f"--checkpoint={tmp_path / 'ckpt.pt'}", f"--format={export_format}",
               f"--out={tmp_path / 'm.bin'}", *tok)
    back = build_model(load_checkpoint(str(tmp_path / "m.bin"))).eval()
    read, _ = back(x, x)
    assert torch.equal(read, trained)  # the same weights, bit for bit, so the same logits
    quant.qat(m, fmt, activations=False, on=False)
    assert (m(x, x)[0] - trained).abs().max() > 1e-3  # and quantization really changed them


def test_train_py_qat_from_an_iteration_on_then_export(tmp_path):
    make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    run_script("train.py", f"--data_root={tmp_path / 'data'}", "--dataset=tiny", f"--out_dir={out}", *TINY,
               "--max_iters=6", "--eval_interval=3", "--qat=llama2c_q8", "--qat_start_iter=3", "--learning_rate=3e-3")
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["config"]["qat"] == "llama2c_q8" and "layers.0.attention.wq.weight" in ckpt["model"]
    m = build_model(ckpt)
    quant.qat(m, "llama2c_q8", activations=False, on=True)
    run_script("export.py", f"--checkpoint={out}", "--format=llama2c_q8", f"--out={tmp_path / 'q.bin'}")
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(build_model(load_checkpoint(str(tmp_path / "q.bin")))(x, x)[0], m(x, x)[0])
    # the formats it was not trained for are refused, as is another group size
    one_line_error(run_script("export.py", f"--checkpoint={out}", "--format=gguf_q4", f"--out={tmp_path / 'x'}",
                              check=False), "trained with qat='llama2c_q8'", "--format=llama2c_q8")
    one_line_error(run_script("export.py", f"--checkpoint={out}", "--format=llama2c_q8", "--group_size=16",
                              f"--out={tmp_path / 'x'}", check=False), "trained in groups of 32")
    assert not (tmp_path / "x").exists()


def test_bad_input_is_one_line_of_error(tmp_path):
    with pytest.raises(UsageError, match="'q5_0' is not one of llama2c_q8, q8_0, q4_0"):
        quant.quantize(torch.ones(4, 32), "q5_0")
    with pytest.raises(UsageError, match="rows of 48, not a multiple of the quantization group 32"):
        quant.quantize(torch.ones(4, 48), "q4_0")
    args = ModelArgs(dim=48, n_heads=4, hidden_dim=128)
    with pytest.raises(UsageError, match="needs both to be multiples of 32"):
        quant.group_size("q8_0", args)
    m = model(tie=True)
    torch.save({"model": state(m), "model_args": m.args.to_dict()}, tmp_path / "ckpt.pt")
    for flags, fragment in ((["--format=gguf_q5"], "format='gguf_q5' is not one of"),
                            (["--format=llama2c_q8", "--group_size=5"], "group_size=5 does not divide dim=64")):
        one_line_error(run_script("export.py", f"--checkpoint={tmp_path / 'ckpt.pt'}", f"--out={tmp_path / 'o'}",
                                  *flags, cwd=tmp_path, check=False), fragment)
    make_dataset(tmp_path / "data")
    one_line_error(run_script("train.py", f"--data_root={tmp_path / 'data'}", "--dataset=tiny", *TINY,
                              f"--out_dir={tmp_path / 'out'}", "--dim=48", "--qat=q4_0", check=False),
                   "hidden_dim=128", "multiples of 32")


def runq():
    """runq.c: LLAMA2C_RUNQ, or the runq beside LLAMA2C_RUN (llama2.c's Makefile builds both)."""
    path = os.environ.get("LLAMA2C_RUNQ") or (os.environ.get("LLAMA2C_RUN") and
                                              os.path.join(os.path.dirname(os.environ["LLAMA2C_RUN"]), "runq"))
    if not path or not shutil.which(path):
        pytest.skip("set LLAMA2C_RUNQ (or LLAMA2C_RUN with runq beside it) to a compiled llama2.c runq.c")
    return path


# stories260K, greedy from BOS: runq.c and our runq-mirroring forward agree on the first 185 tokens; token 186 is a
# near tie (top-2 logits 0.003 apart) that runq.c's integer dot products and fp32 sums in another order break apart
RUNQ_TOKENS = 180


def test_runq_c_reads_our_version_2_file_as_our_quantized_forward_does(tmp_path):
    """runq.c, the independent C reader of llama2.c's int8 files, on our export of stories260K: its greedy story
    is the one our model tells with weights and matmul inputs rounded as runq.c rounds them (quant.qat with
    activations), token for token."""
    binary = runq()
    from checkpoint import load_model
    from tokenizer import Llama2cTokenizer
    m, _ = load_model(str(shared("stories260K", "stories260K.bin")))
    export.write_llama2c(state(m), m.args, tmp_path / "q.bin", version=2)
    r = subprocess.run([binary, str(tmp_path / "q.bin"), "-z", str(shared("stories260K", "tok512.bin")), "-t", "0",
                        "-n", str(RUNQ_TOKENS)], capture_output=True, text=True, check=True)
    quant.qat(m, "llama2c_q8", activations=True, on=True)
    ids = m.generate(torch.tensor([[1]]), max_new_tokens=RUNQ_TOKENS, temperature=0)[0].tolist()
    ours = Llama2cTokenizer(str(shared("stories260K", "tok512.bin"))).decode(ids)
    assert r.stdout.rstrip("\n") == ours.rstrip("\n"), (r.stdout, ours)
