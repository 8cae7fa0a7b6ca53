"""Every script keeps the one-line-error property for each class of bad input: a non-zero exit, no traceback,
and `error: ...` naming the problem and the fix. Every top-level file that is not a library file is a script,
so a new script inherits these tests without being listed."""
import re

import pytest

from conftest import REPO, one_line_error, run_script
from test_layout import SCRIPTS

SUBCOMMAND = {"tokenize_data.py": ["pretokenize"], "evaluate.py": ["loss"]}  # scripts whose first argument is a verb
# the config-file cases run on these (a verb script hands configure argv[2:]); each subprocess costs seconds
FILE_CASES = ("train.py", *SUBCOMMAND)


def test_scripts_are_found():
    assert {"train.py", "generate.py", "evaluate.py", "export.py", "tokenize_data.py", "bench.py"} <= set(SCRIPTS)
    for name in SCRIPTS:  # each installs the handler before anything can fail
        assert re.search(r"^\s*handle_errors\(\)", (REPO / name).read_text(), re.M), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_mistakes(tmp_path, script):
    verb = SUBCOMMAND.get(script, [])
    one_line_error(run_script(script, *verb, "--no_such_key=1", cwd=tmp_path, check=False),
                   "unknown config key 'no_such_key'")
    if script not in FILE_CASES:  # config files go through one configurator path (test_configurator.py)
        return
    (tmp_path / "cfg.yaml").write_text("batch_size: 4\n")
    one_line_error(run_script(script, *verb, "cfg.yaml", cwd=tmp_path, check=False), "is not a .py file")
    one_line_error(run_script(script, *verb, "missing.py", cwd=tmp_path, check=False),
                   "config file 'missing.py' not found")
    (tmp_path / "broken.py").write_text("x = (\n")
    one_line_error(run_script(script, *verb, "broken.py", cwd=tmp_path, check=False), "failed: SyntaxError")


def settings(script):
    from configurator import script_settings
    return script_settings(REPO / script)


@pytest.mark.parametrize("script", SCRIPTS)
def test_none_where_a_value_is_needed_and_a_device_that_does_not_exist(tmp_path, script):
    verb = SUBCOMMAND.get(script, [])
    key = next(k for k, (v, _) in settings(script).items() if v is not None and not isinstance(v, (tuple, list)))
    if script in FILE_CASES:
        one_line_error(run_script(script, *verb, f"--{key}=None", cwd=tmp_path, check=False), f"'{key}'",
                       "needs a value")
    if "device" in settings(script):  # a device is only used with a local model there
        local = ["--checkpoint=missing.pt"] if script == "self_instruct.py" else []
        proc = run_script(script, *verb, *local, "--device=tpu9", cwd=tmp_path, check=False)
        one_line_error(proc, "device='tpu9'")


# values of the right type but impossible meaning: each stops before any work, naming the key
IMPOSSIBLE = [
    ("train.py", ["--batch_size=0"], "batch_size=0 must be > 0"),
    ("train.py", ["--dropout=1.5"], "dropout=1.5 must be in [0, 1]"),
    ("train.py", ["--learning_rate=-0.001"], "learning_rate=-0.001 must be > 0"),
    ("train.py", ["--beta2=1.0"], "beta2=1.0 must be in [0, 1)"),
    ("train.py", ["--sample_temperature=-1"], "sample_temperature=-1.0 must be >= 0"),
    ("train.py", ["--lora_targets=('wq','nope')"], "['nope'] match no linear layer"),
    ("train.py", ["--nonfinite=ignore"], "nonfinite='ignore' is not one of"),
    ("train.py", ["--dpo_loss=hinge"], "dpo_loss='hinge' is not one of sigmoid, ipo"),
    ("train.py", ["--dpo_label_smoothing=0.5"], "dpo_label_smoothing=0.5 must be in [0, 0.5)"),
    ("train.py", ["--dpo_loss=ipo", "--dpo_label_smoothing=0.1"], "applies to dpo_loss='sigmoid' only"),
    ("train.py", ["--dpo_beta=0"], "dpo_beta=0.0 must be > 0"),
    ("evaluate.py", ["preference", "--dpo_beta=-1"], "dpo_beta=-1.0 must be > 0"),
    ("tokenize_data.py", ["dpo", "--block_size=0"], "block_size=0 must be > 0"),
    ("train.py", ["--qat=q5_0"], "qat='q5_0' is not one of"),
    ("train.py", ["--qat=q4_0", "--qat_start_iter=-1"], "qat_start_iter=-1 must be >= 0"),
    ("generate.py", ["--top_p=1.5"], "top_p=1.5 must be in (0, 1] (1.0 disables it)"),
    ("generate.py", ["--top_k=-1"], "top_k=-1 must be >= 0 (0 disables it)"),
    ("generate.py", ["--max_new_tokens=0"], "must both be >= 1"),
    ("generate.py", ["--threads=-1"], "threads=-1 must be >= 0"),
    ("bench_decode.py", ["--threads=0,1"], "threads=(0, 1) must list counts >= 1"),
    ("bench_decode.py", ["--out_json=."], "out_json=. is a folder"),
    ("evaluate.py", ["loss", "--batch_size=0"], "batch_size=0 must be > 0"),
    ("evaluate.py", ["hellaswag", "--max_items=-5"], "max_items=-5 must be >= 0"),
    ("export.py", ["--group_size=-32"], "group_size=-32 must be >= 0"),
    ("bench.py", ["--train_iters=0"], "train_iters=0 must be > 0"),
    ("bench.py", ["--out_json=."], "out_json=. is a folder"),
    ("evaluate.py", ["loss", "--json_out=."], "json_out=. is a folder"),
    ("evaluate.py", ["plot", "--runs=a", "--out=loss"], "out=loss needs a .png, .pdf or .svg name"),
    ("tokenize_data.py", ["download", "--max_docs=-5"], "max_docs=-5 must be -1 (all) or a count >= 0"),
    ("sweep.py", ["--grid=speed"], "grid='speed' is not one of pretrain, classify, continual"),
    ("sweep.py", ["--jobs=0"], "jobs=0 must be > 0"),
    ("sweep.py", ["--arms=(('sgd', '--optimizer=sgd', 'learning_rate', ()),)"], "must be (name, flags, key, (values"),
    ("sweep.py", ["--corpus=missing.txt"], "corpus missing.txt not found; pass --corpus=PATH"),
    ("tokenize_data.py", ["pretokenize", "--val_fraction=1.5"], "val_fraction=1.5 must be in [0, 1]"),
    ("tokenize_data.py", ["train_vocab", "--vocab_size=0"], "vocab_size=0 must be > 0"),
]


@pytest.mark.parametrize("script,flags,fragment", IMPOSSIBLE, ids=[f"{s}{f}" for s, f, _ in IMPOSSIBLE])
def test_impossible_values_stop_before_any_work(tmp_path, script, flags, fragment):
    one_line_error(run_script(script, *flags, cwd=tmp_path, check=False), fragment)
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_setting_with_its_meaning_and_exits_0(tmp_path, script):
    verb = SUBCOMMAND.get(script, [])
    for flag in ("--help", "-h"):  # -h is not a config file name
        proc = run_script(script, *verb, flag, cwd=tmp_path)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = {line.split("=")[0].strip(): line for line in proc.stdout.splitlines() if line.startswith("  --")}
    shown = {k[2:] for k in lines}
    for key, (_, meaning) in settings(script).items():
        assert meaning, f"{script}: setting {key} has no comment saying what it means"
        if not verb:  # subcommands show only the settings they read
            assert key in shown and meaning in lines[f"--{key}"], key
    assert shown <= set(settings(script)) and (not verb or len(shown) < len(settings(script))), shown


def test_a_setting_that_is_not_a_literal_is_refused_not_left_out_of_help(tmp_path):
    from configurator import script_settings
    from runtime import UsageError
    (tmp_path / "s.py").write_text("BIG = 1 << 20  # a constant may be computed\nshard = 1 << 28  # a setting\n")
    with pytest.raises(UsageError, match=r"setting shard = 1 << 28 is not a literal; write its value out"):
        script_settings(tmp_path / "s.py")


def test_readme_documents_every_setting_of_every_script():
    readme = (REPO / "README.md").read_text()
    missing = {s: [k for k in settings(s) if f"`{k}`" not in readme and f"`{k}=" not in readme] for s in SCRIPTS}
    assert not {s: m for s, m in missing.items() if m}, missing
