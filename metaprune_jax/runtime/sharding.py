"""Data parallelism with `jax.jit` and `NamedSharding` over a one-axis mesh ('data',).

The global batch is split over every device of every process along its first axis; the train
state is replicated. Under `jax.jit` the loss is a mean over the *global* batch, so the gradient
(and train-mode BatchNorm statistics) are those of the whole batch: XLA inserts the all-reduces
that `pmap` code writes as `lax.pmean`. The same program therefore runs on 1 device, 8 devices or
a multi-host pod and gives the same numbers up to float reassociation.

Each process feeds only its host-local part of the batch
(`jax.make_array_from_process_local_data`); the data pipeline builds exactly that part.
"""

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metaprune_jax.backends import xla_hints
from metaprune_jax.runtime import steps


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def local_mesh() -> Mesh:
  """A 1-D 'data' mesh over this process's devices only: a process-local run that needs no
  other process (each process of a multi-host `generate` trains its own data models)."""
  return make_mesh(jax.local_devices())


def mesh_processes(mesh: Mesh) -> tuple[int, ...]:
  """The sorted process indices that own the mesh's devices."""
  return tuple(sorted({int(d.process_index) for d in mesh.devices.flat}))


def is_process_subset(mesh: Mesh) -> bool:
  """True when the mesh leaves out some processes of a multi-host run (e.g. `local_mesh()`)."""
  return len(mesh_processes(mesh)) < jax.process_count()


def is_writer(mesh: Mesh) -> bool:
  """True on the one process that writes files for a run on `mesh` (its lowest process)."""
  return jax.process_index() == mesh_processes(mesh)[0]


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch size") -> None:
  """Raises ValueError unless the global batch splits evenly over the mesh's devices."""
  num_devices = mesh.devices.size
  if global_batch % num_devices:
    raise ValueError(
      f"The global {what} {global_batch} is not divisible by the number of devices "
      f"{num_devices} ({jax.process_count()} process(es) x {jax.local_device_count()} local "
      f"devices); choose a multiple of {num_devices}.")


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch slices -> global arrays sharded over 'data'.

  Args:
    local_batch: arrays [global_batch / process_count, ...] (this process's rows).
    mesh: the mesh.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def rows_to_global(build, num_rows: int, mesh: Mesh) -> Any:
  """Global arrays split over the mesh's 'data' axis along their first axis, of which this
  process builds only the rows that its own devices hold.

  Args:
    build: ``rows [n] int -> pytree of numpy arrays [n, ...]`` (the given rows, in order).
    num_rows: the global first-axis size (divisible by the mesh size).
    mesh: the mesh.

  Returns:
    The pytree of global ``[num_rows, ...]`` arrays sharded ``P('data')``.
  """
  sharding = data_sharding(mesh)
  held = sharding.addressable_devices_indices_map((num_rows,)).values()
  rows = sorted({r for idx in held for r in range(*idx[0].indices(num_rows))})
  local = build(np.asarray(rows, np.int64))
  where = {r: p for p, r in enumerate(rows)}

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(
        (num_rows,) + x.shape[1:], sharding,
        lambda idx: x[[where[r] for r in range(*idx[0].indices(num_rows))]])

  return jax.tree.map(put, local)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (the same value on every process) replicated on the mesh."""
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # already a global array
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def jit_train_step(arch, tx, mesh: Mesh, sparsity: tuple[float, float, str] | None = None):
  """`steps.train_step` bound to (arch, tx, sparsity), jitted: state replicated and donated,
  batch split."""
  repl, data = replicated(mesh), data_sharding(mesh)
  return jax.jit(functools.partial(steps.train_step, arch=arch, tx=tx, sparsity=sparsity),
                 in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0,
                 compiler_options=xla_hints.conv_compiler_options(mesh.devices.flat))


@functools.cache
def jit_eval_step(arch, mesh: Mesh):
  """`steps.eval_step` bound to arch, jitted (cached: one compilation per arch and mesh)."""
  repl, data = replicated(mesh), data_sharding(mesh)
  return jax.jit(functools.partial(steps.eval_step, arch=arch),
                 in_shardings=(repl, repl, data), out_shardings=repl,
                 compiler_options=xla_hints.conv_compiler_options(mesh.devices.flat))
