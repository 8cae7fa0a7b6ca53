"""quick_shim.cpp, the few functions of libtorch a compiled decode step calls, as generate.py's quick start uses it:
built into the compile cache for this machine, then adopted by a quick-start record (quick.py) once the record's
step, run on it in a process of its own, gives the logits it gives on libtorch. A record that names it loads it in
about a millisecond instead of libtorch_cpu's 0.18 s (the 2-token command on stories260K: 0.12 s, not 0.3)."""
import hashlib
import io
import json
import os
import subprocess
import sys

from compile_cache import compiler, cpu_flags
from quick import HERE, SHIM, Runner, load, set_shim, shim_digest
from runtime import atomic_file

STUBS = ("libtorch.so", "libc10.so")  # the other libraries of torch's a package may name (a CUDA build's do)
# -Bsymbolic: the shim's calls to its own functions stay its own where libtorch's are loaded too (a process that
# imported torch: tests/test_quick_shim.py calls both)
FLAGS = ["-O2", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-Wl,-Bsymbolic"]


def build(folder, again=False, source=SHIM):
    """source (quick_shim.cpp) compiled for this machine into folder (once, ~1 s; named by the source, the compiler,
    the CPU's flags and FLAGS; again: even if there, as when it failed its check), or None where it does not build
    (no compiler, another platform). The same source gives the same bytes (g++ here): records naming it still match."""
    cxx = compiler()
    if cxx is None or not sys.platform.startswith("linux"):
        return None
    with open(source, "rb") as f:
        name = hashlib.sha256(json.dumps([f.read().hex(), cxx, cpu_flags(), FLAGS]).encode()).hexdigest()[:20]
    target = os.path.join(folder, f"quick-shim-{name}.so")
    # its soname is the library a package names; and empty ones of the names a CUDA build's packages also name
    # (quick.Runner loads them where the package asks), made first: the shim there means they are
    builds = [(f"{target[:-3]}-{soname}", soname, os.devnull) for soname in STUBS]
    builds.append((target, "libtorch_cpu.so", source))
    for path, soname, code in builds:
        if os.path.exists(path) and not again:
            continue
        try:
            with atomic_file(path) as tmp:
                subprocess.run([cxx[0], *FLAGS, f"-Wl,-soname,{soname}", "-x", "c++", code, "-o", tmp], check=True,
                               capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            return None
    return target


CHECKED = (1, 2, 3)  # the tokens adopt runs, at positions 0, 1, 2


def adopt(folder, key, runner, shim=None, again=False):
    """Name the shim (quick_shim.cpp, built by build() unless given) in the record when the record's step runs on
    it in a fresh process (this one has libtorch loaded) with runner's logits (libtorch's) for CHECKED, to 1e-5 of
    the largest (its exp's last bits differ from SLEEF's: 2e-7 measured; a polynomial off by 2% in one coefficient:
    6e-5): later runs load it instead of libtorch. A built shim that fails is built again and checked once more (a
    damaged file); again: built again first (one known damaged). Anything else leaves the record as it is. runner
    (on libtorch) is closed once it has given its logits. Returns whether the shim was adopted."""
    import numpy as np
    if runner.vocab <= max(CHECKED):
        return False
    expected = []
    for pos, token in enumerate(CHECKED):
        runner.step(token, pos)
        expected.append(runner.logits().copy())
    runner.close()  # the check reads its own copy of the weights: one at a time
    expected = np.stack(expected)
    for rebuild in (False,) if shim else (True,) if again else (False, True):
        path = shim or build(folder, rebuild)
        if path is None:
            return False
        try:
            digest = shim_digest(path)  # of the bytes checked
            code = f"import sys; sys.path.insert(0, {HERE!r}); import quick_shim; quick_shim._logits(*sys.argv[1:])"
            out = subprocess.run([sys.executable, "-c", code, folder, key, path], cwd=folder, capture_output=True,
                                 timeout=300, preexec_fn=_no_core)  # a damaged shim crashes it: no core file
            got = np.load(io.BytesIO(out.stdout)) if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, ValueError):
            got = None
        if got is not None and got.shape == expected.shape and \
                np.allclose(got, expected, rtol=0, atol=1e-5 * float(np.abs(expected).max())):
            try:
                set_shim(folder, key, path, digest)
            except (OSError, ValueError):  # the record gone (pruned, replaced) or its folder read-only
                return False
            return True
    return False


def _no_core():
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _logits(folder, key, shim):
    """adopt's other half, in a process of its own: the logits of CHECKED through the shim, as .npy on stdout."""
    import numpy as np
    runner, out = Runner(folder, key, load(folder, key), shim=shim), []
    for pos, token in enumerate(CHECKED):
        runner.step(token, pos)
        out.append(runner.logits().copy())
    np.save(sys.stdout.buffer, np.stack(out))
