"""Training settings as plain data; `stages/train.py` builds them from the `train:` section of params.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..losses.hybrid import LossWeights
from ..nets.identity import check_identity_net

FACE_MODEL_ARRAYS = ("mean_albedo", "albedo_basis", "id_basis", "exp_basis")


@dataclass(frozen=True)
class AugmentSettings:
    """One random similarity per sample (Deep3DFaceRecon's ranges); all zero = no augmentation."""
    shift_px: float = 10.0     # uniform in [-shift, shift] per axis, crop pixels
    scale: float = 0.1         # scale factor uniform in [1 - scale, 1 + scale]
    rotation_deg: float = 10.0  # uniform in [-rot, rot], degrees
    flip: float = 0.5          # probability of a horizontal mirror (landmarks swap sides)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on; the defaults are Deep3DFaceRecon's GPU settings (params.yaml
    holds the CPU ones). Lengths are in epochs over the train split; `batch_size` is the global batch, split
    evenly over the DDP processes, so a run's result does not depend on how many processes share it (up to
    BatchNorm statistics, which stay per process as in Deep3DFaceRecon)."""
    arch: str = "resnet50"
    init_weights: str = ""       # torchvision ResNet weights; "" = random init
    identity_net: str = "none"   # recogniser of the identity term: dlib | arcface | none (nets.identity)
    identity_weights: str = ""   # its weights: dlib .dat ("" = face_recognition_models'), IR-SE50 .pth
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1.0e-4
    lr_decay: float = 0.2        # lr multiplier every `lr_decay_epochs` epochs
    lr_decay_epochs: int = 10
    grad_clip: float = 0.0       # max global gradient L2 norm; 0 = no clipping
    seed: int = 0
    loader_workers: int = 0      # DataLoader processes per training process
    loss: LossWeights = field(default_factory=LossWeights)
    nose_weight: float = 20.0    # landmark weight of the nose (0-based 28-30)
    mouth_weight: float = 20.0   # landmark weight of the 8 inner-mouth points
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    trainable: tuple[str, ...] = ()  # face model arrays trained jointly (FACE_MODEL_ARRAYS)
    face_model_lr: float = 1.0e-5
    face_model_reg: float = 1.0  # x sum over trained arrays of the mean squared change from the start
    max_nonfinite: int = 10      # skipped non-finite steps tolerated before the run fails
    checkpoint_every: int = 50   # steps between resumable checkpoints
    eval_every: int = 50         # steps between validation passes and preview grids (also at start and end)

    def __post_init__(self):
        try:
            check_identity_net(self.identity_net, self.identity_weights)
        except ValueError as error:
            raise ValueError(f"train.{error}") from None
        unknown = set(self.trainable) - set(FACE_MODEL_ARRAYS)
        if unknown:
            raise ValueError(f"train.trainable: unknown face model arrays {sorted(unknown)}; "
                             f"choose from {FACE_MODEL_ARRAYS}")
        if self.arch not in ("resnet18", "resnet50"):
            raise ValueError(f"train.arch must be resnet18 or resnet50, got {self.arch!r}")
        for name in ("epochs", "batch_size", "lr_decay_epochs", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
