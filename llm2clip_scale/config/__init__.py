from llm2clip_scale.config.load import ConfigError, load_config, validate
from llm2clip_scale.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "validate"]
