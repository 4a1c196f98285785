// Clock marks a framework's own threads take without entering Python (ops._C.engine_mark_*).
//
// Why: the MXNet instrument (profiler/instrument/mxnet.py) times each layer where MXNet's engine
// runs it, by queueing engine operations that read the clock. A Python callback there has to
// take the GIL, which the main thread holds while it queues the next operators, so the engine
// stalled at every boundary: +12% on a ResNet-20 step here, against +1.7% with a C function as
// the callback. deepprof_engine_mark is that function: it stores (slot, time) for Python to read
// after the pass, and opens and closes the NVTX ranges a capture needs while the work runs.
//
// The clock is CLOCK_MONOTONIC, the clock of Python's time.perf_counter_ns on Linux, so marks and
// the recorder's own readings share one time line.
//
// NVTX: a slot belongs to a track (one open range at a time). A mark ends its track's open range
// and starts the slot's own event (a forward layer), nothing (the end of a pass), or the next
// event of the track's sequence (backward layers: which one ends next is known only afterwards,
// so Python sets the order it predicts before the pass; NVTX names a range when it starts).
// Events are the indices of nvtx_register (csrc/nvtx_ranges.cpp); -1 where NVTX is not used.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <ctime>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

// csrc/nvtx_ranges.cpp: range calls that never throw (a C callback must not), 0 / no-ops without
// the NVTX C API or for an unknown event.
std::uint64_t nvtx_range_start_quiet(std::int64_t event);
void nvtx_range_end_quiet(std::uint64_t range_id);

namespace {

constexpr std::int64_t kNoEvent = -1;  // the mark only ends its track's range
constexpr std::int64_t kNextInSequence = -2;

struct Slot {
  std::int64_t track;
  std::int64_t event;  // >= 0, kNoEvent or kNextInSequence
};

struct Track {
  bool open = false;
  std::uint64_t range = 0;
  std::vector<std::int64_t> sequence;
  std::size_t next = 0;
};

using Mark = std::tuple<std::int64_t, std::int64_t, std::int64_t>;  // slot, ns, event started

struct State {
  std::mutex lock;
  std::vector<Slot> slots{Slot{-1, kNoEvent}};  // slot 0: ordering only, no mark is stored
  std::vector<Track> tracks;
  std::vector<Mark> marks;
};

State& state() {
  static State* instance = new State();  // never destroyed: the engine may call during shutdown
  return *instance;
}

std::int64_t monotonic_ns() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<std::int64_t>(now.tv_sec) * 1000000000 + now.tv_nsec;
}

void mark(std::int64_t slot) noexcept {
  const std::int64_t now = monotonic_ns();  // before the lock: waiting for it is not the mark's
  State& s = state();
  std::lock_guard<std::mutex> guard(s.lock);
  if (slot <= 0 || slot >= static_cast<std::int64_t>(s.slots.size())) return;
  const Slot& what = s.slots[slot];
  std::int64_t started = kNoEvent;
  if (what.track >= 0) {
    Track& track = s.tracks[what.track];
    if (track.open) nvtx_range_end_quiet(track.range);
    track.open = false;
    std::int64_t event = what.event;
    if (event == kNextInSequence)
      event = track.next < track.sequence.size() ? track.sequence[track.next++] : kNoEvent;
    if (event >= 0) {
      track.range = nvtx_range_start_quiet(event);
      track.open = true;
      started = event;
    }
  }
  try {
    s.marks.emplace_back(slot, now, started);
  } catch (...) {  // out of memory: the mark is lost, the engine thread goes on
  }
}

std::int64_t new_track() {
  State& s = state();
  std::lock_guard<std::mutex> guard(s.lock);
  s.tracks.emplace_back();
  return static_cast<std::int64_t>(s.tracks.size()) - 1;
}

void check_track(const State& s, const char* function, std::int64_t track) {
  if (track < 0 || track >= static_cast<std::int64_t>(s.tracks.size()))
    throw py::index_error(std::string(function) + ": track: expected an index from "
                          "engine_mark_track (< " + std::to_string(s.tracks.size()) +
                          "), got " + std::to_string(track));
}

std::int64_t new_slot(std::int64_t track, std::int64_t event) {
  State& s = state();
  std::lock_guard<std::mutex> guard(s.lock);
  check_track(s, "engine_mark_slot", track);
  if (event < kNextInSequence)
    throw py::value_error("engine_mark_slot: event: expected an nvtx_register index, -1 (none) "
                          "or -2 (the track's next), got " + std::to_string(event));
  s.slots.push_back(Slot{track, event});
  return static_cast<std::int64_t>(s.slots.size()) - 1;
}

void set_sequence(std::int64_t track, std::vector<std::int64_t> events) {
  State& s = state();
  std::lock_guard<std::mutex> guard(s.lock);
  check_track(s, "engine_mark_sequence", track);
  s.tracks[track].sequence = std::move(events);
  s.tracks[track].next = 0;
}

void end_track(std::int64_t track) {
  State& s = state();
  std::lock_guard<std::mutex> guard(s.lock);
  check_track(s, "engine_mark_end", track);
  if (s.tracks[track].open) nvtx_range_end_quiet(s.tracks[track].range);
  s.tracks[track].open = false;
}

std::vector<Mark> take_marks() {
  State& s = state();
  std::vector<Mark> taken;
  std::lock_guard<std::mutex> guard(s.lock);
  taken.swap(s.marks);
  return taken;
}

}  // namespace

// MXNet's EngineSyncFunc(RunContext, void* param): param is the slot.
extern "C" void deepprof_engine_mark(void* /*run_context*/, void* param) {
  mark(static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(param)));
}

// Called at the end of PYBIND11_MODULE in bindings.cpp.
void register_engine_marks(py::module_& m) {
  m.def("engine_mark_callback", [] {
    return reinterpret_cast<std::uintptr_t>(&deepprof_engine_mark);
  }, "The address of deepprof_engine_mark(void* run_context, void* slot), a C function that "
     "takes a mark of `slot` without the GIL (MXNet's EngineSyncFunc signature).");
  m.def("engine_mark_track", &new_track,
        "A new NVTX track for marks (one open range at a time); returns its index.");
  m.def("engine_mark_slot", &new_slot, py::arg("track"), py::arg("event"),
        "A new slot on `track` whose mark starts NVTX event `event` (nvtx_register), -1 "
        "nothing, -2 the track's next sequence event, after ending the track's open range.");
  m.def("engine_mark_sequence", &set_sequence, py::arg("track"), py::arg("events"),
        "The events that `track`'s -2 slots start, in order, from the next mark on.");
  m.def("engine_mark_end", &end_track, py::arg("track"), "Ends `track`'s open NVTX range.");
  m.def("engine_mark", [](std::int64_t slot) { mark(slot); }, py::arg("slot"),
        "Takes a mark of `slot` now, as the C callback does.");
  m.def("engine_marks_take", &take_marks,
        "The marks taken since the last call, as (slot, monotonic ns, NVTX event started or "
        "-1), in the order they were stored; clears them.");
}
