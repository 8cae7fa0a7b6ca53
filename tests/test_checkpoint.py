import os
import pickle

import pytest

from runtime import UsageError
import torch

import checkpoint
from checkpoint import build_model, load_checkpoint, load_model, save_checkpoint
from model import ModelArgs, Transformer


def tiny_ckpt(**kw):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=40, max_seq_len=16, **kw)
    m = Transformer(args)
    return {"model": m.state_dict(), "model_args": args.to_dict(), "config": {}, "tokenizer": None, "iter_num": 3}, m


def test_round_trip_and_compile_ddp_prefixes(tmp_path):
    ckpt, m = tiny_ckpt()
    ckpt["model"] = {"_orig_mod.module." + k: v for k, v in ckpt["model"].items()}  # compiled + DDP names
    save_checkpoint(ckpt, tmp_path / "ckpt.pt")
    loaded, c = load_model(str(tmp_path))  # a run directory works too
    x = torch.randint(0, 40, (1, 8))
    torch.testing.assert_close(loaded(x, x)[0], m.eval()(x, x)[0])
    assert c["iter_num"] == 3 and not loaded.training
    umask = os.umask(0o022)
    try:
        save_checkpoint(ckpt, tmp_path / "perm.pt")
    finally:
        os.umask(umask)
    assert (tmp_path / "perm.pt").stat().st_mode & 0o777 == 0o644  # readable like any new file, not 0600


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ckpt, _ = tiny_ckpt()
    save_checkpoint(ckpt, path)
    before = path.read_bytes()

    def exploding_save(obj, f):
        f.write(b"partial garbage")
        raise OSError("No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", exploding_save)
    with pytest.raises(OSError):
        save_checkpoint({**ckpt, "iter_num": 99}, path)
    assert path.read_bytes() == before  # the previous checkpoint survives
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


class Evil:
    marker = None

    def __reduce__(self):  # unpickling this would run a shell command
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_executes_code_from_the_file(tmp_path):
    path, Evil.marker = tmp_path / "evil.pt", tmp_path / "pwned"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil(), "model_args": {}}, f, protocol=2)
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        load_checkpoint(str(path))
    assert not Evil.marker.exists()


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(UsageError, match="is a folder with no ckpt.pt .* a llama2.c .bin, a GGUF file or a Hugging"):
        load_checkpoint(str(tmp_path))  # an empty run directory: not "not found"
    ckpt, _ = tiny_ckpt()
    save_checkpoint(ckpt, tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="truncated, corrupt"):
        load_checkpoint(str(tmp_path / "cut.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="not a llamaforge checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_weights_that_do_not_match_model_args_are_refused():
    ckpt, _ = tiny_ckpt()
    ckpt["model_args"]["n_layers"] = 2  # claims a layer the weights do not have
    with pytest.raises(UsageError, match="do not match its model_args"):
        build_model(ckpt)
    ckpt, _ = tiny_ckpt()
    ckpt["model_args"]["n_heads"] = 5  # 32 is not divisible by 5
    with pytest.raises(UsageError, match="invalid model_args"):
        build_model(ckpt)
