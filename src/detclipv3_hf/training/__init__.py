"""Training: one Accelerate loop for the three DetCLIPv3 stages (ARCHITECTURE.md section 4).

Builds on the model core and ``data/``; never imported by the model files.
"""

from .cli import add_train_arguments, config_from_args, run_train
from .collate import DetClipV3TrainingCollator, build_stage_transforms, model_inputs
from .config import DataSourceConfig, TrainConfig, build_train_config, load_config_file
from .sources import EndlessSource, MixedRecordSource
from .stages import STAGE_1, STAGE_2, STAGE_3, STAGES, StageSpec, get_stage, loss_base_term
from .trainer import (
    DetClipV3Trainer,
    JsonlTracker,
    TrainerState,
    TrainResult,
    apply_stage_trainability,
    build_model_and_processor,
    build_param_groups,
    list_checkpoints,
    set_train_mode,
    stage_loss,
    train,
)

__all__ = [
    "STAGES",
    "STAGE_1",
    "STAGE_2",
    "STAGE_3",
    "DataSourceConfig",
    "DetClipV3Trainer",
    "DetClipV3TrainingCollator",
    "EndlessSource",
    "JsonlTracker",
    "MixedRecordSource",
    "StageSpec",
    "TrainConfig",
    "TrainResult",
    "TrainerState",
    "add_train_arguments",
    "apply_stage_trainability",
    "build_model_and_processor",
    "build_param_groups",
    "build_stage_transforms",
    "build_train_config",
    "config_from_args",
    "get_stage",
    "list_checkpoints",
    "load_config_file",
    "loss_base_term",
    "model_inputs",
    "run_train",
    "set_train_mode",
    "stage_loss",
    "train",
]
