"""Typed configuration: dataclass sections (`sections.py`) loaded from YAML with dotted overrides
(`loading.py`). Import everything from here: ``from cprec.config import Config, load_config``."""

from cprec.config.loading import (
    apply_overrides,
    config_from_dict,
    config_hash,
    config_to_dict,
    describe_fields,
    flatten,
    load_config,
    parse_override,
    read_yaml,
    save_config,
)
from cprec.config.sections import (
    CheckpointConfig,
    ColumnsConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoaderConfig,
    ModelConfig,
    PromptConfig,
    ScheduleConfig,
    TokenizerConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "ColumnsConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LoaderConfig",
    "ModelConfig",
    "PromptConfig",
    "ScheduleConfig",
    "TokenizerConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_hash",
    "config_to_dict",
    "describe_fields",
    "flatten",
    "load_config",
    "parse_override",
    "read_yaml",
    "save_config",
]
