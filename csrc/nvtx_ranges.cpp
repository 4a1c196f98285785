// NVTX ranges for the profiler (profiler/recorder.py through ops/nvtx.py), emitted through the
// NVTX C API (the header-only nvtx3 of the CUDA toolkit) in domain "deepprof".
//
// Why native: Nsight Systems 2022.4 (Debian's) records ranges made through the C API but none
// made through the `nvtx` Python package; every nsys we target records these.
//
// Why start/end and not push/pop: the recorder's ranges are not always nested per thread. A
// range may end on another thread than the one that began it (PyTorch runs backward hooks on
// its device threads on a GPU), and a layer's backward may close after a later layer's began
// (parameter-gradient hooks). Start/end ranges are process-wide: nsys keeps the starting and the
// ending thread of each, and nesting follows from the times.
//
// Why prebuilt event attributes: the recorder opens the same few hundred names (phases,
// layer x direction) thousands of times. Each (message, colour) is built once; a range start
// then passes one small index, with no string conversion.
//
// Why ASCII and not registered strings (nvtxDomainRegisterStringA), which would spare the tool
// a string copy per range: with CPU sampling on (-s cpu), Debian's nsys 2022.4.2 never finishes
// a capture of a process that registered a string (its agent spins after the process exits; a
// ten-line C program shows it); ASCII messages capture fine.
//
// Without the nvtx3 headers (OPS_WITH_NVTX undefined) the same functions exist: nvtx_built()
// says False and the others raise, so the Python side falls back to the `nvtx` package.

#include <pybind11/pybind11.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(OPS_WITH_NVTX)
#include <nvtx3/nvToolsExt.h>
#endif

namespace py = pybind11;

namespace {

constexpr const char* kDomainName = "deepprof";

#if defined(OPS_WITH_NVTX)

// Enough for every (layer, direction) and phase of several models in one process (DeepPose and
// ResNet-56 together use under 300); fixed so that a reader never sees the storage move.
constexpr std::size_t kMaxEvents = 8192;

struct Events {
  nvtxDomainHandle_t domain = nullptr;
  std::array<nvtxEventAttributes_t, kMaxEvents> attributes{};
  std::array<std::string, kMaxEvents> messages;  // what attributes[i].message.ascii points to
  std::atomic<std::size_t> count{0};
  std::mutex registering;  // registration only; starting and ending take no lock
  std::map<std::pair<std::string, std::uint32_t>, std::size_t> index_of;
};

Events& events() {
  // Created on first use: the domain is created after nsys has injected itself (it sets
  // NVTX_INJECTION64_PATH before the process starts, and nvtx3 reads it at the first call).
  static Events* instance = [] {
    auto* e = new Events();  // never destroyed: ranges may end during interpreter shutdown
    e->domain = nvtxDomainCreateA(kDomainName);
    return e;
  }();
  return *instance;
}

std::size_t register_event(const std::string& message, std::uint32_t argb) {
  Events& e = events();
  std::lock_guard<std::mutex> lock(e.registering);
  const auto key = std::make_pair(message, argb);
  if (auto found = e.index_of.find(key); found != e.index_of.end()) return found->second;
  const std::size_t index = e.count.load(std::memory_order_relaxed);
  if (index >= kMaxEvents) {
    throw std::length_error("nvtx_register: at most " + std::to_string(kMaxEvents) +
                            " distinct (message, colour) pairs per process; got one more: '" +
                            message + "'");
  }
  nvtxEventAttributes_t& a = e.attributes[index];
  a = nvtxEventAttributes_t{};
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  a.colorType = NVTX_COLOR_ARGB;
  a.color = argb;
  e.messages[index] = message;
  a.messageType = NVTX_MESSAGE_TYPE_ASCII;
  a.message.ascii = e.messages[index].c_str();
  e.index_of.emplace(key, index);
  // Publishes the filled slot to range_start on other threads.
  e.count.store(index + 1, std::memory_order_release);
  return index;
}

std::uint64_t range_start(std::size_t event) {
  Events& e = events();
  if (event >= e.count.load(std::memory_order_acquire)) {
    throw py::index_error("nvtx_range_start: event: expected an index from nvtx_register (< " +
                          std::to_string(e.count.load()) + "), got " + std::to_string(event));
  }
  return nvtxDomainRangeStartEx(e.domain, &e.attributes[event]);
}

void range_end(std::uint64_t range_id) { nvtxDomainRangeEnd(events().domain, range_id); }

#else  // no nvtx3 headers at build time

[[noreturn]] void not_built(const char* function) {
  throw std::runtime_error(std::string(function) +
                           ": ops._C was built without the NVTX C API (no nvtx3 headers were "
                           "found; see CMakeLists.txt, OPS_NVTX); use the nvtx package instead");
}

std::size_t register_event(const std::string&, std::uint32_t) { not_built("nvtx_register"); }
std::uint64_t range_start(std::size_t) { not_built("nvtx_range_start"); }
void range_end(std::uint64_t) { not_built("nvtx_range_end"); }

#endif

}  // namespace

// For C callbacks on a framework's threads (csrc/engine_marks.cpp), which must not throw: an
// unknown event, or a build without the NVTX C API, starts nothing and returns 0.
std::uint64_t nvtx_range_start_quiet(std::int64_t event) {
#if defined(OPS_WITH_NVTX)
  Events& e = events();
  if (event < 0 || static_cast<std::size_t>(event) >= e.count.load(std::memory_order_acquire))
    return 0;
  return nvtxDomainRangeStartEx(e.domain, &e.attributes[event]);
#else
  (void)event;
  return 0;
#endif
}

void nvtx_range_end_quiet(std::uint64_t range_id) {
#if defined(OPS_WITH_NVTX)
  if (range_id != 0) nvtxDomainRangeEnd(events().domain, range_id);
#else
  (void)range_id;
#endif
}

// Called at the end of PYBIND11_MODULE in bindings.cpp.
void register_nvtx_ranges(py::module_& m) {
#if defined(OPS_WITH_NVTX)
  m.def("nvtx_built", [] { return true; },
        "True when this build emits NVTX ranges through the C API (nvtx3 headers found).");
#else
  m.def("nvtx_built", [] { return false; },
        "True when this build emits NVTX ranges through the C API (nvtx3 headers found).");
#endif
  m.attr("NVTX_DOMAIN") = kDomainName;
  m.def("nvtx_register", &register_event, py::arg("message"), py::arg("argb"),
        "Registers `message` (an event of domain 'deepprof') with colour `argb` "
        "(0xAARRGGBB) once and returns its event index for nvtx_range_start; the same pair "
        "returns the same index.");
  m.def("nvtx_range_start", &range_start, py::arg("event"),
        "Starts a start/end range of event `event` (from nvtx_register) on the calling thread; "
        "returns its range id (0 when no tool is attached).");
  m.def("nvtx_range_end", &range_end, py::arg("range_id"),
        "Ends the range `range_id` (from nvtx_range_start), from any thread.");
}
