// The only file that knows pybind11: converts Python objects to the plain C++ core and back.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "beam_step.h"
#include "candidates.h"
#include "decoder_step.h"
#include "first_step.h"
#include "leaf_scores.h"
#include "packed_attention.h"
#include "topk.h"
#include "trie.h"

namespace py = pybind11;

// ---- trie + beam search bindings (owner: C++ beam search) ----
void bind_beam_search(py::module_& m);
// ---- streaming top-k over item logits ----
void bind_topk(py::module_& m);
// ---- CUDA attention bindings (owner: CUDA kernels) ----
void bind_attention(py::module_& m);
// ---- CUDA LM head + top-k ----
void bind_head_topk(py::module_& m);

void bind_leaf_scores(py::module_& m);
void bind_candidate_logits(py::module_& m);
void bind_packed_attention(py::module_& m);
void bind_first_step(py::module_& m);

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
  bind_topk(m);
  bind_leaf_scores(m);
  bind_candidate_logits(m);
  bind_packed_attention(m);
  bind_first_step(m);
  bind_attention(m);
  bind_head_topk(m);
}

// ======================= trie + beam search (C++ beam search owner edits below) ==================
void bind_beam_search(py::module_& m) {
  using genrec::BeamSearch;
  using genrec::Trie;
  using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  using BoolArray = py::array_t<bool, py::array::c_style | py::array::forcecast>;
  using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
  static_assert(sizeof(bool) == 1, "allow masks are passed to the core as bytes");
  const auto to_numpy = [](const auto& v) {  // std::vector -> 1-D numpy copy
    using T = typename std::decay_t<decltype(v)>::value_type;
    return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
  };
  const auto check_1d = [](const py::array& a, const std::string& name) {
    if (a.ndim() != 1) throw py::value_error(name + " must be 1-D, got ndim=" + std::to_string(a.ndim()));
  };

  const auto make_trie = [check_1d](const Int64Array& tokens, const Int64Array& offsets, int64_t eos_id) {
    check_1d(tokens, "tokens");
    check_1d(offsets, "offsets");
    const int64_t n = offsets.size() - 1;
    if (n > 0 && offsets.at(n) > tokens.size()) throw py::value_error("offsets run past the end of tokens");
    return std::make_shared<Trie>(Trie::build(tokens.data(), offsets.data(), n, eos_id));
  };
  const auto trie_array = [to_numpy](std::vector<int32_t> Trie::*field) {
    return [to_numpy, field](const Trie& t) { return to_numpy(t.*field); };
  };
  py::class_<Trie, std::shared_ptr<Trie>>(m, "Trie", "CSR token trie over item sequences.")
      .def(py::init(make_trie), py::arg("tokens"), py::arg("offsets"), py::arg("eos_id"),
           "Item i is tokens[offsets[i]:offsets[i+1]] (without EOS).")
      .def_property_readonly("child_ptr", [to_numpy](const Trie& t) { return to_numpy(t.child_ptr); })
      .def_property_readonly("child_token", trie_array(&Trie::child_token))
      .def_property_readonly("child_node", trie_array(&Trie::child_node))
      .def_property_readonly("leaf_item", trie_array(&Trie::leaf_item))
      .def_property_readonly("leaf_lo", trie_array(&Trie::leaf_lo))
      .def_property_readonly("leaf_hi", trie_array(&Trie::leaf_hi))
      .def_property_readonly("leaf_order", trie_array(&Trie::leaf_order))
      .def_property_readonly("step_lo", trie_array(&Trie::step_lo))
      .def_property_readonly("step_hi", trie_array(&Trie::step_hi))
      .def_property_readonly("num_nodes", &Trie::num_nodes)
      .def_property_readonly("num_items", &Trie::num_items)
      .def_readonly("max_depth", &Trie::max_depth)
      .def_readonly("eos_id", &Trie::eos_id);

  // exclude_ptr (num_users + 1,) indexes exclude_items; allow is (n_items,) or (num_users, n_items).
  const auto make_search = [check_1d](std::shared_ptr<Trie> trie, int64_t num_users, int32_t num_beams,
                                      int32_t k, float length_penalty, std::optional<Int64Array> exclude_ptr,
                                      std::optional<Int64Array> exclude_items, std::optional<BoolArray> allow) {
    if (!trie) throw py::value_error("trie must not be None");
    if (num_users < 0) throw py::value_error("num_users must be >= 0, got " + std::to_string(num_users));
    if (exclude_ptr.has_value() != exclude_items.has_value()) {
      throw py::value_error("exclude_ptr and exclude_items go together");
    }
    genrec::ItemFilter filter;
    if (exclude_ptr) {
      check_1d(*exclude_ptr, "exclude_ptr");
      check_1d(*exclude_items, "exclude_items");
      if (exclude_ptr->size() != num_users + 1) {
        throw py::value_error("exclude_ptr must have num_users + 1 entries");
      }
      if (exclude_ptr->at(num_users) > exclude_items->size()) {
        throw py::value_error("exclude_ptr runs past the end of exclude_items");
      }
      filter.exclude_ptr = exclude_ptr->data();
      filter.exclude_items = exclude_items->data();
    }
    if (allow) {
      const int64_t n = trie->num_items();
      const bool shared = allow->ndim() == 1 && allow->shape(0) == n;
      if (!shared && !(allow->ndim() == 2 && allow->shape(0) == num_users && allow->shape(1) == n)) {
        throw py::value_error("allow must have shape (n_items,) or (num_users, n_items)");
      }
      filter.allow = reinterpret_cast<const uint8_t*>(allow->data());
      filter.allow_rows = shared ? 1 : num_users;
    }
    return std::make_unique<BeamSearch>(trie, num_users, num_beams, k, length_penalty, filter);
  };
  const auto step = [to_numpy](BeamSearch& s, const py::object& logprobs, int64_t offset) {
    if (!py::isinstance<py::array_t<float>>(logprobs)) {
      throw py::value_error("logprobs must be a float32 numpy array");
    }
    const auto rows = FloatArray::ensure(logprobs);  // C-contiguous (copies a strided view)
    if (rows.ndim() != 2) {
      throw py::value_error("logprobs must be 2-D (rows, vocab), got ndim=" + std::to_string(rows.ndim()));
    }
    genrec::StepOutput out;
    {
      py::gil_scoped_release release;
      out = s.step(rows.data(), rows.shape(0), rows.shape(1), offset);
    }
    return py::make_tuple(to_numpy(out.parent_rows), to_numpy(out.tokens));
  };
  const auto results = [](const BeamSearch& s) {
    const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(s.num_users()), s.k()};
    py::array_t<int64_t> items(shape);
    py::array_t<float> scores(shape);
    s.results(items.mutable_data(), scores.mutable_data());
    return py::make_tuple(items, scores);
  };
  py::class_<BeamSearch>(m, "BeamSearch", "Trie-constrained beam search state for one batch of users.")
      .def(py::init(make_search), py::arg("trie"), py::arg("num_users"), py::arg("num_beams"), py::arg("k"),
           py::arg("length_penalty") = 0.0f, py::arg("exclude_ptr") = py::none(),
           py::arg("exclude_items") = py::none(), py::arg("allow") = py::none())
      .def("active_users", [to_numpy](const BeamSearch& s) { return to_numpy(s.active_users()); })
      .def_property_readonly("width", &BeamSearch::width)
      .def("set_threads", &BeamSearch::set_threads, py::arg("threads"),
           "Threads `step` may use (<= 0: all cores).")
      .def("done", &BeamSearch::done)
      .def_property_readonly("steps", &BeamSearch::steps)
      .def("step", step, py::arg("logprobs"), py::arg("offset") = 0,
           "(parent_rows, tokens) of the next rows; logprobs column j is token offset + j.")
      .def("results", results, "(items int64, scores float32), both (num_users, k), padded with -1 / -inf.");
}

// ======================= streaming top-k =========================================================
namespace {
// The core object plus the filter arrays it reads (kept alive here, since the core holds views).
struct TopKHolder {
  std::optional<py::array_t<bool>> allow;
  std::unique_ptr<genrec::StreamingTopK> topk;
};
}  // namespace

void bind_topk(py::module_& m) {
  using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  using BoolArray = py::array_t<bool, py::array::c_style | py::array::forcecast>;
  const auto make = [](int64_t num_users, int32_t k, int64_t num_items, std::optional<Int64Array> exclude_ptr,
                       std::optional<Int64Array> exclude_items, std::optional<BoolArray> allow) {
    if (num_users < 0) throw py::value_error("num_users must be >= 0, got " + std::to_string(num_users));
    if (exclude_ptr.has_value() != exclude_items.has_value()) {
      throw py::value_error("exclude_ptr and exclude_items go together");
    }
    auto h = std::make_unique<TopKHolder>();
    genrec::ItemFilter filter;
    if (exclude_ptr) {  // sizes checked before any element is read
      if (exclude_ptr->ndim() != 1 || exclude_ptr->shape(0) != num_users + 1) {
        throw py::value_error("exclude_ptr must be 1-D with num_users + 1 entries");
      }
      if (exclude_items->ndim() != 1) throw py::value_error("exclude_items must be 1-D");
      const int64_t* ptr = exclude_ptr->data();
      if (ptr[0] < 0 || ptr[num_users] > exclude_items->shape(0)) {
        throw py::value_error("exclude_ptr must index into exclude_items");
      }
      filter.exclude_ptr = ptr;
      filter.exclude_items = exclude_items->data();
    }
    if (allow) {
      const bool shared = allow->ndim() == 1 && allow->shape(0) == num_items;
      if (!shared && !(allow->ndim() == 2 && allow->shape(0) == num_users && allow->shape(1) == num_items)) {
        throw py::value_error("allow must have shape (num_items,) or (num_users, num_items)");
      }
      h->allow = *allow;
      filter.allow = reinterpret_cast<const uint8_t*>(h->allow->data());
      filter.allow_rows = shared ? 1 : num_users;
    }
    h->topk = std::make_unique<genrec::StreamingTopK>(num_users, k, num_items, filter);
    return h;
  };
  const auto add = [](TopKHolder& h, std::uintptr_t ptr, int64_t rows, int64_t cols, int64_t ld,
                      int64_t first_item, bool topk, bool lse, int threads) {
    if (rows != h.topk->num_users()) {
      throw py::value_error("scores has " + std::to_string(rows) + " rows, expected num_users=" +
                            std::to_string(h.topk->num_users()));
    }
    if (ptr == 0 && rows * cols > 0) throw py::value_error("scores pointer is null");
    py::gil_scoped_release release;
    h.topk->add(reinterpret_cast<const float*>(ptr), ld, cols, first_item, topk, lse, threads);
  };
  // add_head's and add_head_bf16's arguments: x (rows, dim) for every user, w (cols, dim)
  const auto check_head = [](const TopKHolder& h, std::uintptr_t x, std::uintptr_t w, int64_t rows, int64_t dim,
                             int64_t cols) {
    if (rows != h.topk->num_users()) {
      throw py::value_error("x has " + std::to_string(rows) + " rows, expected num_users=" +
                            std::to_string(h.topk->num_users()));
    }
    if ((x == 0 && rows * dim > 0) || (w == 0 && cols * dim > 0)) throw py::value_error("x or w pointer is null");
  };
  const auto add_head = [check_head](TopKHolder& h, std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias,
                                     int64_t rows, int64_t dim, int64_t cols, int64_t first_item, bool topk, bool lse,
                                     int threads) {
    check_head(h, x, w, rows, dim, cols);
    py::gil_scoped_release release;
    h.topk->add_head(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(w),
                     reinterpret_cast<const float*>(bias), dim, cols, first_item, topk, lse, threads);
  };
  const auto add_head_bf16 = [check_head](TopKHolder& h, std::uintptr_t x, std::uintptr_t w16, std::uintptr_t bias,
                                          int64_t rows, int64_t dim, int64_t cols, int64_t first_item, bool topk,
                                          bool lse, int threads) {
    check_head(h, x, w16, rows, dim, cols);
    py::gil_scoped_release release;
    h.topk->add_head_bf16(reinterpret_cast<const float*>(x), reinterpret_cast<const uint16_t*>(w16),
                          reinterpret_cast<const float*>(bias), dim, cols, first_item, topk, lse, threads);
  };
  const auto add_offsets = [](TopKHolder& h, std::uintptr_t items, std::uintptr_t offsets, int64_t rows, int64_t n,
                              std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, int64_t dim, int threads) {
    if (rows != h.topk->num_users()) {
      throw py::value_error("items has " + std::to_string(rows) + " rows, expected num_users=" +
                            std::to_string(h.topk->num_users()));
    }
    if (rows * n > 0 && (items == 0 || offsets == 0 || x == 0 || w == 0)) {
      throw py::value_error("items, offsets, x or w pointer is null");
    }
    py::gil_scoped_release release;
    h.topk->add_offsets(reinterpret_cast<const int64_t*>(items), reinterpret_cast<const float*>(offsets), n,
                        reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(w),
                        reinterpret_cast<const float*>(bias), dim, threads);
  };
  const auto results = [](const TopKHolder& h) {
    const auto U = static_cast<py::ssize_t>(h.topk->num_users());
    py::array_t<int64_t> items({U, static_cast<py::ssize_t>(h.topk->k())});
    py::array_t<float> values({U, static_cast<py::ssize_t>(h.topk->k())});
    py::array_t<float> lse(U);
    h.topk->results(items.mutable_data(), values.mutable_data(), lse.mutable_data());
    return py::make_tuple(items, values, lse);
  };
  m.def("bf16_head_supported", &genrec::bf16_head_supported,
        "True where StreamingTopK.add_head_bf16 runs: AVX-512 chosen and the CPU has AVX512-BF16.");
  py::class_<TopKHolder>(m, "StreamingTopK",
                         "Per-user top-k of item scores fed in column chunks, with a running log-sum-exp.")
      .def(py::init(make), py::arg("num_users"), py::arg("k"), py::arg("num_items"),
           py::arg("exclude_ptr") = py::none(), py::arg("exclude_items") = py::none(), py::arg("allow") = py::none())
      .def("add", add, py::arg("ptr"), py::arg("rows"), py::arg("cols"), py::arg("ld"), py::arg("first_item"),
           py::arg("topk"), py::arg("lse"), py::arg("threads"),
           "Scores (rows, cols) float32 at a raw host pointer, row stride ld (elements); column j is "
           "item first_item + j. The caller keeps the buffer alive and unchanged during the call.")
      .def("add_head", add_head, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("rows"), py::arg("dim"),
           py::arg("cols"), py::arg("first_item"), py::arg("topk"), py::arg("lse"), py::arg("threads"),
           "`add` of the scores x @ w.T + bias, fused: x (rows, dim), w (cols, dim) float32 C-contiguous and "
           "bias (cols,) at raw host pointers (bias 0 = none); never stores the scores.")
      .def("add_head_bf16", add_head_bf16, py::arg("x"), py::arg("w16"), py::arg("bias"), py::arg("rows"),
           py::arg("dim"), py::arg("cols"), py::arg("first_item"), py::arg("topk"), py::arg("lse"), py::arg("threads"),
           "`add_head` over w16 (cols, dim) bfloat16 bits (uint16), dim even, x float32: scores within a bound of "
           "the float ones (x rounded to bfloat16 in the tiles). Only where `bf16_head_supported()`.")
      .def("add_offsets", add_offsets, py::arg("items"), py::arg("offsets"), py::arg("rows"), py::arg("n"),
           py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("dim"), py::arg("threads"),
           "Offsets on (user, item) logits, once, before any top-k add: items (rows, n) int64 (-1 = none; repeats "
           "sum), offsets (rows, n) float32, x (rows, dim), w (num_items, dim) float32 (row i = item i), bias "
           "(num_items,) or 0, all C-contiguous at raw host pointers. The biased logits enter the top-k now, the "
           "adds skip those items, and the lse counts them biased.")
      .def("results", results, "(items int64 (U, k), raw scores float32 (U, k), lse float32 (U,)).");
}

// ======================= leaf head scores ========================================================
void bind_leaf_scores(py::module_& m) {
  m.def(
      "leaf_scores",
      [](std::uintptr_t weight, int64_t weight_rows, int64_t dim, std::uintptr_t slots, std::uintptr_t starts,
         std::uintptr_t hidden, int64_t rows, int64_t width, std::uintptr_t out, int threads) {
        py::gil_scoped_release release;
        genrec::leaf_scores(reinterpret_cast<const float*>(weight), weight_rows, dim,
                            reinterpret_cast<const int64_t*>(slots), reinterpret_cast<const int64_t*>(starts),
                            reinterpret_cast<const float*>(hidden), rows, width, reinterpret_cast<float*>(out),
                            threads);
      },
      py::arg("weight"), py::arg("weight_rows"), py::arg("dim"), py::arg("slots"), py::arg("starts"),
      py::arg("hidden"), py::arg("rows"), py::arg("width"), py::arg("out"), py::arg("threads"),
      "out (rows, width) = dot(weight[row], hidden[r]), -inf at empty slots (0); row = slots[r, m], or with "
      "starts (rows,) int64 (0: none) starts[r] + m, a table laid out leaf by leaf. weight (weight_rows, dim) "
      "float32, slots (rows, width) int64, hidden (rows, dim) float32, out float32, all C-contiguous at raw "
      "host pointers that the caller keeps alive during the call.");
}

// ======================= a cascade's candidates ===================================================
void bind_candidate_logits(py::module_& m) {
  m.def(
      "candidate_logits",
      [](std::uintptr_t weight, std::uintptr_t bias, int64_t weight_rows, int64_t dim, std::uintptr_t hidden,
         std::uintptr_t items, int64_t users, int64_t n, std::uintptr_t pair_items, std::uintptr_t pair_offsets,
         int64_t pairs, std::uintptr_t out, int threads) {
        if (users * n > 0 && (weight == 0 || hidden == 0 || items == 0 || out == 0)) {
          throw py::value_error("weight, hidden, items or out pointer is null");
        }
        if (users * pairs > 0 && (pair_items == 0 || pair_offsets == 0)) {
          throw py::value_error("pair_items or pair_offsets pointer is null");
        }
        py::gil_scoped_release release;
        genrec::candidate_logits(reinterpret_cast<const float*>(weight), reinterpret_cast<const float*>(bias),
                                 weight_rows, dim, reinterpret_cast<const float*>(hidden),
                                 reinterpret_cast<const int64_t*>(items), users, n,
                                 reinterpret_cast<const int64_t*>(pair_items),
                                 reinterpret_cast<const float*>(pair_offsets), pairs, reinterpret_cast<float*>(out),
                                 threads);
      },
      py::arg("weight"), py::arg("bias"), py::arg("weight_rows"), py::arg("dim"), py::arg("hidden"), py::arg("items"),
      py::arg("users"), py::arg("n"), py::arg("pair_items"), py::arg("pair_offsets"), py::arg("pairs"), py::arg("out"),
      py::arg("threads"),
      "out (users, n) = dot(weight[items], hidden[user]) + bias[items] (bias 0 = none) + the user's pair offsets "
      "at the item (repeats summed), -inf at items -1: weight (weight_rows, dim) float32, hidden (users, dim) "
      "float32, items (users, n) int64, pair_items (users, pairs) int64 (-1 = none), pair_offsets (users, pairs) "
      "float32, out float32, all C-contiguous at raw host pointers that the caller keeps alive during the call.");
  m.def(
      "append_new_items",
      [](std::uintptr_t items, int64_t n, std::uintptr_t extra, int64_t extra_n, int64_t users, std::uintptr_t out,
         int threads) {
        if (users > 0 && ((n > 0 && items == 0) || (extra_n > 0 && extra == 0) || (n + extra_n > 0 && out == 0))) {
          throw py::value_error("items, extra or out pointer is null");
        }
        py::gil_scoped_release release;
        genrec::append_new_items(reinterpret_cast<const int64_t*>(items), n, reinterpret_cast<const int64_t*>(extra),
                                 extra_n, users, reinterpret_cast<int64_t*>(out), threads);
      },
      py::arg("items"), py::arg("n"), py::arg("extra"), py::arg("extra_n"), py::arg("users"), py::arg("out"),
      py::arg("threads"),
      "out (users, n + extra_n) = items (users, n; distinct per row, -1 = none), then the extra items (users, "
      "extra_n; -1 = none) in neither items nor earlier in extra, at their own positions, -1 elsewhere; int64, "
      "C-contiguous at raw host pointers that the caller keeps alive during the call.");
}

// ======================= packed self-attention ===================================================
void bind_packed_attention(py::module_& m) {
  m.def(
      "packed_attention",
      [](std::uintptr_t qkv, int64_t rows, std::uintptr_t offsets, int64_t num_seqs, int64_t heads, int64_t head_dim,
         float scale, std::uintptr_t out, int threads) {
        if (rows > 0 && (qkv == 0 || out == 0)) throw py::value_error("qkv or out pointer is null");
        if (offsets == 0) throw py::value_error("offsets pointer is null");
        py::gil_scoped_release release;
        genrec::packed_attention(reinterpret_cast<const float*>(qkv), rows, reinterpret_cast<const int64_t*>(offsets),
                                 num_seqs, heads, head_dim, scale, reinterpret_cast<float*>(out), threads);
      },
      py::arg("qkv"), py::arg("rows"), py::arg("offsets"), py::arg("num_seqs"), py::arg("heads"), py::arg("head_dim"),
      py::arg("scale"), py::arg("out"), py::arg("threads"),
      "Self-attention of sequences stored back to back: qkv (rows, 3 * heads * head_dim) float32, offsets "
      "(num_seqs + 1,) int64, out (rows, heads * head_dim) float32, all C-contiguous at raw host pointers.");
}

// ======================= the one-token model's first step ========================================
namespace {

// FirstStepModel from python/genrec_fast/first_step.py's tables (`_SIZES`, `_pointers`: the same order).
genrec::FirstStepModel first_step_model(const std::vector<int64_t>& sizes, const std::vector<double>& floats,
                                        const std::vector<std::uintptr_t>& ptrs) {
  if (sizes.size() != 15 || floats.size() != 2) throw py::value_error("first_step: expected 15 sizes and 2 floats");
  genrec::FirstStepModel m;
  m.dim = sizes[0], m.heads = sizes[1], m.ffn = sizes[2], m.max_positions = sizes[3], m.vocab = sizes[4];
  m.n_users = sizes[5], m.n_items = sizes[6], m.bos = sizes[7];
  const int64_t enc = sizes[8], dec = sizes[9];
  m.positions_from_end = sizes[10] != 0;
  m.recency_len = sizes[11], m.width = sizes[12], m.neighbors = sizes[13], m.context = sizes[14];
  m.embed_scale = static_cast<float>(floats[0]), m.eps = static_cast<float>(floats[1]);
  if (enc < 0 || dec < 0 || ptrs.size() != static_cast<size_t>(9 + 16 * enc + 26 * dec + 9))
    throw py::value_error("first_step: the pointer table does not match the layer counts");
  size_t i = 0;
  auto f = [&]() { return reinterpret_cast<const float*>(ptrs[i++]); };
  auto lin = [&]() { genrec::LinearWeights l; l.w = f(); l.b = f(); return l; };
  auto norm = [&]() { genrec::NormWeights n; n.w = f(); n.b = f(); return n; };
  m.tokens = f(), m.users = f(), m.items = f(), m.encoder_positions = f();
  m.encoder_embed_norm = norm();
  m.decoder_positions = f();
  m.decoder_embed_norm = norm();
  for (int64_t l = 0; l < enc; ++l) {
    genrec::EncoderLayerWeights e;
    e.q = lin(), e.k = lin(), e.v = lin(), e.out = lin(), e.attn_norm = norm();
    e.fc1 = lin(), e.fc2 = lin(), e.final_norm = norm();
    m.encoder.push_back(e);
  }
  for (int64_t l = 0; l < dec; ++l) {
    genrec::DecoderLayerWeights d;
    d.self_q = lin(), d.self_k = lin(), d.self_v = lin(), d.self_out = lin(), d.self_norm = norm();
    d.cross_q = lin(), d.cross_k = lin(), d.cross_v = lin(), d.cross_out = lin(), d.cross_norm = norm();
    d.fc1 = lin(), d.fc2 = lin(), d.final_norm = norm();
    m.decoder.push_back(d);
  }
  m.history_query = lin(), m.history_key = lin();
  m.recency = f();
  m.table_items = reinterpret_cast<const int32_t*>(ptrs[i++]);
  m.table_counts = f(), m.weight = f(), m.reverse_weight = f();
  return m;
}

}  // namespace

void bind_first_step(py::module_& m) {
  m.def(
      "first_step",
      [](const std::vector<int64_t>& sizes, const std::vector<double>& floats, const std::vector<std::uintptr_t>& ptrs,
         std::uintptr_t tokens, std::uintptr_t user_ids, std::uintptr_t item_ids, std::uintptr_t mask, int64_t B,
         int64_t S, std::uintptr_t memory, std::uintptr_t heads, std::uintptr_t pair_items, std::uintptr_t pair_offsets,
         int threads) {
        const genrec::FirstStepModel model = first_step_model(sizes, floats, ptrs);
        if (B > 0 && (!tokens || !user_ids || !item_ids || !mask)) throw py::value_error("null input pointer");
        if (B > 0 && heads && model.pairs(S) > 0 && (!pair_items || !pair_offsets))
          throw py::value_error("null pair pointer");
        py::gil_scoped_release release;
        genrec::first_step(model, reinterpret_cast<const int64_t*>(tokens), reinterpret_cast<const int64_t*>(user_ids),
                           reinterpret_cast<const int64_t*>(item_ids), reinterpret_cast<const uint8_t*>(mask), B, S,
                           reinterpret_cast<float*>(memory), reinterpret_cast<float*>(heads),
                           reinterpret_cast<int64_t*>(pair_items), reinterpret_cast<float*>(pair_offsets), threads);
      },
      py::arg("sizes"), py::arg("floats"), py::arg("pointers"), py::arg("tokens"), py::arg("user_ids"),
      py::arg("item_ids"), py::arg("mask"), py::arg("B"), py::arg("S"), py::arg("memory"), py::arg("heads"),
      py::arg("pair_items"), py::arg("pair_offsets"), py::arg("threads"),
      "The encoder, and for one-token models the first decoder step and bias pairs (csrc/first_step.h), from the "
      "weight pointers of genrec_fast.first_step; inputs (B, S) int64 / uint8 mask, outputs memory (B, S, dim) or 0, "
      "heads (B, dim) float32 or 0 (encoder only) and pairs (B, P) int64 / float32, all C-contiguous host memory the "
      "caller keeps alive.");

  m.def(
      "decoder_step",
      [](const std::vector<int64_t>& sizes, const std::vector<double>& floats, const std::vector<std::uintptr_t>& ptrs,
         std::uintptr_t tokens, int64_t rows, int64_t users, int64_t step, int64_t capacity, int64_t memory_len,
         std::uintptr_t lengths, const std::vector<std::uintptr_t>& self_k, const std::vector<std::uintptr_t>& self_v,
         const std::vector<std::uintptr_t>& cross_k, const std::vector<std::uintptr_t>& cross_v, std::uintptr_t hidden,
         int threads) {
        const genrec::FirstStepModel model = first_step_model(sizes, floats, ptrs);
        if (!tokens || !lengths || !hidden) throw py::value_error("null pointer");
        genrec::DecoderCacheView c;
        c.rows = rows, c.users = users, c.step = step, c.capacity = capacity, c.memory_len = memory_len;
        c.lengths = reinterpret_cast<const int64_t*>(lengths);
        for (auto p : self_k) c.self_k.push_back(reinterpret_cast<float*>(p));
        for (auto p : self_v) c.self_v.push_back(reinterpret_cast<float*>(p));
        for (auto p : cross_k) c.cross_k.push_back(reinterpret_cast<const float*>(p));
        for (auto p : cross_v) c.cross_v.push_back(reinterpret_cast<const float*>(p));
        py::gil_scoped_release release;
        genrec::decoder_step(model, reinterpret_cast<const int64_t*>(tokens), c, reinterpret_cast<float*>(hidden),
                             threads);
      },
      py::arg("sizes"), py::arg("floats"), py::arg("pointers"), py::arg("tokens"), py::arg("rows"), py::arg("users"),
      py::arg("step"), py::arg("capacity"), py::arg("memory_len"), py::arg("lengths"), py::arg("self_k"),
      py::arg("self_v"), py::arg("cross_k"), py::arg("cross_v"), py::arg("hidden"), py::arg("threads"),
      "One decoder step of every beam row (csrc/decoder_step.h): tokens (rows,) int64 -> hidden (rows, dim) float32, "
      "writing slot `step` of the per-layer self K/V buffers (rows, heads, capacity, hd); cross K/V (users, heads, "
      "memory_len, hd), lengths (users,) int64; all C-contiguous host memory the caller keeps alive.");
}

// ======================= CUDA attention (CUDA owner edits below) ================================
#ifdef GENREC_WITH_CUDA
#include <array>
#include <cstdint>
#include <string>

#include "attention.h"
#endif

void bind_attention(py::module_& m) {
#ifdef GENREC_WITH_CUDA
  using Strides = std::array<int64_t, 4>;
  m.def(
      "attention_forward",
      [](std::uintptr_t q_ptr, std::uintptr_t k_ptr, std::uintptr_t v_ptr, std::uintptr_t out_ptr,
         std::uintptr_t key_lengths_ptr, int dtype_code, int64_t batch_kv, int64_t heads,
         int64_t len_q, int64_t len_k, int64_t head_dim, const Strides& q_strides,
         const Strides& k_strides, const Strides& v_strides, const Strides& out_strides,
         int64_t kv_group, double scale, std::uintptr_t stream_ptr) {
        if (dtype_code < 0 || dtype_code > 2) {
          throw py::value_error("dtype_code: expected 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                std::to_string(dtype_code));
        }
        genrec::AttentionParams p;
        p.q = reinterpret_cast<const void*>(q_ptr);
        p.k = reinterpret_cast<const void*>(k_ptr);
        p.v = reinterpret_cast<const void*>(v_ptr);
        p.out = reinterpret_cast<void*>(out_ptr);
        p.key_lengths = reinterpret_cast<const int32_t*>(key_lengths_ptr);
        p.dtype = static_cast<genrec::AttnDType>(dtype_code);
        p.batch_kv = batch_kv;
        p.kv_group = kv_group;
        p.heads = heads;
        p.len_q = len_q;
        p.len_k = len_k;
        p.head_dim = head_dim;
        for (int i = 0; i < 4; ++i) {
          p.q_stride[i] = q_strides[i];
          p.k_stride[i] = k_strides[i];
          p.v_stride[i] = v_strides[i];
          p.out_stride[i] = out_strides[i];
        }
        p.scale = static_cast<float>(scale);
        std::string err;
        {
          py::gil_scoped_release release;
          err = genrec::attention_forward(p, reinterpret_cast<void*>(stream_ptr));
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"), py::arg("out_ptr"),
      py::arg("key_lengths_ptr"), py::arg("dtype_code"), py::arg("batch_kv"), py::arg("heads"),
      py::arg("len_q"), py::arg("len_k"), py::arg("head_dim"), py::arg("q_strides"),
      py::arg("k_strides"), py::arg("v_strides"), py::arg("out_strides"), py::arg("kv_group"),
      py::arg("scale"), py::arg("stream_ptr"),
      "Fused attention forward on raw device pointers (see cuda/attention.h); launches on the "
      "given stream without synchronising. key_lengths_ptr = 0: no padding. dtype_code: 0 fp32, "
      "1 fp16, 2 bf16. Strides in elements, ordered (batch, head, seq, dim).");
#else
  (void)m;
#endif
}

// ======================= CUDA LM head + top-k =====================================================
#ifdef GENREC_WITH_CUDA
#include "head_topk.h"
#endif

void bind_head_topk(py::module_& m) {
#ifdef GENREC_WITH_CUDA
  m.def("head_topk_splits", &genrec::head_topk_splits, py::arg("users"), py::arg("vocab"), py::arg("device"),
        "The vocabulary split count head_topk_forward's outputs are sized for on this device.");
  m.def(
      "head_topk_forward",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, int dtype_code, int64_t users, int64_t dim,
         int64_t vocab, int64_t first_item, int64_t num_items, int64_t k, std::uintptr_t exclude_ptr,
         std::uintptr_t exclude_items, std::uintptr_t allow, int64_t allow_stride, int64_t splits,
         std::uintptr_t out_values, std::uintptr_t out_items, std::uintptr_t out_max, std::uintptr_t out_sum,
         std::uintptr_t stream) {
        if (dtype_code < 0 || dtype_code > 2) {
          throw py::value_error("dtype_code: expected 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                std::to_string(dtype_code));
        }
        genrec::HeadTopKParams p;
        p.x = reinterpret_cast<const void*>(x);
        p.weight = reinterpret_cast<const void*>(weight);
        p.bias = reinterpret_cast<const float*>(bias);
        p.dtype = static_cast<genrec::HeadDType>(dtype_code);
        p.users = users;
        p.dim = dim;
        p.vocab = vocab;
        p.first_item = first_item;
        p.num_items = num_items;
        p.k = k;
        p.exclude_ptr = reinterpret_cast<const int64_t*>(exclude_ptr);
        p.exclude_items = reinterpret_cast<const int64_t*>(exclude_items);
        p.allow = reinterpret_cast<const uint8_t*>(allow);
        p.allow_stride = allow_stride;
        p.splits = splits;
        p.out_values = reinterpret_cast<float*>(out_values);
        p.out_items = reinterpret_cast<int32_t*>(out_items);
        p.out_max = reinterpret_cast<float*>(out_max);
        p.out_sum = reinterpret_cast<float*>(out_sum);
        std::string err;
        {
          py::gil_scoped_release release;
          err = genrec::head_topk_forward(p, reinterpret_cast<void*>(stream));
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("dtype_code"), py::arg("users"), py::arg("dim"),
      py::arg("vocab"), py::arg("first_item"), py::arg("num_items"), py::arg("k"), py::arg("exclude_ptr"),
      py::arg("exclude_items"), py::arg("allow"), py::arg("allow_stride"), py::arg("splits"),
      py::arg("out_values"), py::arg("out_items"), py::arg("out_max"), py::arg("out_sum"), py::arg("stream"),
      "LM head + constrained top-k on raw device pointers (see cuda/head_topk.h); launches on the given "
      "stream without synchronising. 0 for an absent bias / filter. dtype_code: 0 fp32, 1 fp16, 2 bf16.");
#else
  (void)m;
#endif
}

