// whale_ops_py: a direct Python entry to the CPU bucket ops, for eager calls on plain tensors.
//
// torch.ops.whale.pack(tensors, ...) converts every tensor of the list into an IValue (looking
// each one up for __torch_function__ overrides), then unboxes the list into a vector again: about
// 120 ns a tensor, 0.6 ms for a bucket of 5,000 small tensors, more than the copy itself.
// _bucket reads the tensors straight out of the Python list (a few ns each) and runs the same CPU
// kernel with the same checks (whale::bucket_cpu). It takes only calls the dispatcher would send
// straight to that kernel: plain torch.Tensor / nn.Parameter objects on CPU with no extra dispatch
// keys (no negative or conjugate views, no subclasses), no dispatch key or torch function mode
// active. Anything else, and any bad argument, returns False with nothing written, and the caller
// goes through torch.ops.whale.*, which raises the ops' own errors.
//
//   _bucket(op: int, flat: Tensor, tensors: list[Tensor], shard_sizes: list[int], scale: float)
//       -> bool
//   op: 0 pack, 1 unpack, 2 pack_shards, 3 unpack_shards (whale::BucketOp); shard_sizes is
//   ignored (pass []) for 0 and 1.

#include "whale_ops.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>

#include <Python.h>

#include <cstdint>
#include <vector>

namespace {

// The key sets of a plain dense CPU tensor, outside and inside inference mode.
bool plain_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet kPlain{
      c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutogradCPU,
      c10::DispatchKey::AutocastCPU};
  static const c10::DispatchKeySet kInference{c10::DispatchKey::CPU, c10::DispatchKey::AutocastCPU};
  if (!t.defined()) return false;
  const c10::DispatchKeySet keys = t.key_set();
  return keys == kPlain || keys == kInference;
}

// Holds a reference to each list item while the GIL is released, so no other thread frees one.
struct Refs {
  std::vector<PyObject*> objects;
  ~Refs() {
    for (PyObject* o : objects) Py_DECREF(o);
  }
};

PyObject* bucket(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5) {
    PyErr_SetString(
        PyExc_TypeError, "whale_ops._bucket(op, flat, tensors, shard_sizes, scale) takes 5 arguments");
    return nullptr;
  }
  const long op = PyLong_AsLong(args[0]);
  if (op == -1 && PyErr_Occurred()) return nullptr;
  if (op < 0 || op > 3) {
    PyErr_SetString(PyExc_ValueError, "whale_ops._bucket: op is 0 to 3");
    return nullptr;
  }
  const double scale = PyFloat_AsDouble(args[4]);
  if (scale == -1.0 && PyErr_Occurred()) return nullptr;
  PyObject* flat_obj = args[1];
  PyObject* list = args[2];
  PyObject* sizes_obj = args[3];
  if (!PyList_Check(list) || !PyList_Check(sizes_obj) || !THPVariable_CheckExact(flat_obj)) {
    Py_RETURN_FALSE;
  }
  // Beyond the default keys (BackendSelect, ADInplaceOrView), an included key is a mode:
  // functionalization, a dispatch mode (FakeTensorMode, ...), vmap.
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  if ((included | c10::default_included_set) != c10::default_included_set ||
      at::impl::torch_function_mode_enabled()) {
    Py_RETURN_FALSE;
  }
  const at::Tensor& flat = THPVariable_Unpack(flat_obj);
  if (!plain_cpu(flat)) Py_RETURN_FALSE;
  const Py_ssize_t n = PyList_GET_SIZE(list);
  std::vector<const at::Tensor*> tensors(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(list, i);
    if (!THPVariable_CheckExact(o)) Py_RETURN_FALSE;
    const at::Tensor& t = THPVariable_Unpack(o);
    if (!plain_cpu(t)) Py_RETURN_FALSE;
    tensors[static_cast<size_t>(i)] = &t;
  }
  std::vector<int64_t> sizes(static_cast<size_t>(PyList_GET_SIZE(sizes_obj)));
  for (size_t r = 0; r < sizes.size(); ++r) {
    PyObject* item = PyList_GET_ITEM(sizes_obj, static_cast<Py_ssize_t>(r));
    if (!PyLong_CheckExact(item)) Py_RETURN_FALSE;
    sizes[r] = PyLong_AsLongLong(item);
    if (sizes[r] == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      Py_RETURN_FALSE;
    }
  }
  Refs refs;
  refs.objects.reserve(static_cast<size_t>(n) + 1);
  refs.objects.push_back(flat_obj);
  Py_INCREF(flat_obj);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(list, i);
    Py_INCREF(o);
    refs.objects.push_back(o);
  }
  bool done = true;
  PyThreadState* state = PyEval_SaveThread();
  try {
    whale::bucket_cpu(static_cast<whale::BucketOp>(op), flat, tensors, sizes, scale);
  } catch (const c10::Error&) {
    done = false;  // a check failed before anything was written: torch.ops raises it
  } catch (const std::exception&) {
    done = false;
  }
  PyEval_RestoreThread(state);
  if (done) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef kMethods[] = {
    {"_bucket", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&bucket)), METH_FASTCALL,
     "Run a whale bucket op on plain CPU tensors; False when the call must go through torch.ops."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "whale_ops", nullptr, -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit_whale_ops() {
  return PyModule_Create(&kModule);
}
