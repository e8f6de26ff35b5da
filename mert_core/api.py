"""The Python API: everything the CLI does, with the same config objects.

    from mert_core import api
    config = api.make_train_config(teachers=["cqt"], preset="tiny", max_steps=200)
    result = api.train(config)
    api.export_hf(result.out_dir, "mert-hf")  # a folder transformers.AutoModel loads
"""

from mert_core.checkpoint import load_student, save_student
from mert_core.config import TrainConfig
from mert_core.export import export_hf
from mert_core.registry import default_registry, load_registry
from mert_core.runconfig import ConfigError, make_train_config
from mert_core.trainer import TrainResult, train

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "default_registry",
    "export_hf",
    "load_registry",
    "load_student",
    "make_train_config",
    "save_student",
    "train",
]
