"""What is PyTorch-specific in the PyTorch workloads (profiler.workloads.torch): graph mode,
the network through torch.compile (Inductor). DeepPose's dropout draws eager's masks there;
our native ops (torch.ops.deepprof) train inside the compiled graph as the framework's own do;
``set_impls`` reaches the compiled network; every workload counts its own compiles, whatever
dynamo's recompile limit; ``predict`` and the weights stay those of the plain module.

torch.compile takes about 10 to 40 s per network on 2 CPU cores: few tests, small batches.
The identical-workload tests in graph mode are in tests/test_workloads.py."""

import numpy as np
import pytest
import torch

from ops.torch import impl_support
from profiler.workloads import build_workload, spec
from tests.test_workloads import assert_update_matches, perturbed_weights

POSE = dict(model="deeppose", batch_size=2, train_size=8, test_size=4, dropout=0.0)


def train(workload, steps: int):
    """``steps`` steps from perturbed weights; (start, losses, weights after)."""
    start = perturbed_weights(workload.model_name)
    workload.import_weights(start)
    losses = [workload.train_step(workload.to_device(batch))
              for batch, _ in zip(workload.make_loader(), range(steps))]
    return start, losses, workload.export_weights()


def runs_native_conv(workload) -> bool:
    """Whether one training step of ``workload`` runs our conv op (in a compiled graph,
    AOTAutograd traces deepprof::conv2d down to deepprof::conv2d_forward / _backward)."""
    batch = next(iter(workload.make_loader()))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        workload.train_step(workload.to_device(batch))
    return any(event.key.startswith("deepprof::conv2d") for event in prof.key_averages())


def test_graph_mode_draws_eagers_dropout_masks():
    """DeepPose with dropout 0.5 from one seed: graph mode gives eager's losses and updates
    over two steps (Inductor's own RNG would draw other masks: the losses would differ by
    tens of percent). predict stays eager and compiles nothing; the weights keep their
    canonical names."""
    # Built and trained one after the other: a workload seeds torch's global generator when
    # it is built, and the masks come from that generator.
    eager = build_workload("torch", **{**POSE, "dropout": 0.5})
    start, eager_losses, eager_after = train(eager, 2)
    graph = build_workload("torch", mode="graph", **{**POSE, "dropout": 0.5})
    _, graph_losses, graph_after = train(graph, 2)
    assert graph.compile_count() == 1
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-5)
    assert list(graph_after) == list(spec.parameter_shapes("deeppose"))
    for name, expected in eager_after.items():
        assert_update_matches(graph_after[name], expected, start[name], "deeppose", True,
                              f"graph vs eager dropout {name}")
    x = np.random.default_rng(5).random((2, 3, 220, 220), np.float32)
    np.testing.assert_allclose(graph.predict(x), eager.predict(x), rtol=1e-4, atol=1e-5)
    assert graph.compile_count() == 1


@pytest.mark.skipif(impl_support("conv")["native"] is not None,
                    reason=f"impl='native': {impl_support('conv')['native']}")
def test_native_ops_train_alike_in_graph_mode_and_set_impls_reaches_the_graph():
    """The native conv and loss (torch.ops.deepprof, with Meta kernels) inside the compiled
    DeepPose step give the framework conv's update (float32 tolerances). Each workload counts
    its own compiles, with dynamo's recompile limit at 1 (without isolation the second
    workload would find the limit reached and run eagerly). ``set_impls`` after a compile
    recompiles for the new conv (the profiler sees which op ran); switching back reuses the
    first graph."""
    with torch._dynamo.config.patch(recompile_limit=1):
        framework = build_workload("torch", mode="graph", **POSE)
        native = build_workload("torch", mode="graph", conv_impl="native", loss_impl="native",
                                **POSE)
        start, framework_losses, framework_after = train(framework, 2)
        _, native_losses, native_after = train(native, 2)
        assert (framework.compile_count(), native.compile_count()) == (1, 1)
    np.testing.assert_allclose(native_losses, framework_losses, rtol=1e-5)
    for name, expected in framework_after.items():
        assert_update_matches(native_after[name], expected, start[name], "deeppose", True,
                              f"graph native vs framework {name}")
    assert runs_native_conv(native)

    native.set_impls(conv="framework")
    assert not runs_native_conv(native)
    assert native.compile_count() == 2
    native.set_impls(conv="native")
    assert runs_native_conv(native)
    assert native.compile_count() == 2
