"""The house (STYLE.md): library files take arguments, raise UsageError and import only library files;
scripts import only library files; every file stays readable whole."""
import ast

import pytest

from conftest import REPO

LIBRARY = {"model.py", "runtime.py", "tokenizer.py", "chat.py", "configurator.py", "optim.py", "data.py", "dpo.py",
           "checkpoint.py", "formats.py", "hf.py", "lora.py", "sources.py", "engine.py", "jobs.py", "quant.py",
           "decode.py", "quick.py", "quick_shim.py", "compile_cache.py", "sampling.py"}
SCRIPTS = sorted(p.name for p in REPO.glob("*.py") if p.name not in LIBRARY)
OURS = {p.stem for p in REPO.glob("*.py")}


def our_imports(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & OURS


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_files_import_only_library_files_and_never_exit(name):
    path = REPO / name
    assert our_imports(path) <= {p[:-3] for p in LIBRARY}, our_imports(path)
    exits = [n.lineno for n in ast.walk(ast.parse(path.read_text()))
             if (isinstance(n, ast.Name) and n.id == "SystemExit") or (isinstance(n, ast.Attribute)
                 and isinstance(n.value, ast.Name) and n.value.id == "sys" and n.attr in ("exit", "argv"))]
    assert not exits, f"{name} exits or reads argv at lines {exits}: raise UsageError and take arguments instead"
    if name == "model.py":  # the ground floor
        assert our_imports(path) == set()


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_import_only_library_files(name):
    assert our_imports(REPO / name) <= {p[:-3] for p in LIBRARY}, our_imports(REPO / name)


@pytest.mark.parametrize("name", sorted(LIBRARY) + SCRIPTS)
def test_files_stay_readable_whole(name):
    lines = (REPO / name).read_text().splitlines()
    assert len(lines) <= 450, f"{name} has {len(lines)} lines; split a concern out"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
    assert not long, f"{name}: lines {long[:10]} are over 120 characters"


def test_the_readme_index_says_what_each_library_file_imports():
    """README "Where things live": one row per file, and for a library file the files of ours it may import,
    which must be what it does import."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].endswith(".py`"):
            rows[cells[0].strip("`")] = cells[2]
    assert set(rows) >= LIBRARY | set(SCRIPTS), sorted((LIBRARY | set(SCRIPTS)) - set(rows))
    for name in LIBRARY:
        said = set() if rows[name] == "nothing" else {w.strip() for w in rows[name].split(",")}
        assert said == our_imports(REPO / name), (name, sorted(said), sorted(our_imports(REPO / name)))


@pytest.mark.parametrize("folder", ["tests", "config"])
def test_tests_and_configs_keep_lines_within_120_characters(folder):
    long = [f"{p.name}:{i + 1}" for p in sorted((REPO / folder).glob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()) if len(line) > 120]
    assert not long, f"lines over 120 characters: {long[:10]}"
