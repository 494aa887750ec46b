"""vimpac: video pre-training via masked token prediction and contrastive learning.

Stages: ``tokenize`` (video -> VQ tokens -> sharded archives), ``pretrain`` (block-masked token
prediction + contrastive loss), ``finetune`` (action recognition, multi-view evaluation).
"""

__version__ = "0.1.0"
