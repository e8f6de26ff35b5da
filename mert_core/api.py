"""The Python API: everything the CLI does, with the same config objects.

    from mert_core import api
    config = api.make_train_config(teachers=["cqt"], preset="tiny", max_steps=200)
    result = api.train(config)                                      # mert train
    api.fit_teacher("kmeans-mfcc", ["/music"], "mfcc.safetensors")  # mert teacher fit
    api.label_data("kmeans-mfcc", ["/music"], "labels/mfcc",        # mert teacher label
                   teacher_file="mfcc.safetensors")
    ups = api.build_upstreams(checkpoints=[result.out_dir], baselines=["handcrafted"])
    report = api.evaluate(ups, ["demo-key"], out_dir="eval-out")    # mert eval (probe_task: mert probe,
    print(report.table)                                             #  extract_task: mert extract)
    api.ablate(api.default_arms(False), data=["/music"], out_dir="ablation", tasks=["demo-key"])  # mert ablate
    api.export_hf(result.out_dir, "mert-hf")  # mert export: a folder transformers.AutoModel loads
"""

from mert_core.ablation import ablate, default_arms, parse_arm
from mert_core.checkpoint import load_student, save_student
from mert_core.config import TrainConfig
from mert_core.evaluation.api import build_task, build_upstreams, evaluate, extract_task, probe_task
from mert_core.export import export_hf
from mert_core.fitting import fit_teacher
from mert_core.labels import label_data
from mert_core.registry import default_registry, load_registry
from mert_core.runconfig import ConfigError, make_train_config
from mert_core.trainer import TrainResult, train

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "ablate",
    "build_task",
    "build_upstreams",
    "default_arms",
    "default_registry",
    "evaluate",
    "export_hf",
    "extract_task",
    "fit_teacher",
    "label_data",
    "load_registry",
    "load_student",
    "make_train_config",
    "parse_arm",
    "probe_task",
    "save_student",
    "train",
]
