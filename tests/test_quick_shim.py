"""quick_shim.cpp and quick_shim.py: the few functions of libtorch a compiled decode step calls, built here, checked
against libtorch's own, adopted by a quick-start record only when the record's step gives libtorch's logits on it;
a later run then loads no libtorch at all."""
import ctypes
import json
import os

import numpy as np
import pytest

import quick
import quick_shim
from checkpoint import build_model, load_checkpoint
from compile_cache import compiler
from conftest import run_script, shared
from decode import CompiledDecoder
from runtime import UsageError
from test_quick import FRESH, cache, packages, records, stories_args  # noqa: F401 (the fixtures)


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    path = quick_shim.build(str(tmp_path_factory.mktemp("shim")))
    if path is None:
        pytest.skip("no C++ compiler here to build quick_shim.cpp")
    return path


def variant(tmp_path, shim, old, new):
    """quick_shim.cpp with `old` replaced by `new`, built by quick_shim.build (into a folder of its own)."""
    source = open(quick.SHIM).read()
    assert old in source
    path = tmp_path / "variant.cpp"
    path.write_text(source.replace(old, new))
    os.makedirs(tmp_path / "variants", exist_ok=True)
    return quick_shim.build(str(tmp_path / "variants"), source=str(path))


def test_the_shims_exp_is_within_one_unit_in_the_last_place(shim):
    """The vector exp the compiled kernels call (SLEEF's u10 names): within 1 ULP of float64's exp over the floats
    a softmax and SiLU see, and exact at the edges: 0 for -inf and far below, inf above 88.73, NaN kept."""
    lib = ctypes.CDLL(shim)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-105, 90, 500_000), rng.uniform(-1, 1, 200_000), np.linspace(-87.5, -103, 5000),
                        [0.0, -0.0, 88.72, 1e-30, -1e-30]]).astype(np.float32)
    y = np.empty_like(x)
    lib.llamaforge_expf(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(y.ctypes.data), ctypes.c_int64(len(x)))
    ref = np.exp(x.astype(np.float64))
    finite = ref < np.finfo(np.float32).max
    ulp = np.maximum(np.spacing(ref[finite].astype(np.float32)), np.spacing(np.float32(0))).astype(np.float64)
    assert np.max(np.abs(y[finite] - ref[finite]) / ulp) <= 1.0
    assert np.all(np.isinf(y[~finite]))
    edges = np.array([-np.inf, np.inf, np.nan, -200, 100, -87.0], dtype=np.float32)
    out = np.empty_like(edges)
    lib.llamaforge_expf(ctypes.c_void_p(edges.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(6))
    assert out[0] == 0 and np.isposinf(out[1]) and np.isnan(out[2]) and out[3] == 0 and np.isposinf(out[4])
    assert out[5] == np.float32(np.exp(-87.0))


def tensors(lib):
    """What a package asks of the C interface, on lib: tensors on memory, views of them, copies, fresh buffers,
    their sizes, strides, offsets and values; a view that outlives its base; grad mode."""
    H, P, i64, i32 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.c_int32
    ints = ctypes.POINTER(i64)
    lib.aoti_torch_create_tensor_from_blob.argtypes = [H, i64, ints, ints, i64, i32, i32, i32, P]
    lib.aoti_torch__reinterpret_tensor.argtypes = [H, i64, ints, ints, i64, P]
    lib.aoti_torch_empty_strided.argtypes = [i64, ints, ints, i32, i32, i32, P]
    for name in ("clone", "new_tensor_handle", "get_data_ptr"):
        getattr(lib, f"aoti_torch_{name}").argtypes = [H, P]
    for name in ("get_dim", "get_numel", "get_storage_offset", "get_storage_size"):
        getattr(lib, f"aoti_torch_{name}").argtypes = [H, ints]
    for name in ("get_sizes", "get_strides"):
        getattr(lib, f"aoti_torch_{name}").argtypes = [H, ctypes.POINTER(ints)]
    lib.aoti_torch_delete_tensor_object.argtypes = [H]
    lib.aoti_torch_grad_mode_is_enabled.restype = ctypes.c_bool
    f32, cpu = lib.aoti_torch_dtype_float32(), lib.aoti_torch_device_type_cpu()

    def arr(*v):
        return (i64 * len(v))(*v)

    def made(fn, *args):
        handle = H()
        assert fn(*args, ctypes.byref(handle)) == 0
        return handle

    def describe(t):
        dim, numel, offset, nbytes, sizes, strides, ptr = i64(), i64(), i64(), i64(), ints(), ints(), H()
        for name, out in (("dim", dim), ("numel", numel), ("storage_offset", offset), ("storage_size", nbytes),
                          ("sizes", sizes), ("strides", strides), ("data_ptr", ptr)):
            assert getattr(lib, f"aoti_torch_get_{name}")(t, ctypes.byref(out)) == 0
        n = dim.value
        first = np.ctypeslib.as_array((ctypes.c_float * 1).from_address(ptr.value))
        values = np.lib.stride_tricks.as_strided(first, sizes[:n], [4 * s for s in strides[:n]])
        return [n, numel.value, offset.value, nbytes.value, sizes[:n], strides[:n], values.reshape(-1).tolist()]

    a = np.arange(12, dtype=np.float32)
    t = made(lib.aoti_torch_create_tensor_from_blob, a.ctypes.data, 2, arr(3, 4), arr(4, 1), 0, f32, cpu, 0)
    view = made(lib.aoti_torch__reinterpret_tensor, t, 2, arr(3, 2), arr(1, 4), 1)  # a[:2, 1:].T of a (3, 4)
    copy = made(lib.aoti_torch_clone, view)
    fresh = made(lib.aoti_torch_empty_strided, 2, arr(2, 3), arr(3, 1), f32, cpu, 0)
    described = [describe(x) for x in (t, view, copy)]
    at = H()
    lib.aoti_torch_get_data_ptr(fresh, ctypes.byref(at))
    np.ctypeslib.as_array((ctypes.c_float * 6).from_address(at.value))[:] = [5, 4, 3, 2, 1, 0]
    column = made(lib.aoti_torch__reinterpret_tensor, fresh, 1, arr(2), arr(3), 2)  # fresh[:, 2]
    other = made(lib.aoti_torch_new_tensor_handle, column)
    inner = made(lib.aoti_torch__reinterpret_tensor, view, 1, arr(2), arr(4), 2)  # offset 1 + 2: a[3], a[7]
    for handle in (fresh, t, view, copy):
        assert lib.aoti_torch_delete_tensor_object(handle) == 0
    described += [describe(column), describe(other), describe(inner)]  # their storage outlives the bases'
    lib.aoti_torch_delete_tensor_object(inner)
    lib.aoti_torch_grad_mode_set_enabled(False)
    described.append(lib.aoti_torch_grad_mode_is_enabled())
    lib.aoti_torch_grad_mode_set_enabled(True)
    for handle in (column, other):
        lib.aoti_torch_delete_tensor_object(handle)
    return described


def test_the_shims_tensors_are_libtorchs(shim):
    """The same calls on the shim and on libtorch's own C interface give the same shapes, offsets, storage sizes
    and data (views, copies, a view that outlives its base), and both are what numpy says."""
    libtorch = ctypes.CDLL(os.path.join(quick._torch_lib(), "libtorch_cpu.so"))  # loaded already: torch is imported
    ours = tensors(ctypes.CDLL(shim))
    assert ours == tensors(libtorch)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert ours[0][-1] == a.reshape(-1).tolist() and ours[0][:6] == [2, 12, 0, 48, [3, 4], [4, 1]]
    assert ours[1][-1] == ours[2][-1] == a[:2, 1:].T.reshape(-1).tolist()
    assert ours[1][:6] == [2, 6, 1, 48, [3, 2], [1, 4]] and ours[2][:6] == [2, 6, 0, 24, [3, 2], [1, 3]]
    assert ours[3] == ours[4] == [1, 2, 2, 24, [2], [3], [3.0, 0.0]] and ours[5][2:] == [3, 48, [2], [4], [3, 7]]
    assert ours[6] is False


def test_the_shims_buffers_are_reused_by_size_class(shim):
    """Buffers freed go back to a pool by size rounded up to a power of two: sizes that grow with the position (the
    attention's) reuse a few buffers, not one of each size for good."""
    lib = ctypes.CDLL(shim)
    i64 = ctypes.c_int64
    lib.aoti_torch_empty_strided.argtypes = [i64, ctypes.POINTER(i64), ctypes.POINTER(i64), ctypes.c_int32,
                                             ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)]
    lib.aoti_torch_get_data_ptr.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.aoti_torch_delete_tensor_object.argtypes = [ctypes.c_void_p]
    seen = set()
    for n in range(1000, 5000, 7):  # float32 buffers of 4000-20000 bytes: size classes 4 KB to 32 KB
        handle, ptr = ctypes.c_void_p(), ctypes.c_void_p()
        assert lib.aoti_torch_empty_strided(1, (i64 * 1)(n), (i64 * 1)(1), 6, 0, 0, ctypes.byref(handle)) == 0
        lib.aoti_torch_get_data_ptr(handle, ctypes.byref(ptr))
        seen.add(ptr.value)
        lib.aoti_torch_delete_tensor_object(handle)
    assert len(seen) <= 4


@pytest.fixture
def record(tmp_path, packages):  # noqa: F811
    """A record of stories260K's compiled step, written as generate.py writes it."""
    model = build_model(load_checkpoint(shared("stories260K", "stories260K.bin")))
    package, inputs, caches = CompiledDecoder(model).ensure()
    quick.save(str(tmp_path), "k", package, inputs, caches, {"vocab": model.args.vocab_size, "context": 512})
    return str(tmp_path), "k"


def test_a_shim_is_adopted_only_when_the_step_gives_libtorchs_logits_on_it(record, shim, tmp_path):
    """adopt runs the record's step on the shim in a process of its own: a shim that lacks a function the package
    calls, or whose exp is off, is not named in the record; the real one is, and a runner then uses it."""
    folder, key = record
    runner = quick.Runner(folder, key, quick.load(folder, key))
    assert runner.t._name.endswith("libtorch_cpu.so")  # this process has libtorch
    lacking = variant(tmp_path, shim, "Sleef_expf", "Other_expf")
    off = variant(tmp_path, shim, "p = p * r + 0.5f;", "p = p * r + 0.49f;")
    for bad in (lacking, off):
        runner = quick.Runner(folder, key, quick.load(folder, key))  # adopt closes the runner it reads
        assert not quick_shim.adopt(folder, key, runner, shim=bad) and "shim" not in quick.load(folder, key)
    runner = quick.Runner(folder, key, quick.load(folder, key))
    assert quick_shim.adopt(folder, key, runner, shim=shim) and quick.load(folder, key)["shim"] == shim
    with pytest.raises(UsageError, match="this runner was closed"):
        runner.step(1, 0)
    assert quick.Runner(folder, key, quick.load(folder, key)).t._name.endswith("libtorch_cpu.so")  # not in here


def test_a_record_runs_only_a_shim_of_its_own_folder_with_its_bytes(tmp_path):
    """A record's shim is one quick_shim.build named, in the record's folder, with the bytes the record hashed:
    any other path, or other bytes, is not loaded."""
    (tmp_path / "in").mkdir()
    folder, outside = str(tmp_path / "in"), str(tmp_path)
    for where in (folder, outside):
        for name in ("quick-shim-abc.so", "libevil.so", "quick-shim-abc.py"):
            (tmp_path / where / name).write_bytes(b"lib")
    digest = quick.shim_digest(f"{folder}/quick-shim-abc.so")
    assert digest == quick.shim_digest(f"{outside}/quick-shim-abc.so")  # the same bytes and name elsewhere
    assert quick._own_shim(folder, {"shim": f"{folder}/quick-shim-abc.so", "shim_sha256": digest}) != ""
    for other in (f"{outside}/quick-shim-abc.so", f"{folder}/libevil.so", f"{folder}/quick-shim-abc.py", ["x"],
                  None, f"{folder}/quick-shim-none.so"):
        assert quick._own_shim(folder, {"shim": other, "shim_sha256": digest}) == ""
    assert quick._own_shim(folder, {"shim": f"{folder}/quick-shim-abc.so", "shim_sha256": "0" * 64}) == ""


def loaded_libraries(proc):
    """The shared libraries a process loaded (its stderr holds LD_DEBUG=files's lines)."""
    return [line.split("file=")[1].split()[0] for line in proc.stderr.splitlines() if "file=" in line]


def test_a_later_run_loads_the_shim_not_libtorch_and_writes_the_same_text(tmp_path, cache):  # noqa: F811
    """The run that writes a record adopts the shim; the next, a fresh process, loads it and no library of torch's,
    and writes the same text (sampled, seeded) as the first and as one forked from a process that has torch."""
    args = [*stories_args(tmp_path), "--temperature=0.8", "--seed=5", "--max_new_tokens=120", "--stream=False"]
    first = run_script("generate.py", *args)
    (name,) = records(tmp_path)
    shim = json.loads((tmp_path / "cache" / name).read_text()).get("shim")
    if shim is None and compiler() is None:
        pytest.skip("no C++ compiler here to build quick_shim.cpp")
    assert shim and os.path.dirname(shim) == str(tmp_path / "cache")
    later = run_script("generate.py", *args, env={**FRESH, "LD_DEBUG": "files"})
    libraries = loaded_libraries(later)
    assert shim in libraries and not [p for p in libraries if "/torch/" in p], libraries
    assert later.stdout == first.stdout == run_script("generate.py", *args).stdout  # forked: on libtorch
    assert len(first.stdout) > 200


def test_a_shim_that_fails_to_start_is_dropped_and_the_command_runs_again(tmp_path, cache, shim):  # noqa: F811
    """A record naming a shim the package cannot load (here one without the exp it calls): the run drops the shim
    from the record and starts itself afresh (torch no longer loads in a process that loaded the shim), then
    decodes on libtorch, writing what the first run wrote."""
    args = [*stories_args(tmp_path), "--temperature=0", "--max_new_tokens=80", "--stream=False"]
    first = run_script("generate.py", *args)
    (name,) = records(tmp_path)
    key = name[len("quick-"):-len(".json")]
    lacking = tmp_path / "cache" / "quick-shim-lacking.so"  # a shim's name and place, or the record ignores it
    os.replace(variant(tmp_path, shim, "Sleef_expf", "Other_expf"), lacking)
    quick.set_shim(str(tmp_path / "cache"), key, str(lacking))
    again = run_script("generate.py", *args, env={**FRESH, "LD_DEBUG": "files"})
    assert again.stdout == first.stdout and "shim" not in quick.load(str(tmp_path / "cache"), key)
    libraries = loaded_libraries(again)  # both processes': the one that loaded the shim, the one started after
    assert str(lacking) in libraries and [p for p in libraries if p.endswith("/torch/lib/libtorch_cpu.so")]


@pytest.mark.parametrize("damage", ["cut short", "overwritten", "deleted", "a stub deleted"])
def test_a_damaged_or_missing_shim_is_not_loaded_and_is_built_again(tmp_path, cache, damage):  # noqa: F811
    """The record holds the hash of its shim's bytes and its stubs': a shim cut short or overwritten in place (which
    would crash the process that loads it), deleted, or a stub gone is not loaded; that run decodes on libtorch,
    writes the same text, then builds the shim again and checks it, and the record names it again."""
    args = [*stories_args(tmp_path), "--temperature=0", "--max_new_tokens=60", "--stream=False"]
    first = run_script("generate.py", *args)
    (name,) = records(tmp_path)
    key, folder = name[len("quick-"):-len(".json")], str(tmp_path / "cache")
    shim = quick.load(folder, key).get("shim")
    if shim is None and compiler() is None:
        pytest.skip("no C++ compiler here to build quick_shim.cpp")
    good = open(shim, "rb").read()
    if damage == "cut short":
        os.truncate(shim, len(good) // 2)
    elif damage == "overwritten":
        with open(shim, "r+b") as f:  # the same size: its code overwritten
            f.seek(4096)
            f.write(b"\xff" * (len(good) - 8192))
    else:
        os.remove(shim if damage == "deleted" else f"{shim[:-3]}-libc10.so")
    again = run_script("generate.py", *args, env=FRESH)
    assert again.stdout == first.stdout and "building it again" in again.stderr
    record = quick.load(folder, key)
    assert quick._own_shim(folder, record) == shim and open(shim, "rb").read() == good
    assert os.path.isfile(f"{shim[:-3]}-libc10.so")


def test_a_shim_damaged_before_a_record_is_written_is_built_again(tmp_path, cache):  # noqa: F811
    """The run that writes a record finds a damaged shim in the cache: its check fails (in its own process), so it
    builds the shim again and checks that; the record names the good one."""
    shim = quick_shim.build(str(tmp_path / "cache"))
    if shim is None:
        pytest.skip("no C++ compiler here to build quick_shim.cpp")
    good = open(shim, "rb").read()
    with open(shim, "wb") as f:
        f.write(b"\x7fELF" + bytes(len(good)))
    run_script("generate.py", *stories_args(tmp_path), "--temperature=0", "--max_new_tokens=20")
    (name,) = records(tmp_path)
    record = quick.load(str(tmp_path / "cache"), name[len("quick-"):-len(".json")])
    assert record["shim"] == shim and open(shim, "rb").read() == good


def test_a_shims_stubs_are_pruned_with_it(tmp_path):
    """compile_cache.prune goes by a shim's time for its stubs (a run touches the shim alone): kept while the shim is
    used, removed with it once it is not."""
    from compile_cache import prune
    names = ["quick-shim-abc.so", "quick-shim-abc-libtorch.so", "quick-shim-abc-libc10.so"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (0, 0))  # 1970: long unused
    os.utime(tmp_path / names[0])  # the shim used now
    prune(str(tmp_path), keep=None)
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    os.utime(tmp_path / names[0], (0, 0))
    prune(str(tmp_path), keep=None)
    assert os.listdir(tmp_path) == []
