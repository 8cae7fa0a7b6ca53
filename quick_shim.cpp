// The part of libtorch a compiled decode step calls, for generate.py's quick start (quick_shim.py builds and
// checks it, quick.py loads it).
//
// An AOTInductor package reaches libtorch only through its C interface (aoti_torch_*: make, view and free tensors,
// read their shapes) and SLEEF's vector exp; libtorch_cpu.so is 0.18 s of loading for those few calls, the
// largest part of the quick start. This file is them on plain memory, named as the package expects, in a library
// whose soname is libtorch_cpu.so. A tensor is a data pointer, a dtype, sizes and strides, on a shared storage
// counted by reference. Buffers the step makes are kept for its next call, by size rounded up to a power of two (a
// step makes the same ~90 buffers each token, libtorch's allocator paying half a microsecond a tensor; the
// attention's grow with the position, so exact sizes would keep one of each position's).
// exp is written here as a textbook range reduction (x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial, then a
// scaling by 2^n in two halves so subnormal results round once): within a unit in the last place like SLEEF's u10,
// though not always the same bits (quick_shim.adopt compares a record's logits on the two, to 1e-5 of the largest;
// tests/test_quick_shim.py the exp to float64's and every function here to libtorch's).
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

struct Storage {
  char* data;
  int64_t bytes;
  bool owned;  // from the pool (freed into it), else memory the caller owns
  std::atomic<int> refs;
};

const int MAX_DIM = 16;

struct Tensor {
  Storage* storage;
  int64_t offset, ndim, sizes[MAX_DIM], strides[MAX_DIM];
  int32_t dtype, device;
};

std::mutex pool_lock;
std::unordered_map<int64_t, std::vector<char*>> pool;  // freed buffers by size class, for the step's next call

int64_t size_class(int64_t bytes) {
  int64_t size = 64;  // torch's alignment
  while (size < bytes) size *= 2;
  return size;
}

enum Dtype : int32_t {  // c10::ScalarType's numbering, what a package passes
  UINT8 = 0, INT8 = 1, INT16 = 2, INT32 = 3, INT64 = 4, FLOAT16 = 5, FLOAT32 = 6, FLOAT64 = 7, BOOL = 11, BFLOAT16 = 15
};

int64_t item_size(int32_t dtype) {
  switch (dtype) {
    case UINT8: case INT8: case BOOL: return 1;
    case INT16: case FLOAT16: case BFLOAT16: return 2;
    case INT32: case FLOAT32: return 4;
    case INT64: case FLOAT64: return 8;
    default: return 0;
  }
}

Tensor* make(Storage* s, int64_t ndim, const int64_t* sizes, const int64_t* strides, int64_t offset, int32_t dtype,
             int32_t device) {
  if (ndim < 0 || ndim > MAX_DIM || item_size(dtype) == 0) return nullptr;
  Tensor* t = new Tensor{s, offset, ndim, {}, {}, dtype, device};
  std::memcpy(t->sizes, sizes, ndim * sizeof(int64_t));
  std::memcpy(t->strides, strides, ndim * sizeof(int64_t));
  s->refs++;
  return t;
}

int64_t span(int64_t ndim, const int64_t* sizes, const int64_t* strides) {  // elements from the first to the last
  int64_t n = 1;
  for (int64_t i = 0; i < ndim; i++) {
    if (sizes[i] == 0) return 0;
    n += (sizes[i] - 1) * strides[i];
  }
  return n;
}

void release(Storage* s) {
  if (--s->refs) return;
  if (s->owned) {
    std::lock_guard<std::mutex> hold(pool_lock);
    pool[size_class(s->bytes)].push_back(s->data);
  }
  delete s;
}

char* allocate(int64_t bytes) {
  int64_t size = size_class(bytes);
  {
    std::lock_guard<std::mutex> hold(pool_lock);
    auto& free = pool[size];
    if (!free.empty()) {
      char* p = free.back();
      free.pop_back();
      return p;
    }
  }
  return static_cast<char*>(std::aligned_alloc(64, size));
}

thread_local bool grad_enabled = true;

template <class V, class I>
V exp_vec(V x) {
  const V zero = {}, lo = zero - 104.0f, hi = zero + 89.0f;  // exp(-104) rounds to 0, exp(89) overflows
  x = x < lo ? lo : (x > hi ? hi : x);  // NaN compares false both ways and stays NaN
  const V shift = zero + 12582912.0f;   // 1.5 * 2^23: adding it rounds to the nearest integer
  V n = (x * 1.44269504088896341f + shift) - shift;
  V r = x - n * 0.693145751953125f;  // ln 2 in two parts: n * the first is exact
  r = r - n * 1.428606820309417232e-6f;
  V p = r * (1.0f / 5040) + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I k = __builtin_convertvector(n, I);
  I half = k >> 1;
  V a, b;
  I ea = (half + 127) << 23, eb = (k - half + 127) << 23;
  std::memcpy(&a, &ea, sizeof a);
  std::memcpy(&b, &eb, sizeof b);
  return p * a * b;
}

}  // namespace

typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));
EXPORT f4 Sleef_expf4_u10(f4 x) { return exp_vec<f4, i4>(x); }
#if defined(__AVX__)
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
EXPORT f8 Sleef_expf8_u10(f8 x) { return exp_vec<f8, i8>(x); }
#endif
#if defined(__AVX512F__)
typedef float f16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
EXPORT f16 Sleef_expf16_u10(f16 x) { return exp_vec<f16, i16>(x); }
#endif

EXPORT void llamaforge_expf(const float* x, float* y, int64_t n) {  // for tests: exp of n floats, 4 at a time
  for (int64_t i = 0; i < n; i += 4) {
    f4 v = {0, 0, 0, 0};
    std::memcpy(&v, x + i, sizeof(float) * (n - i < 4 ? n - i : 4));
    v = exp_vec<f4, i4>(v);
    std::memcpy(y + i, &v, sizeof(float) * (n - i < 4 ? n - i : 4));
  }
}

EXPORT int32_t aoti_torch_device_type_cpu() { return 0; }
EXPORT int32_t aoti_torch_device_type_cuda() { return 1; }
#define DTYPE(name, value) \
  EXPORT int32_t aoti_torch_dtype_##name() { return value; }
DTYPE(uint8, UINT8) DTYPE(int8, INT8) DTYPE(int16, INT16) DTYPE(int32, INT32) DTYPE(int64, INT64)
DTYPE(float16, FLOAT16) DTYPE(float32, FLOAT32) DTYPE(float64, FLOAT64) DTYPE(bool, BOOL) DTYPE(bfloat16, BFLOAT16)

EXPORT bool aoti_torch_grad_mode_is_enabled() { return grad_enabled; }
EXPORT void aoti_torch_grad_mode_set_enabled(bool enabled) { grad_enabled = enabled; }

// a failed check throws: the package's entry points turn a C++ exception into an error code
EXPORT void aoti_torch_check(bool cond, const char* func, const char* file, uint32_t line, const char* msg) {
  if (!cond)
    throw std::runtime_error(std::string(msg ? msg : "check failed") + " (" + (func ? func : "") + ", " +
                             (file ? file : "") + ":" + std::to_string(line) + ")");
}

EXPORT int32_t aoti_torch_empty_strided(int64_t ndim, const int64_t* sizes, const int64_t* strides, int32_t dtype,
                                        int32_t device, int32_t, Tensor** ret) {
  if (device != 0 || item_size(dtype) == 0 || ndim < 0 || ndim > MAX_DIM) return 1;
  int64_t bytes = span(ndim, sizes, strides) * item_size(dtype);
  char* data = allocate(bytes);
  if (data == nullptr) return 1;
  Storage* s = new Storage{data, bytes, true, {0}};
  *ret = make(s, ndim, sizes, strides, 0, dtype, device);
  return 0;
}

EXPORT int32_t aoti_torch_create_tensor_from_blob(void* data, int64_t ndim, const int64_t* sizes,
                                                  const int64_t* strides, int64_t offset, int32_t dtype,
                                                  int32_t device, int32_t, Tensor** ret) {
  if (device != 0 || item_size(dtype) == 0 || ndim < 0 || ndim > MAX_DIM) return 1;
  int64_t bytes = (offset + span(ndim, sizes, strides)) * item_size(dtype);
  Storage* s = new Storage{static_cast<char*>(data), bytes, false, {0}};
  *ret = make(s, ndim, sizes, strides, offset, dtype, device);
  return 0;
}

EXPORT int32_t aoti_torch_create_tensor_from_blob_v2(void* data, int64_t ndim, const int64_t* sizes,
                                                     const int64_t* strides, int64_t offset, int32_t dtype,
                                                     int32_t device, int32_t index, Tensor** ret, int32_t layout,
                                                     const uint8_t*, int64_t metadata_size) {
  if (layout != 0 || metadata_size != 0) return 1;  // strided tensors only (no MKLDNN blobs)
  return aoti_torch_create_tensor_from_blob(data, ndim, sizes, strides, offset, dtype, device, index, ret);
}

// a view of t's storage; offset is added to t's own (torch's _reinterpret_tensor)
EXPORT int32_t aoti_torch__reinterpret_tensor(Tensor* t, int64_t ndim, const int64_t* sizes, const int64_t* strides,
                                              int64_t offset, Tensor** ret) {
  *ret = make(t->storage, ndim, sizes, strides, t->offset + offset, t->dtype, t->device);
  return *ret ? 0 : 1;
}

EXPORT int32_t aoti_torch_new_tensor_handle(Tensor* t, Tensor** ret) {
  *ret = make(t->storage, t->ndim, t->sizes, t->strides, t->offset, t->dtype, t->device);
  return *ret ? 0 : 1;
}

// for quick.py: a new reference of each of n handles, one call a token where ctypes would make n (0.4 us each)
EXPORT int32_t llamaforge_new_handles(Tensor** from, Tensor** to, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (aoti_torch_new_tensor_handle(from[i], to + i)) return 1;
  return 0;
}

EXPORT int32_t aoti_torch_delete_tensor_object(Tensor* t) {
  release(t->storage);
  delete t;
  return 0;
}

// a dense copy, its dimensions in the order of the source's strides (torch's clone: memory format preserved)
EXPORT int32_t aoti_torch_clone(Tensor* t, Tensor** ret) {
  int64_t perm[MAX_DIM], strides[MAX_DIM], n = 1, size = item_size(t->dtype);
  for (int64_t i = 0; i < t->ndim; i++) perm[i] = t->ndim - 1 - i;  // innermost first
  for (int64_t i = 1; i < t->ndim; i++) {  // insertion sort by stride, then size; a zero stride stays in place
    for (int64_t j = i; j > 0; j--) {
      int64_t a = perm[j - 1], b = perm[j], sa = t->strides[a], sb = t->strides[b];
      if (sa == 0 || sb == 0 || sa < sb || (sa == sb && t->sizes[a] <= t->sizes[b])) break;
      perm[j - 1] = b;
      perm[j] = a;
    }
  }
  for (int64_t i = 0; i < t->ndim; i++) {
    strides[perm[i]] = n;
    n *= t->sizes[perm[i]] > 1 ? t->sizes[perm[i]] : 1;
  }
  n = 1;
  for (int64_t i = 0; i < t->ndim; i++) n *= t->sizes[i];
  if (aoti_torch_empty_strided(t->ndim, t->sizes, strides, t->dtype, t->device, 0, ret)) return 1;
  char* out = (*ret)->storage->data;
  const char* in = t->storage->data + t->offset * size;
  for (int64_t flat = 0; flat < n; flat++) {  // each element, by its index in row-major order
    int64_t from = 0, to = 0, rest = flat;
    for (int64_t i = t->ndim - 1; i >= 0; i--) {
      from += rest % t->sizes[i] * t->strides[i];
      to += rest % t->sizes[i] * strides[i];
      rest /= t->sizes[i];
    }
    std::memcpy(out + to * size, in + from * size, size);
  }
  return 0;
}

EXPORT int32_t aoti_torch_get_data_ptr(Tensor* t, void** ret) {
  *ret = t->storage->data + t->offset * item_size(t->dtype);
  return 0;
}
EXPORT int32_t aoti_torch_get_storage_size(Tensor* t, int64_t* ret) { *ret = t->storage->bytes; return 0; }
EXPORT int32_t aoti_torch_get_storage_offset(Tensor* t, int64_t* ret) { *ret = t->offset; return 0; }
EXPORT int32_t aoti_torch_get_dim(Tensor* t, int64_t* ret) { *ret = t->ndim; return 0; }
EXPORT int32_t aoti_torch_get_sizes(Tensor* t, int64_t** ret) { *ret = t->sizes; return 0; }
EXPORT int32_t aoti_torch_get_strides(Tensor* t, int64_t** ret) { *ret = t->strides; return 0; }
EXPORT int32_t aoti_torch_get_dtype(Tensor* t, int32_t* ret) { *ret = t->dtype; return 0; }
EXPORT int32_t aoti_torch_get_device_type(Tensor* t, int32_t* ret) { *ret = t->device; return 0; }
EXPORT int32_t aoti_torch_get_device_index(Tensor*, int32_t* ret) { *ret = 0; return 0; }
EXPORT int32_t aoti_torch_get_numel(Tensor* t, int64_t* ret) {
  int64_t n = 1;
  for (int64_t i = 0; i < t->ndim; i++) n *= t->sizes[i];
  *ret = n;
  return 0;
}
