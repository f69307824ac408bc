"""normkit.torch against torch's own modules: outputs, gradients, running statistics, state_dict,
memory formats, the float64 fallback, gradcheck of the autograd functions, bfloat16, and a
converted torchvision ResNet-18."""

import copy
import inspect
import subprocess
import sys

import pytest
import torch

import normkit.torch as nt

# (class name, constructor arguments, input shape): odd sizes, every rank each class takes.
CASES = [
    ("BatchNorm1d", (5,), {}, (7, 5)),
    ("BatchNorm1d", (5,), {}, (3, 5, 9)),
    ("BatchNorm2d", (6,), {}, (3, 6, 5, 7)),
    ("BatchNorm3d", (4,), {}, (2, 4, 3, 5, 3)),
    ("BatchNorm2d", (6,), {"affine": False}, (3, 6, 5, 7)),
    ("BatchNorm2d", (6,), {"track_running_stats": False}, (3, 6, 5, 7)),
    ("GroupNorm", (3, 6), {}, (3, 6, 5, 7)),
    ("GroupNorm", (2, 4), {}, (2, 4, 3, 5, 3)),
    ("GroupNorm", (5, 5), {"affine": False}, (3, 5, 11)),
    ("LayerNorm", ((7,),), {}, (3, 6, 5, 7)),
    ("LayerNorm", ((6, 5, 7),), {}, (3, 6, 5, 7)),
    ("LayerNorm", ((9,),), {"elementwise_affine": False}, (4, 9)),
    ("InstanceNorm1d", (5,), {"affine": True}, (3, 5, 9)),
    ("InstanceNorm2d", (6,), {}, (3, 6, 5, 7)),
    ("InstanceNorm2d", (6,), {"affine": True, "track_running_stats": True}, (3, 6, 5, 7)),
    ("InstanceNorm3d", (4,), {"affine": True}, (2, 4, 3, 5, 3)),
]
FORMATS = ("channels_first", "channels_last")
NORMKIT_BACKWARDS = ("_BatchNormFunctionBackward", "_GroupNormFunctionBackward",
                     "_LayerNormFunctionBackward", "_InstanceNormFunctionBackward")


def case_id(case):
    name, args, kwargs, shape = case
    extra = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{name}-{'x'.join(map(str, shape))}{'-' + extra if extra else ''}"


def in_format(x, fmt):
    """x laid out channels-first or channels-last (NLC, NHWC, NDHWC memory)."""
    if fmt == "channels_first" or x.dim() < 3:
        return x.contiguous()
    perm = [0, *range(2, x.dim()), 1]
    inverse = [0, x.dim() - 1, *range(1, x.dim() - 1)]
    return x.permute(perm).contiguous().permute(inverse)


def is_channels_last(x):
    return x.dim() >= 3 and x.permute([0, *range(2, x.dim()), 1]).is_contiguous()


def pair(case, dtype=torch.float32):
    """torch's module and normkit's, with the same (random) parameters."""
    name, args, kwargs, _ = case
    reference = getattr(torch.nn, name)(*args, **kwargs, dtype=dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    ours = getattr(nt, name)(*args, **kwargs, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def run(module, x, dy):
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(dy)
    return y, x.grad, [p.grad for p in module.parameters()]


def assert_close(actual, expected, rtol, what):
    scale = max(expected.abs().max().item(), 1.0)
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rtol * scale, f"{what}: max error {error:.3g} > {rtol:.1g} * {scale:.3g}"


def compare(reference, ours, x, dy, rtol, expect_normkit=True):
    y0, dx0, grads0 = run(reference, x, dy)
    y1, dx1, grads1 = run(ours, x, dy)
    backward = type(y1.grad_fn).__name__
    assert (backward in NORMKIT_BACKWARDS) == expect_normkit, backward
    assert y1.dtype == y0.dtype and y1.shape == y0.shape
    assert_close(y1, y0, rtol, "y")
    assert_close(dx1, dx0, rtol, "dx")
    for g1, g0 in zip(grads1, grads0):
        assert_close(g1, g0, 10 * rtol, "parameter gradient")  # sums over the whole batch
    return y1, dx1


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_matches_torch(case, fmt, training):
    torch.manual_seed(1)
    reference, ours = pair(case)
    reference.train(training)
    ours.train(training)
    if not training and "track_running_stats" not in case[2] and case[0].startswith("Batch"):
        # Eval reads the running statistics: make them other than the initial ones.
        with torch.no_grad():
            reference.running_mean.uniform_(-1, 1)
            reference.running_var.uniform_(0.5, 2)
        ours.load_state_dict(reference.state_dict())
    x = in_format(torch.randn(case[3], dtype=torch.float32) * 2 + 0.5, fmt)
    dy = torch.randn(case[3], dtype=torch.float32)  # channels-first: the forward lays it out
    y, dx = compare(reference, ours, x, dy, 1e-5)
    if fmt == "channels_last" and x.dim() >= 3 and case[0] != "LayerNorm":
        assert is_channels_last(y) and is_channels_last(dx)
    for name, buffer in reference.named_buffers():
        assert torch.equal(buffer, dict(ours.named_buffers())[name]) or \
            torch.allclose(buffer, dict(ours.named_buffers())[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("name,shape", [("BatchNorm2d", (4, 6, 5, 3)),
                                        ("BatchNorm1d", (9, 6)),
                                        ("InstanceNorm2d", (4, 6, 5, 3))])
def test_running_statistics(name, shape, momentum):
    if name.startswith("Instance") and momentum is None:
        pytest.skip("torch's InstanceNorm takes no momentum=None")
    torch.manual_seed(2)
    case = (name, (6,), {"momentum": momentum, "track_running_stats": True, "affine": True},
            shape)
    reference, ours = pair(case)
    for step in range(4):
        x = torch.randn(shape, dtype=torch.float32) * (step + 1) + step
        compare(reference, ours, x, torch.randn(shape, dtype=torch.float32), 1e-5)
        for (key, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
            assert a.dtype == b.dtype
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (step, key)
    if name.startswith("Batch"):
        assert ours.num_batches_tracked.item() == 4
    reference.eval()
    ours.eval()
    x = torch.randn(shape, dtype=torch.float32)
    compare(reference, ours, x, torch.randn(shape, dtype=torch.float32), 1e-5)


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_float64_falls_back_to_torch(case):
    torch.manual_seed(3)
    reference, ours = pair(case, torch.float64)
    x = torch.randn(case[3], dtype=torch.float64)
    compare(reference, ours, x, torch.randn(case[3], dtype=torch.float64), 1e-12,
            expect_normkit=False)
    # float64 activations with float32 parameters (what torch computes in mixed types or
    # refuses) are torch's business too: the same error or result as torch's.
    reference, ours = pair(case)
    try:
        expected = reference(x)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            ours(x)
    else:
        assert torch.equal(ours(x), expected)


def test_state_dict_round_trips():
    torch.manual_seed(4)
    for case in CASES:
        name, args, kwargs, shape = case
        reference = getattr(torch.nn, name)(*args, **kwargs, dtype=torch.float32)
        reference.train()
        reference(torch.randn(shape, dtype=torch.float32))
        ours = getattr(nt, name)(*args, **kwargs, dtype=torch.float32)
        ours.load_state_dict(reference.state_dict())
        ours(torch.randn(shape, dtype=torch.float32))
        back = getattr(torch.nn, name)(*args, **kwargs, dtype=torch.float32)
        back.load_state_dict(ours.state_dict())
        assert list(back.state_dict()) == list(reference.state_dict()), case_id(case)
        for key, value in ours.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), (case_id(case), key)


def float32_function(function, *float64_args, extra=()):
    """function (float32 only) as gradcheck's float64 function: inputs rounded to float32 on the
    way in, outputs widened on the way out, so that gradcheck differentiates the float32 op."""
    def wrapped(*args):
        return function(*(a.float() if a is not None else None for a in args), *extra).double()
    return wrapped


# gradcheck of the float32 autograd functions: float64 inputs rounded to float32 through the
# wrapper above, with a step of 1e-3 (float32 resolution would swamp gradcheck's 1e-6) and
# tolerances of 2e-3 for the float32 rounding of the finite differences.
GRADCHECK = dict(eps=1e-3, atol=2e-3, rtol=2e-3, nondet_tol=0.0)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_batch_norm(training):
    torch.manual_seed(5)
    x = torch.randn(3, 4, 3, 2, requires_grad=True)
    w = (torch.rand(4) + 0.5).requires_grad_()
    b = torch.randn(4, requires_grad=True)
    mean, var = torch.randn(4, dtype=torch.float32), torch.rand(4, dtype=torch.float32) + 0.5
    f = float32_function(
        lambda x, w, b: nt._BatchNormFunction.apply(
            x, w, b, mean.clone(), var.clone(), training, 0.1, 1e-5))
    assert torch.autograd.gradcheck(f, (x, w, b), **GRADCHECK)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_group_and_instance_norm(fmt):
    torch.manual_seed(6)
    x = in_format(torch.randn(2, 6, 3, 2), fmt).requires_grad_()
    w = (torch.rand(6) + 0.5).requires_grad_()
    b = torch.randn(6, requires_grad=True)

    def group(x, w, b):
        return nt._GroupNormFunction.apply(in_format(x, fmt), w, b, 3, 1e-5)

    def instance(x, w, b):
        return nt._InstanceNormFunction.apply(in_format(x, fmt), w, b, None, None, True, 0.1,
                                              1e-5)
    assert torch.autograd.gradcheck(float32_function(group), (x, w, b), **GRADCHECK)
    assert torch.autograd.gradcheck(float32_function(instance), (x, w, b), **GRADCHECK)


def test_gradcheck_layer_norm():
    torch.manual_seed(7)
    x = torch.randn(3, 2, 5, requires_grad=True)
    w = (torch.rand(2, 5) + 0.5).requires_grad_()
    b = torch.randn(2, 5, requires_grad=True)
    f = float32_function(lambda x, w, b: nt._LayerNormFunction.apply(x, w, b, (2, 5), 1e-5))
    assert torch.autograd.gradcheck(f, (x, w, b), **GRADCHECK)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[9], CASES[13]], ids=case_id)
def test_half_precision_against_float32(case, dtype):
    """Half-precision activations, float32 parameters: against torch in float32 on the same
    (rounded) inputs, within the half type's rounding of the outputs."""
    torch.manual_seed(8)
    reference, ours = pair(case)
    x = in_format(torch.randn(case[3], dtype=torch.float32), "channels_last").to(dtype)
    dy = torch.randn(case[3], dtype=torch.float32).to(dtype)
    y0, dx0, grads0 = run(reference, x.float(), dy.float())
    y1, dx1, grads1 = run(ours, x, dy)
    assert y1.dtype == dtype and dx1.dtype == dtype
    assert type(y1.grad_fn).__name__ in NORMKIT_BACKWARDS
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(y1, y0, rtol, "y")
    assert_close(dx1, dx0, rtol, "dx")
    for g1, g0 in zip(grads1, grads0):
        assert g1.dtype == torch.float32
        assert_close(g1, g0, rtol, "parameter gradient")  # computed from the same dy in float32


def norm_classes(model):
    return [type(m) for m in model.modules()
            if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm,
                              torch.nn.LayerNorm))]


def test_convert_and_revert():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.InstanceNorm2d(4)),
        torch.nn.Flatten(), torch.nn.LayerNorm(4 * 6 * 6), torch.nn.Linear(144, 3),
        torch.nn.BatchNorm1d(3)).float()
    model[1].weight.requires_grad_(False)
    model[2].eval()
    parameters = [id(p) for p in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    torch_classes = norm_classes(model)
    assert nt.convert(model) is model
    assert norm_classes(model) == [nt.BatchNorm2d, nt.GroupNorm, nt.InstanceNorm2d,
                                   nt.LayerNorm, nt.BatchNorm1d]
    assert [id(p) for p in model.parameters()] == parameters
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    assert model[1].training and not model[2][0].training and not model[2][1].training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], torch.nn.BatchNorm2d)  # still torch's class for isinstance
    assert nt.revert(model) is model
    assert norm_classes(model) == torch_classes
    assert [id(p) for p in model.parameters()] == parameters
    # A norm layer given alone is converted itself; SyncBatchNorm is left as it is.
    layer = nt.convert(torch.nn.BatchNorm2d(3))
    assert type(layer) is nt.BatchNorm2d
    assert type(nt.convert(torch.nn.SyncBatchNorm(3))) is torch.nn.SyncBatchNorm


def relative_error(actual, expected):
    """Normwise: a gradient tensor's small elements are rounding noise in either model."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# 64x64, not 32x32: at 32x32 layer4 normalizes 2 values per channel in training (batch 2, 1x1
# spatial), whose output is +-1 whatever the input, so every gradient upstream is exactly 0 in
# exact arithmetic and rounding noise in float32 (torch's float32 model is 10 % off its float64
# twin there). At 64x64 (2x2 spatial) both float32 models agree with float64 to about 1e-5.
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["channels_first", "channels_last"])
def test_resnet18(memory_format):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(9)
    reference = torchvision.models.resnet18(num_classes=10).float().to(memory_format=memory_format)
    # Running statistics other than the initial ones, so that eval mode reads them.
    reference.train()
    with torch.no_grad():
        reference(torch.randn(4, 3, 64, 64, dtype=torch.float32)
                  .contiguous(memory_format=memory_format))
    ours = nt.convert(copy.deepcopy(reference))
    assert sum(type(m) is nt.BatchNorm2d for m in ours.modules()) == 20
    x = torch.randn(2, 3, 64, 64, dtype=torch.float32).contiguous(memory_format=memory_format)

    reference.eval()
    ours.eval()
    with torch.no_grad():
        assert_close(ours(x), reference(x), 1e-5, "eval output")

    reference.train()
    ours.train()
    outputs = []
    for model in (reference, ours):
        model.zero_grad()
        out = model(x)
        torch.nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
        outputs.append(out)
    assert_close(outputs[1], outputs[0], 1e-5, "train output")
    for (name, p0), p1 in zip(reference.named_parameters(), ours.parameters()):
        assert relative_error(p1.grad, p0.grad) < 1e-4, name
    for (name, b0), b1 in zip(reference.named_buffers(), ours.buffers()):
        assert torch.allclose(b1, b0, rtol=1e-5, atol=1e-6), name
    assert norm_classes(nt.revert(ours)) == norm_classes(reference)


def test_import_normkit_does_not_import_torch():
    code = "import sys, normkit; assert 'torch' not in sys.modules; import normkit.torch"
    subprocess.run([sys.executable, "-c", code], check=True)


class RecordingCustomOp:
    """Stands in for torch >= 2.4's CustomOpDef: runs the op, and checks that the registered
    fake implementation gives every output's shape, strides and dtype."""

    def __init__(self, function):
        self.function, self.fake, self.calls = function, None, 0

    def register_fake(self, fake):
        self.fake = fake
        return fake

    def __call__(self, *args):
        outputs = self.function(*args)
        expected = self.fake(*args)
        assert len(outputs) == len(expected)
        for out, fake in zip(outputs, expected):
            assert isinstance(out, torch.Tensor)  # custom ops return no None
            assert (out.shape, out.dtype) == (fake.shape, fake.dtype)
            assert out.numel() <= 1 or out.stride() == fake.stride()
        self.calls += 1
        return outputs


def compare_every_case_format_and_mode():
    """Every module against torch's in float32, both memory formats, training and eval."""
    for case in CASES:
        for fmt in FORMATS:
            for training in (True, False):
                reference, ours = pair(case)
                reference.train(training)
                ours.train(training)
                x = in_format(torch.randn(case[3], dtype=torch.float32), fmt)
                compare(reference, ours, x, torch.randn(case[3], dtype=torch.float32), 1e-5)


def test_custom_op_registration(monkeypatch):
    """The torch.library branch (torch >= 2.4) on this torch, through a stand-in custom_op:
    the ops' signatures, their fake implementations, and the autograd functions over them."""
    assert nt.CUSTOM_OPS == hasattr(torch.library, "custom_op")
    if not nt.CUSTOM_OPS:
        assert nt._ops is nt._normkit
    registered = {}

    def custom_op(name, mutates_args):
        def define(function):
            signature = inspect.signature(function)
            assert signature.return_annotation is not inspect.Signature.empty, name
            assert all(p.annotation is not inspect.Parameter.empty
                       for p in signature.parameters.values()), name
            assert set(mutates_args) <= set(signature.parameters), name
            registered[name] = RecordingCustomOp(function)
            return registered[name]
        return define

    monkeypatch.setattr(torch.library, "custom_op", custom_op, raising=False)
    monkeypatch.setattr(nt, "_ops", nt._register_custom_ops())
    monkeypatch.setattr(nt, "_compiling", lambda: True)  # as while torch.compile traces
    assert sorted(registered) == sorted(
        f"normkit::{op}_norm_{d}" for op in ("batch", "group", "instance", "layer")
        for d in ("forward", "backward"))
    torch.manual_seed(10)
    compare_every_case_format_and_mode()
    assert all(op.calls > 0 for op in registered.values())


def test_eager_calls_skip_the_custom_ops(monkeypatch):
    """Outside tracing, on plain tensors, the autograd functions call the extension directly:
    with the custom-op table made unusable, every converted module still runs forward and
    backward (and matches torch)."""
    class Unusable:
        def __getattr__(self, name):
            raise AssertionError(f"custom op {name} called in eager mode")
    monkeypatch.setattr(nt, "_ops", Unusable())
    torch.manual_seed(12)
    compare_every_case_format_and_mode()


@pytest.mark.skipif(not nt.CUSTOM_OPS, reason="custom ops need torch.library.custom_op")
def test_dispatch_modes_see_the_custom_ops():
    """Under a dispatch mode (what make_fx and FlopCounterMode use) the modules call the custom
    ops, so the mode sees normkit's ops instead of a result out of nowhere."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func))
            return func(*args, **(kwargs or {}))
    model = nt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.GroupNorm(1, 3)))
    model = model.float()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float32, requires_grad=True)
    with Record():
        model(x).sum().backward()
    for op in ("batch", "group"):
        for d in ("forward", "backward"):
            assert f"normkit.{op}_norm_{d}.default" in seen, sorted(seen)


@pytest.mark.parametrize("make,shape", [
    (lambda: torch.nn.BatchNorm2d(4), (1, 4, 1, 1)),         # one value per channel in training
    (lambda: torch.nn.BatchNorm2d(4), (2, 3, 5, 5)),         # channels != num_features
    (lambda: torch.nn.InstanceNorm2d(4), (2, 4, 1, 1)),      # one value per instance
    (lambda: torch.nn.GroupNorm(2, 4), (2, 6, 5)),           # channels != num_channels
    (lambda: torch.nn.LayerNorm(6), (2, 4, 5)),              # normalized_shape != trailing dims
], ids=["bn-one-value", "bn-channels", "in-one-value", "gn-channels", "ln-shape"])
def test_invalid_calls_raise_torchs_errors(make, shape):
    reference = make().float()
    ours = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape, dtype=torch.float32)
    with pytest.raises((RuntimeError, ValueError)) as expected:
        reference(x)
    with pytest.raises(type(expected.value)) as actual:
        ours(x)
    assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_other_devices_fall_back_to_torch(case):
    """No GPU here: the meta device stands for CUDA and the rest, a device normkit does not
    reach; torch's forward runs there (torch's autograd node, torch's shapes)."""
    name, args, kwargs, shape = case
    module = getattr(nt, name)(*args, **kwargs, dtype=torch.float32).to("meta")
    x = torch.empty(shape, dtype=torch.float32, device="meta", requires_grad=True)
    y = module(x)
    assert y.device.type == "meta" and y.shape == x.shape
    assert type(y.grad_fn).__name__ not in NORMKIT_BACKWARDS


def compile_model(memory_format):
    """A small model with every converted norm class torch.compile should keep: BatchNorm2d,
    GroupNorm, InstanceNorm2d (with running statistics, mutated in place) and LayerNorm."""
    torch.manual_seed(11)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3), torch.nn.GroupNorm(4, 12), torch.nn.SiLU(),
        torch.nn.InstanceNorm2d(12, affine=True, track_running_stats=True),
        torch.nn.LayerNorm(7)).float().to(memory_format=memory_format)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return nt.convert(model)


@pytest.mark.skipif(not (nt.CUSTOM_OPS and hasattr(torch, "compile")),
                    reason="normkit's custom ops need torch.library.custom_op (torch >= 2.4)")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["channels_first", "channels_last"])
def test_torch_compile_keeps_normkit_ops(memory_format):
    """torch.compile (fullgraph: a graph break raises) with AOTAutograd, no code generation:
    normkit's ops are opaque nodes of the forward and backward graphs, and the compiled model's
    outputs, gradients and running statistics are the eager model's, in train and eval."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen = {"forward": set(), "backward": set()}

    def recorder(kind):
        def compiler(graph_module, example_inputs):
            for node in graph_module.graph.nodes:
                if node.op != "call_function":
                    continue
                target = node.target
                # An op that mutates an input (the running statistics) comes wrapped by
                # functionalization: auto_functionalized(op, ...).
                if "auto_functionalized" in str(target) and node.args:
                    target = node.args[0]
                seen[kind].add(str(target))
            return make_boxed_func(graph_module.forward)
        return compiler

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    eager = compile_model(memory_format)
    compiled_copy = copy.deepcopy(eager)
    compiled = torch.compile(compiled_copy, backend=backend, fullgraph=True)
    x = torch.randn(3, 3, 9, 9, dtype=torch.float32).contiguous(memory_format=memory_format)
    dy = torch.randn(3, 12, 7, 7, dtype=torch.float32)
    for step in range(2):
        results = []
        for model in (eager, compiled):
            out, dx, grads = run(model, x, dy)
            results.append((out, dx, grads))
        (y0, dx0, grads0), (y1, dx1, grads1) = results
        assert_close(y1, y0, 1e-5, f"step {step}: y")
        assert_close(dx1, dx0, 1e-5, f"step {step}: dx")
        for (name, _), g0, g1 in zip(eager.named_parameters(), grads0, grads1):
            assert_close(g1, g0, 1e-4, f"step {step}: gradient of {name}")
    for (name, b0), b1 in zip(eager.named_buffers(), compiled_copy.buffers()):
        assert torch.allclose(b1, b0, rtol=1e-5, atol=1e-6), name
    forward_ops = {f"normkit.{op}_norm_forward.default" for op in
                   ("batch", "group", "instance", "layer")}
    backward_ops = {f"normkit.{op}_norm_backward.default" for op in
                    ("batch", "group", "instance", "layer")}
    assert forward_ops <= seen["forward"], sorted(seen["forward"])
    assert backward_ops <= seen["backward"], sorted(seen["backward"])

    eager.eval()
    compiled_copy.eval()
    with torch.no_grad():
        assert_close(compiled(x), eager(x), 1e-5, "eval output")
