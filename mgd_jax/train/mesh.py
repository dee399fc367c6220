"""Device mesh, shardings and batches: data parallel by ``jax.jit`` over a 1-D ``data`` mesh.

Parameters are replicated (``P()``), batches split along their leading axis (``P('data')``).  Each process
contributes its own rows of the global batch (``make_array_from_process_local_data``), so the same code runs
on one CPU, one GPU, or every host of a pod.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicate(tree, mesh: Mesh):
    """Host values (the same on every process) -> arrays replicated over the mesh, on one host or many."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x  # already a global array
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(leaf, tree)


def process_slice(global_size: int) -> slice:
    """This process's contiguous slice of a global batch of ``global_size`` rows (all of it on one process)."""
    if global_size % jax.process_count():
        raise ValueError(f"a global batch of {global_size} rows does not split over {jax.process_count()} processes")
    per = global_size // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def shard_local_batch(local_rows: dict[str, np.ndarray], global_size: int, mesh: Mesh) -> dict[str, jax.Array]:
    """``local_rows``: this process's slice (``process_slice``) of a global batch of ``global_size`` rows."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_size,) + v.shape[1:])
            for k, v in local_rows.items()}


def shard_batch(global_rows: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """``global_rows``: host arrays of the *global* batch; each process puts its own contiguous slice."""
    size = next(iter(global_rows.values())).shape[0]
    mine = process_slice(size)
    return shard_local_batch({k: v[mine] for k, v in global_rows.items()}, size, mesh)


def local_rows(images, labels, rows: np.ndarray) -> dict[str, np.ndarray]:
    """This process's slice of the global batch ``rows`` (indices into ``images`` / ``labels``; rows >= len(labels)
    are padding, after the real rows: zero images, label 0, mask 0).  Only this slice's images are read (a streaming dataset decodes
    them here), so each process of a multi-host evaluation reads only its own shard."""
    n = len(labels)
    mine = np.asarray(rows)[process_slice(len(rows))]
    real = mine < n
    if not np.all(real[:int(real.sum())]):
        raise ValueError("local_rows: padding rows must come after the real rows")
    img = images[mine[real]]
    if not real.all():
        img = np.concatenate([img, np.zeros((int((~real).sum()),) + tuple(img.shape[1:]), img.dtype)])
    return {"image": img, "label": np.where(real, np.asarray(labels)[np.minimum(mine, n - 1)], 0).astype(labels.dtype),
            "mask": real.astype(np.float32)}


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int, pass_id: int,
                  multiple_of: int, drop_remainder: bool = False) -> list[np.ndarray]:
    """Shuffled index batches of one pass over the data, a pure function of (seed, epoch, pass_id).

    The last, smaller batch is kept (the reference's ``drop_last=False``) after trimming it to a multiple of
    ``multiple_of`` (the device count) so it can be split over the mesh.
    """
    perm = np.random.default_rng([int(seed), int(epoch), int(pass_id)]).permutation(num_examples)
    n_full = num_examples // batch_size
    batches = [perm[i * batch_size:(i + 1) * batch_size] for i in range(n_full)]
    rest = num_examples - n_full * batch_size
    if not drop_remainder:
        rest -= rest % multiple_of
        if rest > 0:
            batches.append(perm[n_full * batch_size:n_full * batch_size + rest])
    return batches


def interleave(parts: Sequence[np.ndarray], groups: int) -> np.ndarray:
    """Batches of several data orders (``parts``: S arrays of the same length, a multiple of ``groups``) as one
    batch laid out for ``groups`` devices (or processes): each group's contiguous rows hold its share of every part,
    part after part.  Sharded along the leading axis, every device holds its own rows of each part, so
    ``deinterleave`` inside a jitted step moves no data between devices.  One part: returned as it is."""
    if len(parts) == 1:
        return parts[0]
    size = len(parts[0])
    if any(len(p) != size for p in parts) or size % groups:
        raise ValueError(f"interleave: parts of {[len(p) for p in parts]} rows over {groups} groups")
    rest = parts[0].shape[1:]
    return np.stack([np.asarray(p).reshape(groups, size // groups, *rest) for p in parts], axis=1).reshape(
        len(parts) * size, *rest)


def deinterleave(x, parts: int, groups: int):
    """The inverse of ``interleave`` on a (jax or numpy) array: ``[groups * parts * b, ...]`` -> ``[parts, groups *
    b, ...]``, part ``k`` in its original row order."""
    rest = x.shape[1:]
    b = x.shape[0] // (parts * groups)
    return x.reshape(groups, parts, b, *rest).swapaxes(0, 1).reshape(parts, groups * b, *rest)


def reinterleave(x, groups: int):
    """``interleave`` of stacked parts on a (jax or numpy) array, inside a step: ``[parts, groups * b, ...]`` ->
    ``[groups * parts * b, ...]`` (the inverse of ``deinterleave``; sharded as the batch, it moves no rows between
    devices either)."""
    parts, rows, rest = x.shape[0], x.shape[1], x.shape[2:]
    b = rows // groups
    return x.reshape(parts, groups, b, *rest).swapaxes(0, 1).reshape(groups * parts * b, *rest)


def steps_per_epoch(num_examples: int, batch_size: int, multiple_of: int, drop_remainder: bool = False) -> int:
    return len(epoch_batches(num_examples, batch_size, 0, 0, 0, multiple_of, drop_remainder))
