"""A tiny dataset in Fashion-MNIST's files and format (gzip IDX), random images and labels, for
the tests that drive normkit-train end to end."""

import gzip
import struct

import numpy as np


def write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_dataset(folder, seed, train_images, test_images):
    """Writes the four files into folder (train_images and test_images 28x28 images each) and
    returns folder."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_images), ("t10k", test_images)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 256, (n, 28, 28))
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels, 0x801)
    return folder
