"""Export a llamaforge model to other tools' formats, or import theirs into a ckpt.pt.

    python export.py --checkpoint=out/ckpt.pt --format=llama2c --out=model.bin          # run.c, fp32 (legacy)
    python export.py --checkpoint=out/ckpt.pt --format=llama2c_q8 --out=model_q8.bin    # runq.c, int8 groups
    python export.py --tokenizer=tok512.model --format=llama2c_tokenizer --out=tok512.bin  # run.c -z
    python export.py --checkpoint=out/ckpt.pt --format=hf --out=hf_model/               # transformers
    python export.py --checkpoint=out/ckpt.pt --format=gguf_q8 --out=model.gguf         # llama.cpp (gguf_f16, gguf_q4)
    python export.py --checkpoint=hf_model/ --format=ours --out=out/imported/ckpt.pt    # import (also a .bin)
    python export.py --adapter=out/lora/ckpt.pt --format=ours --out=merged.pt            # LoRA merged into its base
    python export.py --checkpoint=hf_base/ --adapter=out/lora/ckpt.pt --format=peft --out=lora_peft/  # PEFT

Each format is one writer and one EXPORTS entry at the bottom.

Every output is written under a temporary name and renamed into place, so a refused or failed export
leaves nothing behind. Inputs are read by checkpoint.load_checkpoint, the one loader, which already
understands llama2.c files and Hugging Face folders (formats.py).
"""
import os
import sys

from checkpoint import build_model, clean_state_dict, load_checkpoint, load_with_adapter, read_adapter, save_checkpoint
from configurator import configure, print_config, require
from formats import check_vocab, export_gguf, gguf_name, write_llama2c, write_llama2c_tokenizer  # noqa: F401
from hf import export_hf, export_peft_adapter  # noqa: F401
from lora import adapter_pairs, merge_lora
from quant import check_export
from runtime import UsageError, handle_errors
from tokenizer import load_tokenizer, make_tokenizer

# ----------------------------------------------------------------------------------------------------
checkpoint = ""      # input: our ckpt.pt or run dir, a llama2.c .bin, or a Hugging Face Llama folder
adapter = ""         # a LoRA run's ckpt.pt: export its base (checkpoint; "" = the one it recorded) with it merged in
format = "llama2c"   # llama2c|llama2c_v1|llama2c_q8|llama2c_tokenizer|hf|gguf_f16|gguf_q8|gguf_q4|ours|peft
out = ""             # output file (a folder for hf and peft)
tokenizer = ""       # tokenizer .model / "gpt2" / GPT-2 BPE folder; "" = the one recorded in the checkpoint
group_size = 0       # llama2c_q8: int8 group size; 0 = the largest of 64, 32, ... dividing dim and hidden_dim
dtype = "float32"    # hf: float32 | float16 | bfloat16
# ----------------------------------------------------------------------------------------------------

# ---- CLI ---------------------------------------------------------------------------------------------

def source():
    """The checkpoint to export: --checkpoint, or with --adapter its base with the adapter folded into it."""
    if adapter:
        model, base, ad = load_with_adapter(checkpoint, adapter)
        merge_lora(model)
        return {"model": clean_state_dict(model.state_dict()), "model_args": model.args.to_dict(),
                "config": ad.get("config", {}), "tokenizer": base.get("tokenizer") or ad.get("tokenizer"),
                "iter_num": ad.get("iter_num", 0), "best_val_loss": ad.get("best_val_loss"),
                "merged_from": {"base": checkpoint or ad.get("base_checkpoint"), "adapter": os.path.abspath(adapter),
                                "lora": ad["lora"]}}
    if not checkpoint:
        raise UsageError("no --checkpoint given; pass a ckpt.pt, run directory, llama2.c .bin or HF folder")
    return load_checkpoint(checkpoint)


def tokenizer_of(ckpt):
    """--tokenizer, else the checkpoint's own (None where it records none)."""
    if tokenizer:
        return make_tokenizer(tokenizer)
    return load_tokenizer(ckpt["tokenizer"]) if ckpt and ckpt.get("tokenizer") else None


QUANT_OF = {"llama2c_q8": "llama2c_q8", "gguf_q8": "q8_0", "gguf_q4": "q4_0"}  # export format -> quant.py's


def tensors(ckpt):
    model = build_model(ckpt)
    # a model trained (--qat) to be rounded one way is refused by the other quantized formats
    check_export((ckpt.get("config") or {}).get("qat"), QUANT_OF.get(format), model.args, group_size)
    return {k: v.detach().float() for k, v in model.state_dict().items()}, model.args


def export_ours():
    ckpt = source()
    tok = make_tokenizer(tokenizer) if tokenizer else None  # attach one to a file that carries none (llama2.c)
    if tok is not None:
        if not hasattr(tok, "to_meta"):
            raise UsageError("a llama2.c tokenizer .bin cannot be attached to a checkpoint (it lacks the SentencePiece "
                             "model); pass the .model it was exported from, e.g. --tokenizer=tok512.model")
        check_vocab(tok, build_model(ckpt).args, "the checkpoint")
        ckpt["tokenizer"] = tok.to_meta(embed=True)
    save_checkpoint(ckpt, out)


def export_llama2c(version):
    def write():
        gs = write_llama2c(*tensors(source()), out, version, group_size)
        if gs:
            print(f"quantized to int8 in groups of {gs}")
    return write


def export_peft():
    """The adapter alone, for PEFT on top of the Hugging Face export of its base (--checkpoint)."""
    if not (adapter and checkpoint and os.path.isfile(os.path.join(checkpoint, "config.json"))):
        raise UsageError("--format=peft needs --adapter=<a LoRA run's ckpt.pt> and --checkpoint=<the Hugging Face "
                         "export of its base> (python export.py --checkpoint=BASE --format=hf --out=hf_base/)")
    load_with_adapter(checkpoint, adapter)  # refuses an adapter trained on other weights than that folder's
    ad = read_adapter(adapter)
    cfg = ad["lora"]
    export_peft_adapter(out, adapter_pairs(ad), cfg["rank"], cfg["alpha"], cfg["targets"], checkpoint)


def with_model(write, *extra):
    def run():
        ckpt = source()
        write(*tensors(ckpt), tokenizer_of(ckpt), out, *extra)
    return run


# format -> writer (it reads what it needs of the settings above)
EXPORTS = {
    "llama2c": export_llama2c(0), "llama2c_v1": export_llama2c(1), "llama2c_q8": export_llama2c(2),
    "llama2c_tokenizer": lambda: write_llama2c_tokenizer(tokenizer_of(load_checkpoint(checkpoint) if checkpoint
                                                                      else None), out),
    "hf": lambda: with_model(export_hf, dtype)(), "gguf_f16": with_model(export_gguf, "f16"),
    "gguf_q8": with_model(export_gguf, "q8_0"), "gguf_q4": with_model(export_gguf, "q4_0"), "ours": export_ours,
    "peft": export_peft,
}


def main():
    config = configure(globals(), sys.argv[1:])
    print_config(config)
    require(config, non_negative=("group_size",))
    if format not in EXPORTS:
        raise UsageError(f"format={format!r} is not one of {', '.join(EXPORTS)}")
    if not out:
        raise UsageError("no --out given; pass the file (or folder, for hf and peft) to write")
    EXPORTS[format]()
    size = os.path.getsize(out) if os.path.isfile(out) else sum(
        os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    merged = f", {adapter} merged in" if adapter and format != "peft" else ""
    print(f"wrote {out} ({size:,} bytes, format {format}){merged}")


if __name__ == "__main__":
    handle_errors()
    main()
