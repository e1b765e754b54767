"""The run's settings: each declared once (declare.py, on the fields of run_config.py), typed and frozen,
read from the flags by from_flags.py. Nothing here knows the machine, the model or the world: what needs
them is settled above (eqat_dist/settle.py)."""
from .run_config import (DTYPES, BlockAPConfig, ConfigError, E2EConfig, EvalConfig, MachineConfig, RunConfig,
                         StreamsConfig)

__all__ = ["DTYPES", "BlockAPConfig", "ConfigError", "E2EConfig", "EvalConfig", "MachineConfig", "RunConfig",
           "StreamsConfig"]
