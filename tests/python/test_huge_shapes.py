"""Shapes whose bytes exceed the machine's memory, given as broadcast views (no memory behind
them): every op raises MemoryError at once, naming the size, instead of crashing, hanging or
being killed for memory. (The binding makes a non-contiguous input contiguous before the
library sees it, and that allocation is what is refused.)"""

import numpy as np
import pytest

import normkit

# 2^20 * 64 * 2^14 float32 values: 4 TiB.
HUGE = (1 << 20, 64, 1 << 14)


def huge(dtype=np.float32):
    return np.broadcast_to(np.ones((), dtype), HUGE)


@pytest.mark.parametrize("call", [
    lambda x: normkit.group_norm(x, 8),
    lambda x: normkit.layer_norm(x, [x.shape[-1]]),
    lambda x: normkit.instance_norm(x),
    lambda x: normkit.batch_norm(x, None, None, training=True),
    lambda x: normkit.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5),
    lambda x: normkit.layer_norm_forward(x, [x.shape[-1]]),
    lambda x: normkit.instance_norm_forward(x),
], ids=["group_norm", "layer_norm", "instance_norm", "batch_norm", "batch_norm_forward",
        "layer_norm_forward", "instance_norm_forward"])
def test_a_shape_beyond_memory_is_a_python_error(call):
    with pytest.raises(MemoryError, match="4.00 TiB"):
        call(huge())
