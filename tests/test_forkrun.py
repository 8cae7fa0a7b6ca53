"""The suite's fork server (tests/forkrun.py) serves the calls it should: the suite's time depends on it (366 s with
a third of the calls falling back to fresh interpreters, 174 s without, on 2 cores)."""
import os
import sys

import forkrun
from conftest import REPO

PROBE = "import os, sys; print(os.getppid(), 'torch._dynamo' in sys.modules)\n"


def call(tmp_path, **extra):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    proc = forkrun.run([sys.executable, str(script)], tmp_path, env, 60)
    assert proc.returncode == 0, proc.stderr
    parent, dynamo = proc.stdout.split()
    return int(parent) != os.getpid(), dynamo == "True"  # forked by the server, not this process's child


def test_the_server_serves_after_inductor_set_its_cache_dir_and_has_dynamo_imported(tmp_path):
    assert call(tmp_path) == (True, True)
    # what importing torch._dynamo writes into the test process's environment: read afresh at each use
    assert call(tmp_path, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")) == (True, True)
    # a variable read at import does need a fresh interpreter: torch's, and inductor's config's (the compiler)
    assert call(tmp_path, OMP_NUM_THREADS="2") == (False, False)
    assert call(tmp_path, CXX="clang++") == (False, False)
