import pytest

from runtime import UsageError

from configurator import configure


def defaults():
    return {"learning_rate": 3e-4, "batch_size": 16, "compile": False, "device": "auto", "init_from": None,
            "sample_prompts": (), "CONSTANT": 5, "_private": 1}


def test_file_then_flags_override_in_order(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 32\nlearning_rate = 1e-3\nimport math\n_x = 2\n")
    ns = defaults()
    out = configure(ns, [str(cfg), "--learning_rate=5e-4", "--compile", "--device=cuda:1",
                         "--sample_prompts=['a', 'b']"])
    assert ns["batch_size"] == 32 and ns["learning_rate"] == 5e-4 and ns["compile"] is True
    assert ns["device"] == "cuda:1" and ns["sample_prompts"] == ("a", "b")
    assert "CONSTANT" not in out and "_private" not in out  # constants and privates are not settings


def test_int_accepted_for_float_and_none_default_takes_anything():
    ns = defaults()
    configure(ns, ["--learning_rate=1", "--init_from=out/ckpt.pt"])
    assert ns["learning_rate"] == 1.0 and isinstance(ns["learning_rate"], float)
    assert ns["init_from"] == "out/ckpt.pt"


def test_unknown_key_names_nearest(capsys):
    with pytest.raises(UsageError, match=r"unknown config key 'learning_rat'.*learning_rate"):
        configure(defaults(), ["--learning_rat=1e-3"])


def test_unknown_key_in_file(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batchsize = 4\n")
    with pytest.raises(UsageError, match=r"unknown config key 'batchsize' in .*c.py.*batch_size"):
        configure(defaults(), [str(cfg)])


@pytest.mark.parametrize("flag,msg", [("--batch_size=3.5", "expects int"), ("--compile=1", "expects bool"),
                                      ("--batch_size=True", "expects int"), ("--learning_rate=fast", "expects float")])
def test_wrong_types(flag, msg):
    with pytest.raises(UsageError, match=msg):
        configure(defaults(), [flag])


def test_missing_config_file_and_broken_file(tmp_path):
    with pytest.raises(UsageError, match="config file 'nope.py' not found"):
        configure(defaults(), ["nope.py"])
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = = 3\n")
    with pytest.raises(UsageError, match="failed: SyntaxError"):
        configure(defaults(), [str(bad)])


def test_flag_without_value_on_non_bool():
    with pytest.raises(UsageError, match="has no value"):
        configure(defaults(), ["--batch_size"])


def test_one_value_for_a_sweep_is_a_sweep_of_one():
    ns = {"sizes_mb": (100, 1000), "flags": (False,)}
    configure(ns, ["--sizes_mb=5000", "--flags=True"])
    assert ns == {"sizes_mb": (5000,), "flags": (True,)}
    with pytest.raises(UsageError, match="expects tuple"):  # a value of another type is still an error
        configure(ns, ["--sizes_mb=big"])
