"""Device mesh, logical-axis rules, and the shardings of parameters, optimizer state and batches.

The modules never see a mesh: every parameter carries logical axis names (``embed``, ``mlp``, ``heads``,
``conv_in``, ``conv_out``, ``norm``, ``vocab``; models/layers.py) and one rules table per layout maps them to
the mesh axes ``data``, ``fsdp`` and ``tensor``. Parameters, optimizer state and batches all get their
shardings from that one declaration (``param_shardings``, ``opt_state_shardings``, ``batch_sharding``).

Axis types: the mesh is built with ``AxisType.Auto`` on purpose. Our ports are written as ordinary
single-device code and we only pin the shardings of the step's inputs and outputs; with Auto axes the GSPMD
partitioner propagates those through the model and inserts the FSDP all-gathers and reduce-scatters itself.
``Explicit`` axes (jax's new default for ``jax.make_mesh``) would make every matmul over an FSDP-sharded
contracting dimension a ``ShardingTypeError`` unless each module annotated its activations.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from persguard_jax.config import ConfigError, Section

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch is split over every axis that holds a different slice of data

# A rule maps a logical axis to a mesh axis (or a tuple of mesh axes). Several rules may name the same logical
# axis: the first one whose mesh axes are still unused by this parameter and divide the dimension wins.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

RULES: dict[str, Rules] = {
    # Pure data parallelism: every parameter replicated, the batch split over all devices.
    "data": (
        ("batch", ("data", "fsdp", "tensor")),
    ),
    # FSDP (ZeRO-3) with optional tensor parallelism: input-side dimensions (embed, conv_in) are split over
    # fsdp, output-side ones (mlp, heads, conv_out) over tensor. Norm scales, biases, time embeddings and the
    # GEGLU feed-forward are covered too; anything the table leaves whole that is large enough gets fsdp on its
    # largest divisible dimension (``spec_for``), so no big weight is ever replicated.
    "fsdp": (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("conv_in", "fsdp"),
        ("vocab", "fsdp"),
        ("norm", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("conv_out", "tensor"),
        ("conv_out", "fsdp"),   # biases: their only dimension
        ("mlp", "fsdp"),
        ("heads", "fsdp"),
    ),
}


@dataclass(frozen=True)
class MeshConfig(Section):
    """Mesh shape. A size of -1 takes the devices left over (at most one axis may say -1).

    ``dcn_data`` > 1 builds a multi-slice (hybrid ICI/DCN) mesh for TPU pods: the data axis is split across
    ``dcn_data`` slices (slow data-centre network: only the gradient all-reduce crosses it) and fsdp/tensor stay
    within a slice (fast interconnect). ``layout`` names the rules table.
    """
    SECTION = "mesh"
    BOUNDS = {"data": "[-1, inf)", "fsdp": "[-1, inf)", "tensor": "[-1, inf)", "dcn_data": "[1, inf)",
              "min_shard_size": "[1, inf)"}
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    layout: str = "fsdp"
    # arrays with fewer elements than this stay replicated; 1 = shard every array with a divisible dimension
    # (norm scales and biases too: maxdiffusion leaves those replicated, costing ~1 MB per device on SD 1.5)
    min_shard_size: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.layout not in RULES:
            raise ConfigError(f"mesh.layout: unknown sharding layout {self.layout!r}; known: {sorted(RULES)}")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1 (data, fsdp, tensor), got data={self.data} "
                              f"fsdp={self.fsdp} tensor={self.tensor}")
        if 0 in (self.data, self.fsdp, self.tensor):
            raise ConfigError(f"mesh: axis sizes are positive (or -1: the devices left), got data={self.data} "
                              f"fsdp={self.fsdp} tensor={self.tensor}")


def resolve_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with -1 filled in; data counts all slices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh config: at most one axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} "
                         f"tensor={cfg.tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh config: {num_devices} devices do not divide by the fixed axes' {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh config: data x fsdp x tensor = {'x'.join(map(str, sizes))} = {math.prod(sizes)} "
                         f"devices, but {num_devices} are available")
    if sizes[0] % cfg.dcn_data:
        raise ValueError(f"mesh config: data={sizes[0]} is not divisible by dcn_data={cfg.dcn_data}")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all) with axes data, fsdp, tensor, Auto axis types."""
    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_shape(cfg, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if cfg.dcn_data > 1:
        ici = (shape[0] // cfg.dcn_data, shape[1], shape[2])
        if hasattr(devices[0], "slice_index") or jax.process_count() > 1:
            from jax.experimental import mesh_utils
            # TPU slices carry slice_index; elsewhere (multi-host GPU) each process is one DCN granule
            grid = mesh_utils.create_hybrid_device_mesh(
                ici, (cfg.dcn_data, 1, 1), devices, process_is_granule=not hasattr(devices[0], "slice_index"))
        else:
            # one process without slices (CPU tests): contiguous device groups stand in for the slices
            grid = np.asarray(devices).reshape((cfg.dcn_data,) + ici).reshape(shape)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def request_cpu_devices(n: int | None = None) -> None:
    """Ask XLA for ``n`` CPU devices (default: one per core) unless XLA_FLAGS already says how many.

    XLA's CPU runtime keeps about one core busy per device; with one device per core the data axis of the
    mesh uses them all (the tiny UNet step: 0.71 -> 0.40 of PyTorch's time on 2 cores; the engine's DreamBooth
    step, whose gradient is computed per device with replicated parameters: 0.59-0.67 -> 0.55-0.57;
    docs/benchmarks.md).
    Only effective before jax starts its CPU backend.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    n = n or os.cpu_count() or 1
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


# --------------------------------------------------------------------------- logical axes -> mesh axes

def _axes_of(rule_target) -> tuple[str, ...]:
    if rule_target is None:
        return ()
    return (rule_target,) if isinstance(rule_target, str) else tuple(rule_target)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules, *,
             min_shard_size: int = 1) -> P:
    """The mesh ``PartitionSpec`` of one array from its logical axes, shape and the rules.

    Mesh axes of size 1 are dropped (nothing to split), a mesh axis is used at most once per array, and a
    dimension only takes axes whose total size divides it. If the table leaves ``fsdp`` unused on an array of at
    least ``min_shard_size`` elements, fsdp goes on its largest dimension that still divides: every large
    weight is FSDP-sharded whatever its logical names.
    """
    logical = tuple(logical) + (None,) * (len(shape) - len(logical))
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    used: set[str] = set()
    spec: list[tuple[str, ...]] = [() for _ in shape]
    if math.prod(shape) >= min_shard_size or "batch" in logical:
        # rules in table order, so a later fallback rule (mlp -> fsdp) never takes an axis from an earlier one
        # (embed -> fsdp) whatever the order of the dimensions
        for rule_name, target in rules:
            for dim, name in enumerate(logical):
                if name != rule_name or spec[dim]:
                    continue
                axes = tuple(a for a in _axes_of(target) if sizes.get(a, 1) > 1 and a not in used)
                if axes and shape[dim] % math.prod(sizes[a] for a in axes) == 0:
                    spec[dim] = axes
                    used.update(axes)
        fsdp = sizes.get("fsdp", 1)
        uses_fsdp = any("fsdp" in target for name, target in rules if target and name != "batch")
        if fsdp > 1 and uses_fsdp and "fsdp" not in used and "batch" not in logical:
            per_dim = [math.prod(sizes[a] for a in s) for s in spec]
            candidates = [d for d in range(len(shape)) if shape[d] % (per_dim[d] * fsdp) == 0]
            if candidates:
                d = max(candidates, key=lambda d: shape[d] // per_dim[d])
                spec[d] = spec[d] + ("fsdp",)
    return P(*[None if not s else s[0] if len(s) == 1 else s for s in spec])


def rules_for(layout: str) -> Rules:
    if layout not in RULES:
        raise ValueError(f"unknown sharding layout {layout!r}; known: {sorted(RULES)}")
    return RULES[layout]


def logical_axes(module_or_state) -> Any:
    """Pure-dict tree of logical ``PartitionSpec``s, one per ``nnx.Param`` (the annotations in the modules)."""
    from flax import nnx
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    return nnx.get_partition_spec(state).to_pure_dict()


def param_shardings(logical: Any, shapes: Any, mesh: Mesh, cfg: MeshConfig | None = None) -> Any:
    """``NamedSharding`` for every leaf of ``shapes`` (arrays or ShapeDtypeStructs) from its logical spec."""
    cfg = cfg or MeshConfig()
    rules = rules_for(cfg.layout)

    def one(spec, x):
        return NamedSharding(mesh, spec_for(tuple(spec), x.shape, mesh, rules, min_shard_size=cfg.min_shard_size))

    return jax.tree.map(one, logical, shapes, is_leaf=lambda s: isinstance(s, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(optimizer, params_shapes: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for ``optimizer.init(params)``: per-parameter statistics follow their parameter (so Adam's two
    moments are FSDP-sharded exactly like the weights), everything else (counts, scalars) is replicated."""
    import optax
    state_shapes = jax.eval_shape(optimizer.init, params_shapes)
    return optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, state_shapes, shardings,
        transform_non_params=lambda _: replicated(mesh))


def dividing_axes(mesh: Mesh, axes: Sequence[str], size: int | None = None) -> tuple[str, ...]:
    """The leading ``axes`` whose sizes' product divides ``size`` (all of them when ``size`` is None)."""
    axes = tuple(axes)
    while axes and size is not None and size % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return axes


def batch_axes(mesh: Mesh, cfg: MeshConfig | None = None, size: int | None = None) -> tuple[str, ...]:
    """The mesh axes a batch's leading dimension is split over: the layout's ``batch`` axes, and with ``size``
    (the global batch) only as many of them as divide it, so a DreamBooth batch of 1 instance + 1 class image
    still runs on 8 devices (the devices of the unused axes compute replicas)."""
    rules = dict(rules_for((cfg or MeshConfig()).layout))
    axes = tuple(a for a in _axes_of(rules.get("batch", BATCH_AXES)) if a in mesh.axis_names)
    return dividing_axes(mesh, axes, size)


def batch_spec(ndim: int, mesh: Mesh, cfg: MeshConfig | None = None, size: int | None = None) -> P:
    """Batch arrays are split on their leading dimension over ``batch_axes``."""
    axes = batch_axes(mesh, cfg, size)
    return P(axes if len(axes) > 1 else (axes[0] if axes else None), *([None] * (ndim - 1)))


def batch_sharding(batch: Any, mesh: Mesh, cfg: MeshConfig | None = None) -> Any:
    """Shardings for a global batch (arrays or shapes): leading dimension over the batch axes that divide it."""
    return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(np.ndim(x), mesh, cfg, np.shape(x)[0])), batch)


def local_batch_sharding(local_batch: Any, mesh: Mesh, cfg: MeshConfig | None = None) -> Any:
    """``batch_sharding`` of the global batch that this process's share ``local_batch`` is part of (the leading
    dimension times the process count): what ``global_batch`` builds and the step must be compiled for."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] * jax.process_count(),) + np.shape(x)[1:],
                                                         np.asarray(x).dtype), local_batch)
    return batch_sharding(shapes, mesh, cfg)


def batch_divisor(mesh: Mesh, cfg: MeshConfig | None = None) -> int:
    """The number of pieces a global batch is cut into: its size must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, cfg))


def global_batch(local_batch: Any, mesh: Mesh, cfg: MeshConfig | None = None) -> Any:
    """Assemble each process's share of a batch (numpy, leading dim = global batch / process count) into
    global arrays sharded over the batch axes. On one process this is a plain ``device_put``."""
    def one(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        sharding = NamedSharding(mesh, batch_spec(x.ndim, mesh, cfg, global_shape[0]))
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return jax.tree.map(one, local_batch)


def put_global(tree: Any, *, mesh: Mesh, cfg: MeshConfig | None = None, shardings: Any = None) -> Any:
    """Arrays that every process holds whole (photos, prompts, weights read from disk) as global arrays: each
    device takes its slice (``jax.make_array_from_callback``), so it works across hosts, where ``device_put``
    of a host array onto devices of other processes cannot. ``shardings`` default: ``batch_sharding``."""
    if shardings is None:
        shardings = batch_sharding(tree, mesh, cfg)

    def one(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(one, tree, shardings)


# --------------------------------------------------------------------------- the plan, for humans

def sharding_plan(shapes: Any, shardings: Any) -> list[dict]:
    """One row per array: name, shape, mesh spec, bytes per device."""
    from persguard_jax.models.functional import path_str
    rows = []
    flat_s = dict(jax.tree_util.tree_flatten_with_path(shardings)[0])
    for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        s = flat_s[path]
        shard = s.shard_shape(x.shape)
        rows.append(dict(name=path_str(path), shape=tuple(x.shape), spec=str(s.spec),
                         bytes_per_device=int(math.prod(shard)) * np.dtype(x.dtype).itemsize))
    return rows


def format_plan(rows: list[dict], *, limit: int | None = None) -> str:
    """The plan as an aligned text table, with totals (``limit`` rows shown, largest first)."""
    shown = sorted(rows, key=lambda r: -r["bytes_per_device"])[:limit] if limit else rows
    width = max([len(r["name"]) for r in shown] + [4])
    lines = [f"{'name':<{width}}  {'shape':<22} {'spec':<34} bytes/device"]
    for r in shown:
        lines.append(f"{r['name']:<{width}}  {str(r['shape']):<22} {r['spec']:<34} {r['bytes_per_device']:,}")
    total = sum(r["bytes_per_device"] for r in rows)
    full = sum(int(math.prod(r["shape"])) for r in rows)
    lines.append(f"{len(rows)} arrays, {total:,} bytes per device ({full:,} elements unsharded)")
    return "\n".join(lines)
