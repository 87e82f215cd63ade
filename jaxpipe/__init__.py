"""jaxpipe: pipeline + data parallel training for JAX/Flax."""

from .mesh import make_mesh
from .pipeline import Pipeline, TrainState
from .train import TrainResult, train

__all__ = [
    "Pipeline",
    "TrainResult",
    "TrainState",
    "make_mesh",
    "train",
]

__version__ = "0.1.0"
