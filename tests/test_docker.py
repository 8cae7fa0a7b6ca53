"""The Docker image, as far as a machine without a Docker engine can prove it: hadolint passes on the Dockerfile,
.dockerignore keeps data, checkpoints and environments out of the build context but not the code, and the image's
own ENTRYPOINT + CMD (read from the Dockerfile, not repeated here), run in the repo as the image runs it in /app,
serves /health and /v1/models; its HEALTHCHECK passes against it, and fails once it is gone."""
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, save_tiny_checkpoint, tiny_model
from test_serve import call, stop, wait_ready

HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def instructions(path=REPO / "Dockerfile"):
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    kept = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(kept))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip()) for ln in text.splitlines() if ln.strip()]


def exec_form(args):
    """A JSON-array (exec form) command; the shell form would hide signals from the server (no clean stop)."""
    cmd = json.loads(args)
    assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd), args
    return cmd


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install -r requirements-dev.txt)")
def test_hadolint_passes_on_the_dockerfile(tmp_path):
    strict = [HADOLINT, "--no-color", "--failure-threshold=style"]  # every finding fails, down to style
    proc = subprocess.run([*strict, str(REPO / "Dockerfile")], capture_output=True, text=True, cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, ""), proc.stdout + proc.stderr
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nUSER root\nRUN pip install torch\nCMD python serve.py\n")
    bad = subprocess.run([*strict, "Dockerfile"], capture_output=True, text=True, cwd=tmp_path)  # it does look
    assert bad.returncode != 0 and {"DL3007", "DL3013", "DL3025"} <= set(re.findall(r"DL\d+", bad.stdout)), bad.stdout


def excluded(path, patterns):
    """Whether .dockerignore's patterns keep path out of the build context (the last matching line decides; a
    pattern that matches a folder covers everything in it; '**/' matches any depth, including none)."""
    out = False
    for pat in patterns:
        negate, pat = pat.startswith("!"), pat.lstrip("!").strip("/")
        alts = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, a) for a in alts for p in prefixes) or (
                pat.startswith("**/") and any(fnmatch.fnmatchcase(p, pat[3:]) for p in parts)):
            out = not negate
    return out


def test_dockerignore_keeps_data_checkpoints_and_venvs_out_and_the_code_in():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", "data/tinystories/train.bin",
                 "data/tinystories/docs.jsonl", "out/ckpt.pt", "out-lora/metrics.jsonl", "runs/demo/ckpt.pt",
                 "stories260K.bin", "hf/model.safetensors", "demo.gguf", "tok512.model", ".git/HEAD",
                 "__pycache__/model.cpython-311.pyc", "tests/test_model.py"):
        assert excluded(path, patterns), path
    needed = ["requirements.txt"] + [p.name for p in REPO.glob("*.py")] + [
        str(p.relative_to(REPO)) for p in (REPO / "config").glob("*.py")]
    assert not [p for p in needed if excluded(p, patterns)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from test_engine import train_tokenizer
    root = tmp_path_factory.mktemp("docker")
    tok = train_tokenizer(root)
    model = tiny_model(vocab_size=tok.vocab_size)
    save_tiny_checkpoint(root / "tiny" / "ckpt.pt", model, tok)
    return root / "tiny"


def test_the_images_entrypoint_serves_health_and_models_and_its_healthcheck_passes(checkpoint, tmp_path):
    steps = instructions()
    last = {kind: args for kind, args in steps}  # Docker uses the last of each
    entry, cmd, health = exec_form(last["ENTRYPOINT"]), exec_form(last["CMD"]), last["HEALTHCHECK"]
    assert last["WORKDIR"] == "/app" and ("COPY", ". .") in steps  # the repo is the image's working folder
    assert last["USER"].split(":")[0] not in ("root", "0")
    port = last["EXPOSE"]
    assert f"--port={port}" in entry and f"127.0.0.1:{port}/health" in health  # one port, three places
    # as `docker run IMAGE` does, with the image's python being this one; later flags win over earlier ones, so
    # the test listens on a free loopback port (not 0.0.0.0:8000) and serves its own checkpoint instead of /models
    argv = [sys.executable if a == "python" else a for a in entry + cmd]
    argv += [f"--checkpoint={checkpoint}", "--port=0", "--host=127.0.0.1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log = log.name
    try:
        found = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
        assert found, open(log.name).read()
        base, live = found.group(), found.group(1)
        wait_ready(base)
        status, body, _ = call(base, "GET", "/health", key=None)
        assert status == 200 and body["status"] == "ok"
        status, body, _ = call(base, "GET", "/v1/models", key=None)
        assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
        probe = exec_form(re.search(r"CMD\s+(\[.*\])\s*$", health).group(1))
        probe = [sys.executable if a == "python" else a.replace(f":{port}/", f":{live}/") for a in probe]
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    finally:
        stop(proc)
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0  # and it can fail
