"""Synchronized BatchNorm over MPI, for mpi4py communicators.

    from mpi4py import MPI
    import normkit.mpi
    y, mean, invstd = normkit.mpi.sync_batch_norm_forward(
        x, running_mean, running_var, weight, bias, 0.1, 1e-5, MPI.COMM_WORLD)

Every rank passes its own samples; the statistics are those of the global batch and are bitwise
the same for any number of ranks. Importing this module loads MPI (through mpi4py); importing
`normkit` alone does not.
"""

from ._mpi import (_set_output_poison, reject_call, sync_batch_norm_backward,
                   sync_batch_norm_forward)

__all__ = ["sync_batch_norm_forward", "sync_batch_norm_backward", "reject_call"]
