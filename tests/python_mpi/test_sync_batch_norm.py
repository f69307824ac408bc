"""normkit.mpi under mpirun (ctest runs it on 2 and 3 ranks): every rank draws the same global
batch and passes its contiguous piece. The gathered results must match torch's float64
BatchNorm on the whole batch, and equal bitwise the same call over the whole batch on
MPI.COMM_SELF (one rank, one piece): so they are bitwise the same for any number of ranks.
Argument errors raise on every rank, never hang."""

import os
import sys

import numpy as np
import pytest
import torch
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import normkit  # noqa: E402
import normkit.mpi  # noqa: E402
from normkit_testing import in_format  # noqa: E402

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)
normkit._set_output_poison(True)
normkit.mpi._set_output_poison(True)

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.rank, COMM.size


def counts(n, how):
    """The ranks' sample counts: even, uneven (weights 1, 3, 2, ...), or one rank with none."""
    if how == "even":
        return [n // SIZE + (1 if r < n % SIZE else 0) for r in range(SIZE)]
    if how == "uneven":
        w = [(1, 3, 2)[r % 3] for r in range(SIZE)]
        c = [n * wr // sum(w) for wr in w]
        c[-1] += n - sum(c)
        return c
    empty = SIZE // 2
    c = [0 if r == empty else n // max(SIZE - 1, 1) for r in range(SIZE)]
    c[0 if empty != 0 else 1] += n - sum(c)
    return c


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint16 if a.dtype == np.float16 else np.uint32)


def cast(a, dtype, fmt):
    out = in_format(a, fmt) if a.size else np.ascontiguousarray(a, np.float32)
    if dtype == np.float32:
        return out
    half = np.empty_like(out, dtype=np.float16)
    half[...] = out
    return half


CASES = [((13, 5, 7, 3), "channels_first"), ((13, 5, 7, 3), "channels_last"),
         ((9, 3), "channels_first"), ((10, 6, 5, 4), "channels_last")]


@pytest.mark.parametrize("shape,fmt", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("how", ["even", "uneven", "rank_without_samples"])
def test_matches_torch_and_one_rank_bitwise(shape, fmt, dtype, how):
    rng = np.random.default_rng([len(shape), shape[0], shape[1], int(dtype == np.float16)])
    n, c = shape[0], shape[1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    if dtype == np.float16:  # the oracle sees the values the ranks see
        x, dy = x.astype(np.float16).astype(np.float32), dy.astype(np.float16).astype(np.float32)
    w = rng.standard_normal(c).astype(np.float32) * 0.5 + 1
    b = rng.standard_normal(c).astype(np.float32)
    rm0 = rng.standard_normal(c).astype(np.float32)
    rv0 = (rng.random(c) + 0.5).astype(np.float32)

    cs = counts(n, how)
    lo = sum(cs[:RANK])
    hi = lo + cs[RANK]
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = normkit.mpi.sync_batch_norm_forward(
        cast(x[lo:hi], dtype, fmt), rm, rv, w, b, 0.1, 1e-5, COMM)
    dx, dw, db = normkit.mpi.sync_batch_norm_backward(
        cast(dy[lo:hi], dtype, fmt), cast(x[lo:hi], dtype, fmt), w, mean, invstd, COMM)
    assert y.dtype == dtype and dx.dtype == dtype

    # The whole batch as one piece on one rank: the same bits.
    rm1, rv1 = rm0.copy(), rv0.copy()
    y1, mean1, invstd1 = normkit.mpi.sync_batch_norm_forward(
        cast(x, dtype, fmt), rm1, rv1, w, b, 0.1, 1e-5, MPI.COMM_SELF)
    dx1, dw1, db1 = normkit.mpi.sync_batch_norm_backward(
        cast(dy, dtype, fmt), cast(x, dtype, fmt), w, mean1, invstd1, MPI.COMM_SELF)
    for name, got, want in [("mean", mean, mean1), ("invstd", invstd, invstd1), ("rm", rm, rm1),
                            ("rv", rv, rv1), ("dweight", dw, dw1), ("dbias", db, db1),
                            ("y", y, y1[lo:hi]), ("dx", dx, dx1[lo:hi])]:
        assert np.array_equal(bits(got), bits(want)), name

    # torch in float64 on the gathered batch.
    yg = np.concatenate([a.astype(np.float64) for a in COMM.allgather(y)])
    dxg = np.concatenate([a.astype(np.float64) for a in COMM.allgather(dx)])
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    rmt, rvt = torch.tensor(rm0, dtype=torch.float64), torch.tensor(rv0, dtype=torch.float64)
    yt = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, True, 0.1, 1e-5)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    tol = 2e-5 if dtype == np.float32 else 2e-3
    scale = np.sqrt(n * np.prod(shape[2:], dtype=np.int64))
    np.testing.assert_allclose(yg, yt.detach().numpy(), rtol=0, atol=tol * 4)
    np.testing.assert_allclose(dxg, xt.grad.numpy(), rtol=0, atol=tol * 10)
    np.testing.assert_allclose(rm, rmt.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rv, rvt.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=0, atol=1e-5 * scale)


def test_argument_errors_raise_on_every_rank():
    x = np.ones((3, 4, 5), np.float32) * (RANK + 1)
    x[0, :, 0] = 0
    w = np.ones(4, np.float32)
    bad = SIZE - 1
    # Found by the binding (shared with batch_norm_forward): TypeError here, ValueError elsewhere.
    xr = x.astype(np.float64) if RANK == bad else x
    if RANK == bad:
        with pytest.raises(TypeError, match="sync_batch_norm_forward: x has dtype float64; "
                                            "supported: float32, float16"):
            normkit.mpi.sync_batch_norm_forward(xr, None, None, w, None, 0.1, 1e-5, COMM)
    else:
        with pytest.raises(ValueError, match=f"rank {bad} of {SIZE} rejected its arguments.*"
                                             "x has dtype float64"):
            normkit.mpi.sync_batch_norm_forward(xr, None, None, w, None, 0.1, 1e-5, COMM)
    # Found by the library: ValueError everywhere.
    wr = np.ones(3, np.float32) if RANK == bad else w
    with pytest.raises(ValueError, match="weight has length 3, expected C = 4"):
        normkit.mpi.sync_batch_norm_forward(x, None, None, wr, None, 0.1, 1e-5, COMM)
    # The backward's saved statistics, required as in batch_norm_backward.
    y, mean, invstd = normkit.mpi.sync_batch_norm_forward(x, None, None, w, None, 0.1, 1e-5, COMM)
    if RANK == bad:
        with pytest.raises(ValueError, match="save_mean and save_invstd .* are required"):
            normkit.mpi.sync_batch_norm_backward(x, x, w, None, invstd, COMM)
    else:
        with pytest.raises(ValueError, match=f"rank {bad} of {SIZE} rejected"):
            normkit.mpi.sync_batch_norm_backward(x, x, w, mean, invstd, COMM)
    # Not a communicator.
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        normkit.mpi.sync_batch_norm_forward(x, None, None, w, None, 0.1, 1e-5, "world")
    # And the communicator still works.
    normkit.mpi.sync_batch_norm_forward(x, None, None, w, None, 0.1, 1e-5, COMM)


def test_import_normkit_does_not_load_mpi():
    import subprocess
    code = "import sys, normkit; sys.exit('mpi4py' in sys.modules or 'normkit._mpi' in sys.modules)"
    env = dict(os.environ)
    for k in list(env):  # a fresh interpreter outside this MPI job
        if k.startswith(("OMPI_", "PMIX_")):
            del env[k]
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_torch_tensors_as_batch_norm_forward_takes_them(memory_format):
    """The arguments are converted by the code batch_norm_forward uses: torch tensors are read
    where they lie and answered with torch tensors of x's dtype and strides; the float32 bits
    are the NumPy path's, and bfloat16 (DLPack only) is that path on the same values, rounded."""
    rng = np.random.default_rng([7, RANK])
    x32 = torch.from_numpy(rng.standard_normal((3, 4, 5, 2)) * 2 + 1).float()
    dy32 = torch.from_numpy(rng.standard_normal((3, 4, 5, 2))).float()
    x32, dy32 = (t.bfloat16().float().contiguous(memory_format=memory_format)
                 for t in (x32, dy32))  # values bfloat16 holds exactly
    w = torch.from_numpy(rng.standard_normal(4)).float()
    b = torch.from_numpy(rng.standard_normal(4)).float()
    w, b = COMM.bcast((w, b))

    def run(x, dy, w, b):
        y, mean, invstd = normkit.mpi.sync_batch_norm_forward(x, None, None, w, b, 0.1, 1e-5,
                                                              COMM)
        return [y, mean, invstd] + list(normkit.mpi.sync_batch_norm_backward(dy, x, w, mean,
                                                                             invstd, COMM))

    got = run(x32, dy32, w, b)
    want = run(x32.numpy(), dy32.numpy(), w.numpy(), b.numpy())
    for i, (t, n) in enumerate(zip(got, want)):
        assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), n), i
    for out in (got[0], got[3]):
        assert out.dtype == torch.float32 and out.stride() == x32.stride()

    half = run(x32.bfloat16(), dy32.bfloat16(), w, b)
    for i in (0, 3):  # y, dx: bfloat16 in x's strides, the float32 results rounded once
        assert half[i].dtype == torch.bfloat16 and half[i].stride() == x32.stride()
        bound = 2.0 ** -8 * got[i].abs() + 1e-6
        assert bool(((half[i].float() - got[i]).abs() <= bound).all()), i
    for i in (1, 2, 4, 5):  # statistics and parameter gradients: float32 of the same values
        assert half[i].dtype == torch.float32 and torch.equal(half[i], got[i]), i


def test_errors_are_batch_norm_forwards():
    x = torch.ones(3, 4, 5, dtype=torch.float64)
    messages = []
    for f in (lambda: normkit.batch_norm_forward(x, None, None, None, None, True),
              lambda: normkit.mpi.sync_batch_norm_forward(x, None, None, None, None, 0.1, 1e-5,
                                                          MPI.COMM_SELF)):
        with pytest.raises(TypeError) as e:
            f()
        messages.append(str(e.value).split(": ", 1)[1])
    assert messages[0] == messages[1]
