"""The ``data`` section of a pipeline: where stage 1's videos come from."""

from __future__ import annotations

from dataclasses import dataclass

from vimpac.common.config import Where, param
from vimpac.data.synth import DEFAULT_CLASSES, classes_problem


@dataclass
class DataConfig:
    """Where the videos come from."""
    synthetic: bool = param(True, "generate the synthetic motion corpus and use it as the data")
    synth_seed: int = param(0, "seed of the synthetic corpus", ge=0)
    synth_train_per_class: int = param(12, "synthetic labelled train videos per class", ge=1)
    synth_val_per_class: int = param(4, "synthetic labelled val videos per class", ge=1)
    synth_size: int = param(96, "synthetic labelled clip side in pixels", ge=32, le=1024)
    synth_uncurated_videos: int = param(12, "synthetic unlabelled multi-shot videos", ge=0)
    synth_background_contrast: list[float] = param(
        [0.35, 0.75], "synthetic background texture contrast range [low, high] (0 = flat)")
    synth_travel: list[float] = param(
        [0.4, 0.62], "synthetic move_* distance range [low, high], fraction of the frame side")
    synth_camera_drift: float = param(0.1, "synthetic largest background drift over a clip, "
                                           "fraction of the frame side", ge=0, le=1)
    synth_classes: list[str] = param(list(DEFAULT_CLASSES), "synthetic motion classes of the "
                                     "labelled task, in label order")
    synth_layout: str = param("ucf101", "layout the synthetic labelled task is read from",
                              choices=("ucf101", "ssv2", "list"))
    synth_pretrain_on: str = param("uncurated", "what the tokenizer and pre-training see: "
                                                "uncurated (the unlabelled multi-shot videos) or "
                                                "train (the labelled task's training split, "
                                                "without its labels)",
                                   choices=("uncurated", "train"))
    pretrain_inputs: list[str] = param([], "videos, folders or list files for pre-training "
                                           "(used when synthetic is false)")
    finetune_dataset: str = param("", "labelled dataset as NAME:ROOT, e.g. ucf101:/data/UCF101 "
                                      "(used when synthetic is false)")

    def check(self, where: Where) -> None:
        """Rules across this section's fields."""
        for key in ("synth_background_contrast", "synth_travel"):
            pair = getattr(self, key)
            if len(pair) != 2 or not 0.0 <= pair[0] <= pair[1] <= 1.0:
                raise where.error(f"data.{key}", pair,
                                  "expected [low, high] with 0 <= low <= high <= 1")
        why = classes_problem(self.synth_classes, minimum=2)
        if self.synthetic and why:
            raise where.error("data.synth_classes", self.synth_classes, why)
        if self.synthetic and self.synth_pretrain_on == "uncurated" \
                and self.synth_uncurated_videos == 0:
            raise where.error("data.synth_uncurated_videos", 0, "pre-training on uncurated "
                              "videos needs some (or set data.synth_pretrain_on: train)")
