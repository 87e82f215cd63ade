"""Checkpoints with orbax: per layer, so any mesh or schedule can resume them.

A checkpoint holds the parameters and the optimizer state in per-layer form
(``Pipeline.to_layers``: each layer's own tree, a parameter layers share
stored once, in the first layer that reaches it; the optimizer state of the
per-layer tree; its
leaves are grouped as the optimizer builds them for a single array, each
group that mirrors the parameters stored per layer, other leaves such as
counts as they are), the step and the data position, never the device
layout. A run saved on
mesh ``(2, 4)`` with GPipe resumes on ``(1, 8)`` with 1F1B, on ``(1, 1)``, or
with fractional cuts (``Pipeline.from_layers`` fills every copy of a split
layer).

On disk (``orbax.checkpoint.CheckpointManager``, one folder per step)::

    checkpoint_dir/
      <step>/arrays/    params/<layer>/<leaf> and opt_state/<leaf>[/<layer>/<leaf>]
      <step>/meta/      JSON: format, step, data_position, per-layer names and
                        shapes, optimizer leaves, the mesh and schedule that wrote it

Saving is atomic: orbax writes ``<step>.orbax-checkpoint-tmp-<time>`` and
renames it to ``<step>`` when complete, and only complete folders count as
checkpoints, so a crash mid-save leaves the previous checkpoint the newest.

Several processes (``jax.distributed``): every process must call ``save``
and ``restore`` (``to_layers`` gathers the stack entries other processes hold, and
orbax synchronises the processes); the arrays are identical host copies on
every process and orbax writes them from process 0 only. The directory must
be one shared file system that every process can read.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from .pipeline import Pipeline, TrainState

FORMAT = 1
_META_KEYS = ("format", "step", "data_position", "layers", "opt_state")


class CheckpointSaveError(OSError):
    """Saving a checkpoint failed; the checkpoints saved before are untouched.

    Attributes:
      step: the step whose save failed.
      last_good: the newest complete checkpoint, or ``None``.
    """

    def __init__(self, message: str, step: int, last_good: "CheckpointInfo | None"):
        super().__init__(message)
        self.step, self.last_good = step, last_good


class CheckpointInfo(NamedTuple):
    """What a checkpoint records besides its arrays.

    Attributes:
      step: optimizer steps taken.
      data_position: training batches consumed (``== step``: one per step).
      path: the checkpoint's folder.
    """

    step: int
    data_position: int
    path: str


class Checkpoints:
    """A folder of per-layer checkpoints, the newest ``keep`` kept.

    Args:
      directory: the folder (created if missing).
      keep: how many checkpoints to keep (oldest deleted first); ``None``
        keeps all.

    Raises:
      TypeError: if ``directory`` is not a path or ``keep`` not an int.
      ValueError: if ``directory`` is a file or ``keep < 1``.
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a path (str or os.PathLike), got {type(directory).__name__}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, np.integer))):
            raise TypeError(f"keep_checkpoints must be an int or None, got {keep!r}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 (or None to keep all), got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"checkpoint_dir={self.directory!r} is a file; give a folder")
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if keep is None else int(keep), create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("arrays", "meta"))

    def latest(self) -> int | None:
        """The step of the newest complete checkpoint, or ``None``."""
        self._manager.reload()
        return self._manager.latest_step()

    def check_writable(self) -> None:
        """Raises unless a file can be created in the folder (run before training, not at the first save).

        Raises:
          ValueError: naming the folder and the operating system's reason.
        """
        try:
            handle, probe = tempfile.mkstemp(prefix=".jaxpipe-write-check-", dir=self.directory)
            os.close(handle)
            os.remove(probe)
        except OSError as err:
            raise ValueError(
                f"checkpoint_dir={self.directory!r} is not writable ({err.strerror or err}); give a folder "
                "this process can write to, or check its permissions, before training"
            ) from None

    def latest_readable(self) -> int | None:
        """The step of the newest complete checkpoint whose metadata reads, or ``None`` if there is none.

        A newer checkpoint with unreadable metadata (an empty or partial JSON
        file) is skipped with a warning naming it.

        Raises:
          ValueError: if there are checkpoints but none of them reads.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                self._read_meta(step)
            except ValueError as err:
                warnings.warn(f"{err}; falling back to the checkpoint before it", stacklevel=2)
                continue
            return step
        if steps:
            raise ValueError(
                f"no checkpoint in {self.directory} can be read (steps {steps}, every one's metadata is "
                "unreadable); move the folder away to start afresh"
            )
        return None

    def steps(self) -> list[int]:
        """The steps of all complete checkpoints, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def info(self, step: int | None = None) -> CheckpointInfo:
        """The step and data position of checkpoint ``step`` (default: the newest).

        Raises:
          ValueError: if there is no such checkpoint.
        """
        step = self._check_step(step)
        meta = self._read_meta(step)
        return CheckpointInfo(meta["step"], meta["data_position"], os.path.join(self.directory, str(step)))

    def read_params(self, step: int | None = None) -> tuple[list[dict], list[list[np.ndarray]]]:
        """The per-layer parameters of checkpoint ``step`` (default: the newest), without a pipeline.

        Returns:
          ``(layers, params)``: the saved per-layer names and shapes
          (``{"name", "shapes"}``), and per layer its parameter leaves as
          NumPy arrays in the layer's ``nnx.Param`` leaf order.

        Raises:
          ValueError: if there is no such checkpoint or it has another format.
        """
        ocp = self._ocp
        step = self._check_step(step)
        meta = self._read_meta(step)
        if meta.get("format") != FORMAT:
            where = os.path.join(self.directory, str(step))
            raise ValueError(f"checkpoint {where} has format {meta.get('format')!r}; this jaxpipe reads {FORMAT}")
        target = {
            str(i): {str(j): np.zeros(shape, np.float32) for j, shape in enumerate(layer["shapes"])}
            for i, layer in enumerate(meta["layers"]) if layer["shapes"]
        }
        arrays = {}
        if target:
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            arrays = self._manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.PyTreeRestore(
                item={"params": target}, restore_args={"params": restore_args}, partial_restore=True,
            )))["arrays"]["params"]
        params = [
            [np.asarray(arrays[str(i)][str(j)]) for j in range(len(layer["shapes"]))]
            for i, layer in enumerate(meta["layers"])
        ]
        return meta["layers"], params

    def save(self, pipe: Pipeline, state: TrainState, data_position: int | None = None) -> CheckpointInfo:
        """Saves ``state`` in per-layer form at its step; blocks until it is on disk.

        Args:
          pipe: the pipeline ``state`` belongs to.
          state: the state to save.
          data_position: training batches consumed; default the step.

        Returns:
          The saved checkpoint's ``CheckpointInfo``.
        """
        ocp = self._ocp
        params, opt_state, step = pipe.to_layers(state)
        outer, kinds = _groups(pipe)
        arrays = {"params": _layers_tree(params), "opt_state": {}}
        opt_meta = []
        for i, (group, kind) in enumerate(zip(outer.flatten_up_to(opt_state), kinds)):
            if kind["kind"] == "layers":
                tree = _layers_tree(group)
                if tree:
                    arrays["opt_state"][str(i)] = tree
                opt_meta.append({"kind": "layers", "dtype": _dtype(group)})
            else:
                arrays["opt_state"][str(i)] = np.asarray(group)
                opt_meta.append({"kind": "array", "shape": list(np.shape(group)), "dtype": str(np.asarray(group).dtype)})
        arrays = {k: v for k, v in arrays.items() if v}
        meta = {
            "format": FORMAT,
            "step": step,
            "data_position": step if data_position is None else int(data_position),
            "layers": _layers_meta(pipe),
            "opt_state": opt_meta,
            "written_by": {
                "mesh_shape": [pipe.num_replicas, pipe.num_devices],
                "schedule": pipe.schedule,
                "cut": pipe.cut,
                "virtual_stages": pipe.virtual_stages,
            },
        }
        if step in self.steps():
            self._move_aside(step)
        try:
            self._manager.save(
                step, args=ocp.args.Composite(arrays=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - any failure, reported with where the good checkpoint is
            last = self._last_good()
            kept = (f"the last good checkpoint is {last.path} (step {last.step})" if last is not None
                    else "there is no earlier checkpoint")
            raise CheckpointSaveError(
                f"saving the checkpoint of step {step} in {self.directory} failed ({type(err).__name__}: {err}); "
                f"{kept}, untouched", step, last,
            ) from err
        return CheckpointInfo(step, meta["data_position"], os.path.join(self.directory, str(step)))

    def restore(self, pipe: Pipeline, step: int | None = None) -> tuple[TrainState, CheckpointInfo]:
        """Loads checkpoint ``step`` (default: the newest complete one) onto ``pipe``'s mesh.

        Args:
          pipe: the pipeline to restore into; its mesh, schedule and cut may
            differ from the run that saved.
          step: which checkpoint; default the newest.

        Returns:
          ``(state, info)``.

        Raises:
          ValueError: if there is no checkpoint, or it holds another model
            (layer count or parameter shapes) or another optimizer's state.
        """
        ocp = self._ocp
        step = self._check_step(step)
        where = os.path.join(self.directory, str(step))
        meta = self._read_meta(step)
        if meta.get("format") != FORMAT:
            raise ValueError(f"checkpoint {where} has format {meta.get('format')!r}; this jaxpipe reads {FORMAT}")
        _check_layers(meta["layers"], _layers_meta(pipe), where)
        outer, kinds = _groups(pipe)
        structs = outer.flatten_up_to(pipe.optimizer_state_structs())
        saved = [{k: v for k, v in m.items() if k != "dtype"} for m in meta["opt_state"]]
        if saved != kinds:
            raise ValueError(
                f"checkpoint {where} holds optimizer state {saved}, but this optimizer's state is {kinds}; "
                "resume with the optimizer that wrote it"
            )
        target = {"params": _layers_tree(_layer_shapes(pipe)), "opt_state": {}}
        for i, (struct, kind) in enumerate(zip(structs, kinds)):
            if kind["kind"] == "layers":
                tree = _layers_tree(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), struct))
                if tree:
                    target["opt_state"][str(i)] = tree
            else:
                target["opt_state"][str(i)] = np.zeros(struct.shape, struct.dtype)
        target = {k: v for k, v in target.items() if v}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        arrays = self._manager.restore(
            step, args=ocp.args.Composite(arrays=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
        )["arrays"] if target else {}
        params = _layers_list(arrays.get("params", {}), pipe)
        groups = [
            _layers_trees(arrays.get("opt_state", {}).get(str(i), {}), struct)
            if kind["kind"] == "layers" else arrays["opt_state"][str(i)]
            for i, (struct, kind) in enumerate(zip(structs, kinds))
        ]
        opt_state = jax.tree.unflatten(outer, groups)
        state = pipe.from_layers(params, opt_state, meta["step"])
        return state, CheckpointInfo(meta["step"], meta["data_position"], where)

    def _move_aside(self, step: int) -> None:
        """Renames an existing (unreadable, skipped on resume) checkpoint ``step`` so a new one can take its place."""
        where = os.path.join(self.directory, str(step))
        # Not starting with the step: orbax would take the folder for a checkpoint of it.
        target, n = os.path.join(self.directory, f"unreadable-{step}"), 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(self.directory, f"unreadable-{step}-{n}")
        os.rename(where, target)
        self._manager.reload()
        warnings.warn(f"checkpoint {where} was skipped as unreadable; moved to {target} to save step {step} anew",
                      stacklevel=3)

    def _last_good(self) -> CheckpointInfo | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step = self.latest_readable()
            return self.info(step) if step is not None else None
        except Exception:  # noqa: BLE001 - reporting a failure: an unreadable folder has none
            return None

    def close(self) -> None:
        """Releases orbax's resources."""
        self._manager.close()

    def _check_step(self, step: int | None) -> int:
        steps = self.steps()
        if step is None:
            if not steps:
                raise ValueError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise ValueError(f"no complete checkpoint for step {step} in {self.directory}; it has steps {steps}")
        return step

    def _read_meta(self, step: int) -> dict:
        """Checkpoint ``step``'s metadata, or a ValueError naming its file."""
        ocp = self._ocp
        where = os.path.join(self.directory, str(step), "meta", "metadata")
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # noqa: BLE001 - orbax raises JSON, key and file errors alike
            raise ValueError(
                f"checkpoint {os.path.join(self.directory, str(step))} has unreadable metadata {where} "
                f"({type(err).__name__}: {err})"
            ) from None
        missing = [key for key in _META_KEYS if not isinstance(meta, dict) or key not in meta]
        if missing:
            raise ValueError(
                f"checkpoint {os.path.join(self.directory, str(step))} has incomplete metadata {where}: "
                f"it lacks {missing}"
            )
        return meta


def _dtype(trees: Sequence[Any]) -> str | None:
    leaves = jax.tree.leaves(trees)
    return str(np.asarray(leaves[0]).dtype) if leaves else None


def _layers_tree(trees: Sequence[Any]) -> dict:
    """``{layer: {leaf: array}}`` with string keys; layers without parameters left out."""
    out = {}
    for i, tree in enumerate(trees):
        leaves = jax.tree.leaves(tree)
        if leaves:
            out[str(i)] = {str(j): np.asarray(leaf) for j, leaf in enumerate(leaves)}
    return out


def _groups(pipe: Pipeline) -> tuple[Any, list[dict]]:
    """How the optimizer state is grouped on disk: ``(outer treedef, kind per group)``.

    The groups are the leaves of the state the optimizer builds for one
    array (what the first, flat-row layout stored); a group that holds the
    per-layer tree's mirror (``mu``, ``nu``, ...) is stored per layer (kind
    ``"layers"``), any other as one array. An optimizer whose ``init`` needs
    the real tree gets one group per state leaf.
    """
    structs = pipe.optimizer_state_structs()
    num_layers = pipe.placement.num_layers
    try:
        flat = jax.eval_shape(pipe.optimizer.init, jax.ShapeDtypeStruct((2, 3), pipe.placement.dtype))
        outer = jax.tree.structure(flat)
        groups = outer.flatten_up_to(structs)
    except Exception:  # noqa: BLE001 - the optimizer cannot be built for one array: group per leaf
        outer = jax.tree.structure(structs)
        groups = jax.tree.leaves(structs)
    kinds = [
        {"kind": "array", "shape": list(g.shape)} if isinstance(g, jax.ShapeDtypeStruct)
        else {"kind": "layers"} if isinstance(g, list) and len(g) == num_layers
        else None
        for g in groups
    ]
    if None in kinds:
        outer, groups = jax.tree.structure(structs), jax.tree.leaves(structs)
        kinds = [{"kind": "array", "shape": list(g.shape)} for g in groups]
    return outer, kinds


def _layer_shapes(pipe: Pipeline) -> list[list[np.ndarray]]:
    specs = pipe.placement.specs[: pipe.placement.num_layers]
    return [[np.zeros(shape, pipe.placement.dtype) for shape in spec.own_shapes] for spec in specs]


def _layers_list(tree: dict, pipe: Pipeline) -> list[list[np.ndarray]]:
    specs = pipe.placement.specs[: pipe.placement.num_layers]
    return [[tree[str(i)][str(j)] for j in range(len(spec.own_shapes))] for i, spec in enumerate(specs)]


def _layers_trees(tree: dict, structs: Sequence[Any]) -> list[Any]:
    """Per-layer trees shaped like ``structs`` from ``{layer: {leaf: array}}``."""
    out = []
    for i, struct in enumerate(structs):
        leaves, treedef = jax.tree.flatten(struct)
        out.append(jax.tree.unflatten(treedef, [tree[str(i)][str(j)] for j in range(len(leaves))]))
    return out


def _layers_meta(pipe: Pipeline) -> list[dict]:
    return layers_meta(pipe.placement.specs[: pipe.placement.num_layers])


def layers_meta(specs: Sequence[Any]) -> list[dict]:
    """Per layer its name and own parameter shapes (``LayerSpec.own_shapes``: tied leaves are their owner's)."""
    return [{"name": spec.name, "shapes": [list(s) for s in spec.own_shapes]} for spec in specs]


def _check_layers(saved: list[dict], here: list[dict], where: str) -> None:
    if len(saved) != len(here):
        raise ValueError(
            f"checkpoint {where} holds a model of {len(saved)} layers, but model_fn builds {len(here)}; "
            "resume with the model that wrote it"
        )
    for i, (a, b) in enumerate(zip(saved, here)):
        if a != b:
            raise ValueError(
                f"checkpoint {where} holds layer {i} as {a['name']} with parameter shapes {a['shapes']}, "
                f"but model_fn builds {b['name']} with {b['shapes']}; resume with the model that wrote it"
            )
