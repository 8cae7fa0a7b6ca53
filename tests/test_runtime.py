"""runtime.py: the one device/dtype rule, the error handler every script installs, MFU and memory readings."""
import subprocess
import sys

import pytest
import torch

import runtime
from conftest import REPO, one_line_error
from runtime import UsageError


def test_device_and_dtype_rule_on_this_machine():
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    device, kind, dtype = runtime.device_and_dtype()
    assert (device, kind) == (expected, expected)
    assert dtype == ("float32" if kind != "cuda" else
                     "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16")
    assert runtime.device_and_dtype("cpu", "bfloat16") == ("cpu", "cpu", "bfloat16")  # an explicit dtype stands
    assert runtime.device_and_dtype("cpu") == ("cpu", "cpu", "float32")  # no autocast where it buys nothing


@pytest.mark.parametrize("device,dtype,msg", [("gpu", "auto", "not a device name"),
                                              ("cpu", "fp8", "dtype='fp8' is not one of"),
                                              ("meta", "auto", "not supported")])
def test_device_and_dtype_refuse_what_cannot_run(device, dtype, msg):
    with pytest.raises(UsageError, match=msg):
        runtime.device_and_dtype(device, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(UsageError, match="no CUDA GPU is visible; use --device=cpu"):
        runtime.device_and_dtype("cuda:1")


def test_autocast_is_a_no_op_for_float32():
    with runtime.autocast("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")
    with runtime.autocast("cpu", "bfloat16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_mfu_and_peaks():
    assert runtime.mfu(1e9, 1e3, "cpu") is None and runtime.peak_flops(None) is None
    assert runtime.PEAK_BF16_FLOPS["H100"] == 989e12


SCRIPT = """
import sys
from runtime import handle_errors, UsageError
handle_errors()
kind = sys.argv[1]
if kind == "usage":
    raise UsageError("bad thing; do the fix")
if kind == "oserror":
    open("/nonexistent-dir/x.bin", "w")
if kind == "isdir":
    open(".", "w")
if kind == "decode":
    b"\\xff\\xfe".decode("utf-8")
if kind == "interrupt":
    raise KeyboardInterrupt
if kind == "bug":
    raise ZeroDivisionError("a real bug")
if kind == "pipe":  # unflushed writes: each 8 KB block goes out as it fills, nothing is left over
    while True:
        print("x" * 100)
if kind == "flushed":  # as generate.py streams: a write and a flush a token, the failed bytes left in the buffer
    while True:
        sys.stdout.write("x" * 100)
        sys.stdout.flush()
"""


@pytest.mark.parametrize("kind,fragment,status", [
    ("usage", "error: bad thing; do the fix", 1),
    ("oserror", "No such file or directory: /nonexistent-dir/x.bin; check the path", 1),
    ("isdir", "that path is a folder: pass a file path", 1), ("decode", "input is not utf-8 text", 1)])
def test_handle_errors_prints_one_line(tmp_path, kind, fragment, status):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == status
    assert fragment in one_line_error(proc)


@pytest.mark.parametrize("kind", ["pipe", "flushed"])
def test_a_reader_that_stops_early_gets_one_line_not_a_path_hint(kind):
    """`script | head`: the pipe closes while the script still writes; one line says so, status 1 (not Python's
    120 and a second traceback from its own flush at exit, which the bytes left in the buffer used to cause)."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, kind], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={"PYTHONPATH": str(REPO)})
    assert proc.stdout.read(1000).startswith("x")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert err.strip() == ("error: Broken pipe; the program reading this output closed it (e.g. `| head`); the rest "
                           "was not written")


def test_ctrl_c_is_quiet_with_status_130_and_bugs_keep_their_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "interrupt"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO)})
    assert (proc.returncode, proc.stderr) == (130, "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "bug"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError: a real bug" in proc.stderr


def test_only_rank_zero_prints_under_torchrun(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "usage"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "RANK": "1"})
    assert proc.returncode == 1 and proc.stderr == ""
