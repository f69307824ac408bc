"""normkit.torch: torch's normalization modules with normkit's kernels.

BatchNorm1d/2d/3d, GroupNorm, LayerNorm and InstanceNorm1d/2d/3d subclass torch's own classes,
so construction, parameters, buffers, state_dict keys and train/eval are torch's; only the
forward differs. It runs normkit's ops through one torch.autograd.Function per op, and falls
back to torch's forward for what normkit does not compute (see _normkit_can_run), so a converted
model never breaks. `convert(model)` swaps every torch norm layer of a model in place,
`revert(model)` swaps them back. SyncBatchNorm is torch's SyncBatchNorm over normkit.mpi (an
mpi4py communicator instead of a process group; MPI is loaded when one is constructed, not on
import). FrozenBatchNorm2d is torchvision.ops.FrozenBatchNorm2d on normkit's inference
BatchNorm, and `freeze_batch_norm(model)` puts it in place of a model's BatchNorm2d layers.
See docs/torch.md.
"""

import copy
import types

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _normkit

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "LayerNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "convert", "revert",
           "batch_norm", "group_norm", "layer_norm", "instance_norm", "SyncBatchNorm",
           "sync_batch_norm", "FrozenBatchNorm2d", "frozen_batch_norm", "freeze_batch_norm"]

# What normkit computes: these activation dtypes, float32 parameters and statistics, CPU
# memory, (N, C) plus 0 to 3 spatial dims.
_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_RANK = 5


def _normkit_can_run(x, *tensors):
    if x.device.type != "cpu" or x.dtype not in _ACTIVATION_DTYPES or x.layout != torch.strided:
        return False
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32
                              or not t.is_contiguous()):  # read in place, never copied
            return False
    # Tracing and scripting record torch's ops, not ours.
    return not (torch.jit.is_scripting() or torch.jit.is_tracing())


def _per_channel(x, *tensors):
    """Whether x has channels and every tensor given holds one value per channel. Arguments
    torch would refuse go to torch, so that a wrong call raises torch's own error."""
    return x.dim() >= 2 and x.shape[1] > 0 and all(
        t is None or (t.dim() == 1 and t.numel() == x.shape[1]) for t in tensors)


def _values_per_channel(x):
    return x.numel() // x.shape[1]


def _dense(x):
    """x itself when normkit can read it in place (channels-first or channels-last), else a
    channels-first copy, as torch's kernels make one."""
    if x.is_contiguous():
        return x
    if x.dim() >= 3:
        # NLC, NHWC or NDHWC memory viewed as (N, C, ...): strides sorted with C innermost.
        perm = [0, *range(2, x.dim()), 1]
        if x.permute(perm).is_contiguous():
            return x
    return x.contiguous()


def _laid_out_as(t, ref):
    """t with ref's strides: normkit never copies, so dy must be laid out as x is."""
    if t.stride() == ref.stride():
        return t
    out = torch.empty_like(ref)  # preserve_format keeps a dense tensor's strides
    out.copy_(t)
    return out


def _param_grads(ctx, dweight, dbias):
    return (dweight if ctx.needs_input_grad[1] else None,
            dbias if ctx.needs_input_grad[2] else None)


def _register_custom_ops():
    """normkit's ops as torch.library custom ops (torch >= 2.4's torch.library.custom_op), so
    that torch.compile keeps them as opaque nodes of its graph: a fake implementation gives each
    output's shape and strides, mutates_args the running statistics written in place. Older
    torch (Debian's 1.13) calls the extension directly. Custom ops return no None, so an absent
    parameter gradient is an empty tensor there and None again in _unwrap_grads."""
    from typing import List, Optional, Tuple
    Tensor, OptTensor = torch.Tensor, Optional[torch.Tensor]

    def define(name, mutates_args=()):
        return torch.library.custom_op("normkit::" + name, mutates_args=mutates_args)

    def float32(x, shape):
        return x.new_empty(shape, dtype=torch.float32)

    def grads(dx, dweight, dbias):
        if dweight is None:  # no weight: dbias is None too
            # Two tensors: a custom op's outputs may not alias one another.
            dweight, dbias = (dx.new_empty((0,), dtype=torch.float32) for _ in range(2))
        return dx, dweight, dbias

    def fake_grads(dy, weight):
        shape = (0,) if weight is None else weight.shape
        return torch.empty_like(dy), float32(dy, shape), float32(dy, shape)

    @define("batch_norm_forward", ("running_mean", "running_var"))
    def batch_norm_forward(x: Tensor, running_mean: OptTensor, running_var: OptTensor,
                           weight: OptTensor, bias: OptTensor, training: bool, momentum: float,
                           eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        return _normkit.batch_norm_forward(x, running_mean, running_var, weight, bias, training,
                                           momentum, eps)

    @batch_norm_forward.register_fake
    def _(x, running_mean, running_var, weight, bias, training, momentum, eps):
        stats = (x.shape[1],) if training else (0,)
        return torch.empty_like(x), float32(x, stats), float32(x, stats)

    @define("batch_norm_backward")
    def batch_norm_backward(dy: Tensor, x: Tensor, weight: OptTensor, save_mean: OptTensor,
                            save_invstd: OptTensor, training: bool, running_mean: OptTensor,
                            running_var: OptTensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        return grads(*_normkit.batch_norm_backward(dy, x, weight, save_mean, save_invstd,
                                                   training, running_mean, running_var, eps))

    @batch_norm_backward.register_fake
    def _(dy, x, weight, save_mean, save_invstd, training, running_mean, running_var, eps):
        return fake_grads(dy, weight)

    @define("instance_norm_forward", ("running_mean", "running_var"))
    def instance_norm_forward(x: Tensor, running_mean: OptTensor, running_var: OptTensor,
                              weight: OptTensor, bias: OptTensor, use_input_stats: bool,
                              momentum: float, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        return _normkit.instance_norm_forward(x, running_mean, running_var, weight, bias,
                                              use_input_stats, momentum, eps)

    @instance_norm_forward.register_fake
    def _(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
        stats = tuple(x.shape[:2])
        return torch.empty_like(x), float32(x, stats), float32(x, stats)

    @define("instance_norm_backward")
    def instance_norm_backward(dy: Tensor, x: Tensor, save_mean: Tensor, save_rstd: Tensor,
                               weight: OptTensor,
                               use_input_stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
        return grads(*_normkit.instance_norm_backward(dy, x, save_mean, save_rstd, weight,
                                                      use_input_stats))

    @instance_norm_backward.register_fake
    def _(dy, x, save_mean, save_rstd, weight, use_input_stats):
        return fake_grads(dy, weight)

    @define("group_norm_forward")
    def group_norm_forward(x: Tensor, num_groups: int, weight: OptTensor, bias: OptTensor,
                           eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        return _normkit.group_norm_forward(x, num_groups, weight, bias, eps)

    @group_norm_forward.register_fake
    def _(x, num_groups, weight, bias, eps):
        stats = (x.shape[0], num_groups)
        return torch.empty_like(x), float32(x, stats), float32(x, stats)

    @define("group_norm_backward")
    def group_norm_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, num_groups: int,
                            weight: OptTensor) -> Tuple[Tensor, Tensor, Tensor]:
        return grads(*_normkit.group_norm_backward(dy, x, mean, rstd, num_groups, weight))

    @group_norm_backward.register_fake
    def _(dy, x, mean, rstd, num_groups, weight):
        return fake_grads(dy, weight)

    @define("layer_norm_forward")
    def layer_norm_forward(x: Tensor, normalized_shape: List[int], weight: OptTensor,
                           bias: OptTensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        return _normkit.layer_norm_forward(x, normalized_shape, weight, bias, eps)

    @layer_norm_forward.register_fake
    def _(x, normalized_shape, weight, bias, eps):
        k = len(normalized_shape)
        stats = tuple(x.shape[:x.dim() - k]) + (1,) * k
        return torch.empty_like(x), float32(x, stats), float32(x, stats)

    @define("layer_norm_backward")
    def layer_norm_backward(dy: Tensor, x: Tensor, normalized_shape: List[int], mean: Tensor,
                            rstd: Tensor, weight: OptTensor) -> Tuple[Tensor, Tensor, Tensor]:
        return grads(*_normkit.layer_norm_backward(dy, x, normalized_shape, mean, rstd, weight))

    @layer_norm_backward.register_fake
    def _(dy, x, normalized_shape, mean, rstd, weight):
        return fake_grads(dy, weight)

    # The CustomOpDef objects are callable: the same calls as torch.ops.normkit.NAME.
    return types.SimpleNamespace(**{name: op for name, op in locals().items()
                                    if name.endswith(("_forward", "_backward"))})


# The ops torch.compile sees: the custom ops where torch has them, else the extension itself
# (same names, same positional arguments).
CUSTOM_OPS = hasattr(torch, "library") and hasattr(torch.library, "custom_op")
_ops = _register_custom_ops() if CUSTOM_OPS else _normkit


def _compiling():
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


def _dispatch_modes():
    stack = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return stack is not None and stack() > 0


def _ops_for(x):
    """The op table for a call on x: in eager mode on a plain tensor, the extension itself; a
    custom op's dispatch costs about 12 us a call more (docs/torch.md), a few ms a training step
    of a ResNet-50. While torch.compile traces, on a tensor subclass (the fake and functional
    tensors of tracing) or under a dispatch mode (make_fx, FlopCounterMode), the custom ops,
    which these see as opaque nodes."""
    if _ops is _normkit or (type(x) is torch.Tensor and not _compiling()
                            and not _dispatch_modes()):
        return _normkit
    return _ops


def _unwrap_grads(dx, dweight, dbias):
    if dweight is not None and dweight.numel() == 0:
        return dx, None, None
    return dx, dweight, dbias


class _BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        y, save_mean, save_invstd = _ops_for(x).batch_norm_forward(
            x, running_mean, running_var, weight, bias, training, momentum, eps)
        ctx.training, ctx.eps = training, eps
        if not training:
            # Inference statistics are constants of the backward; copied, because a later
            # training step updates the buffers in place before this backward may run.
            save_mean, save_invstd = running_mean.clone(), running_var.clone()
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, saved_a, saved_b = ctx.saved_tensors
        dy = _laid_out_as(dy, x)
        if ctx.training:
            dx, dweight, dbias = _unwrap_grads(*_ops_for(x).batch_norm_backward(
                dy, x, weight, saved_a, saved_b, True, None, None, ctx.eps))
        else:
            dx, dweight, dbias = _unwrap_grads(*_ops_for(x).batch_norm_backward(
                dy, x, weight, None, None, False, saved_a, saved_b, ctx.eps))
        return (dx, *_param_grads(ctx, dweight, dbias), None, None, None, None, None)


class _InstanceNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps):
        y, save_mean, save_rstd = _ops_for(x).instance_norm_forward(
            x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
        # Without input statistics, save_* are the running statistics per sample: constants.
        ctx.use_input_stats = use_input_stats
        ctx.save_for_backward(x, weight, save_mean, save_rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, save_mean, save_rstd = ctx.saved_tensors
        dx, dweight, dbias = _unwrap_grads(*_ops_for(x).instance_norm_backward(
            _laid_out_as(dy, x), x, save_mean, save_rstd, weight, ctx.use_input_stats))
        return (dx, *_param_grads(ctx, dweight, dbias), None, None, None, None, None)


class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps):
        y, mean, rstd = _ops_for(x).group_norm_forward(x, num_groups, weight, bias, eps)
        ctx.num_groups = num_groups
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _unwrap_grads(*_ops_for(x).group_norm_backward(
            _laid_out_as(dy, x), x, mean, rstd, ctx.num_groups, weight))
        return (dx, *_param_grads(ctx, dweight, dbias), None, None)


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps):
        y, mean, rstd = _ops_for(x).layer_norm_forward(x, normalized_shape, weight, bias, eps)
        ctx.normalized_shape = normalized_shape
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _unwrap_grads(*_ops_for(x).layer_norm_backward(
            _laid_out_as(dy, x), x, ctx.normalized_shape, mean, rstd, weight))
        return (dx, *_param_grads(ctx, dweight, dbias), None, None)


# Functional forms with torch.nn.functional's signatures: normkit where it runs, else torch.

def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    if not (_normkit_can_run(x, running_mean, running_var, weight, bias)
            and 2 <= x.dim() <= _MAX_RANK and (training or running_mean is not None)
            and _per_channel(x, running_mean, running_var, weight, bias)
            and not (training and _values_per_channel(x) == 1)):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return _BatchNormFunction.apply(_dense(x), weight, bias, running_mean, running_var,
                                    bool(training), float(momentum), float(eps))


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    if not (_normkit_can_run(x, running_mean, running_var, weight, bias)
            and 3 <= x.dim() <= _MAX_RANK and momentum is not None
            and (use_input_stats or running_mean is not None)
            and _per_channel(x, running_mean, running_var, weight, bias)
            and not (use_input_stats and x.shape[0] > 0
                     and _values_per_channel(x) == x.shape[0])):
        return F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats,
                               momentum, eps)
    return _InstanceNormFunction.apply(_dense(x), weight, bias, running_mean, running_var,
                                       bool(use_input_stats), float(momentum), float(eps))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    if not (_normkit_can_run(x, weight, bias) and 2 <= x.dim() <= _MAX_RANK
            and _per_channel(x, weight, bias) and num_groups > 0
            and x.shape[1] % num_groups == 0):
        return F.group_norm(x, num_groups, weight, bias, eps)
    return _GroupNormFunction.apply(_dense(x), weight, bias, int(num_groups), float(eps))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if not (_normkit_can_run(x, weight, bias) and 1 <= k <= x.dim()
            and tuple(x.shape[x.dim() - k:]) == normalized_shape
            and all(t is None or tuple(t.shape) == normalized_shape for t in (weight, bias))):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    # Channels-first, as torch's CPU kernel: normkit reads channels-last only when the
    # normalized dims are all but the first, and torch's output is contiguous either way.
    return _LayerNormFunction.apply(x.contiguous(), weight, bias,
                                    [int(d) for d in normalized_shape], float(eps))


# Modules: torch's classes, with the forward above.

class _BatchNormMixin:
    def forward(self, input):
        self._check_input_dim(input)
        # torch's _BatchNorm.forward, with normkit's op in place of F.batch_norm.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if keep else None,
                          self.running_var if keep else None, self.weight, self.bias,
                          use_batch_stats, factor, self.eps)


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    pass


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    pass


class _InstanceNormMixin:
    # torch's InstanceNorm forward checks the input and handles unbatched inputs, then calls this.
    def _apply_instance_norm(self, input):
        return instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training or not self.track_running_stats, self.momentum,
                             self.eps)


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    pass


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    pass


class GroupNorm(torch.nn.GroupNorm):
    def forward(self, input):
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


# torch class -> normkit class. Exact types only: a subclass of torch's may change the forward,
# and SyncBatchNorm's forward is collective.
_TO_NORMKIT = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.GroupNorm: GroupNorm,
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.InstanceNorm1d: InstanceNorm1d,
    torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
}
_TO_TORCH = {normkit_class: torch_class for torch_class, normkit_class in _TO_NORMKIT.items()}


def _swap(module, classes):
    """module, or the module it becomes, with its class swapped by `classes`, recursively."""
    new_class = classes.get(type(module))
    if new_class is not None:
        # The same object with the other class: its parameters, buffers, hooks, training mode
        # and requires_grad are the module's own, and optimizers keep their references.
        module.__class__ = new_class
    for name, child in module.named_children():
        _swap(child, classes)
    return module


def convert(model):
    """Replaces every torch.nn BatchNorm*, GroupNorm, LayerNorm and InstanceNorm* of `model`
    (the model itself included) by normkit's, in place, and returns the model."""
    return _swap(model, _TO_NORMKIT)


def revert(model):
    """Undoes `convert`: normkit's norm modules become torch's again. Returns the model."""
    return _swap(model, _TO_TORCH)


# SyncBatchNorm over normkit.mpi. mpi4py and normkit._mpi are imported by the first
# constructor, never by `import normkit.torch`, so that a program without MPI does not start it.

def _load_mpi():
    """(mpi4py.MPI, normkit.mpi), or an ImportError that says what is missing."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("normkit.torch.SyncBatchNorm needs mpi4py (Debian: python3-mpi4py, "
                          "or pip install mpi4py), which is not importable: " + str(e)) from e
    try:
        from . import mpi
    except ImportError as e:
        raise ImportError("normkit.torch.SyncBatchNorm needs normkit.mpi, which this build of "
                          "normkit does not have (it is built when CMake finds MPI and mpi4py): "
                          + str(e)) from e
    return MPI, mpi


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, comm):
        mpi = _load_mpi()[1]
        y, save_mean, save_invstd = mpi.sync_batch_norm_forward(
            x, running_mean, running_var, weight, bias, momentum, eps, comm)
        ctx.comm = comm
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        mpi = _load_mpi()[1]
        dx, dweight, dbias = mpi.sync_batch_norm_backward(
            _laid_out_as(dy, x), x, weight, save_mean, save_invstd, ctx.comm)
        if dweight is not None:
            # normkit returns the sums over the global batch, the same on every rank. Each rank
            # gets 1/P of them, so that the usual DDP averaging (all-reduce, divide by P) leaves
            # them where it leaves every other parameter: at the mean over ranks of each rank's
            # loss gradient (docs/torch.md, "The gradient rule").
            size = ctx.comm.Get_size()
            dweight, dbias = dweight / size, dbias / size
        return (dx, *_param_grads(ctx, dweight, dbias), None, None, None, None, None)


def sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, comm):
    """Training BatchNorm over the global batch formed by every rank's x (collective over comm,
    an mpi4py communicator): normkit.mpi.sync_batch_norm_forward with autograd, whose backward
    is collective too. weight and bias receive 1/comm.size of the global gradient sums."""
    return _SyncBatchNormFunction.apply(_dense(x), weight, bias, running_mean, running_var,
                                        float(momentum), float(eps), comm)


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm over MPI: statistics of the batch formed by all ranks of `comm` (an
    mpi4py communicator; None is MPI.COMM_WORLD) in rank order, bitwise the same for any number
    of ranks and any split. `comm` takes process_group's place; `process_group` stays None.
    Training forward and backward are collective: every rank of comm calls them. The gradients
    of weight and bias are the global sums divided by comm's size on every rank (see
    docs/torch.md). Eval mode is BatchNorm with the running statistics, on each rank alone."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, comm=None, device=None, dtype=None):
        MPI = _load_mpi()[0]
        if comm is None:
            comm = MPI.COMM_WORLD
        elif not isinstance(comm, MPI.Comm):
            raise TypeError("SyncBatchNorm: comm must be an mpi4py communicator "
                            f"(mpi4py.MPI.Comm) or None, got {type(comm).__name__}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, None,
                         device, dtype)
        self.comm = comm

    def __deepcopy__(self, memo):
        # A communicator is a handle on the same group of processes, not data (and mpi4py's
        # cannot be pickled): a copy of the layer shares it.
        memo.setdefault(id(self.comm), self.comm)
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = copy.deepcopy(value, memo)
        return copied

    def _check_input_collectively(self, input):
        message = None
        if input.dim() < 2:
            message = (f"SyncBatchNorm: expected at least 2D input (N, C, ...), got "
                       f"{input.dim()}D input of shape {tuple(input.shape)}")
        elif input.shape[1] != self.num_features:
            message = (f"SyncBatchNorm: input has {input.shape[1]} channels (shape "
                       f"{tuple(input.shape)}), expected num_features = {self.num_features}")
        if message is not None:
            # The other ranks are on their way into the collective: they raise there, naming
            # this rank, instead of waiting for it.
            _load_mpi()[1].reject_call(message, self.comm)

    def forward(self, input):
        if not self.training:
            # No exchange: the running statistics, or (without them) each rank's own batch, as
            # torch's SyncBatchNorm in eval.
            self._check_input_dim(input)
            use_batch_stats = self.running_mean is None and self.running_var is None
            return batch_norm(input, self.running_mean, self.running_var, self.weight,
                              self.bias, use_batch_stats, 0.0, self.eps)
        self._check_input_collectively(input)
        factor = 0.0 if self.momentum is None else self.momentum
        counted = self.track_running_stats and self.num_batches_tracked is not None
        if counted and self.momentum is None:  # cumulative moving average
            factor = 1.0 / (float(self.num_batches_tracked) + 1.0)
        running = self.track_running_stats
        y = sync_batch_norm(input, self.running_mean if running else None,
                            self.running_var if running else None, self.weight, self.bias,
                            factor, self.eps, self.comm)
        # Counted once the call succeeded: an input rejected on any rank changes nothing.
        if counted:
            self.num_batches_tracked.add_(1)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module, comm=None):
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm with an mpi4py communicator: every
        BatchNorm*d (any torch _BatchNorm) of module becomes a new normkit SyncBatchNorm sharing
        its parameters and buffers. Returns the module, or the new layer if module is one."""
        output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            output = cls(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, comm)
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.train(module.training)
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, comm))
        return output


# FrozenBatchNorm2d: BatchNorm with fixed statistics and affine parameters, on normkit's
# inference BatchNorm (C++: the FrozenBatchNorm layer).

def frozen_batch_norm(x, weight, bias, running_mean, running_var, eps=1e-5):
    """y = x * a + b per channel, a = weight / sqrt(running_var + eps), b = bias - running_mean
    * a, as torchvision.ops.FrozenBatchNorm2d; x of shape (N, C, ...). normkit's inference
    BatchNorm where it runs, torchvision's arithmetic otherwise (float64, other devices, ...)."""
    if (_normkit_can_run(x, weight, bias, running_mean, running_var)
            and 2 <= x.dim() <= _MAX_RANK and _per_channel(x, weight, bias, running_mean,
                                                          running_var)):
        return _BatchNormFunction.apply(_dense(x), weight, bias, running_mean, running_var,
                                        False, 0.0, float(eps))
    shape = (1, -1) + (1,) * max(x.dim() - 2, 0)
    scale = weight.reshape(shape) * (running_var.reshape(shape) + eps).rsqrt()
    return x * scale + (bias.reshape(shape) - running_mean.reshape(shape) * scale)


class FrozenBatchNorm2d(torch.nn.Module):
    """torchvision.ops.FrozenBatchNorm2d on normkit: buffers weight, bias, running_mean and
    running_var (no parameters, nothing updated, train and eval the same), eps; its state_dict
    is torchvision's, and a BatchNorm2d state_dict loads into it (num_batches_tracked is
    dropped, as torchvision does). Autograd gives the input's gradient."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x):
        return frozen_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                 self.eps)

    def __repr__(self):
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


def freeze_batch_norm(model, prefix=""):
    """Replaces every BatchNorm2d and SyncBatchNorm of model (torch's, normkit's, and their
    subclasses; the model itself included) by a FrozenBatchNorm2d holding copies of its weight,
    bias, running statistics and eps, as detectron2's convert_frozen_batchnorm. Returns the
    model, or the new layer when model is one. Parameters of replaced layers leave the model:
    make the optimizer after this call. Raises ValueError for a layer without running
    statistics (track_running_stats=False), which has nothing to freeze."""
    if isinstance(model, (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)):
        if model.running_mean is None or model.running_var is None:
            raise ValueError(f"freeze_batch_norm: {prefix or 'the model'} "
                             f"({type(model).__name__}) has no running statistics "
                             "(track_running_stats=False), so there is nothing to freeze")
        frozen = FrozenBatchNorm2d(model.num_features, model.eps)
        with torch.no_grad():
            frozen.running_mean = model.running_mean.detach().clone()
            frozen.running_var = model.running_var.detach().clone()
            if model.affine:
                frozen.weight = model.weight.detach().clone()
                frozen.bias = model.bias.detach().clone()
            else:
                frozen.to(device=model.running_mean.device)
        frozen.train(model.training)
        return frozen
    for name, child in model.named_children():
        new_child = freeze_batch_norm(child, prefix + "." + name if prefix else name)
        if new_child is not child:
            model.add_module(name, new_child)
    return model
