"""The run's settings: typed and frozen (run_config.py), built once from the flags (from_flags.py)."""
from .from_flags import build_run_config
from .run_config import (DTYPES, BlockAPConfig, ConfigError, E2EConfig, EvalConfig, MachineConfig, RunConfig,
                         StreamsConfig)

__all__ = ["DTYPES", "BlockAPConfig", "ConfigError", "E2EConfig", "EvalConfig", "MachineConfig", "RunConfig",
           "StreamsConfig", "build_run_config"]
