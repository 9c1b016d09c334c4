// ternvlm's LiteRT driver (C ABI in litert_api.h): loads libLiteRt.so at run
// time, opens a .tflite with our custom operators registered, binds host
// buffers and runs signatures.
//
// Order of things, and why:
//  - The file is read by us into anonymous memory backed by transparent huge
//    pages (TERNVLM_LOAD=mmap maps the file instead) and handed to
//    LiteRtCreateModelFromBuffer, which verifies the flatbuffer
//    (LiteRtCreateModelFromFile does not: a truncated file could crash it) and
//    reads constants in place, so weights stay 64-byte aligned if the file has
//    them so. Huge pages matter for decode speed: a batch-1 matmul streams its
//    weights once per token, and with 4 KiB file pages the hardware
//    prefetchers stop at every page boundary and the TLB misses every 4 KiB.
//  - Our nodes are read and validated from the model before compiling; the
//    kernels find them again at run time (litert_ops.h).
//  - Options carry the CPU accelerator, its "xnnpack" TOML payload
//    ("num_threads = N") and our four kernels; they stay alive until the
//    compiled model is gone. Teardown: buffers, compiled model, model,
//    options, environment, mapping, op context.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "litert_api.h"
#include "litert_capi.h"
#include "litert_ops.h"

namespace tvr {
namespace {

constexpr int kMaxThreads = 64;  // tvk's limit
constexpr size_t kHeavyWeightBytes = 64 * 1024;  // builtin FC weights that are model work

// ---- libLiteRt.so ------------------------------------------------------------

std::mutex g_lib_mu;

const LiteRtApi* LoadApi(const std::string& path, std::string* err) {
  static auto* loaded = new std::map<std::string, std::unique_ptr<LiteRtApi>>();
  std::lock_guard<std::mutex> lock(g_lib_mu);
  auto it = loaded->find(path);
  if (it != loaded->end()) return it->second.get();
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    *err = "cannot load the LiteRT library " + path + ": " + (why ? why : "unknown error");
    return nullptr;
  }
  auto api = std::make_unique<LiteRtApi>();
#define TVR_RESOLVE(name, ret, params)                                                \
  api->name = reinterpret_cast<ret(*) params>(dlsym(handle, #name));                  \
  if (api->name == nullptr) {                                                         \
    *err = "the LiteRT library " + path + " has no function " #name                   \
           " (ternvlm needs the one of ai-edge-litert 2.3.0)";                        \
    return nullptr; /* the library stays loaded: never unload a half-used runtime */  \
  }
  TVR_LITERT_FUNCTIONS(TVR_RESOLVE)
#undef TVR_RESOLVE
  const LiteRtApi* result = api.get();
  (*loaded)[path] = std::move(api);
  return result;
}

// ---- LiteRT's diagnostics --------------------------------------------------------

// LiteRT reports details on stderr only. While alive, fd 2 goes to a temp file.
class StderrCapture {
 public:
  StderrCapture() {
    std::fflush(stderr);
    file_ = std::tmpfile();
    if (file_ == nullptr) return;
    saved_ = dup(STDERR_FILENO);
    if (saved_ < 0 || dup2(fileno(file_), STDERR_FILENO) < 0) Restore();
  }
  ~StderrCapture() { Finish(); }

  // Stops capturing; returns what was written.
  std::string Finish() {
    std::string text;
    if (file_ == nullptr) return text;
    std::fflush(stderr);
    Restore();
    std::rewind(file_);
    char buf[4096];
    size_t got;
    while ((got = std::fread(buf, 1, sizeof buf, file_)) > 0 && text.size() < (1u << 20)) {
      text.append(buf, got);
    }
    std::fclose(file_);
    file_ = nullptr;
    return text;
  }

 private:
  void Restore() {
    if (saved_ >= 0) {
      dup2(saved_, STDERR_FILENO);
      close(saved_);
      saved_ = -1;
    }
  }
  std::FILE* file_ = nullptr;
  int saved_ = -1;
};

bool IsNoise(const std::string& line) {
  return line.empty() || line.find("INFO:") != std::string::npos ||
         line.rfind("I0", 0) == 0 || line.find("absl::InitializeLog") != std::string::npos ||
         line.find("accelerator could not be loaded") != std::string::npos;
}

// The error lines of captured output, on one line ("" if nothing useful).
std::string Summarize(const std::string& text) {
  std::vector<std::string> lines, errors;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(start, end - start);
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (!IsNoise(line)) {
      lines.push_back(line);
      if (line.find("ERROR") != std::string::npos || line.find("rror") != std::string::npos ||
          line.find("ailed") != std::string::npos) {
        errors.push_back(line);
      }
    }
    start = end + 1;
  }
  const auto& pick = errors.empty() ? lines : errors;
  std::string out;
  for (size_t i = pick.size() > 4 ? pick.size() - 4 : 0; i < pick.size(); ++i) {
    if (!out.empty()) out += " | ";
    out += pick[i];
  }
  if (out.size() > 800) out = out.substr(0, 797) + "...";
  return out;
}

// Writes captured error lines back to stderr (LiteRT also prints INFO lines and
// warnings about the NPU/GPU accelerators it cannot find on every load).
void Replay(const std::string& text) {
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    if (line.find("ERROR") != std::string::npos) std::fprintf(stderr, "%s\n", line.c_str());
    start = end + 1;
  }
}

const char* StatusName(LiteRtStatus s) {
  switch (s) {
    case 1: return "invalid argument";
    case 2: return "memory allocation failure";
    case 3: return "runtime failure";
    case 4: return "missing input tensor";
    case 5: return "unsupported";
    case 6: return "not found";
    case 7: return "timeout";
    case 8: return "wrong version";
    case 9: return "unknown error";
    case 10: return "already exists";
    case 100: return "cancelled";
    case 500: return "file I/O error";
    case 501: return "invalid flatbuffer";
    case 502: return "dynamic loading error";
    case 503: return "serialization error";
    case 504: return "compilation error";
    default: return "error";
  }
}

std::string StatusText(LiteRtStatus s) {
  return "LiteRT status " + std::to_string(s) + ", " + StatusName(s);
}

// Bytes per element of the types a signature may carry (0: not supported).
size_t ElementSize(int type) {
  switch (type) {
    case 1: case 2: case 16: return 4;      // float32, int32, uint32
    case 3: case 6: case 9: return 1;       // uint8, bool, int8
    case 4: case 11: case 13: case 8: return 8;  // int64, float64, uint64, complex64
    case 7: case 10: case 17: case 19: return 2;  // int16, float16, uint16, bfloat16
    case 12: return 16;                     // complex128
    default: return 0;
  }
}

struct Tensor {
  std::string name;
  LiteRtRankedTensorType type{};
  size_t nbytes = 0;
  size_t buffer_bytes = 0;
};

struct Signature {
  std::string name;
  std::vector<Tensor> tensors[2];             // inputs, outputs (graph order)
  std::vector<LiteRtTensorBuffer> buffers[2];  // bound buffers, same order
};

}  // namespace
}  // namespace tvr

struct tvr_model {
  const tvr::LiteRtApi* api = nullptr;
  std::unique_ptr<tvr::OpContext> ops;
  void* map = nullptr;
  size_t map_size = 0;   // bytes mapped (rounded up to huge pages when read)
  size_t data_size = 0;  // bytes of the file
  tvr::LiteRtEnvironment env = nullptr;
  tvr::LiteRtModel model = nullptr;
  tvr::LiteRtOptions options = nullptr;
  tvr::LiteRtCompiledModel compiled = nullptr;
  std::vector<tvr::Signature> sigs;
  std::vector<std::string> foreign_ops;  // custom codes that are not ours
  int num_custom_ops = 0;
  bool builtin_heavy = false;  // big builtin FULLY_CONNECTED or TernaryUnpack ops present
  std::string error;
};

namespace tvr {
namespace {

using Status = std::string;  // "" on success, else the message

void Destroy(tvr_model* m) {
  if (m == nullptr) return;
  if (m->api != nullptr) {
    StderrCapture capture;  // LiteRT logs an INFO line per accelerator it destroys
    const LiteRtApi& api = *m->api;
    for (auto& s : m->sigs) {
      for (auto& list : s.buffers) {
        for (auto& b : list) {
          if (b != nullptr) api.LiteRtDestroyTensorBuffer(b);
          b = nullptr;
        }
      }
    }
    if (m->compiled != nullptr) api.LiteRtDestroyCompiledModel(m->compiled);
    if (m->model != nullptr) api.LiteRtDestroyModel(m->model);
    if (m->options != nullptr) api.LiteRtDestroyOptions(m->options);
    if (m->env != nullptr) api.LiteRtDestroyEnvironment(m->env);
    Replay(capture.Finish());
  }
  if (m->map != nullptr) munmap(m->map, m->map_size);
  delete m;  // the op context goes last: the runtime calls into it until here
}

Status MapFile(tvr_model* m, const char* path) {
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::string("cannot open ") + path + ": " + std::strerror(errno);
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return std::string(path) + " is not a regular file";
  }
  const size_t size = static_cast<size_t>(st.st_size);
  char ident[4] = {0, 0, 0, 0};
  if (size < 8 || pread(fd, ident, 4, 4) != 4 || std::memcmp(ident, "TFL3", 4) != 0) {
    close(fd);
    return std::string(path) + " is not a .tflite flatbuffer (no TFL3 identifier)";
  }
  const char* how = std::getenv("TERNVLM_LOAD");
  if (how != nullptr && std::strcmp(how, "mmap") == 0) {
    void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return std::string("cannot map ") + path + ": " + std::strerror(errno);
    m->map = p;
    m->map_size = m->data_size = size;
    return "";
  }
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t room = (size + kHuge - 1) / kHuge * kHuge;
  void* p = mmap(nullptr, room, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    close(fd);
    return std::string("no memory for ") + path + " (" + std::to_string(size) + " bytes)";
  }
#ifdef MADV_HUGEPAGE
  // A hint (without THP the read still works), on the whole 2 MiB pages of the file only: a huge
  // page over the file's last partial 2 MiB would make up to 2 MiB of nothing resident. (The
  // room stays a multiple of 2 MiB: the kernel places such mappings on a 2 MiB boundary.)
  if (size >= kHuge) madvise(p, size / kHuge * kHuge, MADV_HUGEPAGE);
#endif
  size_t done = 0;
  while (done < size) {
    const ssize_t got = pread(fd, static_cast<char*>(p) + done, size - done, done);
    if (got <= 0) {
      if (got < 0 && errno == EINTR) continue;
      const std::string why = got < 0 ? std::strerror(errno) : "unexpected end of file";
      close(fd);
      munmap(p, room);
      return std::string("cannot read ") + path + ": " + why;
    }
    done += static_cast<size_t>(got);
  }
  close(fd);
  mprotect(p, room, PROT_READ);  // the model is read-only, as a file mapping would be
  m->map = p;
  m->map_size = room;
  m->data_size = size;
  return "";
}

TensorDesc Describe(const LiteRtApi& api, LiteRtTensor t) {
  TensorDesc d;
  const char* name = nullptr;
  if (api.LiteRtGetTensorName(t, &name) == kLiteRtStatusOk && name != nullptr) d.name = name;
  int type_id = -1;
  d.ranked = api.LiteRtGetTensorTypeId(t, &type_id) == kLiteRtStatusOk &&
             type_id == kLiteRtRankedTensorType &&
             api.LiteRtGetRankedTensorType(t, &d.type) == kLiteRtStatusOk;
  LiteRtWeights w = nullptr;
  const void* data = nullptr;
  size_t bytes = 0;
  if (api.LiteRtGetTensorWeights(t, &w) == kLiteRtStatusOk && w != nullptr &&
      api.LiteRtGetWeightsBytes(w, &data, &bytes) == kLiteRtStatusOk && bytes > 0) {
    d.data = data;
    d.bytes = bytes;
  }
  return d;
}

// Reads and validates our nodes; notes custom ops that are not ours.
Status ReadNodes(tvr_model* m) {
  const LiteRtApi& api = *m->api;
  // subgraph -> the first signature that runs it, for messages
  std::map<LiteRtSubgraph, std::string> sig_of;
  LiteRtParamIndex num_sigs = 0;
  if (api.LiteRtGetNumModelSignatures(m->model, &num_sigs) == kLiteRtStatusOk) {
    for (LiteRtParamIndex i = num_sigs; i-- > 0;) {
      LiteRtSignature sig = nullptr;
      LiteRtSubgraph sg = nullptr;
      const char* key = nullptr;
      if (api.LiteRtGetModelSignature(m->model, i, &sig) == kLiteRtStatusOk &&
          api.LiteRtGetSignatureSubgraph(sig, &sg) == kLiteRtStatusOk &&
          api.LiteRtGetSignatureKey(sig, &key) == kLiteRtStatusOk && key != nullptr) {
        sig_of[sg] = key;
      }
    }
  }
  LiteRtParamIndex num_subgraphs = 0;
  if (api.LiteRtGetNumModelSubgraphs(m->model, &num_subgraphs) != kLiteRtStatusOk) {
    return "cannot list the model's subgraphs";
  }
  std::vector<Node> nodes;
  for (LiteRtParamIndex g = 0; g < num_subgraphs; ++g) {
    LiteRtSubgraph sg = nullptr;
    LiteRtParamIndex num_ops = 0;
    if (api.LiteRtGetModelSubgraph(m->model, g, &sg) != kLiteRtStatusOk ||
        api.LiteRtGetNumSubgraphOps(sg, &num_ops) != kLiteRtStatusOk) {
      return "cannot read subgraph " + std::to_string(g);
    }
    const std::string graph = sig_of.count(sg) ? "signature '" + sig_of[sg] + "'"
                                               : "subgraph " + std::to_string(g);
    for (LiteRtParamIndex o = 0; o < num_ops; ++o) {
      LiteRtOp op = nullptr;
      int code = -1;
      const char* custom = nullptr;
      if (api.LiteRtGetSubgraphOp(sg, o, &op) != kLiteRtStatusOk ||
          api.LiteRtGetOpCode(op, &code) != kLiteRtStatusOk) {
        continue;
      }
      if (code == kLiteRtOpCodeTflFullyConnected && !m->builtin_heavy) {
        // A builtin layer with real weights (not a rotary 64 x 64): XNNPACK does model work.
        LiteRtTensor wt = nullptr;
        if (api.LiteRtGetOpInput(op, 1, &wt) == kLiteRtStatusOk && wt != nullptr &&
            Describe(api, wt).bytes >= kHeavyWeightBytes) {
          m->builtin_heavy = true;
        }
      }
      if (code != kLiteRtOpCodeTflCustom ||
          api.LiteRtGetCustomCode(op, &custom) != kLiteRtStatusOk || custom == nullptr) {
        continue;
      }
      int kind = 0;
      while (kind < kNumOps && std::strcmp(custom, kOpNames[kind]) != 0) ++kind;
      if (kind == kNumOps) {
        if (std::find(m->foreign_ops.begin(), m->foreign_ops.end(), custom) ==
            m->foreign_ops.end()) {
          m->foreign_ops.push_back(custom);
        }
        continue;
      }
      const std::string where =
          std::string(kOpNames[kind]) + " node " + std::to_string(o) + " of " + graph;
      const uint8_t* opt_data = nullptr;
      int32_t opt_size = 0;
      if (api.LiteRtGetCustomOptions(op, &opt_data, &opt_size) != kLiteRtStatusOk) {
        opt_data = nullptr;
        opt_size = 0;
      }
      OpOptions opt;
      Status e = ParseOptions(static_cast<OpKind>(kind), opt_data,
                              static_cast<size_t>(std::max<int32_t>(opt_size, 0)), &opt);
      if (!e.empty()) return where + ": " + e;
      std::vector<TensorDesc> ins, outs;
      LiteRtParamIndex n_in = 0, n_out = 0;
      if (api.LiteRtGetNumOpInputs(op, &n_in) != kLiteRtStatusOk ||
          api.LiteRtGetNumOpOutputs(op, &n_out) != kLiteRtStatusOk) {
        return where + ": cannot read its operands";
      }
      for (LiteRtParamIndex i = 0; i < n_in; ++i) {
        LiteRtTensor t = nullptr;
        if (api.LiteRtGetOpInput(op, i, &t) != kLiteRtStatusOk || t == nullptr) {
          return where + ": input " + std::to_string(i) + " is missing";
        }
        ins.push_back(Describe(api, t));
      }
      for (LiteRtParamIndex i = 0; i < n_out; ++i) {
        LiteRtTensor t = nullptr;
        if (api.LiteRtGetOpOutput(op, i, &t) != kLiteRtStatusOk || t == nullptr) {
          return where + ": output " + std::to_string(i) + " is missing";
        }
        outs.push_back(Describe(api, t));
      }
      Node node;
      e = ValidateNode(static_cast<OpKind>(kind), opt, ins, outs, &node);
      if (!e.empty()) return where + ": " + e;
      node.where = where;
      nodes.push_back(std::move(node));
    }
  }
  m->num_custom_ops = static_cast<int>(nodes.size());
  // TernaryUnpack feeds builtin FULLY_CONNECTED: XNNPACK does the work
  for (const Node& n : nodes) m->builtin_heavy = m->builtin_heavy || n.kind == kTernaryUnpack;
  return m->ops->AddNodes(std::move(nodes));
}

Status MakeOptions(tvr_model* m, int threads) {
  const LiteRtApi& api = *m->api;
  LiteRtStatus s = api.LiteRtCreateOptions(&m->options);
  if (s != kLiteRtStatusOk) return "cannot create options (" + StatusText(s) + ")";
  s = api.LiteRtSetOptionsHardwareAccelerators(m->options, kLiteRtHwAcceleratorCpu);
  if (s != kLiteRtStatusOk) return "cannot select the CPU accelerator (" + StatusText(s) + ")";
  // The CPU accelerator's options: a TOML C string owned by the opaque options.
  // Threads of the builtin ops (XNNPACK). With our matmuls in the model they get one: both thread
  // pools spin between jobs, and two spinning pools on the same cores starve each other (2
  // cores, smolvlm-256m ternary decode: 210 -> 268 tok/s; image encoding 840 -> 1040 ms, its
  // attention being builtin). TERNVLM_XNNPACK_THREADS=N overrides.
  int xnn_threads = m->builtin_heavy || m->num_custom_ops == 0 ? threads : 1;
  if (const char* v = std::getenv("TERNVLM_XNNPACK_THREADS")) {
    xnn_threads = std::max(1, std::min(threads, std::atoi(v)));
  }
  const std::string toml = "num_threads = " + std::to_string(xnn_threads) + "\n";
  char* payload = static_cast<char*>(std::malloc(toml.size() + 1));
  if (payload == nullptr) return "out of memory";
  std::memcpy(payload, toml.c_str(), toml.size() + 1);
  LiteRtOpaqueOptions cpu = nullptr;
  s = api.LiteRtCreateOpaqueOptions("xnnpack", payload, std::free, &cpu);
  if (s != kLiteRtStatusOk) {
    std::free(payload);
    return "cannot create the CPU options (" + StatusText(s) + ")";
  }
  s = api.LiteRtAddOpaqueOptions(m->options, cpu);
  if (s != kLiteRtStatusOk) {
    api.LiteRtDestroyOpaqueOptions(cpu);
    return "cannot add the CPU options (" + StatusText(s) + ")";
  }
  for (int k = 0; k < kNumOps; ++k) {
    s = api.LiteRtAddCustomOpKernelOption(m->options, kOpNames[k], 1, &CustomOpKernel(),
                                          m->ops->user_data(static_cast<OpKind>(k)));
    if (s != kLiteRtStatusOk) {
      return std::string("cannot register ") + kOpNames[k] + " (" + StatusText(s) + ")";
    }
  }
  return "";
}

Status ReadSignatures(tvr_model* m) {
  const LiteRtApi& api = *m->api;
  LiteRtParamIndex num = 0;
  if (api.LiteRtGetNumModelSignatures(m->model, &num) != kLiteRtStatusOk) {
    return "cannot list the model's signatures";
  }
  if (num == 0) return "the model has no signatures";
  for (LiteRtParamIndex i = 0; i < num; ++i) {
    LiteRtSignature sig = nullptr;
    const char* key = nullptr;
    if (api.LiteRtGetModelSignature(m->model, i, &sig) != kLiteRtStatusOk ||
        api.LiteRtGetSignatureKey(sig, &key) != kLiteRtStatusOk || key == nullptr) {
      return "cannot read signature " + std::to_string(i);
    }
    Signature s;
    s.name = key;
    for (int out = 0; out < 2; ++out) {
      LiteRtParamIndex count = 0;
      auto count_fn = out ? api.LiteRtGetNumSignatureOutputs : api.LiteRtGetNumSignatureInputs;
      auto name_fn = out ? api.LiteRtGetSignatureOutputName : api.LiteRtGetSignatureInputName;
      auto tensor_fn = out ? api.LiteRtGetSignatureOutputTensorByIndex
                           : api.LiteRtGetSignatureInputTensorByIndex;
      auto req_fn = out ? api.LiteRtGetCompiledModelOutputBufferRequirements
                        : api.LiteRtGetCompiledModelInputBufferRequirements;
      if (count_fn(sig, &count) != kLiteRtStatusOk) {
        return "cannot read signature '" + s.name + "'";
      }
      const char* role = out ? "output" : "input";
      for (LiteRtParamIndex j = 0; j < count; ++j) {
        const char* name = nullptr;
        LiteRtTensor tensor = nullptr;
        if (name_fn(sig, j, &name) != kLiteRtStatusOk || name == nullptr ||
            tensor_fn(sig, j, &tensor) != kLiteRtStatusOk) {
          return "cannot read " + std::string(role) + " " + std::to_string(j) + " of '" +
                 s.name + "'";
        }
        Tensor t;
        t.name = name;
        const TensorDesc d = Describe(api, tensor);
        const std::string what = std::string(role) + " '" + t.name + "' of '" + s.name + "'";
        if (!d.ranked) return what + " has no static shape";
        t.type = d.type;
        const size_t esize = ElementSize(t.type.element_type);
        if (esize == 0) {
          return what + " has element type " + std::to_string(t.type.element_type) +
                 ", which ternvlm does not support";
        }
        size_t count_el = 1;
        for (unsigned r = 0; r < t.type.layout.rank; ++r) {
          if (t.type.layout.dimensions[r] < 0) return what + " has a dynamic shape";
          count_el *= static_cast<size_t>(t.type.layout.dimensions[r]);
        }
        t.nbytes = count_el * esize;
        LiteRtTensorBufferRequirements req = nullptr;
        size_t need = 0;
        if (req_fn(m->compiled, i, j, &req) == kLiteRtStatusOk && req != nullptr &&
            api.LiteRtGetTensorBufferRequirementsBufferSize(req, &need) == kLiteRtStatusOk) {
          t.buffer_bytes = std::max(need, t.nbytes);
        } else {
          t.buffer_bytes = t.nbytes;
        }
        s.tensors[out].push_back(std::move(t));
      }
      s.buffers[out].assign(count, nullptr);
    }
    m->sigs.push_back(std::move(s));
  }
  return "";
}

Status Open(tvr_model* m, const char* model_path, int threads) {
  Status e = MapFile(m, model_path);
  if (!e.empty()) return e;
  const LiteRtApi& api = *m->api;
  StderrCapture capture;
  LiteRtStatus s = api.LiteRtCreateEnvironment(0, nullptr, &m->env);
  if (s != kLiteRtStatusOk) {
    return "cannot create the LiteRT environment (" + StatusText(s) + ")";
  }
  s = api.LiteRtCreateModelFromBuffer(m->env, m->map, m->data_size, &m->model);
  if (s != kLiteRtStatusOk) {
    m->model = nullptr;
    const std::string details = Summarize(capture.Finish());
    return std::string(model_path) + " is not a valid .tflite model (" + StatusText(s) + ")" +
           (details.empty() ? "" : ": " + details);
  }
  e = ReadNodes(m);
  if (!e.empty()) return std::string(model_path) + ": " + e;
  e = MakeOptions(m, threads);
  if (!e.empty()) return e;
  s = api.LiteRtCreateCompiledModel(m->env, m->model, m->options, &m->compiled);
  const std::string text = capture.Finish();
  if (s != kLiteRtStatusOk) {
    m->compiled = nullptr;
    if (m->ops->failed()) return std::string(model_path) + ": " + m->ops->error();
    const std::string details = Summarize(text);
    return "LiteRT cannot compile " + std::string(model_path) + " (" + StatusText(s) + ")" +
           (details.empty() ? "" : ": " + details);
  }
  if (m->ops->failed()) return std::string(model_path) + ": " + m->ops->error();
  Replay(text);
  return ReadSignatures(m);
}

bool ValidTensor(const tvr_model* m, int sig, int is_output, int index) {
  return m != nullptr && sig >= 0 && sig < static_cast<int>(m->sigs.size()) &&
         (is_output == 0 || is_output == 1) && index >= 0 &&
         index < static_cast<int>(m->sigs[sig].tensors[is_output].size());
}

int Error(tvr_model* m, std::string message) {
  if (m != nullptr) m->error = std::move(message);
  return -1;
}

}  // namespace
}  // namespace tvr

extern "C" {

tvr_model* tvr_open(const char* litert_path, const char* model_path, int threads, char* err,
                    size_t err_size) {
  std::string e;
  tvr_model* m = nullptr;
  if (litert_path == nullptr || model_path == nullptr) {
    e = "no LiteRT library or model path given";
  } else if (threads < 1 || threads > tvr::kMaxThreads) {
    e = "threads must be in [1, " + std::to_string(tvr::kMaxThreads) + "], got " +
        std::to_string(threads);
  } else {
    m = new tvr_model();
    m->api = tvr::LoadApi(litert_path, &e);
    if (m->api != nullptr) {
      m->ops = std::make_unique<tvr::OpContext>(m->api, threads);
      e = tvr::Open(m, model_path, threads);
    }
  }
  if (e.empty()) return m;
  tvr::Destroy(m);
  if (err != nullptr && err_size > 0) {
    std::snprintf(err, err_size, "%s", e.c_str());
  }
  return nullptr;
}

void tvr_close(tvr_model* model) { tvr::Destroy(model); }

const char* tvr_last_error(const tvr_model* model) {
  return model == nullptr ? "no model" : model->error.c_str();
}

int tvr_num_signatures(const tvr_model* model) {
  return model == nullptr ? -1 : static_cast<int>(model->sigs.size());
}

const char* tvr_signature_name(const tvr_model* model, int signature) {
  if (model == nullptr || signature < 0 || signature >= static_cast<int>(model->sigs.size())) {
    return nullptr;
  }
  return model->sigs[signature].name.c_str();
}

int tvr_num_tensors(const tvr_model* model, int signature, int is_output) {
  if (model == nullptr || signature < 0 || signature >= static_cast<int>(model->sigs.size()) ||
      (is_output != 0 && is_output != 1)) {
    return -1;
  }
  return static_cast<int>(model->sigs[signature].tensors[is_output].size());
}

int tvr_tensor_info(const tvr_model* model, int signature, int is_output, int index,
                    const char** name, int* dtype, int* rank, int64_t* dims, size_t* nbytes,
                    size_t* buffer_bytes) {
  if (!tvr::ValidTensor(model, signature, is_output, index)) return -1;
  const tvr::Tensor& t = model->sigs[signature].tensors[is_output][index];
  if (name != nullptr) *name = t.name.c_str();
  if (dtype != nullptr) *dtype = t.type.element_type;
  if (rank != nullptr) *rank = static_cast<int>(t.type.layout.rank);
  if (dims != nullptr) {
    for (unsigned r = 0; r < t.type.layout.rank; ++r) dims[r] = t.type.layout.dimensions[r];
  }
  if (nbytes != nullptr) *nbytes = t.nbytes;
  if (buffer_bytes != nullptr) *buffer_bytes = t.buffer_bytes;
  return 0;
}

int tvr_bind(tvr_model* model, int signature, int is_output, int index, void* data,
             size_t size) {
  if (!tvr::ValidTensor(model, signature, is_output, index)) {
    return tvr::Error(model, "no such signature tensor");
  }
  tvr::Signature& s = model->sigs[signature];
  const tvr::Tensor& t = s.tensors[is_output][index];
  const std::string what =
      std::string(is_output ? "output" : "input") + " '" + t.name + "' of '" + s.name + "'";
  if (data == nullptr || reinterpret_cast<uintptr_t>(data) % tvr::kLiteRtHostAlignment != 0) {
    return tvr::Error(model, "memory bound to " + what + " must be 64-byte aligned");
  }
  if (size < t.buffer_bytes) {
    return tvr::Error(model, "memory bound to " + what + " holds " + std::to_string(size) +
                                 " bytes, it needs " + std::to_string(t.buffer_bytes));
  }
  tvr::LiteRtTensorBuffer buffer = nullptr;
  const tvr::LiteRtStatus st =
      model->api->LiteRtCreateTensorBufferFromHostMemory(&t.type, data, size, nullptr, &buffer);
  if (st != tvr::kLiteRtStatusOk || buffer == nullptr) {
    return tvr::Error(model, "cannot wrap memory for " + what + " (" + tvr::StatusText(st) + ")");
  }
  tvr::LiteRtTensorBuffer& slot = s.buffers[is_output][index];
  if (slot != nullptr) model->api->LiteRtDestroyTensorBuffer(slot);
  slot = buffer;
  return 0;
}

int tvr_run(tvr_model* model, int signature) {
  if (model == nullptr) return -1;
  if (signature < 0 || signature >= static_cast<int>(model->sigs.size())) {
    return tvr::Error(model, "no signature " + std::to_string(signature));
  }
  tvr::Signature& s = model->sigs[signature];
  for (int out = 0; out < 2; ++out) {
    for (size_t j = 0; j < s.buffers[out].size(); ++j) {
      if (s.buffers[out][j] == nullptr) {
        return tvr::Error(model, std::string(out ? "output '" : "input '") +
                                     s.tensors[out][j].name + "' of '" + s.name +
                                     "' has no memory bound");
      }
    }
  }
  const tvr::LiteRtApi& api = *model->api;
  auto run = [&] {
    model->ops->ClearError();
    return api.LiteRtRunCompiledModel(model->compiled, static_cast<size_t>(signature),
                                      s.buffers[0].size(), s.buffers[0].data(),
                                      s.buffers[1].size(), s.buffers[1].data());
  };
  tvr::LiteRtStatus st = run();
  if (st == tvr::kLiteRtStatusOk && !model->ops->failed()) {
    model->error.clear();
    return 0;
  }
  std::string details;
  if (!model->ops->failed()) {
    // LiteRT printed the reason on stderr: run once more to capture it.
    tvr::StderrCapture capture;
    st = run();
    details = tvr::Summarize(capture.Finish());
  }
  std::string msg = "running signature '" + s.name + "' failed";
  if (model->ops->failed()) {
    msg += ": " + model->ops->error();
  } else {
    msg += " (" + tvr::StatusText(st) + ")";
    if (!details.empty()) msg += ": " + details;
    if (!model->foreign_ops.empty()) {
      msg += "; the model uses custom ops that ternvlm does not provide:";
      for (size_t i = 0; i < model->foreign_ops.size(); ++i) {
        msg += (i ? ", " : " ") + model->foreign_ops[i];
      }
    }
  }
  return tvr::Error(model, msg);
}

int tvr_num_custom_ops(const tvr_model* model) {
  return model == nullptr ? -1 : model->num_custom_ops;
}

}  // extern "C"
