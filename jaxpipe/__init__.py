"""jaxpipe: pipeline + data parallel training for JAX/Flax."""

from . import distributed, ticks
from .batches import DataShard, data_shard
from .bridge import LinenLayer, linen
from .checkpoint import CheckpointInfo, Checkpoints, CheckpointSaveError
from .config import PipelineConfig
from .load import load_layers
from .mesh import make_mesh
from .metrics import StepMetrics
from .partition import Piece, fractional_partition, partition_layers
from .pipeline import Pipeline, TrainState
from .planner import Candidate, Plan, make_plan
from .plot import plot_timeline
from .calibrate import Calibration, calibrate
from .profile import LayerCost, Profile, profile
from .schedule import (
    Schedule,
    ScheduleError,
    gpipe,
    interleaved_1f1b,
    make_schedule,
    one_f_one_b,
    validate,
)
from .simulate import Costs, SimResult, simulate
from .ticks import Ticks
from .train import NonFiniteError, TrainResult, plan, train

__all__ = [
    "distributed",
    "ticks",
    "Calibration",
    "Candidate",
    "CheckpointInfo",
    "CheckpointSaveError",
    "Checkpoints",
    "Costs",
    "DataShard",
    "LayerCost",
    "LinenLayer",
    "NonFiniteError",
    "Piece",
    "Plan",
    "Profile",
    "Pipeline",
    "PipelineConfig",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "StepMetrics",
    "Ticks",
    "TrainResult",
    "TrainState",
    "calibrate",
    "data_shard",
    "fractional_partition",
    "gpipe",
    "interleaved_1f1b",
    "linen",
    "load_layers",
    "make_mesh",
    "make_plan",
    "make_schedule",
    "one_f_one_b",
    "partition_layers",
    "plan",
    "plot_timeline",
    "profile",
    "simulate",
    "train",
    "validate",
]

__version__ = "0.1.0"
