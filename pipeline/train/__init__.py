"""Training R-Net with hybrid-level weak supervision (Deng et al. 2019): config, augmentation, data order,
DDP, checkpoints and the loop."""
from .augment import IBUG_FLIP, sample_similarity, warp
from .checkpoint import load_rnet, load_rnet_record
from .config import FACE_MODEL_ARRAYS, AugmentSettings, TrainConfig
from .distributed import Dist, init_distributed, shutdown
from .loop import TrainPaths, TrainResult, train
from .step import StepResult, Trainer

__all__ = ["FACE_MODEL_ARRAYS", "IBUG_FLIP", "AugmentSettings", "Dist", "StepResult", "TrainConfig", "TrainPaths",
           "TrainResult", "Trainer", "init_distributed", "load_rnet", "load_rnet_record", "sample_similarity",
           "shutdown", "train", "warp"]
