"""normkit.torch.SyncBatchNorm under mpirun (ctest: 1, 2 and 3 ranks). Every rank draws the same
global batch and feeds its uneven contiguous piece; the gathered results must match torch's
float64 BatchNorm on the whole batch (outputs, input gradients, running statistics over several
steps, eval), the parameter gradients must follow the documented rule (the global sums / P on
every rank, so that DDP's all-reduce-mean gives the gradient of the mean of the ranks' losses,
as for every other parameter), and everything must equal bitwise the same module on
MPI.COMM_SELF with the whole batch."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from mpi4py import MPI

import normkit.torch as nt

torch.set_num_threads(1)

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.rank, COMM.size


@pytest.fixture(autouse=True)
def float32_by_default():
    """Layers made as a float32 model makes them (test_sync_batch_norm.py, in the same session,
    sets float64 as the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


def piece(n, how="uneven"):
    """This rank's [lo, hi) of a global batch of n: weights 1, 3, 2, ... by rank, or one rank
    (the middle one) without samples."""
    if how == "uneven":
        w = [(1, 3, 2)[r % 3] for r in range(SIZE)]
        c = [n * wr // sum(w) for wr in w]
        c[-1] += n - sum(c)
    else:
        c = [n // SIZE] * SIZE
        c[-1] += n - sum(c)
        if SIZE > 1:
            c[SIZE // 2 - 1] += c[SIZE // 2]
            c[SIZE // 2] = 0
    lo = sum(c[:RANK])
    return lo, lo + c[RANK]


def laid_out(t, channels_last):
    """A copy of t (never a view: each becomes a leaf of its own), channels-last if asked."""
    if channels_last and t.dim() >= 3:
        perm = [0, *range(2, t.dim()), 1]
        return t.permute(perm).contiguous().permute(
            [0, t.dim() - 1, *range(1, t.dim() - 1)])
    return t.clone(memory_format=torch.contiguous_format)


def gather(t):
    return torch.cat([torch.from_numpy(a) for a in COMM.allgather(t.detach().numpy())])


def bits(t):
    return t.detach().contiguous().numpy().view(np.uint32)


def torch_twin(shape, **kwargs):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[len(shape)]
    return cls(shape[1], **kwargs).double()


CASES = [((13, 5, 7, 3), False), ((13, 5, 7, 3), True), ((11, 6), False), ((9, 4, 6), True),
         ((7, 3, 2, 3, 4), True)]


@pytest.mark.parametrize("shape,channels_last", CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("how", ["uneven", "rank_without_samples"])
def test_matches_torch_on_the_whole_batch(shape, channels_last, momentum, how):
    rng = np.random.default_rng([len(shape), shape[0], int(channels_last), momentum is None])
    c = shape[1]
    mine = nt.SyncBatchNorm(c, momentum=momentum)
    whole = nt.SyncBatchNorm(c, momentum=momentum, comm=MPI.COMM_SELF)
    ref = torch_twin(shape, momentum=momentum)
    with torch.no_grad():
        w = torch.from_numpy(rng.standard_normal(c) * 0.5 + 1).float()
        b = torch.from_numpy(rng.standard_normal(c)).float()
        for m in (mine, whole, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    lo, hi = piece(shape[0], how)
    for step in range(3):
        x = torch.from_numpy(rng.standard_normal(shape) * 2 + 3).float()
        dy = torch.from_numpy(rng.standard_normal(shape)).float()
        for m in (mine, whole, ref):
            m.zero_grad()
        xr = laid_out(x[lo:hi], channels_last).requires_grad_()
        y = mine(xr)
        y.backward(laid_out(dy[lo:hi], channels_last))
        assert y.stride() == xr.stride() and xr.grad.stride() == xr.stride()

        xw = laid_out(x, channels_last).requires_grad_()
        yw = whole(xw)
        yw.backward(laid_out(dy, channels_last))

        xt = x.double().requires_grad_()
        yt = ref(xt)
        yt.backward(dy.double())

        # Bitwise what one rank computes from the whole batch: the split changes no bit.
        assert np.array_equal(bits(y), bits(yw[lo:hi])), step
        assert np.array_equal(bits(xr.grad), bits(xw.grad[lo:hi])), step
        for name in ("running_mean", "running_var"):
            assert np.array_equal(bits(getattr(mine, name)), bits(getattr(whole, name))), name
        # The rule: every rank holds the global sums / P (the P = 1 module's sums, divided).
        for p, pw in ((mine.weight, whole.weight), (mine.bias, whole.bias)):
            assert np.array_equal(bits(p.grad), bits(pw.grad / SIZE)), step
            assert all(np.array_equal(g, p.grad.numpy()) for g in COMM.allgather(p.grad.numpy()))

        # torch in float64 on the whole batch.
        scale = np.sqrt(x.numel() / c)
        np.testing.assert_allclose(gather(y), yt.detach(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(gather(xr.grad), xt.grad, rtol=0, atol=1e-5)
        np.testing.assert_allclose(mine.weight.grad * SIZE, ref.weight.grad, rtol=0,
                                   atol=2e-6 * scale)
        np.testing.assert_allclose(mine.bias.grad * SIZE, ref.bias.grad, rtol=0,
                                   atol=2e-6 * scale)
        np.testing.assert_allclose(mine.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mine.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
        assert int(mine.num_batches_tracked) == step + 1

    # Eval: the running statistics, each rank alone, no exchange.
    mine.eval()
    ref.eval()
    x = torch.from_numpy(rng.standard_normal(shape)).float()
    xr = laid_out(x[lo:hi], channels_last).requires_grad_()
    y = mine(xr)
    y.backward(torch.ones_like(y))
    xt = x.double().requires_grad_()
    yt = ref(xt)
    yt.backward(torch.ones_like(yt))
    np.testing.assert_allclose(y.detach(), yt.detach()[lo:hi], rtol=0, atol=1e-5)
    np.testing.assert_allclose(xr.grad, xt.grad[lo:hi], rtol=0, atol=1e-5)


def test_ddp_averaging_gives_the_mean_of_the_ranks_loss_gradients():
    """A conv before the layer, each rank's loss on its own samples, then DDP's averaging of
    every gradient (all-reduce, divide by P): the result is the gradient of the sum of the
    ranks' losses, divided by P, for the conv and the SyncBatchNorm parameters alike."""
    rng = np.random.default_rng(5)
    shape = (10, 3, 5, 4)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    ref.load_state_dict(model.state_dict())
    ref.double()
    model = nt.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model[1], nt.SyncBatchNorm) and model[1].comm is COMM
    x = torch.from_numpy(rng.standard_normal(shape)).float()
    target = torch.from_numpy(rng.standard_normal((shape[0], 4, 5, 4))).float()
    lo, hi = piece(shape[0])
    loss = ((model(x[lo:hi]) - target[lo:hi]) ** 2).sum()
    loss.backward()
    for p in model.parameters():  # DDP
        p.grad = torch.from_numpy(COMM.allreduce(p.grad.numpy(), op=MPI.SUM) / SIZE)
    ((ref(x.double()) - target.double()) ** 2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.grad, q.grad / SIZE, rtol=1e-4, atol=1e-4, err_msg=name)


def test_module_is_torchs():
    mine = nt.SyncBatchNorm(5, 1e-3, 0.2, True, True)
    theirs = torch.nn.SyncBatchNorm(5, 1e-3, 0.2, True, True)
    assert isinstance(mine, torch.nn.SyncBatchNorm) and mine.comm is COMM
    assert mine.process_group is None
    assert list(mine.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert repr(mine) == repr(theirs)
    with torch.no_grad():
        theirs.running_mean.uniform_()
        theirs.weight.uniform_()
    mine.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(nt.SyncBatchNorm(5).state_dict())
    assert torch.equal(mine.running_mean, mine.state_dict()["running_mean"])
    # Without affine or running statistics, as torch's.
    bare = nt.SyncBatchNorm(3, affine=False, track_running_stats=False)
    x = torch.randn(4, 3, 5)
    np.testing.assert_allclose(bare(x), torch.nn.functional.batch_norm(
        torch.cat(COMM.allgather(x)), None, None, training=True)[4 * RANK:4 * RANK + 4],
        rtol=0, atol=1e-5)
    bare.eval()  # no running statistics: each rank's own batch, as torch's in eval
    np.testing.assert_allclose(bare(x), torch.nn.functional.batch_norm(
        x, None, None, training=True), rtol=0, atol=1e-5)
    copy = __import__("copy").deepcopy(mine)
    assert copy.comm is mine.comm and copy.weight is not mine.weight


def test_convert_sync_batchnorm_shares_parameters_and_buffers():
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1), torch.nn.BatchNorm1d(3),
                                torch.nn.Sequential(torch.nn.BatchNorm3d(2, momentum=None)))
    bn, bn3 = model[1], model[2][0]
    model.eval()
    out = nt.SyncBatchNorm.convert_sync_batchnorm(model, comm=MPI.COMM_SELF)
    assert out is model and type(model[0]) is torch.nn.Conv1d
    for new, old in ((model[1], bn), (model[2][0], bn3)):
        assert type(new) is nt.SyncBatchNorm and new.comm is MPI.COMM_SELF
        assert new.weight is old.weight and new.running_var is old.running_var
        assert new.num_batches_tracked is old.num_batches_tracked
        assert new.momentum == old.momentum and not new.training
    single = nt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(4))
    assert type(single) is nt.SyncBatchNorm and single.comm is COMM


def test_bad_input_raises_on_every_rank():
    m = nt.SyncBatchNorm(4)
    bad = SIZE - 1
    good = torch.randn(3, 4, 5)
    for wrong, message in ((torch.randn(3), r"expected at least 2D input .*got 1D input of "
                                            r"shape \(3,\)"),
                           (torch.randn(3, 5, 5), r"input has 5 channels \(shape \(3, 5, 5\)\), "
                                                  r"expected num_features = 4"),
                           (good.double(), "x has dtype float64")):
        x = wrong if RANK == bad else good
        expected = message if RANK == bad else f"rank {bad} of {SIZE} rejected its arguments"
        with pytest.raises((ValueError, TypeError), match=expected):
            m(x)
    assert int(m.num_batches_tracked) == 0
    m(good).sum().backward()  # and the communicator still works
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator .* got str"):
        nt.SyncBatchNorm(4, comm="world")


def _fresh_python(code):
    env = dict(os.environ)
    for k in list(env):  # a fresh interpreter outside this MPI job
        if k.startswith(("OMPI_", "PMIX_")):
            del env[k]
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_import_loads_no_mpi_and_construction_without_mpi4py_says_so():
    if RANK != 0:
        return
    r = _fresh_python("import sys, normkit.torch; "
                      "sys.exit('mpi4py' in sys.modules or 'normkit._mpi' in sys.modules)")
    assert r.returncode == 0, r.stderr
    r = _fresh_python("import sys; sys.modules['mpi4py'] = None\n"
                      "import normkit.torch\n"
                      "try:\n  normkit.torch.SyncBatchNorm(3)\n"
                      "except ImportError as e:\n  print(e)")
    assert "SyncBatchNorm needs mpi4py (Debian: python3-mpi4py" in r.stdout, r.stdout + r.stderr
