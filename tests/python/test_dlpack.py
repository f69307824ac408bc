"""Tensors from DLPack producers (torch above all): computed where they lie, in the format their
strides say, and answered with tensors of the same kind; NumPy arrays keep their behaviour."""

import numpy as np
import pytest
import torch

import normkit
from normkit_testing import raises

F32 = torch.float32  # torch's default dtype is float64 in these tests (conftest.py)
SHAPE = (3, 6, 5, 7)  # odd spatial sizes; C divisible by the 3 groups
FORMATS = {"channels_first": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def layer_norm_shape(x):
    return tuple(x.shape[1:])


# name: (forward(x, weight, bias) -> (y, *saved), backward(dy, x, saved, weight) -> grads,
#        parameter shape for x)
OPS = {
    "group_norm": (
        lambda x, w, b, **kw: normkit.group_norm_forward(x, 3, w, b, **kw),
        lambda dy, x, saved, w, **kw: normkit.group_norm_backward(dy, x, *saved, 3, w, **kw),
        lambda x: (x.shape[1],)),
    "batch_norm": (
        lambda x, w, b, **kw: normkit.batch_norm_forward(x, None, None, w, b, True, **kw),
        lambda dy, x, saved, w, **kw: normkit.batch_norm_backward(dy, x, w, *saved, **kw),
        lambda x: (x.shape[1],)),
    "instance_norm": (
        lambda x, w, b, **kw: normkit.instance_norm_forward(x, None, None, w, b, **kw),
        lambda dy, x, saved, w, **kw: normkit.instance_norm_backward(dy, x, *saved, w, **kw),
        lambda x: (x.shape[1],)),
    "layer_norm": (
        lambda x, w, b, **kw: normkit.layer_norm_forward(x, layer_norm_shape(x), w, b, **kw),
        lambda dy, x, saved, w, **kw: normkit.layer_norm_backward(dy, x, layer_norm_shape(x),
                                                                  *saved, w, **kw),
        lambda x: layer_norm_shape(x)),
}


def torch_input(rng, dtype, fmt, shape=SHAPE, offset=1.0):
    values = torch.from_numpy(offset + rng.standard_normal(shape))
    return values.to(DTYPES[dtype]).contiguous(memory_format=FORMATS[fmt])


def params(rng, op, x):
    shape = OPS[op][2](x)
    w = torch.from_numpy(1 + 0.5 * rng.standard_normal(shape)).float()
    b = torch.from_numpy(rng.standard_normal(shape)).float()
    return w, b


def run(op, x, dy, w, b, **epilogue):
    forward, backward, _ = OPS[op]
    out = forward(x, w, b, **{k: v for k, v in epilogue.items() if k in ("activation",
                                                                           "residual")})
    y, *saved = out
    back = {k: v for k, v in epilogue.items() if k in ("activation", "residual_grad")}
    if epilogue.get("activation") == "relu":
        back["y"] = y
    if epilogue.get("activation") == "silu":  # z is recomputed from the forward's inputs
        back["residual"] = epilogue.get("residual")
        back["bias"] = b
    grads = backward(dy, x, saved, w, **back)
    return list(out) + list(grads)


# Positions of the activations (y, dx, dresidual) in run()'s outputs; the rest are float32.
ACTIVATIONS = (0, 3, 6)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torch_in_torch_out_bitwise_as_numpy(rng, op, fmt, dtype):
    """torch tensors and NumPy views of the same memory give the same bits, returned as torch
    tensors in x's dtype and memory format (statistics and parameter gradients float32)."""
    x = torch_input(rng, dtype, fmt)
    dy = torch_input(rng, dtype, fmt, offset=0.0)
    w, b = params(rng, op, x)
    for epilogue in [{}, {"activation": "relu", "residual_grad": True},
                     {"activation": "silu", "residual_grad": True}]:
        if epilogue:
            epilogue["residual"] = torch_input(rng, dtype, fmt, offset=0.0)
        from_torch = run(op, x, dy, w, b, **epilogue)
        np_epilogue = {k: (v.numpy() if isinstance(v, torch.Tensor) else v)
                       for k, v in epilogue.items()}
        from_numpy = run(op, x.numpy(), dy.numpy(), w.numpy(), b.numpy(), **np_epilogue)
        assert len(from_torch) == len(from_numpy)
        for i, (t, n) in enumerate(zip(from_torch, from_numpy)):
            what = f"{op} output {i} {epilogue.keys()}"
            assert isinstance(t, torch.Tensor) and isinstance(n, np.ndarray), what
            assert t.device.type == "cpu" and t.shape == n.shape, what
            assert np.array_equal(t.numpy(), n), what
            assert t.dtype == (DTYPES[dtype] if i in ACTIVATIONS else torch.float32), what
        # y, dx (and dresidual) in x's memory format: torch's own strides.
        y, dx = from_torch[0], from_torch[3]
        for out in [y, dx] + from_torch[6:]:
            assert out.stride() == x.stride(), (op, out.stride(), x.stride())


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_float32_against_torch_float64(rng, op, fmt, activation, with_residual):
    x = torch_input(rng, "float32", fmt)
    dy = torch_input(rng, "float32", fmt, offset=0.0)
    w, b = params(rng, op, x)
    epilogue = {"activation": activation, "residual_grad": with_residual}
    if with_residual:
        epilogue["residual"] = torch_input(rng, "float32", fmt, offset=0.0)
    x64 = x.double().requires_grad_()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    F = torch.nn.functional
    ref = {"group_norm": lambda: F.group_norm(x64, 3, w64, b64),
           "batch_norm": lambda: F.batch_norm(x64, None, None, w64, b64, True),
           "instance_norm": lambda: F.instance_norm(x64, None, None, w64, b64),
           "layer_norm": lambda: F.layer_norm(x64, layer_norm_shape(x), w64, b64)}[op]()
    outputs = run(op, x, dy, w, b, **epilogue)
    y, dx, dw, db = outputs[0], outputs[3], outputs[4], outputs[5]
    if with_residual:
        r64 = epilogue["residual"].double().requires_grad_()
        ref = ref + r64
    if activation == "silu":
        ref = F.silu(ref)
    ref.backward(dy.double())
    checks = [(y, ref, 1e-5), (dx, x64.grad, 1e-4), (dw, w64.grad, 1e-4), (db, b64.grad, 1e-4)]
    if with_residual:
        checks.append((outputs[6], r64.grad, 1e-4))
    for got, want, tol in checks:
        error = (got.double() - want.detach()).abs().max().item()
        assert error <= tol * want.abs().max().item(), (op, activation, with_residual, error)


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bfloat16_matches_the_float32_path(rng, op, fmt, activation):
    """bfloat16 (no NumPy dtype: DLPack only) is computed in float32 inside: its results are the
    float32 path's on the same values, rounded once to bfloat16 (8 significant bits)."""
    x = torch_input(rng, "bfloat16", fmt)
    dy = torch_input(rng, "bfloat16", fmt, offset=0.0)
    w, b = params(rng, op, x)
    residual = torch_input(rng, "bfloat16", fmt, offset=0.0)
    half = run(op, x, dy, w, b, activation=activation, residual=residual,
               residual_grad=True)
    single = run(op, x.float(), dy.float(), w, b, activation=activation,
                 residual=residual.float(), residual_grad=True)
    for i, (h, s) in enumerate(zip(half, single)):
        if h is None:
            continue
        if i in ACTIVATIONS:
            assert h.dtype == torch.bfloat16 and h.stride() == x.stride(), i
            bound = 2.0 ** -8 * s.abs() + 1e-5 * (1 + s.abs().max())
            assert bool(((h.float() - s).abs() <= bound).all()), (op, i)
        else:  # statistics and parameter gradients: float32 from the same values
            assert h.dtype == torch.float32
            assert torch.allclose(h, s, rtol=1e-4, atol=1e-4 * s.abs().max().item()), (op, i)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_no_copies_and_inputs_untouched(rng, dtype, fmt):
    """The kernels read a DLPack tensor where it lies; inputs keep their memory and values,
    running statistics are updated in their own memory."""
    x = torch_input(rng, dtype, fmt)
    address, computed = normkit._kernel_view(x)
    assert address == x.data_ptr() and computed == fmt
    assert normkit._kernel_view(x.numpy() if dtype != "bfloat16" else x)[0] == x.data_ptr()
    before = x.clone()
    pointer = x.data_ptr()
    rm, rv = torch.zeros(x.shape[1], dtype=F32), torch.ones(x.shape[1], dtype=F32)
    rm_pointer = rm.data_ptr()
    y = normkit.batch_norm(x, rm, rv, training=True)
    assert x.data_ptr() == pointer and torch.equal(x, before)
    assert rm.data_ptr() == rm_pointer and bool((rm != 0).any())
    assert y.data_ptr() != pointer


def test_numpy_copies_only_what_it_must(rng):
    x = torch_input(rng, "float32", "channels_last").numpy()
    assert normkit._kernel_view(x) == (x.ctypes.data, "channels_last")
    strided = np.zeros(SHAPE + (2,), np.float32)[..., 0]
    address, computed = normkit._kernel_view(strided)
    assert address != strided.ctypes.data and computed == "channels_first"


def test_parameters_that_require_grad_are_read(rng):
    x = torch_input(rng, "float32", "channels_last")
    w = torch.ones(6, dtype=F32, requires_grad=True)
    y = normkit.group_norm(x, 3, w)
    assert torch.equal(y, normkit.group_norm(x, 3, w.detach()))
    assert not y.requires_grad


def test_mixed_kinds_follow_x(rng):
    x = torch_input(rng, "float32", "channels_first")
    w = np.ones(6, np.float32)
    assert isinstance(normkit.group_norm(x, 3, w), torch.Tensor)
    assert isinstance(normkit.group_norm(x.numpy(), 3, torch.ones(6, dtype=F32)), np.ndarray)


class Producer:
    """A DLPack producer that is neither NumPy nor torch."""

    def __init__(self, tensor, device=(1, 0)):
        self.tensor = tensor
        self.device = device

    def __dlpack__(self, stream=None):
        return torch.utils.dlpack.to_dlpack(self.tensor)

    def __dlpack_device__(self):
        return self.device


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_producers_get_dlpack_tensors(rng, fmt):
    x = torch_input(rng, "float32", fmt)
    y, mean, rstd = normkit.group_norm_forward(Producer(x), 3)
    assert isinstance(y, normkit.DLPackTensor)
    assert y.shape == tuple(x.shape) and y.dtype == "float32" and mean.shape == (3, 3)
    expected = normkit.group_norm(x, 3)
    as_torch = torch.utils.dlpack.from_dlpack(y)
    assert torch.equal(as_torch, expected) and as_torch.stride() == x.stride()
    assert np.array_equal(np.from_dlpack(y), expected.numpy())  # a second consumer, same memory
    # ... and normkit takes its own results back.
    dx, _, _ = normkit.group_norm_backward(y, Producer(x), mean, rstd, 3)
    assert isinstance(dx, normkit.DLPackTensor)


def test_dlpack_errors(rng):
    x = torch_input(rng, "float32", "channels_last")
    with raises(ValueError, "group_norm", "x", "device", "(2, 0)", "CPU"):
        normkit.group_norm(Producer(x, device=(2, 0)), 3)
    with raises(ValueError, "x", "(3, 6, 3, 7)", "byte strides", "does not copy", "contiguous"):
        normkit.group_norm(x[:, :, ::2], 3)
    with raises(ValueError, "x", "byte strides", "does not copy"):
        normkit.group_norm(x.transpose(2, 3), 3)
    with raises(TypeError, "x", "float64", "float32", "bfloat16"):
        normkit.group_norm(x.double(), 3)
    with raises(TypeError, "x", "int32"):
        normkit.group_norm(x.int(), 3)
    with raises(TypeError, "weight", "float16", "expected float32"):
        normkit.group_norm(x, 3, torch.ones(6, dtype=torch.float16))
    with raises(ValueError, "weight", "contiguous", "does not copy"):
        normkit.group_norm(x, 3, torch.ones(12, dtype=F32)[::2])
    with raises(TypeError, "x", "dtype object"):  # NumPy's array of anything else
        normkit.group_norm(object(), 3)
    # dy is not brought to x's format as a NumPy array would be: that would be a copy.
    y, mean, rstd = normkit.group_norm_forward(x, 3)
    with raises(ValueError, "dy", "channels_last", "does not copy"):
        normkit.group_norm_backward(x.contiguous(), x, mean, rstd, 3)
    with raises(ValueError, "residual", "laid out as x"):
        normkit.group_norm(x, 3, residual=x.contiguous())
    with raises(TypeError, "residual", "bfloat16", "float32"):
        normkit.group_norm(x, 3, residual=x.bfloat16())
    with raises(ValueError, "running_mean", "contiguous"):
        normkit.batch_norm(x, torch.zeros(12, dtype=F32)[::2], torch.ones(6, dtype=F32),
                           training=True)


def test_layer_norm_of_a_channels_last_tensor_over_other_dims_is_an_error(rng):
    x = torch_input(rng, "float32", "channels_last")
    with raises(ValueError, "layer_norm", "channels-last", "(7,)", "x.contiguous()"):
        normkit.layer_norm(x, 7)
    y = normkit.layer_norm(x.contiguous(), 7)
    assert torch.equal(y, torch.from_numpy(normkit.layer_norm(x.numpy(), 7)))
