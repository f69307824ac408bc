"""normkit.torch.FrozenBatchNorm2d against torchvision.ops.FrozenBatchNorm2d: outputs and input
gradients in float32 (normkit's inference BatchNorm) and float64 (torchvision's arithmetic,
bit for bit), both memory formats; state_dicts both ways, a BatchNorm2d's included; and
freeze_batch_norm on a model."""

import pytest
import torch
import torchvision

import normkit.torch as nt

SHAPES = [(3, 6, 5, 7), (1, 5, 4, 3), (2, 3, 1, 1)]
FORMATS = (torch.contiguous_format, torch.channels_last)


def random_buffers(module, generator):
    c = module.weight.numel()
    with torch.no_grad():
        module.weight.copy_(torch.randn(c, generator=generator) * 0.5 + 1)
        module.bias.copy_(torch.randn(c, generator=generator))
        module.running_mean.copy_(torch.randn(c, generator=generator) * 2)
        module.running_var.copy_(torch.rand(c, generator=generator) * 3 + 0.1)
    return module


def pair(c, dtype, eps=1e-5, seed=0):
    theirs = random_buffers(torchvision.ops.FrozenBatchNorm2d(c, eps=eps).to(dtype),
                            torch.Generator().manual_seed(seed))
    ours = nt.FrozenBatchNorm2d(c, eps=eps).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def run(module, x, dy):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = module(x)
    y.backward(dy)
    return y, x.grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("memory_format", FORMATS, ids=("channels_first", "channels_last"))
@pytest.mark.parametrize("training", [True, False])
def test_float32_matches_torchvision(shape, memory_format, training):
    generator = torch.Generator().manual_seed(sum(shape))
    theirs, ours = pair(shape[1], torch.float32, eps=1e-3)
    reference = pair(shape[1], torch.float64, eps=1e-3)[0]
    for m in (theirs, ours, reference):
        m.train(training)
    x = (torch.randn(shape, generator=generator) * 3 + 1).float().contiguous(
        memory_format=memory_format)
    dy = torch.randn(shape, generator=generator).float().contiguous(memory_format=memory_format)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    y, dx = run(ours, x, dy)
    assert type(y.grad_fn).__name__ == "_BatchNormFunctionBackward"  # normkit computed it
    assert y.dtype == dx.dtype == torch.float32
    if memory_format == torch.channels_last and shape[2] * shape[3] > 1:
        assert y.is_contiguous(memory_format=memory_format)
        assert dx.is_contiguous(memory_format=memory_format)
    y64, dx64 = run(reference, x.double(), dy.double())
    y32, dx32 = run(theirs, x, dy)
    # normkit and torchvision's float32 both within float32 rounding of float64.
    for got in ((y, dx), (y32, dx32)):
        torch.testing.assert_close(got[0].double(), y64, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got[1].double(), dx64, rtol=2e-6, atol=2e-6)
    for k, v in ours.state_dict().items():  # frozen: nothing moves, in training either
        assert torch.equal(v, before[k]), k
    assert list(ours.parameters()) == []


@pytest.mark.parametrize("memory_format", FORMATS, ids=("channels_first", "channels_last"))
def test_float64_is_torchvisions_arithmetic(memory_format):
    generator = torch.Generator().manual_seed(1)
    theirs, ours = pair(6, torch.float64)
    x = torch.randn(3, 6, 5, 7, generator=generator, dtype=torch.float64).contiguous(
        memory_format=memory_format)
    dy = torch.randn(3, 6, 5, 7, generator=generator, dtype=torch.float64)
    y, dx = run(ours, x, dy)
    want_y, want_dx = run(theirs, x, dy)
    assert torch.equal(y, want_y) and torch.equal(dx, want_dx)


def test_state_dicts_load_both_ways():
    theirs, ours = pair(5, torch.float32, seed=3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = torchvision.ops.FrozenBatchNorm2d(5).float()
    back.load_state_dict(ours.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k
    # A BatchNorm2d's, num_batches_tracked dropped as torchvision drops it, strict or not.
    bn = torch.nn.BatchNorm2d(5).float()
    random_buffers(bn, torch.Generator().manual_seed(4))
    frozen = nt.FrozenBatchNorm2d(5).float()
    frozen.load_state_dict(bn.state_dict(), strict=True)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, bn.state_dict()[k]), k
    assert repr(frozen) == repr(torchvision.ops.FrozenBatchNorm2d(5))


def test_freeze_batch_norm_keeps_the_eval_output():
    generator = torch.Generator().manual_seed(5)
    model = torchvision.models.resnet18(num_classes=7).float()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            random_buffers(m, generator)
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=generator).float()
    want = model(x)
    state = model.state_dict()
    frozen = nt.freeze_batch_norm(model)
    assert frozen is model
    kinds = {type(m) for m in model.modules()}
    assert nt.FrozenBatchNorm2d in kinds and torch.nn.BatchNorm2d not in kinds
    assert sum(isinstance(m, nt.FrozenBatchNorm2d) for m in model.modules()) == 20
    model.train()  # frozen: training computes what eval did
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got.sum().backward()  # the convolutions still train
    assert all(p.grad is not None for p in model.parameters())
    # The frozen model's state_dict is the BatchNorm model's without num_batches_tracked, and
    # the BatchNorm checkpoint loads into it.
    assert set(model.state_dict()) == {k for k in state if not k.endswith("num_batches_tracked")}
    model.load_state_dict(state)


def test_freeze_batch_norm_edge_cases():
    bn = torch.nn.BatchNorm2d(3).float()
    frozen = nt.freeze_batch_norm(bn)
    assert type(frozen) is nt.FrozenBatchNorm2d and frozen.eps == bn.eps
    assert frozen.running_var.data_ptr() != bn.running_var.data_ptr()
    plain = torch.nn.BatchNorm2d(3, affine=False).float()
    with torch.no_grad():
        plain.running_mean.fill_(2)
    frozen = nt.freeze_batch_norm(plain)
    assert torch.equal(frozen.weight, torch.ones(3, dtype=torch.float32))
    assert torch.equal(frozen.running_mean, plain.running_mean)
    untracked = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1),
                                    torch.nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"freeze_batch_norm: 1 \(BatchNorm2d\) has no running "
                                         r"statistics \(track_running_stats=False\)"):
        nt.freeze_batch_norm(untracked)
    # BatchNorm1d and 3d stay (their inputs are not (N, C, H, W)); normkit's BatchNorm2d goes.
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), nt.BatchNorm2d(3))
    nt.freeze_batch_norm(model)
    assert type(model[0]) is torch.nn.BatchNorm1d and type(model[1]) is nt.FrozenBatchNorm2d
