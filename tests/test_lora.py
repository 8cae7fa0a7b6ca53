"""LoRA: frozen base + trainable adapters, adapter-only checkpoints with exact resume, merge into a
full checkpoint, loading onto a base (and refusing another base), the PEFT-export adapter dict."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY, read_metrics, run_script
from test_finetune import make_base, make_tokenizer_model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tok_path = make_tokenizer_model(root)
    base, tok = make_base(root, tok_path)
    other, _ = make_base(root, tok_path, seed=1, name="other.pt")  # same architecture and tokenizer, other weights
    rng = np.random.default_rng(2)
    recs = [{"instruction": f"copy {w}", "output": f"{w} {w}"}
            for w in rng.choice(["cat", "dog", "mat", "ball", "red"], 50)]
    (root / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    run_script("tokenize_data.py", "sft", f"--source={root / 'a.jsonl'}", "--data_root=data", "--dataset=sft",
               f"--tokenizer={base}", cwd=root)
    return root, base, other


def train(root, *args, check=True):
    return run_script("train.py", "--data_root=data", "--dataset=sft", *TINY, "--block_size=63", "--log_interval=1",
                      *args, cwd=root, check=check)


def test_adapters_start_as_identity_train_alone_and_merge_exactly(env):
    from checkpoint import load_model
    from lora import add_lora, adapter_pairs, base_fingerprint, lora_state_dict, memory_report, merge_lora
    _, base, _ = env
    model, _ = load_model(base)
    x = torch.randint(0, 300, (2, 16))
    ref = model(x)[0]
    fp = base_fingerprint(model)
    names = add_lora(model, ("wq", "wv", "w2"), rank=4, alpha=8.0)
    assert len(names) == 6 and all(n.endswith((".wq", ".wv", ".w2")) for n in names)
    assert torch.equal(model(x)[0], ref)  # B = 0: the adapted model starts equal to its base
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert base_fingerprint(model) == fp  # adapters are not part of the base's identity
    w = model.layers[0].attention.wq
    mods = dict(model.named_modules())
    expected = sum(4 * (mods[n].in_features + mods[n].out_features) for n in names)  # r x in + out x r per layer
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert "trainable of" in memory_report(model, "adamw") and "saves" in memory_report(model, "adamw")
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if n.endswith(".lora_B"):
            p.data.normal_(0, 0.1)  # a trained-looking adapter
    with torch.no_grad():
        adapted = model(x)[0]
    assert not torch.allclose(adapted, ref, atol=1e-3)
    pairs = adapter_pairs({"adapter": lora_state_dict(model)})  # what export.export_peft_adapter takes
    A, B = pairs["layers.0.attention.wq"]
    assert A.shape == (4, w.in_features) and B.shape == (w.out_features, 4) and len(pairs) == 6
    merge_lora(model)
    assert not any(n.endswith("lora_A") for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(model(x)[0], adapted, atol=1e-5)  # merged == unmerged


def test_lora_run_saves_adapters_only_and_resumes_exactly(env):
    root, base, _ = env
    common = [f"--init_from={base}", "--lora_rank=4", "--lora_dropout=0.1", "--dropout=0.1", "--eval_interval=4",
              "--gradient_accumulation_steps=2", "--warmup_iters=2", "--lr_decay_iters=8", "--learning_rate=1e-2",
              "--lora_targets=('wq','wv','w1')"]
    proc = train(root, *common, "--max_iters=8", "--out_dir=full")
    assert "LoRA:" in proc.stdout and "trainable of" in proc.stdout
    train(root, *common, "--max_iters=4", "--out_dir=part")
    train(root, *common, "--max_iters=8", "--init_from=resume", "--out_dir=part")
    full = [(r["iter"], r["loss"]) for r in read_metrics(root / "full", "train")]
    assert [(r["iter"], r["loss"]) for r in read_metrics(root / "part", "train")] == full and len(full) == 8
    ckpt = torch.load(root / "full" / "ckpt.pt", weights_only=True)
    assert "model" not in ckpt and ckpt["lora"]["rank"] == 4 and ckpt["base_checkpoint"] == str(base)
    assert set(ckpt["adapter"]) and all(k.endswith((".lora_A", ".lora_B")) for k in ckpt["adapter"])
    assert (root / "full" / "ckpt.pt").stat().st_size < base.stat().st_size / 2  # a small file


def test_adapter_generates_like_its_merge_and_refuses_another_base(env):
    root, base, other = env
    train(root, f"--init_from={base}", "--lora_rank=4", "--max_iters=20", "--eval_interval=20", "--learning_rate=3e-2",
          "--warmup_iters=0", "--out_dir=ad")
    run_script("export.py", "--adapter=ad/ckpt.pt", "--format=ours", "--out=merged.pt", cwd=root)
    g = ["--prompt=copy cat", "--chat=True", "--temperature=0", "--max_new_tokens=12"]
    with_adapter = run_script("generate.py", f"--checkpoint={base}", "--adapter=ad/ckpt.pt", *g, cwd=root).stdout
    assert with_adapter == run_script("generate.py", "--checkpoint=merged.pt", *g, cwd=root).stdout
    assert with_adapter != run_script("generate.py", f"--checkpoint={base}", *g, cwd=root).stdout  # the adapter matters
    proc = run_script("generate.py", f"--checkpoint={other}", "--adapter=ad/ckpt.pt", *g, cwd=root, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "different base model" in last and str(base) in last
    proc = run_script("export.py", f"--checkpoint={other}", "--adapter=ad/ckpt.pt", "--format=ours", "--out=x.pt",
                      cwd=root, check=False)
    assert "different base model" in proc.stderr.strip().splitlines()[-1]
    proc = run_script("generate.py", "--checkpoint=ad/ckpt.pt", cwd=root, check=False)  # an adapter is not a model
    assert "is a LoRA adapter, not a full model" in proc.stderr.strip().splitlines()[-1] and "--adapter=" in proc.stderr


def test_lora_errors(env):
    root, base, _ = env
    proc = train(root, "--lora_rank=4", "--out_dir=e1", check=False)  # init_from scratch
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: lora_rank > 0 adapts")
    proc = train(root, f"--init_from={base}", "--lora_rank=4", "--lora_targets=('nope',)", "--out_dir=e2", check=False)
    assert "match no linear layer" in proc.stderr.strip().splitlines()[-1]
    for bad in ("--lora_alpha=0", "--lora_dropout=1.0"):  # an adapter that would never learn: refused, not run
        proc = train(root, f"--init_from={base}", "--lora_rank=4", bad, "--out_dir=e3", check=False)
        assert proc.returncode != 0 and "the rank and alpha must be > 0 and the dropout in [0, 1)" in proc.stderr, bad
    assert not (root / "e3" / "ckpt.pt").exists()


def test_peft_export_command_loads_in_peft_with_our_logits(env, tmp_path):
    """export.py --format=peft: the adapter alone, on the Hugging Face export of its base, as PEFT loads it."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    root, base, other = env
    train(root, f"--init_from={base}", "--lora_rank=4", "--max_iters=6", "--eval_interval=6", "--learning_rate=3e-2",
          "--warmup_iters=0", "--lora_targets=('wq','wk','w2')", f"--out_dir={tmp_path / 'ad'}")
    ad = tmp_path / "ad" / "ckpt.pt"
    run_script("export.py", f"--checkpoint={base}", "--format=hf", f"--out={tmp_path / 'hf'}", cwd=root)
    run_script("export.py", f"--checkpoint={tmp_path / 'hf'}", f"--adapter={ad}", "--format=peft",
               f"--out={tmp_path / 'peft'}", cwd=root)
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                        tmp_path / "peft").eval()
    from checkpoint import load_with_adapter
    ours = load_with_adapter(str(base), str(ad))[0]
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - ours(x, x)[0]).abs().max().item() < 1e-4
    export_other = run_script("export.py", f"--checkpoint={tmp_path / 'hf'}", f"--adapter={ad}", "--format=peft",
                              f"--out={tmp_path / 'x'}", cwd=root, check=False)
    assert export_other.returncode == 0  # the HF export is the same weights: accepted
    run_script("export.py", f"--checkpoint={other}", "--format=hf", f"--out={tmp_path / 'hf_other'}", cwd=root)
    proc = run_script("export.py", f"--checkpoint={tmp_path / 'hf_other'}", f"--adapter={ad}", "--format=peft",
                      f"--out={tmp_path / 'y'}", cwd=root, check=False)
    assert proc.returncode != 0 and "different base model" in proc.stderr.strip().splitlines()[-1]
