"""The compile cache: where generate.py's compiled decode steps (decode.CompiledDecoder's packages) and quick-start
records (quick.py, quick_shim.py) are kept, what names a package besides the model's shape (the C++ compiler, the
CPU's flags), and its housekeeping. Imports no torch: the quick start reads it before torch would load."""
import os
import shutil
import sys
import time

from runtime import TMP_PREFIX


def cache_dir():
    """Where compiled decode steps and quick-start records are kept: $LLAMAFORGE_CACHE, else
    $XDG_CACHE_HOME/llamaforge, else ~/.cache/llamaforge."""
    return os.environ.get("LLAMAFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llamaforge")


def compiler(cxx=None):
    """The C++ compiler cxx (a name or path; by default the one inductor reads at its config's import: $CXX, else
    g++, clang++ on macOS) as its real path, size and time; None without one."""
    cxx = cxx or os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
    if (found := shutil.which(cxx)) is None:
        return None
    info = os.stat(real := os.path.realpath(found))
    return [real, info.st_size, info.st_mtime_ns]


def cpu_flags():
    """The CPU's instruction sets as /proc/cpuinfo lists them (x86 "flags", ARM "Features"); "" elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def prune(folder, keep, days=30):
    """Remove the packages and quick-start records of this folder not used for `days` (another torch, an older
    llamaforge, a shape or model no longer run: a package is a few MB, a record the model's size, and a later
    version never reads either again) and what a killed compile or write left (after a day)."""
    now = time.time()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        stale = 86400 if name.endswith(".tmp.pt2") or name.startswith(TMP_PREFIX) else days * 86400
        used = path  # a record's weights go by its JSON's time, a shim's stubs by the shim's
        if name.startswith("quick-") and name.endswith(".bin"):
            used = path[:-4] + ".json"
        elif name.startswith("quick-shim-") and "-lib" in name:
            used = os.path.join(folder, name.split("-lib")[0] + ".so")
        if name.startswith(("decode-", "quick-", TMP_PREFIX)) and path != keep:
            try:
                if now - os.path.getmtime(used if os.path.exists(used) else path) > stale:
                    os.remove(path)
            except OSError:  # another process removed or replaced it first
                pass
