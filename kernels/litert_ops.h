// ternvlm's LiteRT custom operators (internal to the driver, not a C ABI).
//
//   TernaryMatMul     (x f32 [..., K], w int8 [N, ceil(K/4)], scale f32 [N, C], bias f32 [N])
//                     or 2bit-lut weights: w [ceil(N/32) * 32, ceil(K/4)], tile-interleaved
//   TernaryMatMul158  (same, w [N, ceil(K/5)], 5 trits per byte)
//   BinaryMatMul      (same, w [N, ceil(K/8)], 1 bit per weight)
//   Int8MatMul        (same, w [N, K], one signed byte per weight: LM heads)
//   Int4MatMul        (same, w [N, ceil(K/2)], two nibbles per byte: LM heads)
//       -> y f32 [..., N] = x . dequant(w)^T (+ bias) (clamped)
//   TernaryUnpack     (w int8 [N, row bytes], scale f32 [N, C]) -> f32 [N, K] dequantized
//                     (any format)
//   PackedEmbedding   (ids int32 [...], w int8 [V, row bytes], scale f32 [V, C])
//                     -> f32 [..., K]: rows ids of dequant(w) (any format)
//   DecodeAttention   (qkv f32 [1, 1, (H+2G)*D], cos f32 [1, R], sin f32 [1, R],
//                     k_cache f32 [1, L, G, D], v_cache f32 [1, L, G, D], pos int32 [1])
//                     -> f32 [1, 1, (H+2G)*D] = [attention output | rotary(k) | v]
//                     (tvk.h tvk_decode_attention); its options are their own 32 bytes:
//                     char magic[4] = "TVA1"; int32 version = 1; int32 heads, kv_heads,
//                     head_dim, rot_dim; float scale; int32 reserved = 0. All its nodes in
//                     a model must share these options (they have no weights to tell them
//                     apart at run time).
//
// w holds the packed bytes of kernels/tvk.h (declared int8 because the converter
// refuses uint8 constants; the bits are the same). C divides K. Custom options
// are 32 little-endian bytes (not flexbuffers):
//   char magic[4] = "TVK1"; int32 version = 1; int32 format (TVK_FMT_*: 0 = 2bit,
//   1 = 1.6bit, 2 = 1bit, 3 = int8, 4 = int4, 5 = 2bit-lut); int32 flags (bit 0:
//   has_bias, bit 1: int8 activations, bit 2: int7 activations, matmuls only;
//   2bit-lut needs bit 2); int64 k; float clip (<= 0: none); int32 reserved = 0.
//
// How the runtime calls us (litert/runtime/custom_op_dispatcher.cc): one
// user_data per registered op name, shared by every node of that op in every
// signature; Init gets each node's options but returns no per-node handle, and
// GetOutputLayouts / Run see only layouts and buffers. So the driver reads all
// our nodes from the model before compiling (OpContext::nodes, validated there
// with clear errors), and Run finds its node by the addresses of its constant
// weights (which point into the model file), with a shape match as fallback.
// The runtime ignores the statuses we return, so failures are recorded in the
// OpContext (first error wins) and the driver checks it after every call.
#ifndef TERNVLM_KERNELS_LITERT_OPS_H_
#define TERNVLM_KERNELS_LITERT_OPS_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "litert_capi.h"

namespace tvr {

enum OpKind : int {
  kTernaryMatMul,
  kTernaryMatMul158,
  kBinaryMatMul,
  kTernaryUnpack,
  kInt8MatMul,
  kInt4MatMul,
  kPackedEmbedding,
  kDecodeAttention,
  kNumOps
};
extern const char* const kOpNames[kNumOps];

constexpr size_t kOptionsSize = 32;

struct OpOptions {
  int format = 0;  // TVK_FMT_*: 0 2bit, 1 1.6bit, 2 1bit, 3 int8, 4 int4, 5 2bit-lut
  int64_t k = 0;
  bool has_bias = false;
  bool act_int8 = false;  // quantize activations per row to int8 (tvk.h TVK_ACT_INT8)
  bool act_int7 = false;  // ... or to int7 (TVK_ACT_INT7; what 2bit-lut needs)
  float clip = 0.0f;  // <= 0: none
  // DecodeAttention
  int heads = 0, kv_heads = 0, head_dim = 0, rot_dim = 0;
  float scale = 0.0f;
};

// Parses and checks a node's custom options; "" on success, else the reason.
std::string ParseOptions(OpKind kind, const void* data, size_t size, OpOptions* out);

// A tensor as the driver reads it from the model (data: constant bytes or null).
struct TensorDesc {
  std::string name;
  LiteRtRankedTensorType type{};
  bool ranked = false;
  const void* data = nullptr;
  size_t bytes = 0;
};

// One of our nodes, read from the model before compiling.
struct Node {
  OpKind kind = kTernaryMatMul;
  OpOptions opt;
  int64_t n = 0, row_bytes = 0, scale_cols = 0;
  const void* w = nullptr;      // constant packed weights (address in the model)
  const void* scale = nullptr;  // constant scales
  std::string where;            // "TernaryMatMul node 3 of subgraph 'decode'"
};

// Checks a node's tensors against its options; "" on success, else the reason.
std::string ValidateNode(OpKind kind, const OpOptions& opt, const std::vector<TensorDesc>& inputs,
                         const std::vector<TensorDesc>& outputs, Node* node);

class OpContext;

struct OpUserData {
  OpContext* ctx;
  OpKind kind;
};

// Per-model state shared by our four kernels (the user_data they get).
class OpContext {
 public:
  OpContext(const LiteRtApi* api, int threads);
  OpContext(const OpContext&) = delete;
  OpContext& operator=(const OpContext&) = delete;

  // After all nodes are added: "" or why two nodes cannot be told apart at run time.
  std::string AddNodes(std::vector<Node> nodes);
  void* user_data(OpKind kind) { return &users_[kind]; }

  void Fail(const std::string& message);  // first error wins
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  std::string error() const;
  void ClearError();

  const LiteRtApi& api() const { return *api_; }
  int threads() const { return threads_; }
  const Node* Find(OpKind kind, const void* w, const void* scale, int64_t n, int64_t row_bytes,
                   int64_t scale_cols, int64_t k) const;
  // TernaryUnpack's / PackedEmbedding's node from its weight shapes (GetOutputLayouts
  // sees nothing else and must know K).
  const Node* FindByShape(OpKind kind, int64_t n, int64_t row_bytes, int64_t scale_cols) const;

 private:
  struct Key {
    int kind;
    const void* w;
    const void* scale;
    bool operator==(const Key& o) const { return kind == o.kind && w == o.w && scale == o.scale; }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const;
  };

  const LiteRtApi* api_;
  int threads_;
  OpUserData users_[kNumOps];
  std::vector<Node> nodes_;                                       // fixed after AddNodes
  std::unordered_map<Key, const Node*, KeyHash> by_weights_;      // fixed after AddNodes
  std::atomic<bool> failed_{false};
  mutable std::mutex mu_;
  std::string error_;
};

// The callbacks registered for every op (user_data: OpUserData*).
const LiteRtCustomOpKernel& CustomOpKernel();

}  // namespace tvr

#endif  // TERNVLM_KERNELS_LITERT_OPS_H_
