"""jaxpipe: pipeline + data parallel training for JAX/Flax."""

from .mesh import make_mesh
from .pipeline import Pipeline, TrainState
from .plot import plot_timeline
from .schedule import (
    Schedule,
    ScheduleError,
    assign_buffers,
    gpipe,
    interleaved_1f1b,
    make_schedule,
    one_f_one_b,
    validate,
)
from .simulate import Costs, SimResult, simulate
from .train import TrainResult, train

__all__ = [
    "Costs",
    "Pipeline",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "TrainResult",
    "TrainState",
    "assign_buffers",
    "gpipe",
    "interleaved_1f1b",
    "make_mesh",
    "make_schedule",
    "one_f_one_b",
    "plot_timeline",
    "simulate",
    "train",
    "validate",
]

__version__ = "0.1.0"
