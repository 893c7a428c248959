"""Sharding over a device mesh: logical axis names on the parameters, one rules table, meshes.

Every parameter carries logical axis names where it is created (`Linear(..., axes=("embed", "mlp"))`,
`nnx.Param(..., logical_axes=...)`; a leading stacked-layer axis is "layers"). One table, `RULES`, maps
the names to the mesh axes "data" and "model":

- "tp" (tensor parallel, Megatron style): attention heads, MLP width and vocabulary on "model"; the
  rest replicated. Batch rows (and truncation variants) on "data".
- "fsdp": as "tp", and the embedding width on "data" too, so the weights are spread over every device
  and gathered layer by layer.

A mesh axis that does not divide a dimension is dropped for that dimension (it stays replicated), so
any model runs on any mesh. Activations are constrained at the layer-stack boundaries (rows on
"data"); XLA's partitioner does the rest, and every entry point returns the same numbers as on one
device. `jaxflow.load(path, mesh=...)` restores each parameter straight into its sharded layout.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)
LOGICAL_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "mlp")

RULES: dict[str, dict[str, str]] = {
    "tp": {"vocab": MODEL, "heads": MODEL, "kv_heads": MODEL, "mlp": MODEL},
    "fsdp": {"vocab": MODEL, "heads": MODEL, "kv_heads": MODEL, "mlp": MODEL, "embed": DATA},
}


class MeshError(ValueError):
    """A mesh request that cannot be met (one line: what is wrong and how to fix it)."""


def parse_mesh(text: str) -> dict[str, int]:
    """"data:N,model:M" (either part may be left out: size 1) -> {"data": N, "model": M}."""
    sizes = {DATA: 1, MODEL: 1}
    seen = set()
    for part in str(text).split(","):
        name, _, n = part.strip().partition(":")
        if name not in sizes or name in seen or not n.strip().isdigit() or int(n) < 1:
            raise MeshError(f"--mesh must look like data:N,model:M with positive sizes (axes data, model), got {text!r}")
        seen.add(name)
        sizes[name] = int(n)
    return sizes


def make_mesh(shape: str | dict | tuple | None = None, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: this process's local devices).

    shape: "data:N,model:M", {"data": N, "model": M}, (N, M), or None (all devices on "data"). It must
    use exactly the devices given (N * M of them)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if shape is None:
        sizes = {DATA: len(devices), MODEL: 1}
    elif isinstance(shape, str):
        sizes = parse_mesh(shape)
    elif isinstance(shape, dict):
        sizes = {DATA: int(shape.get(DATA, 1)), MODEL: int(shape.get(MODEL, 1))}
    else:
        sizes = {DATA: int(shape[0]), MODEL: int(shape[1])}
    n = sizes[DATA] * sizes[MODEL]
    if n != len(devices):
        raise MeshError(f"mesh data:{sizes[DATA]},model:{sizes[MODEL]} needs {n} devices, but {len(devices)} are "
                        f"available ({devices[0].platform}): make data x model = {len(devices)}")
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes[DATA], sizes[MODEL]), MESH_AXES)


def _names(var: nnx.Variable, ndim: int) -> tuple:
    """The logical names of a parameter's dimensions ("layers" for a stacked leading axis)."""
    names = tuple(var.get_metadata().get("logical_axes") or ())
    if not names:
        return (None,) * ndim
    unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axis {unknown[0]!r}: use one of {', '.join(LOGICAL_AXES)}")
    if len(names) == ndim - 1:  # stacked by nnx.vmap over the layers
        names = ("layers",) + names
    if len(names) != ndim:
        raise ValueError(f"logical axes {names} do not fit a parameter of {ndim} dimensions")
    return names


def partition_spec(names: tuple, shape: tuple, mesh: Mesh, rules: str | dict = "tp") -> P:
    """The PartitionSpec of one array: each logical name through the rules to a mesh axis, kept only
    where that axis divides the dimension and is not used by an earlier dimension."""
    table = RULES[rules] if isinstance(rules, str) else rules
    used, spec = set(), []
    for name, dim in zip(names, shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
            spec.append(None)
        else:
            used.add(axis)
            spec.append(axis)
    return P(*spec)


def check_rules(rules: str | dict) -> dict:
    if isinstance(rules, str):
        if rules not in RULES:
            raise MeshError(f"sharding rules must be one of {', '.join(RULES)}, got {rules!r}")
        return RULES[rules]
    return dict(rules)


def state_shardings(state: nnx.State, mesh: Mesh, rules: str | dict = "tp") -> nnx.State:
    """The NamedSharding of every parameter of a state (abstract states from `nnx.eval_shape` too),
    as a state of the same structure."""
    table = check_rules(rules)

    def one(v):
        shape = tuple(v.get_value().shape)
        return v.replace(NamedSharding(mesh, partition_spec(_names(v, len(shape)), shape, mesh, table)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def set_mesh(model, mesh: Mesh | None):
    """Records the mesh on the model's decoder (static: the layer stack constrains its activations to it)."""
    model.language_model.mesh = mesh
    return model


def shard(model, mesh: Mesh, rules: str | dict = "tp"):
    """The model with every parameter placed by the rules on `mesh` (and the mesh recorded)."""
    table = check_rules(rules)
    graphdef, state = nnx.split(model)

    def place(v):
        a = v.get_value()
        return v.replace(jax.device_put(a, NamedSharding(mesh, partition_spec(_names(v, a.ndim), a.shape, mesh, table))))

    state = jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return set_mesh(nnx.merge(graphdef, state), mesh)


def constrain_rows(x, mesh: Mesh | None, axes: tuple[int, ...] = (0,)):
    """x with the first of `axes` that "data" divides (batch rows, truncation variants) sharded on
    "data"; x unchanged without a mesh or when none divides."""
    if mesh is None or mesh.shape[DATA] == 1:
        return x
    for axis in axes:
        if x.shape[axis] % mesh.shape[DATA] == 0:
            spec = [None] * x.ndim
            spec[axis] = DATA
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
    return x


def sharding_summary(model) -> dict:
    """How the parameters lie: counts of parameters (and of their elements) sharded on each mesh axis."""
    state = nnx.state(model, nnx.Param)
    out = {"parameters": 0, "elements": 0, "on_model": 0, "on_data": 0, "elements_on_model": 0}
    for leaf in jax.tree.leaves(state):
        spec = getattr(getattr(leaf, "sharding", None), "spec", P())
        axes = {a for a in spec if a is not None}
        n = math.prod(leaf.shape)
        out["parameters"] += 1
        out["elements"] += n
        out["on_model"] += MODEL in axes
        out["on_data"] += DATA in axes
        out["elements_on_model"] += n if MODEL in axes else 0
    return out
