// ternvlm's LiteRT custom operators: options, validation and the kernel
// callbacks (see litert_ops.h for the contract and how nodes are found).
#include "litert_ops.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <unordered_map>

#include "tvk.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "custom options are little-endian");

namespace tvr {

const char* const kOpNames[kNumOps] = {"TernaryMatMul", "TernaryMatMul158", "BinaryMatMul",
                                       "TernaryUnpack", "Int8MatMul",       "Int4MatMul",
                                       "PackedEmbedding", "DecodeAttention"};

namespace {

constexpr int kNumFormats = 6;
constexpr int kCodesPerByte[kNumFormats] = {4, 5, 8, 1, 2, 4};
constexpr const char* kFormatNames[kNumFormats] = {"2bit", "1.6bit", "1bit",
                                                   "int8", "int4", "2bit-lut"};
constexpr int64_t kMaxDim = int64_t{1} << 31;  // tvk's limit on every size

// The weight format a matmul op is bound to; -1 for ops that take any format.
int MatMulFormat(OpKind kind) {
  switch (kind) {
    case kTernaryMatMul: return TVK_FMT_2BIT;
    case kTernaryMatMul158: return TVK_FMT_1P6BIT;
    case kBinaryMatMul: return TVK_FMT_1BIT;
    case kInt8MatMul: return TVK_FMT_INT8;
    case kInt4MatMul: return TVK_FMT_INT4;
    default: return -1;
  }
}

bool IsMatMul(OpKind kind) { return MatMulFormat(kind) >= 0; }

// TernaryMatMul also takes its weights tile-interleaved for the lookup-table kernel.
bool FormatFits(OpKind kind, int format) {
  return format == MatMulFormat(kind) ||
         (kind == kTernaryMatMul && format == TVK_FMT_2BIT_LUT);
}

// Rows the weight tensor holds for N rows of W (2bit-lut: whole tiles of 32), by the
// library's own rule: the bytes of an N x 1 matrix are its stored rows (negative if N is bad).
int64_t WeightRows(int format, int64_t n) { return tvk_weight_bytes(format, n, 1); }

int ActMode(const OpOptions& opt) {
  return opt.act_int7 ? TVK_ACT_INT7 : opt.act_int8 ? TVK_ACT_INT8 : TVK_ACT_F32;
}

// Inputs of each op: x, w, scale, bias (matmul); w, scale (unpack); ids, w, scale (embedding).
size_t NumInputs(OpKind kind) {
  if (kind == kDecodeAttention) return 6;
  return IsMatMul(kind) ? 4 : kind == kPackedEmbedding ? 3 : 2;
}
size_t WeightIndex(OpKind kind) { return kind == kTernaryUnpack ? 0 : 1; }

int64_t RowBytes(int64_t k, int format) {
  return (k + kCodesPerByte[format] - 1) / kCodesPerByte[format];
}

std::string ShapeString(const LiteRtLayout& l) {
  std::string s = "[";
  for (unsigned i = 0; i < l.rank; ++i) {
    if (i) s += ", ";
    s += std::to_string(l.dimensions[i]);
  }
  return s + "]";
}

const char* TypeName(int t) {
  switch (t) {
    case kLiteRtElementTypeFloat32: return "float32";
    case kLiteRtElementTypeInt32: return "int32";
    case kLiteRtElementTypeUInt8: return "uint8";
    case kLiteRtElementTypeInt8: return "int8";
    default: return "another type";
  }
}

bool IsPackedType(int t) { return t == kLiteRtElementTypeInt8 || t == kLiteRtElementTypeUInt8; }

// "" if `t` is a ranked tensor of element type `type` and rank `rank`.
std::string Expect(const TensorDesc& t, const char* role, int type, int rank) {
  if (!t.ranked) return std::string(role) + " '" + t.name + "' has no static rank";
  const bool type_ok = type == kLiteRtElementTypeInt8 ? IsPackedType(t.type.element_type)
                                                      : t.type.element_type == type;
  if (!type_ok) {
    return std::string(role) + " '" + t.name + "' is " + TypeName(t.type.element_type) +
           ", expected " + TypeName(type);
  }
  if (rank >= 0 && static_cast<int>(t.type.layout.rank) != rank) {
    return std::string(role) + " '" + t.name + "' has shape " + ShapeString(t.type.layout) +
           ", expected rank " + std::to_string(rank);
  }
  for (unsigned i = 0; i < t.type.layout.rank; ++i) {
    if (t.type.layout.dimensions[i] < 0) {
      return std::string(role) + " '" + t.name + "' has a dynamic shape " +
             ShapeString(t.type.layout) + "; static shapes only";
    }
  }
  return "";
}

// A constant operand: present, of the expected size and 64-byte aligned.
std::string ExpectConstant(const TensorDesc& t, const char* role, size_t bytes) {
  if (t.data == nullptr || t.bytes == 0) {
    return std::string(role) + " '" + t.name + "' must be a constant of the model";
  }
  if (t.bytes != bytes) {
    return std::string(role) + " '" + t.name + "' holds " + std::to_string(t.bytes) +
           " bytes, its shape needs " + std::to_string(bytes);
  }
  if (reinterpret_cast<uintptr_t>(t.data) % kLiteRtHostAlignment != 0) {
    return std::string(role) + " '" + t.name +
           "' is not 64-byte aligned in the file, which LiteRT refuses for custom-op inputs "
           "(\"Unaligned host memory pointer\"); realign the file with "
           "ternvlm.export.align.realign_file or export it again";
  }
  return "";
}

bool SameOptions(const OpOptions& a, const OpOptions& b) {
  return a.format == b.format && a.k == b.k && a.has_bias == b.has_bias &&
         a.act_int8 == b.act_int8 && a.act_int7 == b.act_int7 && a.clip == b.clip &&
         a.heads == b.heads &&
         a.kv_heads == b.kv_heads && a.head_dim == b.head_dim && a.rot_dim == b.rot_dim &&
         a.scale == b.scale;
}

std::string ParseAttentionOptions(const unsigned char* b, OpOptions* out) {
  int32_t v[6];
  float scale;
  std::memcpy(v, b + 4, 20);
  std::memcpy(&scale, b + 24, 4);
  std::memcpy(&v[5], b + 28, 4);
  if (std::memcmp(b, "TVA1", 4) != 0) return "custom options do not start with \"TVA1\"";
  if (v[0] != 1) return "custom options version " + std::to_string(v[0]) + ", expected 1";
  const int heads = v[1], kv_heads = v[2], head_dim = v[3], rot_dim = v[4];
  if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0 || heads > (1 << 20)) {
    return "heads " + std::to_string(heads) + " and kv_heads " + std::to_string(kv_heads) +
           ": heads must be a positive multiple of kv_heads";
  }
  if (head_dim < 1 || head_dim > (1 << 20) || rot_dim < 0 || rot_dim > head_dim ||
      rot_dim % 2 != 0) {
    return "head_dim " + std::to_string(head_dim) + ", rot_dim " + std::to_string(rot_dim) +
           ": need 0 <= rot_dim <= head_dim, rot_dim even";
  }
  if (!std::isfinite(scale) || scale <= 0) return "scale is not a positive finite number";
  if (v[5] != 0) return "reserved field is " + std::to_string(v[5]) + ", expected 0";
  out->heads = heads;
  out->kv_heads = kv_heads;
  out->head_dim = head_dim;
  out->rot_dim = rot_dim;
  out->scale = scale;
  return "";
}

int64_t AttentionWidth(const OpOptions& o) {
  return static_cast<int64_t>(o.heads + 2 * o.kv_heads) * o.head_dim;
}

}  // namespace

std::string ParseOptions(OpKind kind, const void* data, size_t size, OpOptions* out) {
  if (data == nullptr || size != kOptionsSize) {
    return "custom options are " + std::to_string(size) + " bytes, expected the " +
           std::to_string(kOptionsSize) + "-byte TVK1 record";
  }
  const auto* b = static_cast<const unsigned char*>(data);
  if (kind == kDecodeAttention) return ParseAttentionOptions(b, out);
  int32_t version, format, flags, reserved;
  int64_t k;
  float clip;
  std::memcpy(&version, b + 4, 4);
  std::memcpy(&format, b + 8, 4);
  std::memcpy(&flags, b + 12, 4);
  std::memcpy(&k, b + 16, 8);
  std::memcpy(&clip, b + 24, 4);
  std::memcpy(&reserved, b + 28, 4);
  if (std::memcmp(b, "TVK1", 4) != 0) return "custom options do not start with \"TVK1\"";
  if (version != 1) return "custom options version " + std::to_string(version) + ", expected 1";
  if (format < 0 || format >= kNumFormats) return "unknown format " + std::to_string(format);
  if (!IsMatMul(kind) && format == TVK_FMT_2BIT_LUT) {
    return std::string(kOpNames[kind]) + " does not take 2bit-lut weights (TernaryMatMul does)";
  }
  if (IsMatMul(kind) && !FormatFits(kind, format)) {
    return std::string("format ") + kFormatNames[format] + " does not match the op (" +
           kFormatNames[MatMulFormat(kind)] + ")";
  }
  if (flags & ~7) return "unknown flags " + std::to_string(flags);
  if ((flags & 6) == 6) return "flags ask for both int8 and int7 activations";
  if (format == TVK_FMT_2BIT_LUT && !(flags & 4)) {
    return "2bit-lut weights need int7 activations (flag bit 2)";
  }
  if (reserved != 0) return "reserved field is " + std::to_string(reserved) + ", expected 0";
  if (k <= 0 || k >= kMaxDim) return "k = " + std::to_string(k) + " is out of range";
  if (std::isnan(clip) || std::isinf(clip)) return "clip is not a finite number";
  if (!IsMatMul(kind) && (flags != 0 || clip > 0)) {
    return std::string(kOpNames[kind]) + " takes no bias, clip or activation flags";
  }
  out->format = format;
  out->k = k;
  out->has_bias = (flags & 1) != 0;
  out->act_int8 = (flags & 2) != 0;
  out->act_int7 = (flags & 4) != 0;
  out->clip = clip > 0 ? clip : 0.0f;
  return "";
}

namespace {

// DecodeAttention's operands against its options (see litert_ops.h).
std::string ValidateAttention(const OpOptions& opt, const std::vector<TensorDesc>& in,
                              const std::vector<TensorDesc>& out) {
  if (in.size() != 6 || out.size() != 1) {
    return std::to_string(in.size()) + " inputs and " + std::to_string(out.size()) +
           " outputs, expected 6 and 1";
  }
  const int64_t width = AttentionWidth(opt);
  const char* roles[6] = {"qkv", "cos", "sin", "k_cache", "v_cache", "pos"};
  const int ranks[6] = {3, 2, 2, 4, 4, 1};
  std::string e;
  for (int i = 0; i < 6; ++i) {
    const int type = i == 5 ? kLiteRtElementTypeInt32 : kLiteRtElementTypeFloat32;
    if (!(e = Expect(in[i], roles[i], type, ranks[i])).empty()) return e;
  }
  if (!(e = Expect(out[0], "output", kLiteRtElementTypeFloat32, 3)).empty()) return e;
  const auto& q = in[0].type.layout;
  const auto& kc = in[3].type.layout;
  const auto& vc = in[4].type.layout;
  const auto& y = out[0].type.layout;
  auto dims = [](const LiteRtLayout& l, std::initializer_list<int64_t> want) {
    int i = 0;
    for (int64_t w : want) {
      if (w >= 0 && l.dimensions[i] != w) return false;
      ++i;
    }
    return true;
  };
  if (!dims(q, {1, 1, width}) || !dims(y, {1, 1, width})) {
    return "qkv " + ShapeString(q) + " and output " + ShapeString(y) + " must be [1, 1, " +
           std::to_string(width) + "]";
  }
  if (!dims(in[1].type.layout, {1, opt.rot_dim}) || !dims(in[2].type.layout, {1, opt.rot_dim})) {
    return "cos/sin must be [1, " + std::to_string(opt.rot_dim) + "]";
  }
  if (!dims(kc, {1, -1, opt.kv_heads, opt.head_dim}) || kc.dimensions[1] < 1 ||
      !dims(vc, {1, kc.dimensions[1], opt.kv_heads, opt.head_dim})) {
    return "caches " + ShapeString(kc) + ", " + ShapeString(vc) + " must be [1, L, " +
           std::to_string(opt.kv_heads) + ", " + std::to_string(opt.head_dim) + "]";
  }
  if (!dims(in[5].type.layout, {1})) return "pos must be [1]";
  return "";
}

}  // namespace

std::string ValidateNode(OpKind kind, const OpOptions& opt, const std::vector<TensorDesc>& in,
                         const std::vector<TensorDesc>& out, Node* node) {
  if (kind == kDecodeAttention) {
    std::string e = ValidateAttention(opt, in, out);
    if (!e.empty()) return e;
    node->kind = kind;
    node->opt = opt;
    return "";
  }
  const bool unpack = kind == kTernaryUnpack;
  const size_t want_in = NumInputs(kind);
  if (in.size() != want_in || out.size() != 1) {
    return std::to_string(in.size()) + " inputs and " + std::to_string(out.size()) +
           " outputs, expected " + std::to_string(want_in) + " and 1";
  }
  const TensorDesc& w = in[WeightIndex(kind)];
  const TensorDesc& scale = in[WeightIndex(kind) + 1];
  std::string e;
  if (!(e = Expect(w, "packed weights", kLiteRtElementTypeInt8, 2)).empty()) return e;
  if (!(e = Expect(scale, "scale", kLiteRtElementTypeFloat32, 2)).empty()) return e;
  const bool lut = opt.format == TVK_FMT_2BIT_LUT;
  const int64_t rb = w.type.layout.dimensions[1], stored = w.type.layout.dimensions[0];
  const int64_t n = lut ? scale.type.layout.dimensions[0] : stored;
  const int64_t cols = scale.type.layout.dimensions[1];
  if (n < 1) return "packed weights '" + w.name + "' have no rows";
  if (stored != WeightRows(opt.format, n)) {
    return "packed weights '" + w.name + "' have " + std::to_string(stored) +
           " rows; 2bit-lut stores the " + std::to_string(n) +
           " rows of its scale in whole tiles of 32: " + std::to_string(WeightRows(opt.format, n));
  }
  if (rb != RowBytes(opt.k, opt.format)) {
    return "packed weights '" + w.name + "' have rows of " + std::to_string(rb) + " bytes; " +
           kFormatNames[opt.format] + " rows of k = " + std::to_string(opt.k) + " take " +
           std::to_string(RowBytes(opt.k, opt.format));
  }
  if (scale.type.layout.dimensions[0] != n || cols < 1 || opt.k % cols != 0) {
    return "scale '" + scale.name + "' has shape " + ShapeString(scale.type.layout) +
           ", expected [" + std::to_string(n) + ", C] with C dividing k = " +
           std::to_string(opt.k);
  }
  if (!(e = ExpectConstant(w, "packed weights", static_cast<size_t>(stored * rb))).empty()) {
    return e;
  }
  if (!(e = ExpectConstant(scale, "scale", static_cast<size_t>(n * cols) * 4)).empty()) return e;
  const TensorDesc& y = out[0];
  if (y.data != nullptr) return "output '" + y.name + "' is a constant of the model";
  if (unpack) {
    if (!(e = Expect(y, "output", kLiteRtElementTypeFloat32, 2)).empty()) return e;
    if (y.type.layout.dimensions[0] != n || y.type.layout.dimensions[1] != opt.k) {
      return "output '" + y.name + "' has shape " + ShapeString(y.type.layout) + ", expected [" +
             std::to_string(n) + ", " + std::to_string(opt.k) + "]";
    }
  } else if (kind == kPackedEmbedding) {
    const TensorDesc& ids = in[0];
    if (!(e = Expect(ids, "ids", kLiteRtElementTypeInt32, -1)).empty()) return e;
    if (!(e = Expect(y, "output", kLiteRtElementTypeFloat32, -1)).empty()) return e;
    const LiteRtLayout &il = ids.type.layout, &yl = y.type.layout;
    bool same = yl.rank == il.rank + 1 && yl.dimensions[il.rank] == opt.k;
    for (unsigned i = 0; same && i < il.rank; ++i) same = yl.dimensions[i] == il.dimensions[i];
    if (!same) {
      return "output '" + y.name + "' has shape " + ShapeString(yl) + " for ids " +
             ShapeString(il) + " and k = " + std::to_string(opt.k);
    }
  } else {
    const TensorDesc& x = in[0];
    const TensorDesc& bias = in[3];
    if (!(e = Expect(x, "input", kLiteRtElementTypeFloat32, -1)).empty()) return e;
    const LiteRtLayout& xl = x.type.layout;
    if (xl.rank < 1 || xl.dimensions[xl.rank - 1] != opt.k) {
      return "input '" + x.name + "' has shape " + ShapeString(xl) + ", expected [..., " +
             std::to_string(opt.k) + "]";
    }
    if (!(e = Expect(bias, "bias", kLiteRtElementTypeFloat32, 1)).empty()) return e;
    if (bias.type.layout.dimensions[0] != n) {
      return "bias '" + bias.name + "' has shape " + ShapeString(bias.type.layout) +
             ", expected [" + std::to_string(n) + "]";
    }
    if (bias.data != nullptr &&
        !(e = ExpectConstant(bias, "bias", static_cast<size_t>(n) * 4)).empty()) {
      return e;
    }
    if (!(e = Expect(y, "output", kLiteRtElementTypeFloat32, -1)).empty()) return e;
    bool same = y.type.layout.rank == xl.rank && y.type.layout.dimensions[xl.rank - 1] == n;
    for (unsigned i = 0; same && i + 1 < xl.rank; ++i) {
      same = y.type.layout.dimensions[i] == xl.dimensions[i];
    }
    if (!same) {
      return "output '" + y.name + "' has shape " + ShapeString(y.type.layout) + " for input " +
             ShapeString(xl) + " and " + std::to_string(n) + " output features";
    }
  }
  node->kind = kind;
  node->opt = opt;
  node->n = n;
  node->row_bytes = rb;
  node->scale_cols = cols;
  node->w = w.data;
  node->scale = scale.data;
  return "";
}

// ---- OpContext -------------------------------------------------------------

size_t OpContext::KeyHash::operator()(const Key& k) const {
  const size_t a = std::hash<const void*>()(k.w), b = std::hash<const void*>()(k.scale);
  return a ^ (b * 0x9e3779b97f4a7c15ull) ^ static_cast<size_t>(k.kind);
}

OpContext::OpContext(const LiteRtApi* api, int threads) : api_(api), threads_(threads) {
  for (int i = 0; i < kNumOps; ++i) users_[i] = {this, static_cast<OpKind>(i)};
}

std::string OpContext::AddNodes(std::vector<Node> nodes) {
  nodes_ = std::move(nodes);
  by_weights_.clear();
  for (const Node& n : nodes_) {
    auto [it, inserted] = by_weights_.emplace(Key{n.kind, n.w, n.scale}, &n);
    if (!inserted && !SameOptions(it->second->opt, n.opt)) {
      return n.where + " and " + it->second->where +
             " share their weights but not their options; the runtime cannot tell them apart";
    }
  }
  // TernaryUnpack, PackedEmbedding: GetOutputLayouts sees only (N, row bytes, C), needs K.
  for (const Node& a : nodes_) {
    for (const Node& b : nodes_) {
      if (!IsMatMul(a.kind) && a.kind == b.kind && a.n == b.n &&
          a.row_bytes == b.row_bytes && a.scale_cols == b.scale_cols && a.opt.k != b.opt.k) {
        return a.where + " and " + b.where +
               " have the same weight shapes but different k; the runtime cannot tell them apart";
      }
    }
  }
  return "";
}

const Node* OpContext::Find(OpKind kind, const void* w, const void* scale, int64_t n,
                            int64_t row_bytes, int64_t scale_cols, int64_t k) const {
  auto it = by_weights_.find(Key{kind, w, scale});
  if (it != by_weights_.end()) return it->second;
  // Fallback (weights not where the model said): a unique node of these shapes.
  const Node* found = nullptr;
  for (const Node& node : nodes_) {
    if (node.kind != kind || node.n != n || node.row_bytes != row_bytes ||
        node.scale_cols != scale_cols || node.opt.k != k) {
      continue;
    }
    if (found != nullptr && !SameOptions(found->opt, node.opt)) return nullptr;
    found = &node;
  }
  return found;
}

const Node* OpContext::FindByShape(OpKind kind, int64_t n, int64_t row_bytes,
                                   int64_t scale_cols) const {
  for (const Node& node : nodes_) {
    if (node.kind == kind && node.n == n && node.row_bytes == row_bytes &&
        node.scale_cols == scale_cols) {
      return &node;  // AddNodes made (N, row bytes, C) -> k unique
    }
  }
  return nullptr;
}

void OpContext::Fail(const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!failed_.load(std::memory_order_relaxed)) {
    error_ = message;
    failed_.store(true, std::memory_order_release);
  }
}

std::string OpContext::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void OpContext::ClearError() {
  std::lock_guard<std::mutex> lock(mu_);
  error_.clear();
  failed_.store(false, std::memory_order_release);
}

// ---- kernel callbacks --------------------------------------------------------

namespace {

constexpr LiteRtStatus kInvalidArgument = 1;  // kLiteRtStatusErrorInvalidArgument
constexpr LiteRtStatus kRuntimeFailure = 3;   // kLiteRtStatusErrorRuntimeFailure

struct Operand {
  LiteRtRankedTensorType type;
  void* data;
  size_t size;
};

bool GetOperand(const LiteRtApi& api, LiteRtTensorBuffer b, Operand* o) {
  int buffer_type = 0;
  return b != nullptr && api.LiteRtGetTensorBufferType(b, &buffer_type) == kLiteRtStatusOk &&
         buffer_type == kLiteRtTensorBufferTypeHostMemory &&
         api.LiteRtGetTensorBufferTensorType(b, &o->type) == kLiteRtStatusOk &&
         api.LiteRtGetTensorBufferSize(b, &o->size) == kLiteRtStatusOk &&
         api.LiteRtGetTensorBufferHostMemory(b, &o->data) == kLiteRtStatusOk && o->data != nullptr;
}

LiteRtStatus Fail(OpContext* ctx, OpKind kind, const std::string& what) {
  ctx->Fail(std::string(kOpNames[kind]) + ": " + what);
  return kRuntimeFailure;
}

LiteRtStatus Init(void* user_data, const void* init_data, size_t init_data_size) {
  auto* u = static_cast<OpUserData*>(user_data);
  OpOptions opt;
  const std::string e = ParseOptions(u->kind, init_data, init_data_size, &opt);
  if (!e.empty()) {
    Fail(u->ctx, u->kind, e);
    return kInvalidArgument;
  }
  return kLiteRtStatusOk;
}

LiteRtStatus Destroy(void*) { return kLiteRtStatusOk; }

LiteRtStatus GetOutputLayouts(void* user_data, size_t num_inputs, const LiteRtLayout* in,
                              size_t num_outputs, LiteRtLayout* out) {
  auto* u = static_cast<OpUserData*>(user_data);
  const OpKind kind = u->kind;
  if (num_inputs != NumInputs(kind) || num_outputs != 1 || in == nullptr || out == nullptr) {
    return Fail(u->ctx, kind, "unexpected number of inputs or outputs");
  }
  if (kind == kDecodeAttention) {  // the output has the shape of qkv
    *out = in[0];
    out->has_strides = 0;
    return kLiteRtStatusOk;
  }
  const LiteRtLayout& w = in[WeightIndex(kind)];
  const LiteRtLayout& s = in[WeightIndex(kind) + 1];
  // Weight rows are N, or N in whole tiles of 32 (TernaryMatMul on 2bit-lut weights).
  const bool rows_ok = w.rank == 2 && s.rank == 2 &&
                       (s.dimensions[0] == w.dimensions[0] ||
                        (kind == kTernaryMatMul && w.dimensions[0] == WeightRows(TVK_FMT_2BIT_LUT,
                                                                                 s.dimensions[0])));
  if (!rows_ok || s.dimensions[1] < 1) {
    return Fail(u->ctx, kind,
                "bad weight or scale shape " + ShapeString(w) + ", " + ShapeString(s));
  }
  LiteRtLayout y{};
  if (!IsMatMul(kind)) {
    const Node* node = u->ctx->FindByShape(kind, w.dimensions[0], w.dimensions[1], s.dimensions[1]);
    if (node == nullptr) return Fail(u->ctx, kind, "no node with weights " + ShapeString(w));
    if (kind == kTernaryUnpack) {
      y.rank = 2;
      y.dimensions[0] = w.dimensions[0];
      y.dimensions[1] = static_cast<int32_t>(node->opt.k);
    } else {
      const LiteRtLayout& ids = in[0];
      if (ids.rank + 1 > sizeof(y.dimensions) / sizeof(y.dimensions[0])) {
        return Fail(u->ctx, kind, "ids " + ShapeString(ids) + " have too many dimensions");
      }
      y = ids;
      y.has_strides = 0;
      y.rank = ids.rank + 1;
      y.dimensions[ids.rank] = static_cast<int32_t>(node->opt.k);
    }
  } else {
    const LiteRtLayout& x = in[0];
    const int64_t k = x.rank >= 1 ? x.dimensions[x.rank - 1] : 0;
    if (x.rank < 1 || k < 1 || RowBytes(k, MatMulFormat(kind)) != w.dimensions[1] ||
        k % s.dimensions[1] != 0) {
      return Fail(u->ctx, kind,
                  "input " + ShapeString(x) + " does not match weights " + ShapeString(w) +
                      " and scale " + ShapeString(s));
    }
    y = x;
    y.has_strides = 0;
    y.dimensions[x.rank - 1] = s.dimensions[0];
  }
  *out = y;
  return kLiteRtStatusOk;
}

// Product of the leading `rank` dimensions of `l` (-1 if one is negative or it is too large).
int64_t Rows(const LiteRtLayout& l, unsigned rank) {
  int64_t m = 1;
  for (unsigned i = 0; i < rank; ++i) {
    if (l.dimensions[i] < 0) return -1;
    m *= l.dimensions[i];
    if (m >= kMaxDim) return -1;
  }
  return m;
}

LiteRtStatus RunAttention(OpContext* ctx, const LiteRtTensorBuffer* inputs,
                          LiteRtTensorBuffer* outputs) {
  const OpKind kind = kDecodeAttention;
  const Node* node = ctx->Find(kind, nullptr, nullptr, 0, 0, 0, 0);
  if (node == nullptr) return Fail(ctx, kind, "the model has no DecodeAttention node");
  const OpOptions& opt = node->opt;
  Operand in[6], y{};
  const LiteRtApi& api = ctx->api();
  bool ok = GetOperand(api, outputs[0], &y);
  for (int i = 0; ok && i < 6; ++i) ok = GetOperand(api, inputs[i], &in[i]);
  if (!ok) return Fail(ctx, kind, "an operand is not a readable host-memory buffer");
  const LiteRtLayout& kl = in[3].type.layout;
  if (kl.rank != 4 || kl.dimensions[2] != opt.kv_heads || kl.dimensions[3] != opt.head_dim ||
      kl.dimensions[1] < 1) {
    return Fail(ctx, kind, node->where + ": cache " + ShapeString(kl) + " does not fit");
  }
  const int64_t cache_len = kl.dimensions[1], width = AttentionWidth(opt);
  const size_t cache_bytes = static_cast<size_t>(opt.kv_heads * cache_len * opt.head_dim) * 4;
  const bool sizes_ok = in[0].size >= static_cast<size_t>(width) * 4 &&
                        y.size >= static_cast<size_t>(width) * 4 &&
                        in[1].size >= static_cast<size_t>(opt.rot_dim) * 4 &&
                        in[2].size >= static_cast<size_t>(opt.rot_dim) * 4 &&
                        in[3].size >= cache_bytes && in[4].size >= cache_bytes && in[5].size >= 4;
  if (!sizes_ok) return Fail(ctx, kind, node->where + ": a buffer is smaller than its shape");
  const int32_t pos = *static_cast<const int32_t*>(in[5].data);
  if (pos < 0 || pos >= cache_len) {
    return Fail(ctx, kind,
                "position " + std::to_string(pos) + " is outside the KV cache of " +
                    std::to_string(cache_len) + " slots");
  }
  const int code = tvk_decode_attention(
      static_cast<const float*>(in[0].data), static_cast<const float*>(in[1].data),
      static_cast<const float*>(in[2].data), static_cast<const float*>(in[3].data),
      static_cast<const float*>(in[4].data), pos, opt.heads, opt.kv_heads, opt.head_dim,
      opt.rot_dim, cache_len, opt.scale, static_cast<float*>(y.data));
  if (code != TVK_OK) {
    return Fail(ctx, kind,
                node->where + ": " + tvk_error_string(code) + " (tvk error " +
                    std::to_string(code) + ")");
  }
  return kLiteRtStatusOk;
}

LiteRtStatus Run(void* user_data, size_t num_inputs, const LiteRtTensorBuffer* inputs,
                 size_t num_outputs, LiteRtTensorBuffer* outputs) {
  auto* u = static_cast<OpUserData*>(user_data);
  OpContext* ctx = u->ctx;
  const OpKind kind = u->kind;
  if (kind == kDecodeAttention) {
    if (num_inputs != 6 || num_outputs != 1 || inputs == nullptr || outputs == nullptr) {
      return Fail(ctx, kind, "unexpected number of inputs or outputs");
    }
    return RunAttention(ctx, inputs, outputs);
  }
  const bool unpack = kind == kTernaryUnpack, embed = kind == kPackedEmbedding;
  if (num_inputs != NumInputs(kind) || num_outputs != 1 || inputs == nullptr ||
      outputs == nullptr) {
    return Fail(ctx, kind, "unexpected number of inputs or outputs");
  }
  Operand x{}, w{}, s{}, b{}, y{};
  const LiteRtApi& api = ctx->api();
  bool ok = GetOperand(api, inputs[WeightIndex(kind)], &w) &&
            GetOperand(api, inputs[WeightIndex(kind) + 1], &s) && GetOperand(api, outputs[0], &y);
  if (ok && !unpack) ok = GetOperand(api, inputs[0], &x);  // x, or the ids
  if (ok && IsMatMul(kind)) ok = GetOperand(api, inputs[3], &b);
  if (!ok) return Fail(ctx, kind, "an operand is not a readable host-memory buffer");

  const LiteRtLayout &wl = w.type.layout, &sl = s.type.layout, &yl = y.type.layout;
  if (wl.rank != 2 || sl.rank != 2 || !IsPackedType(w.type.element_type) ||
      s.type.element_type != kLiteRtElementTypeFloat32 ||
      y.type.element_type != kLiteRtElementTypeFloat32) {
    return Fail(ctx, kind, "unexpected weight, scale or output type");
  }
  // N from the scale (2bit-lut pads the weight rows to whole tiles): checked below against the
  // node, and the weight rows against N.
  const int64_t n = sl.dimensions[0], rb = wl.dimensions[1], cols = sl.dimensions[1];
  int64_t m = 1, k = 0;
  const LiteRtLayout& xl = x.type.layout;
  if (unpack) {
    if (yl.rank != 2 || yl.dimensions[0] != n) {
      return Fail(ctx, kind, "output shape " + ShapeString(yl));
    }
    k = yl.dimensions[1];
  } else if (embed) {
    if (x.type.element_type != kLiteRtElementTypeInt32 || yl.rank != xl.rank + 1) {
      return Fail(ctx, kind, "ids " + ShapeString(xl) + " and output " + ShapeString(yl));
    }
    for (unsigned i = 0; i < xl.rank; ++i) {
      if (xl.dimensions[i] != yl.dimensions[i]) {
        return Fail(ctx, kind, "ids " + ShapeString(xl) + " vs output " + ShapeString(yl));
      }
    }
    k = yl.dimensions[xl.rank];
    m = Rows(xl, xl.rank);
  } else {
    if (x.type.element_type != kLiteRtElementTypeFloat32 || xl.rank < 1 ||
        yl.rank != xl.rank || yl.dimensions[yl.rank - 1] != n) {
      return Fail(ctx, kind, "input " + ShapeString(xl) + " and output " + ShapeString(yl) +
                                 " do not fit weights " + ShapeString(wl));
    }
    k = xl.dimensions[xl.rank - 1];
    for (unsigned i = 0; i + 1 < xl.rank; ++i) {
      if (xl.dimensions[i] != yl.dimensions[i]) {
        return Fail(ctx, kind, "input " + ShapeString(xl) + " vs output " + ShapeString(yl));
      }
    }
    m = Rows(xl, xl.rank - 1);
  }
  if (m < 0) return Fail(ctx, kind, "input " + ShapeString(xl) + " is too large");
  const Node* node = ctx->Find(kind, w.data, s.data, n, rb, cols, k);
  if (node == nullptr) {
    return Fail(ctx, kind, "cannot tell which node runs (weights " + ShapeString(wl) + ")");
  }
  const OpOptions& opt = node->opt;
  if (k != opt.k || rb != node->row_bytes || cols != node->scale_cols || n != node->n ||
      wl.dimensions[0] != WeightRows(opt.format, n)) {
    return Fail(ctx, kind, node->where + ": operands do not match the node's options");
  }
  // Sizes of what the kernels read and write (every size < 2^31: products fit int64).
  const size_t out_elems = static_cast<size_t>(unpack ? n * k : embed ? m * k : m * n);
  const size_t in_bytes = static_cast<size_t>(unpack ? 0 : embed ? m * 4 : m * k * 4);
  const bool sizes_ok = w.size >= static_cast<size_t>(WeightRows(opt.format, n) * rb) &&
                        s.size >= static_cast<size_t>(n * cols) * 4 &&
                        y.size >= out_elems * 4 && x.size >= in_bytes &&
                        (!IsMatMul(kind) || !opt.has_bias || b.size >= static_cast<size_t>(n) * 4);
  if (!sizes_ok) return Fail(ctx, kind, node->where + ": a buffer is smaller than its shape");
  if (m == 0) return kLiteRtStatusOk;

  int code;
  const auto* wp = static_cast<const uint8_t*>(w.data);
  const auto* sp = static_cast<const float*>(s.data);
  auto* yp = static_cast<float*>(y.data);
  if (unpack) {
    code = tvk_unpack(opt.format, wp, n, k, sp, cols, yp, ctx->threads());
  } else if (embed) {
    code = tvk_gather(opt.format, static_cast<const int32_t*>(x.data), m, wp, n, k, sp, cols, yp);
  } else {
    const float* bp = opt.has_bias ? static_cast<const float*>(b.data) : nullptr;
    code = tvk_matmul(opt.format, ActMode(opt),
                      static_cast<const float*>(x.data), m, k, wp, n, sp, cols, bp, opt.clip, yp,
                      ctx->threads());
  }
  if (code != TVK_OK) {
    return Fail(ctx, kind,
                node->where + ": " + tvk_error_string(code) + " (tvk error " +
                    std::to_string(code) + ")");
  }
  return kLiteRtStatusOk;
}

}  // namespace

const LiteRtCustomOpKernel& CustomOpKernel() {
  static const LiteRtCustomOpKernel kernel = {Init, GetOutputLayouts, Run, Destroy};
  return kernel;
}

}  // namespace tvr
