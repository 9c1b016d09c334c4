// The few LiteRT C API types and functions the ternvlm driver uses.
//
// The ai-edge-litert wheel ships libLiteRt.so but no C headers, so these are
// our own declarations, written from the public API of google-ai-edge/LiteRT
// (litert/c/*.h at commit f67457790c9c, which matches ai-edge-litert 2.3.0).
// Nothing here links against LiteRT: the driver dlopen()s libLiteRt.so at run
// time and resolves every function below with dlsym() into LiteRtApi.
//
// Layouts that cross the ABI are pinned with static_asserts (upstream asserts
// the same sizes and offsets on 64-bit targets).
#ifndef TERNVLM_KERNELS_LITERT_CAPI_H_
#define TERNVLM_KERNELS_LITERT_CAPI_H_

#include <cstddef>
#include <cstdint>

namespace tvr {

// Opaque handles (pointers to runtime-owned objects).
using LiteRtEnvironment = struct LiteRtEnvironmentT*;
using LiteRtModel = struct LiteRtModelT*;
using LiteRtSubgraph = struct LiteRtSubgraphT*;
using LiteRtSignature = struct LiteRtSignatureT*;
using LiteRtOp = struct LiteRtOpT*;
using LiteRtTensor = struct LiteRtTensorT*;
using LiteRtWeights = struct LiteRtWeightsT*;
using LiteRtOptions = struct LiteRtOptionsT*;
using LiteRtOpaqueOptions = struct LiteRtOpaqueOptionsT*;
using LiteRtCompiledModel = struct LiteRtCompiledModelT*;
using LiteRtTensorBuffer = struct LiteRtTensorBufferT*;
using LiteRtTensorBufferRequirements = struct LiteRtTensorBufferRequirementsT*;
using LiteRtParamIndex = size_t;

// LiteRtStatus is a C enum with non-negative values: returned in a 32-bit
// register like int.
using LiteRtStatus = int;
constexpr LiteRtStatus kLiteRtStatusOk = 0;

// LiteRtHwAccelerators (bit set).
constexpr int kLiteRtHwAcceleratorCpu = 1 << 0;

// LiteRtOpCode: kLiteRtOpCodeTflCustom == kTfLiteBuiltinCustom.
constexpr int kLiteRtOpCodeTflCustom = 32;
constexpr int kLiteRtOpCodeTflFullyConnected = 9;  // kTfLiteBuiltinFullyConnected

// LiteRtTensorTypeId.
constexpr int kLiteRtRankedTensorType = 0;

// LiteRtTensorBufferType.
constexpr int kLiteRtTensorBufferTypeHostMemory = 1;

// LiteRtElementType (the kTfLite* type codes).
enum : int {
  kLiteRtElementTypeFloat32 = 1,
  kLiteRtElementTypeInt32 = 2,
  kLiteRtElementTypeUInt8 = 3,
  kLiteRtElementTypeInt8 = 9,
};

constexpr int kLiteRtTensorMaxRank = 8;      // LITERT_TENSOR_MAX_RANK
constexpr size_t kLiteRtHostAlignment = 64;  // LITERT_HOST_MEMORY_BUFFER_ALIGNMENT

struct LiteRtLayout {
  unsigned int rank : 7;
  unsigned int has_strides : 1;
  int32_t dimensions[kLiteRtTensorMaxRank];  // < 0: dynamic
  uint32_t strides[kLiteRtTensorMaxRank];    // only if has_strides
};
static_assert(sizeof(LiteRtLayout) == 68, "LiteRtLayout size");
static_assert(offsetof(LiteRtLayout, dimensions) == 4, "LiteRtLayout.dimensions");
static_assert(offsetof(LiteRtLayout, strides) == 36, "LiteRtLayout.strides");

struct LiteRtRankedTensorType {
  int element_type;  // LiteRtElementType
  LiteRtLayout layout;
};
static_assert(sizeof(LiteRtRankedTensorType) == 72, "LiteRtRankedTensorType size");
static_assert(offsetof(LiteRtRankedTensorType, layout) == 4, "LiteRtRankedTensorType.layout");

// litert_custom_op_kernel.h. The runtime ignores the statuses these return.
struct LiteRtCustomOpKernel {
  LiteRtStatus (*Init)(void* user_data, const void* init_data, size_t init_data_size);
  LiteRtStatus (*GetOutputLayouts)(void* user_data, size_t num_inputs,
                                   const LiteRtLayout* input_layouts, size_t num_outputs,
                                   LiteRtLayout* output_layouts);
  LiteRtStatus (*Run)(void* user_data, size_t num_inputs, const LiteRtTensorBuffer* inputs,
                      size_t num_outputs, LiteRtTensorBuffer* outputs);
  LiteRtStatus (*Destroy)(void* user_data);
};
static_assert(sizeof(LiteRtCustomOpKernel) == 4 * sizeof(void*), "LiteRtCustomOpKernel size");

// X(name, return type, parameter list): every function the driver resolves.
#define TVR_LITERT_FUNCTIONS(X)                                                              \
  /* litert_environment.h (options: const LiteRtEnvOption*, none passed) */                \
  X(LiteRtCreateEnvironment, LiteRtStatus, (int, const void*, LiteRtEnvironment*))          \
  X(LiteRtDestroyEnvironment, void, (LiteRtEnvironment))                                    \
  /* litert_model.h */                                                                      \
  X(LiteRtCreateModelFromBuffer, LiteRtStatus,                                              \
    (LiteRtEnvironment, const void*, size_t, LiteRtModel*))                                 \
  X(LiteRtDestroyModel, void, (LiteRtModel))                                                \
  X(LiteRtGetNumModelSignatures, LiteRtStatus, (LiteRtModel, LiteRtParamIndex*))            \
  X(LiteRtGetModelSignature, LiteRtStatus, (LiteRtModel, LiteRtParamIndex, LiteRtSignature*)) \
  X(LiteRtGetSignatureKey, LiteRtStatus, (LiteRtSignature, const char**))                   \
  X(LiteRtGetSignatureSubgraph, LiteRtStatus, (LiteRtSignature, LiteRtSubgraph*))           \
  X(LiteRtGetNumSignatureInputs, LiteRtStatus, (LiteRtSignature, LiteRtParamIndex*))        \
  X(LiteRtGetSignatureInputName, LiteRtStatus,                                              \
    (LiteRtSignature, LiteRtParamIndex, const char**))                                      \
  X(LiteRtGetSignatureInputTensorByIndex, LiteRtStatus,                                     \
    (LiteRtSignature, LiteRtParamIndex, LiteRtTensor*))                                     \
  X(LiteRtGetNumSignatureOutputs, LiteRtStatus, (LiteRtSignature, LiteRtParamIndex*))       \
  X(LiteRtGetSignatureOutputName, LiteRtStatus,                                             \
    (LiteRtSignature, LiteRtParamIndex, const char**))                                      \
  X(LiteRtGetSignatureOutputTensorByIndex, LiteRtStatus,                                    \
    (LiteRtSignature, LiteRtParamIndex, LiteRtTensor*))                                     \
  X(LiteRtGetNumModelSubgraphs, LiteRtStatus, (LiteRtModel, LiteRtParamIndex*))             \
  X(LiteRtGetModelSubgraph, LiteRtStatus, (LiteRtModel, LiteRtParamIndex, LiteRtSubgraph*)) \
  X(LiteRtGetNumSubgraphOps, LiteRtStatus, (LiteRtSubgraph, LiteRtParamIndex*))             \
  X(LiteRtGetSubgraphOp, LiteRtStatus, (LiteRtSubgraph, LiteRtParamIndex, LiteRtOp*))       \
  X(LiteRtGetOpCode, LiteRtStatus, (LiteRtOp, int*))                                        \
  X(LiteRtGetCustomCode, LiteRtStatus, (LiteRtOp, const char**))                            \
  X(LiteRtGetCustomOptions, LiteRtStatus, (LiteRtOp, const uint8_t**, int32_t*))            \
  X(LiteRtGetNumOpInputs, LiteRtStatus, (LiteRtOp, LiteRtParamIndex*))                      \
  X(LiteRtGetOpInput, LiteRtStatus, (LiteRtOp, LiteRtParamIndex, LiteRtTensor*))            \
  X(LiteRtGetNumOpOutputs, LiteRtStatus, (LiteRtOp, LiteRtParamIndex*))                     \
  X(LiteRtGetOpOutput, LiteRtStatus, (LiteRtOp, LiteRtParamIndex, LiteRtTensor*))           \
  X(LiteRtGetTensorName, LiteRtStatus, (LiteRtTensor, const char**))                        \
  X(LiteRtGetTensorTypeId, LiteRtStatus, (LiteRtTensor, int*))                              \
  X(LiteRtGetRankedTensorType, LiteRtStatus, (LiteRtTensor, LiteRtRankedTensorType*))      \
  X(LiteRtGetTensorWeights, LiteRtStatus, (LiteRtTensor, LiteRtWeights*))                   \
  X(LiteRtGetWeightsBytes, LiteRtStatus, (LiteRtWeights, const void**, size_t*))            \
  /* litert_options.h, litert_opaque_options.h */                                           \
  X(LiteRtCreateOptions, LiteRtStatus, (LiteRtOptions*))                                    \
  X(LiteRtDestroyOptions, void, (LiteRtOptions))                                            \
  X(LiteRtSetOptionsHardwareAccelerators, LiteRtStatus, (LiteRtOptions, int))               \
  X(LiteRtCreateOpaqueOptions, LiteRtStatus,                                                \
    (const char*, void*, void (*)(void*), LiteRtOpaqueOptions*))                            \
  X(LiteRtDestroyOpaqueOptions, void, (LiteRtOpaqueOptions))                                \
  X(LiteRtAddOpaqueOptions, LiteRtStatus, (LiteRtOptions, LiteRtOpaqueOptions))             \
  X(LiteRtAddCustomOpKernelOption, LiteRtStatus,                                            \
    (LiteRtOptions, const char*, int, const LiteRtCustomOpKernel*, void*))                  \
  /* litert_compiled_model.h */                                                             \
  X(LiteRtCreateCompiledModel, LiteRtStatus,                                                \
    (LiteRtEnvironment, LiteRtModel, LiteRtOptions, LiteRtCompiledModel*))                  \
  X(LiteRtDestroyCompiledModel, void, (LiteRtCompiledModel))                                \
  X(LiteRtGetCompiledModelInputBufferRequirements, LiteRtStatus,                            \
    (LiteRtCompiledModel, LiteRtParamIndex, LiteRtParamIndex,                               \
     LiteRtTensorBufferRequirements*))                                                      \
  X(LiteRtGetCompiledModelOutputBufferRequirements, LiteRtStatus,                           \
    (LiteRtCompiledModel, LiteRtParamIndex, LiteRtParamIndex,                               \
     LiteRtTensorBufferRequirements*))                                                      \
  X(LiteRtRunCompiledModel, LiteRtStatus,                                                   \
    (LiteRtCompiledModel, LiteRtParamIndex, size_t, LiteRtTensorBuffer*, size_t,            \
     LiteRtTensorBuffer*))                                                                  \
  /* litert_tensor_buffer.h, litert_tensor_buffer_requirements.h */                         \
  X(LiteRtGetTensorBufferRequirementsBufferSize, LiteRtStatus,                              \
    (LiteRtTensorBufferRequirements, size_t*))                                              \
  X(LiteRtCreateTensorBufferFromHostMemory, LiteRtStatus,                                   \
    (const LiteRtRankedTensorType*, void*, size_t, void (*)(void*), LiteRtTensorBuffer*))   \
  X(LiteRtDestroyTensorBuffer, void, (LiteRtTensorBuffer))                                  \
  X(LiteRtGetTensorBufferType, LiteRtStatus, (LiteRtTensorBuffer, int*))                    \
  X(LiteRtGetTensorBufferTensorType, LiteRtStatus,                                          \
    (LiteRtTensorBuffer, LiteRtRankedTensorType*))                                          \
  X(LiteRtGetTensorBufferSize, LiteRtStatus, (LiteRtTensorBuffer, size_t*))                 \
  X(LiteRtGetTensorBufferHostMemory, LiteRtStatus, (LiteRtTensorBuffer, void**))

struct LiteRtApi {
#define TVR_DECLARE(name, ret, params) ret(*name) params = nullptr;
  TVR_LITERT_FUNCTIONS(TVR_DECLARE)
#undef TVR_DECLARE
};

}  // namespace tvr

#endif  // TERNVLM_KERNELS_LITERT_CAPI_H_
