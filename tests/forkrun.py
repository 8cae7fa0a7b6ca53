"""run_script's fast path: each script still runs in a process of its own, forked from a per-worker server that
imported torch and numpy once, instead of a fresh interpreter paying their ~1.5 s import every time (most of the
suite's time: it runs our CLIs hundreds of times), and torch._dynamo, which torch.optim imports when a script makes
its first optimizer (another 1.3 s of every training run). The child is set up as `python script.py args` would be:
its argv, cwd and sys.path[0], stdin from /dev/null, stdout and stderr to files, the script run as __main__, then
Python's own exit path (non-daemon threads joined, atexit handlers, the excepthook for an uncaught exception, exit
status 1). Only our modules are imported afresh in each child.

The child's os.environ is the call's. A call falls back to a fresh interpreter (subprocess.run) when it sets a
variable read at start-up or import (AT_IMPORT) differently from the server, or another thread is using the
server; and always when the call's environment has LLAMAFORGE_FRESH_PROCESSES=1 (a test measuring its
children's resources: a forked script is the server's child, not the test's)."""
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading

SERVER = r'''
import atexit, os, pickle, runpy, struct, sys, tempfile, threading
import numpy, torch  # noqa: F401  what every script start would import again
import torch._dynamo  # noqa: F401  imported by torch.optim's first optimizer (1.3 s of each training run)

control_in, control_out = sys.stdin.buffer, sys.stdout.buffer


def run(argv, cwd, env, out, err):
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # found again from this call's TMPDIR
    numpy.random.seed()  # a fresh process's entropy (Python's random reseeds itself after a fork)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
        f = os.open(path, flags)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(cwd)
    sys.argv, sys.path[0] = list(argv), os.path.dirname(argv[0])
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    os._exit(code)


while True:
    head = control_in.read(4)
    if len(head) < 4:
        break
    request = pickle.loads(control_in.read(struct.unpack("<I", head)[0]))
    pid = os.fork()
    if pid == 0:
        run(*request)
    control_out.write(struct.pack("<i", pid))
    control_out.flush()
    control_out.write(struct.pack("<i", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])))
    control_out.flush()
'''

_lock = threading.Lock()
_server = None  # (Popen, env it was started with)


def _start(env):
    global _server
    proc = subprocess.Popen([sys.executable, "-c", SERVER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, bufsize=0)  # unbuffered: select() sees every reply
    _server = (proc, _imported(env))
    return proc


# variables read when Python starts or torch, numpy and torch._dynamo are imported (in the server, before any call;
# torch._dynamo brings inductor's config, which reads $CXX and its own variables then): a call that sets any of these
# differently runs in a fresh interpreter
AT_IMPORT = ("PYTHON", "TORCH", "PYTORCH", "OMP_", "KMP_", "GOMP_", "MKL", "OPENBLAS", "NUMPY", "CUDA", "NVIDIA",
             "LD_", "TRITON", "CXX", "AOT_INDUCTOR", "AOTINDUCTOR", "INDUCTOR_", "SYMPY")


# ...except one torch writes into os.environ itself: importing torch._dynamo sets TORCHINDUCTOR_CACHE_DIR to its
# default, and torch reads it afresh at each use, so the call's value reaches the child. Counted, it sent every call
# of a worker whose process had imported torch._dynamo (an optimizer, a compile) to a fresh interpreter (194 of one
# suite run's 310 calls, ~2 s each)
SET_BY_TORCH = ("TORCHINDUCTOR_CACHE_DIR",)


def _imported(env):
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k.startswith(AT_IMPORT) and k not in SET_BY_TORCH}


def _stop():
    global _server
    _server = None


def _read(proc, n, deadline_s):
    if deadline_s is not None and not select.select([proc.stdout], [], [], max(deadline_s, 0))[0]:
        return None
    data = b""
    while len(data) < n:
        more = proc.stdout.read(n - len(data))
        if not more:
            raise RuntimeError("the fork server died")
        data += more
    return data


def _text(data):  # as subprocess.run(text=True) decodes
    return data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def run(argv, cwd, env, timeout):
    """subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout) for a Python
    script argv = [sys.executable, script, *args], through the fork server where that is the same thing."""
    if (env or os.environ).get("LLAMAFORGE_FRESH_PROCESSES") or not _lock.acquire(blocking=False):
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    try:
        proc = _server[0] if _server and _server[0].poll() is None else None
        if proc is not None and _server[1] != _imported(env):
            return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        proc = proc or _start(env)
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            for p in (out, err):
                open(p, "wb").close()
            request = pickle.dumps((argv[1:], os.path.abspath(cwd or os.getcwd()), env, out, err))
            proc.stdin.write(struct.pack("<I", len(request)) + request)
            proc.stdin.flush()
            try:
                pid = struct.unpack("<i", _read(proc, 4, 60))[0]
                status = _read(proc, 4, timeout)
                if status is None:  # as subprocess.run: kill the child, then raise
                    os.kill(pid, signal.SIGKILL)
                    _read(proc, 4, None)
                    raise subprocess.TimeoutExpired(argv, timeout)
            except BaseException:  # Ctrl-C, a timeout, a dead server: drop the server, whose replies may be unread
                proc.kill()
                _stop()
                raise
            code = struct.unpack("<i", status)[0]
            with open(out, "rb") as f, open(err, "rb") as g:
                return subprocess.CompletedProcess(argv, code, _text(f.read()), _text(g.read()))
    finally:
        _lock.release()
