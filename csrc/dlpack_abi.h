// The DLPack data-exchange ABI, version 1.x: the structs that travel inside a "dltensor" or
// "dltensor_versioned" PyCapsule. Written here from the published specification
// (dmlc/dlpack, include/dlpack/dlpack.h); only the layout matters, so only what we read is named.
// Nothing in this file allocates, frees or interprets memory.
#pragma once

#include <cstdint>

namespace dlpack_abi {

// Device types we recognise; the numeric values are fixed by the standard.
enum DeviceType : int32_t {
  kCPU = 1,
  kCUDA = 2,
  kCUDAHost = 3,  // pinned host memory: readable by the CPU like ordinary memory
  kCUDAManaged = 13,
};

// Type codes; the numeric values are fixed by the standard.
enum TypeCode : uint8_t {
  kInt = 0,
  kUInt = 1,
  kFloat = 2,
  kOpaqueHandle = 3,
  kBfloat = 4,
  kComplex = 5,
  kBool = 6,
};

struct Version {
  uint32_t major;
  uint32_t minor;
};

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
};

// Legacy (unversioned) capsule payload, capsule name "dltensor".
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

// Versioned payload (DLPack >= 1.0), capsule name "dltensor_versioned".
struct ManagedTensorVersioned {
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned* self);
  uint64_t flags;
  Tensor dl_tensor;
};

// ManagedTensorVersioned::flags bits.
constexpr uint64_t kFlagReadOnly = 1ULL << 0;  // the consumer must not write through it
constexpr uint64_t kFlagIsCopied = 1ULL << 1;  // the producer made a copy for this export

}  // namespace dlpack_abi
