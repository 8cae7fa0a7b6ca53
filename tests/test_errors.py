"""Every script keeps the one-line-error property for each class of bad input: a non-zero exit, no traceback,
and `error: ...` naming the problem and the fix. Every top-level file that is not a library file is a script,
so a new script inherits these tests without being listed."""
import re

import pytest

from conftest import REPO, one_line_error, run_script
from test_layout import SCRIPTS

SUBCOMMAND = {"tokenize_data.py": ["pretokenize"], "evaluate.py": ["loss"]}  # scripts whose first argument is a verb


def test_scripts_are_found():
    assert {"train.py", "generate.py", "evaluate.py", "export.py", "tokenize_data.py", "bench.py"} <= set(SCRIPTS)
    for name in SCRIPTS:  # each installs the handler before anything can fail
        assert re.search(r"^\s*handle_errors\(\)", (REPO / name).read_text(), re.M), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_mistakes(tmp_path, script):
    verb = SUBCOMMAND.get(script, [])
    one_line_error(run_script(script, *verb, "--no_such_key=1", cwd=tmp_path, check=False), "unknown config key 'no_such_key'")
    (tmp_path / "cfg.yaml").write_text("batch_size: 4\n")
    one_line_error(run_script(script, *verb, "cfg.yaml", cwd=tmp_path, check=False), "is not a .py file")
    one_line_error(run_script(script, *verb, "missing.py", cwd=tmp_path, check=False), "config file 'missing.py' not found")
    (tmp_path / "broken.py").write_text("x = (\n")
    one_line_error(run_script(script, *verb, "broken.py", cwd=tmp_path, check=False), "failed: SyntaxError")
