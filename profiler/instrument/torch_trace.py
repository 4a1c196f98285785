"""PyTorch's own trace of a training step (torch.profiler) turned into layer ranges, after the
step: a "trace" instrument (instrument.base) beside the hook instrument (instrument.torch), so
the two can check each other. It must not attribute with our hooks or our own ranges around
layers; the only things it adds to the trace are clock anchors, outside the step.

What PyTorch 2.13 records, as probed here (CPU, ResNet-20 and a conv/bn/relu/linear model):

- Op events (``experimental_event_tree()`` of the profiler's result, the event tree that
  torch.profiler's own analyses use) carry no module name. ``with_modules=True`` adds nothing in
  eager mode (it is TorchScript's module hierarchy: the tree held the same 1717 op events and
  no module event). ``with_stack=True`` turns on the Python tracer, whose "nn.Module:
  Conv2d_0" call events hold the module object's address (``extra_fields.module.self_ptr``,
  ``id(module)``): the forward ops under such an event are that module's, exactly, whatever
  its class or its name (the "_0" counters of the event names are per class and would need
  guessing; the address needs none).
- Backward ops are run by the autograd engine as "autograd::engine::evaluate_function: <Node>"
  events that carry the forward op's sequence number (``sequence_number``); the forward op
  with that number (the last one to carry it: an op that creates no autograd node only peeks
  at the counter, and the next op that creates one takes the number) names the layer whose
  backward it is. A first layer, whose input needs no gradient, still has its weight's node
  (ConvolutionBackward0), so it gets its backward too.
- Gradient accumulation ("torch::autograd::AccumulateGrad") has no sequence number. The engine
  runs it at the highest priority, right after the node that produced the gradient; it is
  given to that node's layer, up to as many as the layer has trainable parameters (beyond
  that, or after a node of no layer: unattributed).

So a layer's forward is the time its modules' ops ran (dispatch included, the Python between
the ops not), its backward the time its autograd nodes ran (the engine's evaluate_function,
node hooks included). Ops of no named layer (the functional ReLUs and the residual additions
of a block, the loss, the optimizer) are attributed to nothing.

Graph mode (torch.compile, Inductor on the CPU): dynamo inlines the modules, so no
"nn.Module:" event of a named layer exists (only the compiled wrapper's and the model's own),
and the whole network is one autograd node ("CompiledFunction", "CompiledFunctionBackward").
The Python tracer does see each kernel the compiled program runs: a C++ kernel as a
"<built-in function kernel>" call from the output code's ``call`` (the calling line names it:
``cpp_fused_..._3(buf6, ...)``), an extern kernel (convolution, mm) as its aten op. ResNet-20
at batch 8: per step 21 convolutions each way, 20 C++ kernel calls each way (13 distinct
forward kernels, 12 backward), mm and addmm. Their names already show kernels spanning layers
and even directions (a forward kernel
``cpp_fused__native_batch_norm_legit_functional_add_copy__native_batch_norm_backward_relu_4``
computes part of a batch norm's backward). What maps a kernel to modules exists only while
Inductor compiles: FX node meta ``nn_module_stack`` (``fwd_nn_module_stack`` on backward
nodes), and ``trace.provenance_tracking_level`` (read in the source, not tried: it keeps kernel
-> post-grad -> pre-grad node *names*, not modules, and changes the compile's cache key). A warm
FX graph cache skips lowering altogether, so a hook on compilation would see nothing, and the
output code names no module (only node names like ``convolution_1``). So graph mode attributes
nothing to layers: each kernel becomes a fused region ("forward: cpp_fused_relu_3",
"backward: aten::convolution_backward") covering layers this trace cannot name; the glue
between kernels (size asserts, allocations) counts for none. A compiling step must not run
under the trace: reading the Python tracer's record of a compilation took 44 s (ResNet-20,
warm caches); compile in the warm-up with the instrument removed.

Clock: the profiler's times are Unix-epoch nanoseconds (time.time_ns's clock, converted from
its cheap clock). Each step's trace is mapped onto ``time.perf_counter_ns`` by anchors:
record_function ranges opened, right after the step, between two perf_counter readings; the
offset is the middle of the intersection of the anchors' intervals. Measured (40 steps, 2
loaded cores): half-width median 6.6 us, at most 8.1 us; the independent time.time_ns -
perf_counter_ns offset fell inside the interval every time, 0.7 to 2.5 us from its middle.

Per step: the profiler runs from ``install`` (or the last ``collect_step``) to
``collect_step``, which stops it, reads the step and starts a fresh one, outside the step:
32 to 43 ms for a ResNet-20 step at batch 16 (medians of four runs). The step itself runs
under the profiler: :data:`TRACE_COST_NOTE`.

GPU (written, not run: no GPU here): with CUDA the profiler also records CUDA activity; each
kernel is linked by its correlation id to the CPU op that launched it and takes that op's
layer and direction, and the layer times are then the kernels' times on the GPU.
"""

from __future__ import annotations

import linecache
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch._C._profiler import RecordScope, _EventType
from torch.autograd import DeviceType

from .attribution import OpEvent, TraceInstrumentBase, attribute

TRACK = "trace:torch"
CLOCK_ANCHOR = "deepprof::clock_anchor"
_ANCHORS = 3
_BACKWARD = "autograd::engine::evaluate_function: "
_ACCUMULATE = _BACKWARD + "torch::autograd::AccumulateGrad"
_COMPILED_CALL = "## Call CompiledFxGraph"
_COMPILED = {"CompiledFunction": "forward", "CompiledFunctionBackward": "backward"}

#: What a traced step costs: the report's own overhead measures it in every run.
TRACE_COST_NOTE = (
    "Trace cost: the step runs under torch.profiler with its Python tracer (which module "
    "attribution needs); the instrumentation overhead above is that cost in this run (measured "
    "here, ResNet-20 batch 16: 1.10 to 1.22 times an unprofiled step, docs/measurements.md). "
    "Reading the trace happens between steps, outside the step.")


class TraceInstrument(TraceInstrumentBase):
    """Per-layer forward and backward times of a PyTorch training step, read after the step
    from torch.profiler's trace (module docstring). ``subject``: a seed workload or a
    UserModel (its ``named_layers()`` are the layers); ``mode``: "eager", or "graph" for a
    model run through torch.compile (kernels as fused regions, no layer)."""

    #: Whether the trace times layers in each mode (graph: fused regions only, see above).
    layers_in = {"eager": True, "graph": False}
    #: Whether it shows the compiled program's fused regions (graph mode: Inductor's kernels).
    regions_in = {"eager": False, "graph": True}
    source = "torch.profiler (CPU op events and the Python tracer's module events)"

    def __init__(self, subject, recorder, *, mode: str = "eager"):
        super().__init__(subject, recorder, mode=mode)
        self.on_gpu = subject.device_kind() == "cuda"
        self._layer_of_module = {id(module): name for name, module in self.layers}
        self._trainable = {name: sum(1 for p in module.parameters(recurse=False)
                                     if p.requires_grad) for name, module in self.layers}
        self._profile = None
        self.clock_error_ns: Optional[int] = None   # half the anchors' interval, last step
        self.regions: Dict[str, str] = {}     # graph mode: fused region -> what it covers
        self.notes = [
            "PyTorch trace (torch.profiler): layer forward = the ops run under the layer's "
            "module call (the Python tracer's nn.Module events, matched by the module's "
            "address); layer backward = the autograd nodes those ops created (matched by "
            "sequence number), and the gradient accumulations the engine runs right after "
            "them. Ops of no named layer (functional activations, residual additions, the "
            "loss, the optimizer) count for no layer; Python between ops counts for none.",
            "Trace times are the profiler's, mapped onto the step's clock by anchors taken "
            "after each step (error: the anchors' interval, under 10 microseconds).",
            TRACE_COST_NOTE]
        if mode == "graph":
            self.notes.append(
                "Graph mode (torch.compile): no per-layer times. Dynamo inlines the modules "
                "(no module event of a named layer) and the compiled network is one autograd "
                "node; what maps Inductor's kernels to modules (FX node meta nn_module_stack) "
                "lives only while Inductor compiles, which a compile-cache hit skips. Each "
                "kernel the compiled program ran is a fused region named '<direction>: "
                "<kernel>' (a cpp_fused_... kernel or an extern aten op), covering layers the "
                "trace cannot name (kernels fuse across layers, even across directions).")
        if self.on_gpu:
            self.notes.append("GPU (unverified: written without a GPU to run it on): layer "
                              "times are the GPU kernels' times, each kernel given the layer "
                              "of the CPU op that launched it.")

    # -- the contract ------------------------------------------------------------------------
    def install(self) -> None:
        """Starts torch.profiler (idempotent); it records until ``collect_step``."""
        if self._profile is not None:
            return
        if torch.autograd.profiler._is_profiler_enabled or torch._C._autograd._profiler_enabled():
            raise RuntimeError("TraceInstrument.install: torch.profiler is already running "
                               "in this process (one profiler at a time); stop it first")
        self._start()

    def remove(self) -> None:
        """Stops the profiler and drops what it recorded (idempotent)."""
        profile, self._profile = self._profile, None
        if profile is not None:
            profile.stop()

    def mark_output(self, output):
        """``output`` itself, with a tensor hook that calls ``on_output_grad`` when the
        backward pass reaches its gradient (a phase boundary for the engine, not a layer's)."""
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._output_grad)
        return output

    def _output_grad(self, grad):
        self.on_output_grad()

    def collect_step(self, step: int, window: Optional[Tuple[int, int]] = None) -> None:
        """Reads step ``step``'s events (the step ran inside ``window``, (start_ns, end_ns) on
        the recorder's clock; default: the recorder's range of kind "step" of that step),
        records its layer ranges on track "trace:torch", and starts a fresh profiler for the
        next step. Nothing to do when the profiler is not running."""
        if self._profile is None:
            return
        if window is None:
            window = self._step_window(step)
        brackets = self._anchor()
        profile, self._profile = self._profile, None
        profile.stop()
        try:
            result = profile.profiler.kineto_results
            tree = result.experimental_event_tree()
            offset_ns, self.clock_error_ns = clock_offset(tree, brackets)
            device_events = result.events() if self.on_gpu else None
            events = self.op_events(tree, offset_ns, device_events)
            del tree, result, profile
            self.record(step, attribute(events, window), track=TRACK, phases=False)
        finally:
            self._start()       # the next step is traced, whatever became of this one

    def accounting(self) -> Dict[str, object]:
        """The report's "trace" section (TraceInstrumentBase's), with how the events were
        attributed and the clock's error at the last step."""
        return {**super().accounting(),
                "source": self.source + (" and CUDA kernels" if self.on_gpu else ""),
                "attributed": ("layers by module address (forward) and autograd sequence "
                               "number (backward)" if self.mode == "eager" else
                               "fused regions (Inductor kernels), no layers"),
                "clock_error_us": None if self.clock_error_ns is None
                else self.clock_error_ns / 1e3}

    # -- reading a trace -----------------------------------------------------------------------
    def op_events(self, tree, offset_ns: int = 0, device_events=None) -> List[OpEvent]:
        """The OpEvents of an event tree (``experimental_event_tree()``), times shifted by
        ``-offset_ns``. With ``device_events`` (the result's KinetoEvents, GPU), the GPU kernels
        are the events, each with its launching op's attribution."""
        if self.mode == "graph":
            ops = self._compiled_ops(tree)
        else:
            ops = self._eager_ops(tree)
        if device_events is not None:
            ops = self._device_ops(ops, device_events)
        return [OpEvent(start - offset_ns, max(start, end) - offset_ns, name, None,
                        layer=layer, direction=direction if layer else None, region=region)
                for start, end, name, layer, direction, region, _ in ops]

    def _eager_ops(self, tree) -> List[tuple]:
        """(start, end, name, layer, direction, region, correlation ids) of the outermost ops:
        forward ops by their innermost named module, backward nodes by sequence number."""
        forward, backward = [], []
        # (event, innermost named layer around it); ops nested in an op are that op's.
        stack = [(e, None) for e in reversed(tree)]
        while stack:
            event, layer = stack.pop()
            if event.tag == _EventType.PyCall:
                module = event.extra_fields.module
                if module is not None:
                    layer = self._layer_of_module.get(module.self_ptr, layer)
            elif event.tag == _EventType.TorchOp:
                if _name(event) == CLOCK_ANCHOR:
                    continue
                if not _annotation(event):
                    (backward if _name(event).startswith(_BACKWARD) else forward).append(
                        (event, layer))
                    continue
            stack.extend((c, layer) for c in reversed(event.children))
        forward.sort(key=lambda item: item[0].start_time_ns)
        backward.sort(key=lambda item: item[0].start_time_ns)
        owner: Dict[int, Optional[str]] = {}      # sequence number -> layer that took it
        ops = []
        for event, layer in forward:
            seqs, ids = _subtree_numbers(event)
            for seq in seqs:
                owner[seq] = layer
            ops.append((event.start_time_ns, event.end_time_ns, _name(event), layer,
                        "forward", None, ids))
        accumulated: Dict[str, int] = {}
        previous: Dict[int, Optional[str]] = {}   # thread -> layer of its last node
        for event, _ in backward:
            thread = event.start_tid
            if _name(event) == _ACCUMULATE:
                layer = previous.get(thread)
                if layer is not None and accumulated.get(layer, 0) < self._trainable[layer]:
                    accumulated[layer] = accumulated.get(layer, 0) + 1
                else:
                    layer = None
            else:
                layer = owner.get(event.extra_fields.sequence_number)
                previous[thread] = layer
            ops.append((event.start_time_ns, event.end_time_ns, _name(event), layer,
                        "backward", None, _subtree_numbers(event)[1]))
        return ops

    def _compiled_ops(self, tree) -> List[tuple]:
        """Graph mode: every kernel run inside a compiled graph's call, as a fused region
        '<direction>: <kernel>'; ops outside compiled graphs (loss, optimizer) as no layer."""
        ops = []
        # (event, direction of the compiled graph around it, inside the output code's call)
        stack = [(e, None, False) for e in reversed(tree)]
        while stack:
            event, direction, in_call = stack.pop()
            name = _name(event)
            if event.tag == _EventType.TorchOp:
                if name == CLOCK_ANCHOR:
                    continue
                if name in _COMPILED:
                    direction = _COMPILED[name]
                elif name.startswith(_COMPILED_CALL):
                    in_call = True
                elif in_call and direction:      # an extern kernel (convolution, mm)
                    self._region(ops, event, direction, name)
                    continue
                elif direction is None and not _annotation(event) \
                        and not _contains_compiled(event):   # eager: loss, optimizer
                    ops.append((event.start_time_ns, event.end_time_ns, name, None, None,
                                None, _subtree_numbers(event)[1]))
                    continue
            elif event.tag == _EventType.PyCCall and in_call and direction \
                    and name == "<built-in function kernel>":
                caller = event.extra_fields.caller
                self._region(ops, event, direction,
                             _kernel_name(caller.file_name, caller.line_number))
                continue
            stack.extend((c, direction, in_call) for c in reversed(event.children))
        return ops

    def _region(self, ops, event, direction, kernel) -> None:
        region = f"{direction}: {kernel}"
        self.regions.setdefault(region, "layers not known to the trace (graph mode)")
        ops.append((event.start_time_ns, event.end_time_ns, region, None, None, region,
                    _subtree_numbers(event)[1]))

    def _device_ops(self, ops, device_events) -> List[tuple]:
        """GPU (unverified): the CUDA kernels, each with the attribution of the CPU op whose
        correlation id its linked correlation id is."""
        by_id = {}
        for op in ops:
            for correlation in op[6]:
                by_id[correlation] = op
        kernels = []
        for k in device_events:
            if k.device_type() != DeviceType.CUDA:
                continue
            op = by_id.get(k.linked_correlation_id())
            layer, direction, region = (op[3], op[4], op[5]) if op else (None, None, None)
            kernels.append((k.start_ns(), k.end_ns(), k.name(), layer, direction, region, ()))
        return kernels

    # -- the profiler and its clock ------------------------------------------------------------
    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_gpu:     # unverified here (module docstring)
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profile = torch.profiler.profile(activities=activities, with_stack=True)
        profile.start()
        self._profile = profile

    def _anchor(self) -> List[Tuple[int, int]]:
        """Opens and closes ``_ANCHORS`` record_function ranges named CLOCK_ANCHOR, each
        between two perf_counter_ns readings: (before, after) per anchor."""
        enter = torch.ops.profiler._record_function_enter_new
        leave = torch.ops.profiler._record_function_exit._RecordFunction
        brackets = []
        for _ in range(_ANCHORS):
            before = time.perf_counter_ns()
            handle = enter(CLOCK_ANCHOR, None)
            after = time.perf_counter_ns()
            leave(handle)
            brackets.append((before, after))
        return brackets

    def _step_window(self, step: int) -> Tuple[int, int]:
        for r in reversed(self.recorder.timeline.ranges):
            if r.kind == "step" and r.step == step and not r.track.startswith("device:"):
                return r.start_ns, r.end_ns
        raise RuntimeError(f"TraceInstrument.collect_step: step {step}: the recorder has no "
                           f"range of kind 'step' for it; pass window=(start_ns, end_ns)")


def clock_offset(tree, brackets: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """(offset_ns, error_ns): trace time - perf_counter time, from the CLOCK_ANCHOR events of
    ``tree`` and the perf_counter ``brackets`` (before, after) taken around them, in order.
    Each anchor bounds the offset to [start - after, start - before]; the offset is the middle
    of their intersection and the error half its width. Anchors that disagree (a clock that
    jumped) fall back to the narrowest anchor's middle."""
    starts = sorted(e.start_time_ns for e in _find(tree, CLOCK_ANCHOR))
    if len(starts) != len(brackets):
        raise RuntimeError(f"TraceInstrument: clock anchors: expected {len(brackets)} "
                           f"'{CLOCK_ANCHOR}' events in the trace, found {len(starts)}")
    low = max(t - after for t, (_, after) in zip(starts, brackets))
    high = min(t - before for t, (before, _) in zip(starts, brackets))
    if low <= high:
        return (low + high) // 2, (high - low + 1) // 2
    t, (before, after) = min(zip(starts, brackets), key=lambda x: x[1][1] - x[1][0])
    return t - (before + after) // 2, (after - before + 1) // 2


def _find(tree, name: str):
    stack = list(tree)
    while stack:
        event = stack.pop()
        if _name(event) == name:
            yield event
        else:
            stack.extend(event.children)


def _name(event) -> str:
    """An event's name; "" for one whose name is not valid UTF-8 (seen among the Python
    tracer's events while dynamo compiles)."""
    try:
        return event.name
    except UnicodeDecodeError:
        return ""


def _annotation(event) -> bool:
    """A record_function range (a user's, or the optimizer's "Optimizer.step#SGD.step"): not
    an op; the ops inside it are looked at one by one."""
    return event.extra_fields.scope == RecordScope.USER_SCOPE


def _contains_compiled(event) -> bool:
    """Whether a compiled graph ran inside ``event`` (a dynamo region, a backward node)."""
    return any(e.tag == _EventType.TorchOp and _name(e) in _COMPILED
               for e in _descendants(event))


def _descendants(event):
    stack = list(event.children)
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.children)


def _subtree_numbers(event) -> Tuple[List[int], Tuple[int, ...]]:
    """The autograd sequence numbers (in time order) and the correlation ids of the ops in
    ``event``'s subtree."""
    seqs, ids = [], []
    stack = [event]
    while stack:
        e = stack.pop()
        if e.tag == _EventType.TorchOp:
            ids.append(e.correlation_id)
            seq = e.extra_fields.sequence_number
            if seq >= 0 and seq not in seqs:
                seqs.append(seq)
        stack.extend(reversed(e.children))
    return seqs, tuple(ids)


def _kernel_name(file_name: str, line_number: int) -> str:
    """The kernel an Inductor output-code line calls (``cpp_fused_relu_3(buf1, ...)``)."""
    line = linecache.getline(file_name, line_number).strip()
    callee = line.split("(", 1)[0].split("=")[-1].strip()
    return callee or f"kernel at {file_name}:{line_number}"
