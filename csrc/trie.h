// Token trie over item sequences in flat CSR form (docs/beam_search_spec.md, "Trie").
#pragma once

#include <cstdint>
#include <vector>

namespace genrec {

// Nodes are numbered in DFS preorder with children visited by increasing token id; the root is
// node 0. Every item ends at a leaf reached by an EOS edge.
struct Trie {
  std::vector<int64_t> child_ptr;    // (N+1,) edges of node n are child_ptr[n]..child_ptr[n+1]
  std::vector<int32_t> child_token;  // (E,) sorted by token id within a node
  std::vector<int32_t> child_node;   // (E,)
  std::vector<int32_t> leaf_item;    // (N,) item at a leaf, -1 elsewhere
  std::vector<int32_t> leaf_lo;      // (N,) the leaves under n are leaf_order[leaf_lo[n]:leaf_hi[n]]
  std::vector<int32_t> leaf_hi;      // (N,)
  std::vector<int32_t> leaf_order;   // (num_items,) items in DFS leaf order
  std::vector<int32_t> leaf_pos;     // (num_items,) inverse of leaf_order
  // (max_depth,) smallest / largest token on an edge out of a node at depth d: a search's step d reads
  // only the log-probabilities of tokens step_lo[d]..step_hi[d] (its window)
  std::vector<int32_t> step_lo;
  std::vector<int32_t> step_hi;
  int32_t eos_id = 0;
  int32_t max_depth = 0;   // longest root-to-leaf path in edges (pieces + EOS)
  int32_t max_token = -1;  // largest token id on any edge, EOS included

  int64_t num_nodes() const { return static_cast<int64_t>(leaf_item.size()); }
  int64_t num_items() const { return static_cast<int64_t>(leaf_order.size()); }

  // Item i is tokens[offsets[i]:offsets[i+1]] without EOS (appended here); the caller makes sure
  // tokens holds offsets[num_items] entries. Throws
  // std::invalid_argument for empty or duplicate sequences, negative tokens or tokens equal to
  // eos_id, and ids that do not fit int32.
  static Trie build(const int64_t* tokens, const int64_t* offsets, int64_t num_items,
                    int64_t eos_id);
};

}  // namespace genrec
