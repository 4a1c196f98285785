// Device queries for the bindings. "No driver" and "no device" both mean zero devices here:
// a CPU-only machine must be able to ask without anything breaking.
#include <mutex>
#include <vector>

#include "cuda_common.cuh"
#include "kernels.h"

namespace kernels {

bool cuda_built() { return true; }

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

void cuda_set_device(int device) { cuda::check(cudaSetDevice(device), "cudaSetDevice"); }

int cuda_get_device() {
  int device = 0;
  cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

namespace cuda {

int multiprocessor_count() {
  static std::mutex mutex;
  static std::vector<int> cached;
  const int device = cuda_get_device();
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(cached.size()) <= device) cached.resize(device + 1, 0);
  if (cached[device] == 0) {
    check(cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute(MultiProcessorCount)");
  }
  return cached[device];
}

}  // namespace cuda
}  // namespace kernels
