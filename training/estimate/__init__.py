"""`guardtune estimate`: peak training memory per device, from the model's shape and the train config.

shapes.py holds the model shapes, options.py the estimate's keys (read from a train config),
memory.py the arithmetic (one function per component), cli.py the command.
"""

from training.estimate.cli import add_arguments, run
from training.estimate.memory import CPU_RUNTIME_BYTES, Estimate, estimate
from training.estimate.options import EstimateConfig, load_estimate_config
from training.estimate.shapes import PRESETS, ModelShape, resolve_shape

__all__ = ["CPU_RUNTIME_BYTES", "PRESETS", "Estimate", "EstimateConfig", "ModelShape", "add_arguments", "estimate",
           "load_estimate_config", "resolve_shape", "run"]
