"""What every script needs from the process it runs in.

- UsageError, the one error type of the library files, and handle_errors(), which each script calls
  once: an uncaught UsageError, OSError or decode error then ends the process with one line
  `error: ...` and status 1, and Ctrl-C with status 130, instead of a traceback.
- The one device/dtype rule (device_and_dtype) and the autocast context that goes with it.
- Device peaks and MFU; memory readings; torch.distributed setup and teardown.
- The one atomic writer of files and folders, and the one-writer-per-folder lock.
Imports nothing of ours: every library file may import it.
"""
import contextlib
import ctypes
import errno
import os
import sys
from contextlib import nullcontext


class UsageError(Exception):
    """Bad input, settings or files. The message names the problem and the fix, in one line."""


class HelpRequested(Exception):
    """--help: the script's settings, printed by the handler, which then exits with status 0."""


def _one_line(exc):
    """The `error: ...` line for an exception that escaped a script, or None for a real bug."""
    if isinstance(exc, UsageError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):  # readers that know their file convert this themselves
        byte = exc.object[exc.start:exc.start + 1]
        return (f"input is not {exc.encoding} text (byte {byte!r} at offset {exc.start}); "
                f"convert the file to UTF-8 or pass its --encoding")
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        fix = {errno.ENOSPC: "free some disk space or write elsewhere",
               errno.EFBIG: "the file outgrew what this process may write (ulimit -f) or the file system holds",
               errno.EDQUOT: "free some disk space or write elsewhere",
               errno.EACCES: "choose a location you may write to (or fix its permissions)",
               errno.EPERM: "choose a location you may write to (or fix its permissions)",
               errno.EROFS: "the file system is read-only: write elsewhere",
               errno.EISDIR: "that path is a folder: pass a file path",
               errno.ENOTDIR: "a part of that path is a file, not a folder: fix the path",
               errno.ENOENT: "check the path",
               errno.EEXIST: "a file of that name is in the way of a folder: pass another path",
               errno.EPIPE: "the program reading this output closed it (e.g. `| head`); the rest was not written",
               }.get(exc.errno, "check the path, its permissions and free disk space")
        return f"{exc.strerror or exc}{':' if where else ''}{where}; {fix}"
    return None


def before_hard_exit():
    """What a normal exit does first, for a process about to leave with os._exit (which skips interpreter
    finalization): run the atexit handlers (e.g. release a folder lock) and flush the streams."""
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()


def handle_errors():
    """Install the script-wide handler (call it at the top of a script, before any work). Library code
    raises; only this turns an exception into an exit status. Under torchrun only rank 0 prints, so a
    configuration error shows once, not once per process."""
    previous = sys.excepthook

    def hook(kind, exc, tb):
        quiet = int(os.environ.get("RANK", "0")) != 0
        if issubclass(kind, HelpRequested):
            try:
                print(exc, flush=True)
            except BrokenPipeError:  # `--help | head`
                pass
            os._exit(0)
        if issubclass(kind, KeyboardInterrupt):
            # quietly, and as the status a shell gives a process stopped by Ctrl-C; the `with` blocks that
            # write files have already removed their temporary files while the exception unwound
            before_hard_exit()
            os._exit(130)
        line, seen = None, exc
        while line is None and seen is not None:  # e.g. torch.save's RuntimeError raised while closing after ENOSPC
            line, seen = _one_line(seen), seen.__cause__ or seen.__context__
        if line is None:
            return previous(kind, exc, tb)  # a bug, not bad input: the traceback is what helps
        try:
            sys.stdout.flush()
        except BrokenPipeError:  # `| head` closed it: what is still buffered goes nowhere, and Python's own flush at
            with contextlib.suppress(OSError, ValueError):  # exit must not fail again (status 120, two tracebacks)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not quiet:
            print(f"error: {line}", file=sys.stderr, flush=True)
        # returning lets Python exit with status 1 as for any uncaught exception

    sys.excepthook = hook


def huge_pages():
    """Have torch back its CPU tensors of 2 MB and more with 2 MB pages (transparent huge pages, where the kernel
    offers them; every 2 MB-aligned block inside such a tensor): batch-1 decoding streams every weight once a token,
    and on 4 KB pages the TLB misses cost 5-8% of a token (15M shape, 1 and 2 threads, measured in one process).
    torch reads the setting at its first large allocation: call before loading a model. A THP_MEM_ALLOC_ENABLE the
    user set wins. With it, glibc's malloc is told to map every block of 2 MB or more afresh: by default, after a
    large free it serves such blocks from heap memory already touched, hence on 4 KB pages (seen: a model's head
    regrouped in memory landed there about one time in two). For the whole process, so a large temporary (a
    prefill's logits) is mapped and faulted in afresh each time, on 2 MB pages: for the decoding scripts only."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if os.environ["THP_MEM_ALLOC_ENABLE"] == "1" and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc: no mallopt
            ctypes.CDLL(None).mallopt(-3, 2 << 20)  # M_MMAP_THRESHOLD, fixed (glibc's own moves up to 32 MB)


GREEDY_BELOW = 1e-5  # a temperature this small is greedy: dividing logits by it overflows to inf and NaN probabilities


def check(ok, message):
    """Raise UsageError(message) unless ok: the one-line form of a validation."""
    if not ok:
        raise UsageError(message)


# ---- device and dtype ----------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")


def device_and_dtype(device="auto", dtype="auto"):
    """The one rule: 'auto' device is CUDA, else Apple's MPS, else the CPU; 'auto' dtype is bf16 autocast
    on GPUs with native bf16, fp16 (with loss scaling when training) on older GPUs, and fp32 elsewhere,
    where autocast buys nothing. Returns (device string, device type, dtype name)."""
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UsageError(f"device='{device}' is not a device name; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device='{device}' but no CUDA GPU is visible; use --device=cpu")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise UsageError(f"device='{device}' but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                         f"pick another index")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device='{device}' but this torch build or machine has no MPS; use --device=cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device='{device}' is not supported; use auto, cpu, cuda, cuda:N or mps")
    if dtype == "auto":
        bf16 = kind == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        dtype = "float32" if kind != "cuda" else ("bfloat16" if bf16 else "float16")
    if dtype not in DTYPES:
        raise UsageError(f"dtype='{dtype}' is not one of 'auto', {', '.join(repr(d) for d in DTYPES)}")
    return device, kind, dtype


def autocast(device_type, dtype):
    """Mixed precision for dtype's matmuls over fp32 weights; a no-op context for float32."""
    import torch
    return nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# ---- speed and memory ------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) from the vendors' datasheets.
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12,
    "A100": 312e12, "A800": 312e12, "A10G": 70e12, "A10": 125e12, "L4": 121e12, "L40S": 362e12,
    "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def peak_flops(device=None):
    """Peak dense bf16 FLOP/s of a CUDA device, matched on its name; None for CPU or unknown GPUs."""
    import torch
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # longest first: "GH200" before "H200"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops_per_token, tokens_per_second, device=None):
    """Model FLOPs utilisation against the device's dense bf16 peak; None where the peak is unknown."""
    peak = peak_flops(device)
    return None if peak is None else flops_per_token * tokens_per_second / peak


def peak_rss():
    """Peak resident memory of this process in bytes (0 where the resource module is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class MemoryMeter:
    """Peak memory since start: on CUDA the allocator's peak of live tensors (no sync), elsewhere the growth
    of the process's peak resident memory since the meter was made (coarser: allocator caches count too)."""

    def __init__(self, device):
        import torch
        self.device, self.cuda = device, torch.device(device).type == "cuda"
        self.base = 0 if self.cuda else peak_rss()

    def peak(self):
        import torch
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else max(0, peak_rss() - self.base)

    def reset(self):
        """Start a new window (CUDA only: a process's peak RSS cannot be lowered)."""
        import torch
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)


def cap_gpu_memory(device, gigabytes):
    """The caching allocator raises OutOfMemoryError past this many GiB, as a smaller card would."""
    import torch
    index = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gigabytes * 2**30 / total), index)


# ---- torch.distributed -------------------------------------------------------------------------------

def distributed_world():
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment, without initialising anything."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1
    return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def init_distributed(device_type):
    """Join torchrun's process group: NCCL between GPUs, gloo between CPU processes."""
    import torch
    import torch.distributed as dist
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":  # else every rank's collectives (all_gather_object, barrier) land on cuda:0
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)


def gather(obj):
    """The list of obj from every rank (a list of one outside torch.distributed)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def any_rank(flag):
    """Whether flag (a bool or a 0-dim tensor) is true on any rank: decisions every rank must take together
    (stop here, skip this step, refuse a nan). A host sync; the flag itself outside torch.distributed."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.as_tensor(flag).float().reshape(()).to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() > 0


class StopSignals:
    """SIGINT/SIGTERM ask a training loop to finish its step, save and exit cleanly instead of dying."""

    def __init__(self):
        import signal
        self.requested = False
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._request)

    def _request(self, signum, frame):
        self.requested = True


def teardown_distributed():
    """Wait for every rank (the master may still be writing a checkpoint), then leave the group. Drop any
    DDP wrapper before calling this: its reducer holds the group, and left for interpreter finalization
    gloo's threads free tensors after Python is gone and the process aborts ("terminate called ...")."""
    import gc
    import torch.distributed as dist
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


# ---- files: atomic writes, one writer per folder -------------------------------------------------------

TMP_PREFIX = ".tmp-"  # what atomic writes name their files and folders until they are complete


def current_umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary path beside `path`; when the body finishes it is fsynced and renamed onto `path`,
    and if the body fails it is removed. Rename is atomic on POSIX and the data reaches the disk before
    it: a crash, a power cut or a full disk mid-write leaves the previous file intact, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder; pass a file path to write to")
    import tempfile  # on use, here and below (with shutil): generate.py's quick start writes nothing, 3 ms of its start
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual mode of a new file
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(directory)  # the rename itself
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_output(path, key):
    """Refuse, before the work that fills it, an output path that cannot take a file."""
    check(not os.path.isdir(path), f"{key}={path} is a folder; pass a file path to write to")


def write_text(path, text):
    """A whole small result file (a report, a JSON line), replaced atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path):
    """The same for a folder: filled under a temporary name, fsynced, then swapped in whole (an old folder
    of that name is removed only after the new one is in place)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if os.path.isfile(path):
        raise UsageError(f"{path} is a file; pass a folder path to write to")
    import shutil
    import tempfile
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700 folders; give the usual mode of a new one
    try:
        yield tmp
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~current_umask())  # some writers make 0600 files
            fsync_path(os.path.join(tmp, name))
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        fsync_path(parent)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def remove_stale_temps(folder):
    """Delete what atomic writes of a killed process left behind in folder (it never reached its real
    name, so nothing refers to it); returns the names removed."""
    import shutil
    removed = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TMP_PREFIX):
                p = os.path.join(folder, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
                removed.append(name)
    return removed


class FolderLock:
    """One writer per folder. The lock is an flock on folder/.lock, which holds the owner's pid for the message;
    the kernel drops it when the owner dies however it dies, so a lock left by a killed run is simply taken
    over (no stale-lock guessing, no pid-reuse mistakes). Released, and its file removed, when the process
    exits normally (or by release())."""

    def __init__(self, folder, what):
        import atexit
        import fcntl
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, ".lock")
        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(self.fd, 64).decode(errors="replace").strip() or "?"
                os.close(self.fd)
                raise UsageError(f"{folder} is in use by another {what} (process {owner}); wait for it to finish or "
                                 f"stop it, or use another folder")
            try:  # the previous owner may have removed the file between our open and our lock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self.fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        self.stale = remove_stale_temps(folder)  # only now is nobody else writing here
        atexit.register(self.release)

    def release(self):
        if self.fd is not None:
            os.remove(self.path)  # before unlocking, so a waiting process never locks a file about to vanish
            os.close(self.fd)
            self.fd = None
