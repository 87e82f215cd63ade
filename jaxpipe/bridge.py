"""Linen modules as pipeline layers.

A Linen module becomes an ``nnx`` layer through ``nnx.bridge.ToNNX(module,
rngs=rngs).lazy_init(sample_input)``: its variables become ``nnx.Param``
state and ``rngs`` becomes RNG streams the bridge draws from on every call
(a Linen ``nn.Dropout`` asks for the ``"dropout"`` stream, or ``"params"``
when ``rngs`` has none). jaxpipe sets those streams per step and micro-batch
like any other layer's (``rng.py``), so such a layer can be used as it is.

What the bridge cannot do is switch a Linen module to evaluation mode:
``layer.eval()`` sets ``deterministic`` attributes of ``nnx`` modules, and a
Linen module takes its mode as a call argument or a dataclass field.
``linen`` wraps the bridge in ``LinenLayer``, which has a ``deterministic``
attribute and hands it to the Linen module, so ``Pipeline.evaluate`` runs it
without dropout. (A plain bridge whose module still draws in evaluation mode
is refused by ``Pipeline.evaluate``.)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from flax import linen as nn
from flax import nnx


def _switch(module: nn.Module) -> str | None:
    """How ``module`` takes its mode: ``"argument"``, ``"field"`` or ``None``."""
    if "deterministic" in inspect.signature(type(module).__call__).parameters:
        return "argument"
    if "deterministic" in {f.name for f in dataclasses.fields(module)}:
        return "field"
    return None


class LinenLayer(nnx.Module):
    """A Linen module bridged to ``nnx``, whose dropout follows ``layer.eval()``.

    Attributes:
      bridge: the ``nnx.bridge.ToNNX`` module holding the Linen variables
        and RNG streams.
      deterministic: evaluation mode (set by ``layer.eval()`` / ``layer.train()``).
      switch: ``"argument"``: passed as ``module(x, deterministic=...)``;
        ``"field"``: the module's ``deterministic`` field is set; ``None``:
        the module has no mode.
    """

    def __init__(self, module: nn.Module, sample_input: Any, rngs: nnx.Rngs):
        if not isinstance(module, nn.Module):
            raise TypeError(f"jaxpipe.linen needs a flax.linen Module, got {type(module).__name__}")
        self.switch = _switch(module)
        self.deterministic = False
        self.modes = (module.clone(deterministic=False), module.clone(deterministic=True)) if (
            self.switch == "field") else (module, module)
        kwargs = {"deterministic": True} if self.switch == "argument" else {}
        self.bridge = nnx.bridge.ToNNX(self.modes[0], rngs=rngs).lazy_init(sample_input, **kwargs)

    def __call__(self, x: Any) -> Any:
        if self.switch == "argument":
            return self.bridge(x, deterministic=self.deterministic)
        self.bridge.to_nnx__module = self.modes[int(bool(self.deterministic))]
        return self.bridge(x)


def linen(module: nn.Module, sample_input: Any, rngs: nnx.Rngs) -> LinenLayer:
    """A Linen module as a pipeline layer, initialised on ``sample_input``.

    Args:
      module: the Linen module; its dropout (or other randomness) switches
        off in evaluation when it takes a ``deterministic`` call argument or
        has a ``deterministic`` field.
      sample_input: an input of the layer (any number of rows), to create
        the module's variables as Linen's ``init`` does.
      rngs: the ``nnx.Rngs`` ``model_fn`` receives (``params`` or
        ``default`` initialises; a ``dropout`` stream, if present, is the one
        Linen's ``nn.Dropout`` draws from in training).

    Returns:
      A ``LinenLayer``.
    """
    return LinenLayer(module, sample_input, rngs)
