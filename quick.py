"""generate.py's quick start: the compiled CPU decode step run without importing torch, from a record kept in the
compile cache (compile_cache.py).

`import torch` takes 1.3-1.9 s here, longer than a 15M model takes to write 256 tokens. The step needs far less:
the package's shared library (decode.CompiledDecoder compiles it; it calls a few functions of libtorch's C
interface, which quick_shim.cpp has too: quick_shim.py), the weights laid out as the step takes them, a tokenizer.
So a run of generate.py --compile=True on a CPU leaves a record in the compile cache: the step's inputs as one raw
file (the weights packed and int8 regrouped as the step reads them) and a JSON file naming the package, the shim,
the inputs' shapes and the tokenizer, under a hash of all the run's model depends on (settings, the files' sizes
and times, torch's and our code, the CPU, the environment that sets threads). A later run of the same hash loads
the library with ctypes, reads the file into memory and decodes without torch; any other takes the usual path,
which writes a new record. Both generate through this file's loop (prompt and new tokens through the step one at
a time, as run.c; sampling with numpy's generator): a seed gives the same text whether the record was there or not.
"""
import contextlib
import ctypes
import glob
import hashlib
import importlib.util
import json
import math
import mmap
import os
import sys

from compile_cache import compiler, cpu_flags, prune
from runtime import UsageError, atomic_file

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.join(HERE, "quick_shim.cpp")
ALIGN = 64  # every input starts at a multiple of this in the file (and so in memory): whole vector loads
FIX = "pass --quick_start=False, or delete the quick-* files in the compile cache"


class Unavailable(Exception):
    """This machine or record cannot run the quick path (the caller takes the usual one)."""


def _stat(path):
    """A file as its real path, size, times and inode (a save through runtime.atomic_file is a new inode), or a
    folder (a run folder, a Hugging Face folder) as every file in it."""
    if not path or not os.path.exists(path):
        return [path, None]
    real = os.path.realpath(path)
    if os.path.isdir(real):
        return [real, sorted([e.name, *_stat(e.path)[1:]] for e in os.scandir(real) if e.is_file())]
    info = os.stat(real)
    return [real, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]


def _torch_lib():
    """torch's library folder, found without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("torch is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "lib")


def available():
    """Whether this machine can run a record: Linux, with torch's C library where a CPU or CUDA wheel keeps it."""
    try:
        return sys.platform.startswith("linux") and os.path.isfile(os.path.join(_torch_lib(), "libtorch_cpu.so"))
    except Unavailable:
        return False


def fingerprint(settings, files):
    """The hash that names a record: settings (the run's model-defining settings but its file paths), the files
    (each file or folder as _stat has it), and what else decides the model, its layout or the compiled step: torch's
    build, our code, the Python, the CPU, the compiler, and what sets the thread count or the device."""
    code = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(HERE, "*.py")) + [SHIM]):
        with open(path, "rb") as f:
            code.update(f.read())
    try:
        lib = _torch_lib()
        torch_files = [_stat(os.path.join(lib, n)) for n in ("libtorch_cpu.so", "libc10.so")]
        torch_files.append(_stat(os.path.join(os.path.dirname(lib), "version.py")))
    except Unavailable:
        torch_files = None
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "CXX",
                                          "CUDA_VISIBLE_DEVICES", "THP_MEM_ALLOC_ENABLE")}
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    gpus = [p for p in ("/dev/nvidiactl", "/dev/kfd") if os.path.exists(p)]
    key = json.dumps([settings, [_stat(p) for p in files], torch_files, code.hexdigest(), sys.version,
                      sys.executable, cpu_flags(), compiler(), env, affinity, os.cpu_count(), gpus], default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def paths(folder, key):
    return os.path.join(folder, f"quick-{key}.json"), os.path.join(folder, f"quick-{key}.bin")


def _bytes(value):
    if not isinstance(value, bytes):
        raise UsageError(f"a quick-start record holds JSON and bytes, not {type(value).__name__}")
    import base64  # on use, as zipfile below: their imports are 10 ms of a later run's ~0.1 s start, unused
    return {"base64": base64.b64encode(value).decode()}  # a tokenizer's own model


def _unbytes(d):
    return __import__("base64").b64decode(d["base64"]) if list(d) == ["base64"] else d


def save(folder, key, package, tensors, caches, info, source="", watch=()):
    """Write a record: tensors (the step's inputs but the KV cache, torch tensors, in the step's order) into one
    raw file, then the JSON naming it (written last, so a record is whole or absent). caches: [(dtype name, shape)]
    of the KV cache tensors (fresh zeros in each run). info: what the runner needs besides (tokenizer, stop ids,
    vocab, context, a note to print). source: what the run was asked for (settings, real paths): the records of
    the same source under other keys are older versions, removed. watch: more files the model came from (an
    adapter's base), checked at each load."""
    import torch  # only the run that writes a record has torch (and its tensors)
    meta, written, kept, (json_path, bin_path) = [], {}, [], paths(folder, key)
    with atomic_file(bin_path) as tmp, open(tmp, "wb") as f:
        for t in tensors:
            data = t.detach().contiguous().cpu()
            kept.append(data)  # alive to the end: a freed copy's address could come back as another's
            same = (data.data_ptr(), data.dtype, data.shape)  # a tied embedding and head: one copy, two inputs
            if same not in written:
                f.write(b"\0" * (-f.tell() % ALIGN))
                written[same] = f.tell()
                f.write(memoryview(data.view(-1).view(torch.uint8).numpy()))
            meta.append([str(data.dtype).replace("torch.", ""), list(data.shape), written[same]])
    try:
        with atomic_file(json_path) as tmp, open(tmp, "w") as f:
            json.dump({"package": package, "inputs": meta, "caches": caches, "bytes": os.path.getsize(bin_path),
                       "weights_file": _identity(bin_path), "source": source, "watch": [_stat(p) for p in watch],
                       **info}, f, default=_bytes)
    except BaseException:
        os.remove(bin_path)
        raise
    for other in glob.glob(os.path.join(folder, "quick-*.json")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if other != json_path and source and _source(other) == source:
                forget(folder, os.path.basename(other)[6:-5])
    prune(folder, keep=package)


def set_shim(folder, key, shim, digest=None):
    """The record names shim (quick_shim.py's library, and digest: shim_digest's when it was checked; None: no
    shim), its JSON replaced atomically."""
    json_path = paths(folder, key)[0]
    with open(json_path) as f:  # a tokenizer's bytes stay {"base64": ...}
        record = {k: v for k, v in json.load(f).items() if k not in ("shim", "shim_sha256")}
    with atomic_file(json_path) as tmp, open(tmp, "w") as f:
        json.dump({**record, "shim": shim, "shim_sha256": digest or shim_digest(shim)} if shim else record, f)


def shim_digest(shim):
    """The hash of a shim's bytes and its stub libraries' (a library cut short or overwritten would crash the
    process that loads it; ~50 KB in all: 0.1 ms)."""
    sha = hashlib.sha256()
    for path in [shim, *sorted(glob.glob(f"{glob.escape(shim[:-3])}-lib*.so"))]:  # and its stubs
        with open(path, "rb") as f:
            sha.update(os.path.basename(path).encode() + b"\0" + f.read())
    return sha.hexdigest()


def _identity(path):
    """A file's size, modification time and inode (nothing here sets the weights file's time: prune() reads the
    record's): the weights file changed in any way but a same-time rewrite of its bytes in place shows."""
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def _source(path):
    with open(path) as f:
        return json.load(f).get("source")


def forget(folder, key):
    """Remove a record."""
    for path in paths(folder, key):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


REQUIRED = {"package": str, "inputs": list, "caches": list, "bytes": int, "vocab": int, "context": int,
            "watch": list, "weights_file": list}


def load(folder, key):
    """The record of this key, or None (absent, torn, its weights file or a watched file changed)."""
    json_path, bin_path = paths(folder, key)
    try:
        with open(json_path) as f:
            record = json.load(f, object_hook=_unbytes)
    except (OSError, ValueError):
        return None
    try:
        if any(not isinstance(record.get(k), t) for k, t in REQUIRED.items()) or \
                [_stat(w[0]) for w in record["watch"]] != record["watch"] or \
                _identity(bin_path) != record["weights_file"]:
            return None
    except (AttributeError, TypeError, IndexError, OSError):  # not a record's shape; no weights file
        return None
    with contextlib.suppress(OSError):  # last use: prune() keeps what is used (a weights file goes by its record's)
        for path in (json_path, record["package"]):
            os.utime(path)
    return record


LOADED = []  # the shim this process loaded: for good (torch no longer imports here: its libraries would bind to it)


class ShimFailed(Unavailable):
    """The step did not start on the record's shim, now loaded: torch no longer imports in this process. The
    record no longer names the shim; a new process runs it on libtorch (generate.py starts itself again)."""


def _own_shim(folder, record):
    """The record's shim if it is one (quick_shim.build's name, in the record's folder, with its stubs the bytes the
    record was checked with), else ""."""
    shim = record.get("shim") or ""
    ours = isinstance(shim, str) and os.path.basename(shim).startswith("quick-shim-") and shim.endswith(".so")
    try:
        same = ours and os.path.realpath(os.path.dirname(shim)) == os.path.realpath(folder)
        return shim if same and shim_digest(shim) == record.get("shim_sha256") else ""
    except OSError:
        return ""


def _loaded(soname):
    """Whether a library of this soname is loaded in this process."""
    try:
        ctypes.CDLL(soname, mode=os.RTLD_NOLOAD)
        return True
    except OSError:
        return False


def _open(path, where):
    """The shared library at path, loading first each library of torch's it needs that is not loaded yet, from
    where(its name) (a package built by a CUDA build of torch needs libtorch.so, which brings libtorch_cuda; a CPU
    build's, none; on the shim, an empty library of that name: quick_shim.py)."""
    for _ in range(8):
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            needed = where(str(e).split(":")[0])
            if not os.path.isfile(needed):
                raise
            ctypes.CDLL(needed, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(path)


class Runner:
    """The compiled step of a record, through AOTInductor's C interface: step(token, pos) -> the argmax of the
    logits, with logits() the last step's logits (a numpy array, valid until the next step). The interface comes
    from the record's shim (quick_shim.adopt) when it has one, else (or with shim="") from libtorch."""

    def __init__(self, folder, key, record, shim=None):
        if not sys.platform.startswith("linux"):
            raise Unavailable("the quick start runs on Linux")
        self.where, self.shim = (folder, key, record), ""
        try:
            self._start(folder, key, record, _own_shim(folder, record) if shim is None else shim)
        except (Unavailable, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            why = str(e) if isinstance(e, Unavailable) else f"the record does not fit ({e})"  # another layout
            if LOADED:  # torch no longer loads here: the caller starts afresh, the record without this shim
                self.drop_shim()
                raise ShimFailed(why) from None
            raise Unavailable(why) from None

    def drop_shim(self):
        """The record no longer names the shim this runner runs on (the next start runs it on libtorch)."""
        folder, key, record = self.where
        if self.shim and self.shim == record.get("shim"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                set_shim(folder, key, None)

    def _start(self, folder, key, record, shim):
        cache_bytes = [4 * math.prod(shape) for _, shape in record["caches"]]
        size = record["bytes"] + sum(cache_bytes) + ALIGN * len(cache_bytes)  # private: shared memory gets no THP
        self.memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):  # 2 MB pages (a file's own are 4 KB ones, whose TLB misses cost 5-8% of
            self.memory.madvise(mmap.MADV_HUGEPAGE)  # a token; runtime.huge_pages); the KV cache after, zeros
        try:
            with open(paths(folder, key)[1], "rb") as f:
                if f.readinto(memoryview(self.memory)[:record["bytes"]]) != record["bytes"]:
                    raise Unavailable("the record's weights file is short")
            package = self._library(record["package"])
        except (OSError, StopIteration) as e:
            raise Unavailable(str(e) or type(e).__name__) from None
        # the C interface for the whole process (the package's calls into it resolve at the package's load): the
        # shim, 1 ms, unless libtorch is here already (its soname would take the package's calls); else libtorch's
        # (0.18 s; ctypes keeps the GIL while it loads: no thread overlaps it). A process keeps the shim it loaded
        shim = LOADED[0] if LOADED else shim if shim and os.path.isfile(shim) and not _loaded("libtorch_cpu.so") else ""
        H, P, i64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64
        self.container, self.shim = H(), shim
        try:
            if shim:
                self.t = t = ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)
                LOADED[:] = [shim]
                with contextlib.suppress(OSError):  # in use (prune: its stubs go by it)
                    os.utime(shim)
                step = _open(package, lambda name: f"{shim[:-3]}-{name}")
            else:
                lib = _torch_lib()
                for name in ("libc10.so", "libtorch_cpu.so"):
                    ctypes.CDLL(os.path.join(lib, name), mode=ctypes.RTLD_GLOBAL)
                self.t = t = ctypes.CDLL(os.path.join(lib, "libtorch_cpu.so"))
                step = _open(package, lambda name: os.path.join(lib, name))
            create = step.AOTInductorModelContainerCreateWithDevice
            create.argtypes = [P, ctypes.c_size_t, ctypes.c_char_p, H]
            if create(ctypes.byref(self.container), 1, b"cpu", None):
                raise OSError("the compiled step did not start")
        except (OSError, AttributeError) as e:
            raise Unavailable(str(e) or type(e).__name__) from None
        t.aoti_torch_create_tensor_from_blob.argtypes = [H, i64, ctypes.POINTER(i64), ctypes.POINTER(i64), i64,
                                                         ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, P]
        t.aoti_torch_get_data_ptr.argtypes = [H, P]
        t.aoti_torch_delete_tensor_object.argtypes = [H]
        t.aoti_torch_new_tensor_handle.argtypes = [H, P]
        step.AOTInductorModelContainerRun.argtypes = [H, P, ctypes.c_size_t, P, ctypes.c_size_t, H, H]
        self.run_fn = step.AOTInductorModelContainerRun
        self.step_lib = step
        dtypes = {n: getattr(t, f"aoti_torch_dtype_{n}")() for n in ("float32", "int64", "int8", "uint8", "bfloat16")}
        self.cpu = t.aoti_torch_device_type_cpu()
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        inputs = [(base + offset, shape, dtypes[dtype]) for dtype, shape, offset in record["inputs"]]
        offset = record["bytes"] + (-record["bytes"] % ALIGN)
        for (dtype, shape), n in zip(record["caches"], cache_bytes):
            inputs.append((base + offset, shape, dtypes[dtype]))
            offset += n + (-n % ALIGN)
        # a call takes (and frees) its inputs' handles: ours are made once, a call gets new references (0.5 us each)
        self.ids = (ctypes.c_int64 * 2)()  # the token in, the argmax out
        self.none, self.f32 = ctypes.c_float(), dtypes["float32"]
        addr = ctypes.addressof(self.ids)
        self.token = self._tensor(addr, [1, 1], dtypes["int64"])
        self.best = self._tensor(addr + 8, [1], dtypes["int64"])
        self.fixed = [self._tensor(p, s, d) for p, s, d in inputs]
        self.filled = {}  # position -> an empty (position + 2, 0) tensor: the position, as a size
        self.handles = (ctypes.c_void_p * (n := 3 + len(inputs)))()  # what a call takes: new references of ours
        self.ours = (ctypes.c_void_p * n)(self.token.value, None, self.best.value, *(h.value for h in self.fixed))
        self.slots = [ctypes.cast(ctypes.addressof(self.handles) + 8 * i, P) for i in range(n)]
        if (batch := getattr(t, "llamaforge_new_handles", None)) is not None:  # the shim's: one call a step, not n
            batch.argtypes = [P, P, i64]
        self.batch = batch
        self.out, self.ptr = (ctypes.c_void_p * 1)(), ctypes.c_void_p()
        self.vocab, self.context = record["vocab"], record["context"]

    @staticmethod
    def _library(package):
        """The package's shared library, unpacked once beside it (torch's loader unpacks it into a temporary folder
        at each load), named by the package's inode: a package compiled again is a new file, unpacked afresh."""
        target = f"{package[:-4]}-{os.stat(package).st_ino}.so"
        if not os.path.exists(target):
            import zipfile  # (as base64 above) on use: the first run of a package unpacks it, a later one does not
            import zlib
            try:
                with zipfile.ZipFile(package) as z, atomic_file(target) as tmp, open(tmp, "wb") as f:
                    f.write(z.read(next(n for n in z.namelist() if n.endswith(".so"))))
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:  # a damaged package
                raise OSError(f"{package}: {e or type(e).__name__}") from None
        with contextlib.suppress(OSError):  # in use (prune); a read-only folder serves as it is
            os.utime(target)
        return target

    def _tensor(self, ptr, shape, dtype):
        """A handle of ours on a contiguous tensor at ptr."""
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        handle = ctypes.c_void_p()
        if self.t.aoti_torch_create_tensor_from_blob(ptr, len(shape), (ctypes.c_int64 * len(shape))(*shape),
                                                     (ctypes.c_int64 * len(shape))(*strides), 0, dtype, self.cpu, 0,
                                                     ctypes.byref(handle)):
            raise Unavailable("the compiled step could not take its inputs")
        return handle

    def step(self, token, pos):
        """Run the step for token id `token` at position `pos` (the KV cache holds positions 0..pos-1)."""
        # the kernel checks no bounds: a position or token out of range would read or write outside its memory
        if not (0 <= pos < self.context and 0 <= token < self.vocab):
            raise UsageError(f"position {pos} or token {token} is outside the compiled step's range (positions 0 to "
                             f"{self.context - 1}, tokens below {self.vocab})")
        if self.memory.closed:
            raise UsageError("this runner was closed; make a new quick.Runner")
        self.release()
        self.ids[0] = token
        if pos not in self.filled:
            try:
                self.filled[pos] = self._tensor(ctypes.addressof(self.none), [pos + 2, 0], self.f32)
            except Unavailable as e:
                raise UsageError(f"{e}; {FIX}") from None
        self.ours[1] = self.filled[pos].value
        if self.batch is not None:
            self.batch(self.ours, self.handles, len(self.handles))
        else:
            for handle, slot in zip(self.ours, self.slots):
                self.t.aoti_torch_new_tensor_handle(handle, slot)
        if self.run_fn(self.container, self.handles, len(self.handles), self.out, 1, None, None):
            self.drop_shim()  # the next run on libtorch
            raise UsageError(f"the compiled step failed; {'run it again, or ' if self.shim else ''}{FIX}")
        return self.ids[1]

    def logits(self):
        import numpy as np
        self.t.aoti_torch_get_data_ptr(self.out[0], ctypes.byref(self.ptr))
        return np.ctypeslib.as_array((ctypes.c_float * self.vocab).from_address(self.ptr.value))

    def close(self):
        """Free the weights' memory now (this runner does not step again)."""
        self.release()
        self.memory.close()

    def release(self):
        if self.out[0]:
            self.t.aoti_torch_delete_tensor_object(self.out[0])
            self.out[0] = None


def generate(runner, tok, ids, max_new_tokens, context, temperature, top_k, top_p, rng, stop_ids, on_text=None):
    """New token ids after prompt ids, streaming their text to on_text: the prompt through the step one token at a
    time, then up to max_new_tokens (fewer at the context's end, as the engine counts) or a stop id (not kept)."""
    for pos, token in enumerate(ids[:-1]):
        runner.step(token, pos)
    decoder, new, buffers = tok.stream(ids[-1]), [], None
    if temperature != 0:  # numpy only when sampling: greedy never imports it (55 ms here, of a ~0.1 s start)
        from sampling import sample, scratch
        buffers = scratch(runner.vocab)
    limit, token, pos = min(max_new_tokens, context - len(ids) + 1), ids[-1], len(ids) - 1
    while len(new) < limit:
        best = runner.step(token, pos)
        token = best if temperature == 0 else sample(runner.logits(), temperature, top_k, top_p, rng, buffers)
        pos += 1
        if token in stop_ids:
            break
        new.append(token)
        if on_text is not None:
            on_text(decoder.add(token))
    if on_text is not None:
        on_text(decoder.flush())
    runner.release()
    return new
