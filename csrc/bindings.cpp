// The only file that knows pybind11: converts Python objects to the plain C++ core and back.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

namespace py = pybind11;

// ---- trie + beam search bindings (owner: C++ beam search) ----
void bind_beam_search(py::module_& m);
// ---- CUDA attention bindings (owner: CUDA kernels) ----
void bind_attention(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "genrec_fast native core: trie-constrained beam search and CUDA attention";
  m.def("has_cuda", []() {
#ifdef GENREC_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA attention kernels were compiled into this build.");
  bind_beam_search(m);
  bind_attention(m);
}

// ======================= trie + beam search (C++ beam search owner edits below) ==================
void bind_beam_search(py::module_& /*m*/) {}

// ======================= CUDA attention (CUDA owner edits below) ================================
void bind_attention(py::module_& /*m*/) {}
