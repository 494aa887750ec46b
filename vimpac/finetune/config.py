"""The ``finetune`` and ``evaluate`` sections of a pipeline: action recognition and its test."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vimpac.common.config import TableChoices, Where, check_crops, check_scales, param


def _pools() -> Iterable[str]:
    """``finetune.pool``'s choices: the POOLS table beside the model (read when a value is
    checked, so loading a config imports no torch)."""
    from vimpac.pretrain.model import POOLS

    return POOLS


@dataclass
class FinetuneConfig:
    """Stage 3: action recognition from a pre-trained backbone."""
    init: str = param("pretrained", "pretrained or scratch", choices=("pretrained", "scratch"))
    split: str = param("1", "dataset split (UCF101/HMDB51: 1, 2, 3)")
    frames: int = param(10, "token frames per clip (paper: 10)", ge=1, le=256)
    grid: int = param(32, "token grid side (paper: 32 = 256 px)", ge=1, le=256)
    fps: float = param(4.0, "token frame rate of the dataset archive (paper: 2 UCF/K400, 4 others)",
                       gt=0)
    view_scales: list[float] = param([1.0, 1.25], "training views: resize scales of the "
                                                   "shorter side (paper: S and 1.25 S)")
    view_crops: list[str] = param(["top", "center", "bottom"],
                                  "training views: crop positions (paper: 3)")
    view_hflip: bool = param(True, "training views: add flipped copies (paper; never for SSV2)")
    compare_scratch: bool = param(False, "also fine-tune the same model from scratch with the "
                                         "same budget (the paper's Table 7 baseline)",
                                  volatile=True)
    epochs: float = param(50.0, "passes over the training set", gt=0)
    batch_size: int = param(128, "videos per update", ge=1)
    micro_batch: int = param(16, "videos per forward pass per process", ge=1, volatile=True)
    lr: float = param(1e-4, "peak learning rate (1e-4 small/base, 5e-5 large-half)", gt=0)
    warmup: float = param(0.1, "warm-up fraction", ge=0, le=1)
    weight_decay: float = param(0.01, "AdamW weight decay", ge=0)
    label_smoothing: float = param(0.0, "label smoothing", ge=0, le=1)
    dropout: float = param(0.1, "backbone dropout", ge=0, le=1)
    grad_clip: float = param(1.0, "gradient-norm clip; 0 = off", ge=0)
    precision: str = param("auto", "auto, bf16, fp32", choices=("auto", "bf16", "fp32"),
                           volatile=True)
    num_workers: int = param(2, "DataLoader workers", ge=0, le=64, volatile=True)
    eval_every: float = param(1.0, "epochs between validations (the plateau rule counts "
                                   "validations)", gt=0)
    val_fraction: float = param(0.1, "fraction of the training split held out (by key hash) as "
                                     "the validation set that best.pt is chosen on; 0 = no "
                                     "validation, no best.pt", ge=0, le=0.5)
    plateau_patience: int = param(0, "stop once this many validations in a row improve the "
                                     "best top-1 by less than plateau_min_delta (epochs is then "
                                     "the maximum budget); 0 = off: train for all epochs",
                                  ge=0, keyed_when_set=True)
    plateau_min_delta: float = param(0.01, "smallest rise of validation top-1 (a fraction) that "
                                           "counts as an improvement, for the plateau rule and "
                                           "the still-improving warning",
                                     ge=0, le=1, keyed_when_set=True)
    plateau_min_epochs: float = param(0.0, "a minimum budget: the plateau rule stops no run "
                                           "before this many epochs (it counts validations "
                                           "from the first all the same); 0 = no minimum",
                                      ge=0, keyed_when_set=True)
    pool: str = param("cls", "what the classifier reads: cls (the paper) or mean (the mean of "
                             "the token features, as MAE fine-tunes); a name in "
                             "vimpac.pretrain.model.POOLS", choices=TableChoices(_pools),
                      keyed_when_set=True)
    seed: int = param(0, "seed", ge=0)

    def check(self, where: Where) -> None:
        """Rules across this section's fields."""
        check_crops(where, "finetune.view_crops", self.view_crops)
        check_scales(where, "finetune.view_scales", self.view_scales)
        if self.plateau_patience > 0 and self.val_fraction == 0:
            raise where.error("finetune.plateau_patience", self.plateau_patience,
                              "the plateau rule watches the validation split: set "
                              "finetune.val_fraction > 0 or plateau_patience: 0")
        if self.plateau_min_epochs > 0 and self.plateau_patience == 0:
            raise where.error("finetune.plateau_min_epochs", self.plateau_min_epochs,
                              "a minimum budget for the plateau rule needs the rule: set "
                              "finetune.plateau_patience > 0 or plateau_min_epochs: 0")
        if self.plateau_min_epochs >= self.epochs:
            raise where.error("finetune.plateau_min_epochs", self.plateau_min_epochs,
                              f"must be below finetune.epochs ({self.epochs}), the maximum "
                              "budget, or the rule could never stop a run")


@dataclass
class EvaluateConfig:
    """Multi-view evaluation and frozen-feature probes."""
    test_clips: int = param(10, "uniform temporal clips per video", ge=1, le=100)
    test_crops: list[str] = param(["top", "center", "bottom"],
                                  "crop views averaged at test (SSV2: center only)")
    knn_k: int = param(200, "neighbours for the k-NN probe", ge=1)
    knn_temperature: float = param(0.07, "k-NN vote temperature", gt=0)
    linear_probe_epochs: int = param(100, "epochs of the linear probe on frozen CLS features", ge=0)
    checkpoint: str = param("final", "model the pipeline evaluates: final (the last update, as "
                                     "the paper reports) or best (best top-1 on the validation "
                                     "split carved from the training data)",
                            choices=("final", "best"))

    def check(self, where: Where) -> None:
        """Rules across this section's fields."""
        check_crops(where, "evaluate.test_crops", self.test_crops)
