#include "trie.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

namespace genrec {
namespace {

constexpr int64_t kMaxId = std::numeric_limits<int32_t>::max();

// Read-only view of the item sequences with EOS appended.
struct Sequences {
  const int64_t* tokens;
  const int64_t* offsets;
  int64_t eos_id;

  int64_t length(int64_t item) const { return offsets[item + 1] - offsets[item] + 1; }
  int64_t at(int64_t item, int64_t depth) const {
    return depth + 1 < length(item) ? tokens[offsets[item] + depth] : eos_id;
  }
  // Lexicographic order; EOS never occurs inside a sequence, so only equal sequences tie.
  bool less(int64_t a, int64_t b) const {
    for (int64_t d = 0; d < std::min(length(a), length(b)); ++d) {
      if (at(a, d) != at(b, d)) return at(a, d) < at(b, d);
    }
    return false;
  }
};

void check_sequences(const Sequences& seqs, int64_t num_items) {
  if (num_items < 0) throw std::invalid_argument("offsets must hold at least one entry");
  if (seqs.eos_id < 0 || seqs.eos_id > kMaxId) {
    throw std::invalid_argument("eos_id must be in [0, 2**31), got " + std::to_string(seqs.eos_id));
  }
  if (num_items > 0 && seqs.offsets[0] < 0) throw std::invalid_argument("offsets[0] must be >= 0");
  for (int64_t i = 0; i < num_items; ++i) {  // all offsets first: tokens are read only in bounds
    if (seqs.length(i) < 2) throw std::invalid_argument("sequences[" + std::to_string(i) + "] is empty");
  }
  if (num_items > 0 && seqs.offsets[num_items] - seqs.offsets[0] + 2 * num_items >= kMaxId) {
    throw std::invalid_argument("sequences: too many tokens for int32 node ids");
  }
  for (int64_t i = 0; i < num_items; ++i) {
    const std::string name = "sequences[" + std::to_string(i) + "]";
    for (int64_t d = 0; d + 1 < seqs.length(i); ++d) {
      const int64_t t = seqs.at(i, d);
      if (t < 0 || t > kMaxId) throw std::invalid_argument(name + " has a token outside [0, 2**31)");
      if (t == seqs.eos_id) throw std::invalid_argument(name + " contains eos_id");
    }
  }
}

// Creates the nodes in DFS preorder; order[lo:hi] are the items below the node being created.
class Builder {
 public:
  Builder(const Sequences& seqs, Trie& trie) : seqs_(seqs), trie_(trie) {}

  void visit(const std::vector<int64_t>& order, int64_t lo, int64_t hi, int64_t depth,
             int32_t parent, int32_t token) {
    const auto node = static_cast<int32_t>(trie_.leaf_item.size());
    parent_.push_back(parent);
    token_.push_back(token);
    trie_.leaf_item.push_back(-1);
    trie_.leaf_lo.push_back(static_cast<int32_t>(trie_.leaf_order.size()));
    trie_.leaf_hi.push_back(0);
    if (depth == seqs_.length(order[lo])) {  // past EOS: a leaf, holding exactly one item
      trie_.leaf_item[node] = static_cast<int32_t>(order[lo]);
      trie_.leaf_order.push_back(static_cast<int32_t>(order[lo]));
      trie_.max_depth = std::max(trie_.max_depth, static_cast<int32_t>(depth));
    } else {
      for (int64_t a = lo; a < hi;) {  // one child per run of equal tokens at this depth
        const int64_t t = seqs_.at(order[a], depth);
        int64_t b = a + 1;
        while (b < hi && seqs_.at(order[b], depth) == t) ++b;
        visit(order, a, b, depth + 1, node, static_cast<int32_t>(t));
        a = b;
      }
    }
    trie_.leaf_hi[node] = static_cast<int32_t>(trie_.leaf_order.size());
  }

  // Turns the (parent, token) of every non-root node into CSR edges. Children of a node are
  // created in token order with increasing ids, so a pass over ids keeps edges sorted by token.
  void finish_edges() {
    const int64_t n = trie_.num_nodes();
    trie_.child_ptr.assign(n + 1, 0);
    for (int64_t v = 1; v < n; ++v) ++trie_.child_ptr[parent_[v] + 1];
    std::partial_sum(trie_.child_ptr.begin(), trie_.child_ptr.end(), trie_.child_ptr.begin());
    std::vector<int64_t> cursor(trie_.child_ptr.begin(), trie_.child_ptr.end() - 1);
    trie_.child_token.resize(n - 1);
    trie_.child_node.resize(n - 1);
    std::vector<int32_t> depth(n, 0);  // preorder: a parent's depth is known before its children's
    trie_.step_lo.assign(trie_.max_depth, std::numeric_limits<int32_t>::max());
    trie_.step_hi.assign(trie_.max_depth, -1);
    for (int64_t v = 1; v < n; ++v) {
      const int64_t e = cursor[parent_[v]]++;
      trie_.child_token[e] = token_[v];
      trie_.child_node[e] = static_cast<int32_t>(v);
      trie_.max_token = std::max(trie_.max_token, token_[v]);
      const int32_t d = depth[parent_[v]];
      depth[v] = d + 1;
      trie_.step_lo[d] = std::min(trie_.step_lo[d], token_[v]);
      trie_.step_hi[d] = std::max(trie_.step_hi[d], token_[v]);
    }
  }

 private:
  const Sequences& seqs_;
  Trie& trie_;
  std::vector<int32_t> parent_;  // per node, -1 for the root
  std::vector<int32_t> token_;   // per node: token of the edge into it
};

}  // namespace

Trie Trie::build(const int64_t* tokens, const int64_t* offsets, int64_t num_items,
                 int64_t eos_id) {
  const Sequences seqs{tokens, offsets, eos_id};
  check_sequences(seqs, num_items);
  std::vector<int64_t> order(num_items);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return seqs.less(a, b); });
  for (int64_t i = 1; i < num_items; ++i) {
    if (!seqs.less(order[i - 1], order[i])) {
      throw std::invalid_argument("sequences[" + std::to_string(std::max(order[i - 1], order[i])) +
                                  "] duplicates sequences[" +
                                  std::to_string(std::min(order[i - 1], order[i])) + "]");
    }
  }
  Trie trie;
  trie.eos_id = static_cast<int32_t>(eos_id);
  Builder builder(seqs, trie);
  if (num_items > 0) {
    builder.visit(order, 0, num_items, 0, -1, -1);
  } else {  // no items: a lone root
    trie.leaf_item = {-1};
    trie.leaf_lo = {0};
    trie.leaf_hi = {0};
  }
  builder.finish_edges();
  trie.leaf_pos.resize(num_items);
  for (int64_t p = 0; p < num_items; ++p) trie.leaf_pos[trie.leaf_order[p]] = static_cast<int32_t>(p);
  return trie;
}

}  // namespace genrec
