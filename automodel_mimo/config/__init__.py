"""Run configuration: the schema (one dataclass per section), loading from YAML + overrides, validation.

    schema.py    the sections, their keys, defaults and comments
    load.py      load_config: YAML + dotted overrides -> RunConfig, validated
    checks.py    cross-field checks (one line naming the key and the fix), inferred values, notes
    sizes.py     sizes the data path derives from the config (packed rows, CP/SP padding)
    compile.py   train.compile resolved for a run, and what cannot be compiled
"""

from automodel_mimo.config.load import default_config_path, load_config
from automodel_mimo.config.schema import (
    CONFIG_DIR, CheckpointConfig, DataConfig, DPOConfig, EvalConfig, GenerationConfig, GRPOConfig, LaunchConfig,
    LoggingConfig, MimoConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig)
from automodel_mimo.config.sizes import packed_row_size, pad_multiple, round_up
from automodel_mimo.config.checks import validate

__all__ = [
    "CONFIG_DIR", "CheckpointConfig", "DataConfig", "DPOConfig", "EvalConfig", "GenerationConfig", "GRPOConfig",
    "LaunchConfig", "LoggingConfig", "MimoConfig", "ModelConfig", "ParallelConfig", "RunConfig", "TrainConfig",
    "default_config_path", "load_config", "packed_row_size", "pad_multiple", "round_up", "validate"]
