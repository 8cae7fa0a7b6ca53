"""Export a llamaforge model to other tools' formats, or import theirs into a ckpt.pt.

    python export.py --checkpoint=out/ckpt.pt --format=llama2c --out=model.bin          # run.c, fp32 (legacy)
    python export.py --checkpoint=out/ckpt.pt --format=llama2c_q8 --out=model_q8.bin    # runq.c, int8 groups
    python export.py --tokenizer=tok512.model --format=llama2c_tokenizer --out=tok512.bin  # run.c -z
    python export.py --checkpoint=out/ckpt.pt --format=hf --out=hf_model/               # transformers
    python export.py --checkpoint=out/ckpt.pt --format=gguf_q8 --out=model.gguf         # llama.cpp
    python export.py --checkpoint=hf_model/ --format=ours --out=out/imported/ckpt.pt    # import (also a .bin)
    python export.py --adapter=out/lora/ckpt.pt --format=ours --out=merged.pt            # LoRA merged into its base

Each format is one writer and one EXPORTS entry at the bottom.

Every output is written under a temporary name and renamed into place, so a refused or failed export
leaves nothing behind. Inputs are read by checkpoint.load_checkpoint, the one loader, which already
understands llama2.c files and Hugging Face folders (formats.py).
"""
import os
import sys

from checkpoint import build_model, clean_state_dict, load_checkpoint, load_with_adapter, save_checkpoint
from configurator import configure, print_config, require
from formats import check_vocab, export_gguf, gguf_name, write_llama2c, write_llama2c_tokenizer  # noqa: F401
from hf import export_hf, export_peft_adapter  # noqa: F401
from lora import merge_lora
from runtime import UsageError, handle_errors
from tokenizer import load_tokenizer, make_tokenizer

# ----------------------------------------------------------------------------------------------------
checkpoint = ""      # input: our ckpt.pt or run dir, a llama2.c .bin, or a Hugging Face Llama folder
adapter = ""         # a LoRA run's ckpt.pt: export its base (checkpoint; "" = the one it recorded) with it merged in
format = "llama2c"   # llama2c | llama2c_v1 | llama2c_q8 | llama2c_tokenizer | hf | gguf_f16 | gguf_q8 | ours
out = ""             # output file (folder for hf)
tokenizer = ""       # tokenizer .model / "gpt2" / GPT-2 BPE folder; "" = the one recorded in the checkpoint
group_size = 0       # llama2c_q8: int8 group size; 0 = the largest of 64, 32, ... dividing dim and hidden_dim
dtype = "float32"    # hf: float32 | float16 | bfloat16
# ----------------------------------------------------------------------------------------------------

# ---- CLI ---------------------------------------------------------------------------------------------

def tensors(ckpt):
    model = build_model(ckpt)
    return {k: v.detach().float() for k, v in model.state_dict().items()}, model.args


def export_ours(ckpt, tok, path):
    if tok is not None:
        if not hasattr(tok, "to_meta"):
            raise UsageError("a llama2.c tokenizer .bin cannot be attached to a checkpoint (it lacks the SentencePiece "
                             "model); pass the .model it was exported from, e.g. --tokenizer=tok512.model")
        check_vocab(tok, build_model(ckpt).args, "the checkpoint")
        ckpt["tokenizer"] = tok.to_meta(embed=True)
    save_checkpoint(ckpt, path)


def export_llama2c(version):
    def write(ckpt, tok, path):
        gs = write_llama2c(*tensors(ckpt), path, version, group_size)
        if gs:
            print(f"quantized to int8 in groups of {gs}")
    return write


# format -> writer(checkpoint dict, tokenizer or None, output path)
EXPORTS = {
    "llama2c": export_llama2c(0), "llama2c_v1": export_llama2c(1), "llama2c_q8": export_llama2c(2),
    "llama2c_tokenizer": lambda ckpt, tok, path: write_llama2c_tokenizer(tok, path),
    "hf": lambda ckpt, tok, path: export_hf(*tensors(ckpt), tok, path, dtype),
    "gguf_f16": lambda ckpt, tok, path: export_gguf(*tensors(ckpt), tok, path, "f16"),
    "gguf_q8": lambda ckpt, tok, path: export_gguf(*tensors(ckpt), tok, path, "q8_0"),
    "ours": export_ours,
}


def merged_checkpoint(base_path, adapter_path):
    """An ordinary checkpoint of the base with the LoRA adapter folded into its weights."""
    model, base, ad = load_with_adapter(base_path, adapter_path)
    merge_lora(model)
    return {"model": clean_state_dict(model.state_dict()), "model_args": model.args.to_dict(),
            "config": ad.get("config", {}), "tokenizer": base.get("tokenizer") or ad.get("tokenizer"),
            "iter_num": ad.get("iter_num", 0), "best_val_loss": ad.get("best_val_loss"),
            "merged_from": {"base": base_path or ad.get("base_checkpoint"), "adapter": os.path.abspath(adapter_path),
                            "lora": ad["lora"]}}


def main():
    config = configure(globals(), sys.argv[1:])
    print_config(config)
    require(config, non_negative=("group_size",))
    if format not in EXPORTS:
        raise UsageError(f"format={format!r} is not one of {', '.join(EXPORTS)}")
    if not out:
        raise UsageError("no --out given; pass the file (or folder, for hf) to write")
    ckpt = merged_checkpoint(checkpoint, adapter) if adapter else load_checkpoint(checkpoint) if checkpoint else None
    tok = make_tokenizer(tokenizer) if tokenizer else (
        load_tokenizer(ckpt["tokenizer"]) if ckpt and ckpt.get("tokenizer") else None)
    if ckpt is None and format != "llama2c_tokenizer":
        raise UsageError("no --checkpoint given; pass a ckpt.pt, run directory, llama2.c .bin or HF folder")
    EXPORTS[format](ckpt, tok, out)
    size = os.path.getsize(out) if os.path.isfile(out) else sum(
        os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out} ({size:,} bytes, format {format})" + (f", {adapter} merged in" if adapter else ""))


if __name__ == "__main__":
    handle_errors()
    main()
