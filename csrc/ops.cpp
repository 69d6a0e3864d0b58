// urkle_fast._C: the one place that declares the native schemas (docs/KERNEL_CONTRACT.md).
//
// Kernels register per device with TORCH_LIBRARY_IMPL(urkle_fast, CPU, m) in csrc/cpu/*.cpp and
// TORCH_LIBRARY_IMPL(urkle_fast, CUDA, m) in csrc/cuda/*.cu. The Python side (urkle_fast/ops/) adds
// the public ops (gaussian_kl, nt_xent_fwd, pgd_step_linf_, ...) to the same namespace through
// torch.library fragments, so those names must never be declared here.
//
// <Python.h> + a plain PyModuleDef instead of <torch/extension.h>: the module has no Python
// functions of its own (the ops are reached through torch.ops.urkle_fast), and skipping pybind11
// keeps this file's compile time at a few seconds.

#include <Python.h>

#include <torch/library.h>

#include "cpu/vec_kernels.h"

TORCH_LIBRARY(urkle_fast, m) {
  // Gaussian KL (docs/MATH.md section 2). reduction: 0 none -> [B], 1 sum -> [], 2 mean -> []; float32 out.
  m.def("gaussian_kl_fwd_native(Tensor mu_p, Tensor logvar_p, Tensor mu_q, Tensor logvar_q, int reduction) "
        "-> Tensor");
  m.def("gaussian_kl_bwd_native(Tensor grad, Tensor mu_p, Tensor logvar_p, Tensor mu_q, Tensor logvar_q, "
        "int reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  // PGD steps (docs/MATH.md section 3), in place on x_adv.
  m.def("pgd_step_linf_native_(Tensor(a!) x_adv, Tensor grad, Tensor x_orig, float alpha, float eps, "
        "float lo, float hi) -> ()");
  m.def("pgd_step_l2_native_(Tensor(a!) x_adv, Tensor grad, Tensor x_orig, float alpha, float eps, "
        "float lo, float hi) -> ()");
  // Multi-view NT-Xent (docs/MATH.md section 4): rows of this call vs all gathered columns.
  m.def("nt_xent_fwd_native(Tensor z_rows, Tensor z_cols, int views, float temperature, int denominator, "
        "int row_offset) -> (Tensor loss_rows, Tensor lse)");
  // cols_grad=False: dz_cols is zeros and not computed (the columns are detached: RoCL's similarity)
  m.def("nt_xent_bwd_native(Tensor grad_rows, Tensor z_rows, Tensor z_cols, Tensor lse, int views, "
        "float temperature, int denominator, int row_offset, bool cols_grad=True) "
        "-> (Tensor dz_rows, Tensor dz_cols)");
}

namespace {

PyModuleDef urkle_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "urkle_fast native kernels; the ops are torch.ops.urkle_fast.*_native. WITH_CUDA: whether CUDA kernels "
    "were compiled in; CPU_CAPABILITY: the copy of the CPU loops in use (DEFAULT, AVX2, AVX512).",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&urkle_fast_c_module);
  if (mod == nullptr) {
    return nullptr;
  }
#ifdef URKLE_FAST_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  Py_INCREF(with_cuda);
  if (PyModule_AddObject(mod, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(with_cuda);
    Py_DECREF(mod);
    return nullptr;
  }
  // which copy of the CPU inner loops runs here: "DEFAULT", "AVX2" or "AVX512" (ATEN_CPU_CAPABILITY lowers it)
  if (PyModule_AddStringConstant(mod, "CPU_CAPABILITY", urkle_fast::cpu::kernels().name) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
