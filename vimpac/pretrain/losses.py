"""Pre-training losses: masked-token prediction and NT-Xent (paper Sec. 3, eqs. 1, 4-6, 19-20).

- Masked-token loss: cross-entropy averaged over the masked, non-pad positions only (eq. 1).
- NT-Xent: L2-normalised projections, temperature gamma = 0.2; the negatives of a clip are all
  other clips of the *global* micro-batch (2N - 2 for N videos), all-gathered with gradient. Both
  directions are summed and multiplied by gamma: ``(CE_a + CE_b) * gamma``.
- Total: ``L = mlm_weight * L_mask + alpha * NT-Xent`` (eq. 6, alpha = 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def masked_token_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy at the masked positions.

    logits [M, V] (only masked positions), targets [M] long -> (mean loss, accuracy), both scalars.
    With M = 0 the loss is a differentiable zero.
    """
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {targets.shape[0]} targets")
    if targets.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    loss = F.cross_entropy(logits.float(), targets)
    accuracy = (logits.detach().argmax(dim=-1) == targets).float().mean()
    return loss, accuracy


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums the gradients of all ranks and keeps this rank's slice
    (a reduce_scatter with SUM)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        world, rank = dist.get_world_size(), dist.get_rank()
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty_like(grad.chunk(world)[rank])
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce_scatter: sum everything, keep our slice
        return grad.chunk(world)[rank].contiguous()


def gather_with_grad(x: Tensor) -> Tensor:
    """[N, ...] on each rank -> [world * N, ...] (rank order), differentiable.

    Every rank must pass the same shape. Identity when not distributed.
    """
    if not _distributed():
        return x
    return _GatherWithGrad.apply(x)


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _one_direction(anchor: Tensor, other_all: Tensor, same_all: Tensor, offset: int,
                   temperature: float) -> tuple[Tensor, Tensor]:
    """CE of anchors [N, P] against [positives/negatives: other_all [G, P]; negatives: same_all]."""
    n = anchor.shape[0]
    idx = torch.arange(n, device=anchor.device) + offset  # global index of each anchor
    to_other = anchor @ other_all.t()  # [N, G]: the positive sits at column idx
    to_same = anchor @ same_all.t()  # [N, G]: column idx is the anchor itself
    self_col = F.one_hot(idx, same_all.shape[0]).bool()
    to_same = to_same.masked_fill(self_col, float("-inf"))
    logits = torch.cat([to_other, to_same], dim=1) / temperature  # [N, 2G]
    loss = F.cross_entropy(logits, idx)
    correct = (logits.detach().argmax(dim=1) == idx).float()
    return loss, correct


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> tuple[Tensor, Tensor]:
    """Symmetric NT-Xent over the global micro-batch.

    z1, z2 [N, P]: projections of the first and second clip of the same N local videos. Returns
    ``(loss, accuracy)``: loss = (CE(z1 -> z2) + CE(z2 -> z1)) * temperature, each CE a mean over
    the local anchors; accuracy = fraction of the 2N local anchors whose positive has the top logit.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent needs z1, z2 of the same [N, P] shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)  # [G, P], G = world * N
    offset = _rank() * z1.shape[0]
    loss_a, correct_a = _one_direction(z1, g2, g1, offset, temperature)
    loss_b, correct_b = _one_direction(z2, g1, g2, offset, temperature)
    accuracy = torch.cat([correct_a, correct_b]).mean()
    return (loss_a + loss_b) * temperature, accuracy


COUNTS = ("mlm_moving_hits", "mlm_moving")  # summed over micro-batches, not averaged


def pretrain_loss(outputs: dict[str, Tensor], targets: Tensor, *, mlm_weight: float = 1.0,
                  alpha: float = 1.0, temperature: float = 0.2,
                  moving: Tensor | None = None) -> dict[str, Tensor]:
    """Total pre-training loss L = mlm_weight * L_mask + alpha * NT-Xent (eq. 6).

    ``outputs`` is :class:`~vimpac.pretrain.model.VimpacPretrainModel`'s dict: ``mlm_logits``
    [M, V] and ``proj`` [2N, P], laid out as all first clips then all second clips (the loader's
    [N, 2, T, H, W] as ``x.transpose(0, 1).flatten(0, 1)``). ``targets`` [M] are the original
    tokens at the masked positions. Returns scalars ``loss``, ``mlm_loss``, ``mlm_acc``,
    ``nce_loss``, ``nce_acc`` (the last four detached).

    ``moving`` [M] bool marks targets whose code differs from the same cell one frame earlier.
    Copying the previous frame predicts every other target, so accuracy on these is the part
    that needs motion; it is returned as counts ``mlm_moving_hits`` and ``mlm_moving`` (summed
    over micro-batches, divided when logged: :func:`moving_accuracy`).
    """
    mlm_loss, mlm_acc = masked_token_loss(outputs["mlm_logits"], targets)
    proj = outputs["proj"]
    if proj.shape[0] % 2:
        raise ValueError(f"proj has {proj.shape[0]} rows: expected 2N (two clips per video)")
    z1, z2 = proj.chunk(2, dim=0)
    nce_loss, nce_acc = nt_xent(z1, z2, temperature)
    total = mlm_weight * mlm_loss + alpha * nce_loss
    out = {"loss": total, "mlm_loss": mlm_loss.detach(), "mlm_acc": mlm_acc,
           "nce_loss": nce_loss.detach(), "nce_acc": nce_acc}
    if moving is not None:
        out.update(moving_counts(outputs["mlm_logits"], targets, moving))
    return out


def moving_counts(mlm_logits: Tensor, targets: Tensor, moving: Tensor) -> dict[str, Tensor]:
    """:data:`COUNTS` of one batch: correct predictions among the masked targets that moved
    (``moving`` [M] bool) and how many moved, as float scalars."""
    hits = mlm_logits.detach().argmax(dim=-1) == targets
    return {"mlm_moving_hits": (hits & moving).sum().float(), "mlm_moving": moving.sum().float()}


def changed_from_previous_frame(tokens: Tensor) -> Tensor:
    """tokens [N,T,H,W] -> bool [N,T,H,W]: code differs from the same cell at t-1 (t=0: False)."""
    changed = torch.zeros_like(tokens, dtype=torch.bool)
    changed[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
    return changed


def moving_accuracy(values: dict[str, float]) -> None:
    """Replace the summed counts by ``mlm_acc_moving`` (absent when no moving target was masked)."""
    hits, total = values.pop("mlm_moving_hits", 0.0), values.pop("mlm_moving", 0.0)
    if total > 0:
        values["mlm_acc_moving"] = hits / total
