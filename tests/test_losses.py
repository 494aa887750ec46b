"""Masked-token loss at masked positions only; NT-Xent values, reference equality and its
differentiable all-gather across two gloo processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vimpac.pretrain.losses import (
    changed_from_previous_frame,
    gather_with_grad,
    masked_token_loss,
    moving_accuracy,
    nt_xent,
    pretrain_loss,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR written plainly: 2N anchors, each against the 2N - 1 others; mean CE over all
    anchors; the paper's sum of two directions times gamma is 2 * gamma * that mean."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        logits = torch.stack([z[i] @ z[j] for j in others]) / temperature
        total = total - torch.log_softmax(logits, 0)[others.index(partner)]
    return 2 * temperature * total / (2 * n)


def test_masked_token_loss_counts_only_masked_positions() -> None:
    g = _gen(0)
    logits_all = torch.randn(2, 5, 4, 4, 11, generator=g)
    targets_all = torch.randint(0, 11, (2, 5, 4, 4), generator=g)
    mask = torch.rand(2, 5, 4, 4, generator=g) < 0.3
    loss, acc = masked_token_loss(logits_all[mask], targets_all[mask])
    labels = targets_all.masked_fill(~mask, -100)  # the paper's formulation
    expected = F.cross_entropy(logits_all.flatten(0, -2), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    hits = (logits_all.argmax(-1) == targets_all)[mask].float().mean()
    torch.testing.assert_close(acc, hits)
    # Changing logits at unmasked positions cannot change anything.
    logits_all[~mask] = 100.0
    torch.testing.assert_close(masked_token_loss(logits_all[mask], targets_all[mask])[0], loss)


def test_masked_token_loss_with_no_masked_positions_is_a_differentiable_zero() -> None:
    logits = torch.zeros(0, 7, requires_grad=True)
    loss, acc = masked_token_loss(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and acc.item() == 0.0


def test_nt_xent_at_random_embeddings_is_about_gamma_2_ln15() -> None:
    g = _gen(1)
    losses = [nt_xent(torch.randn(8, 256, generator=g), torch.randn(8, 256, generator=g))[0]
              for _ in range(40)]
    assert torch.stack(losses).mean().item() == pytest.approx(0.2 * 2 * math.log(15), abs=0.04)


def test_nt_xent_equals_the_reference_and_recognises_positives() -> None:
    g = _gen(2)
    z1, z2 = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    loss, _ = nt_xent(z1, z2, temperature=0.3)
    torch.testing.assert_close(loss.double(), _reference_nt_xent(z1, z2, 0.3))
    # Identical clips with orthogonal videos: every positive has the top logit.
    eye = torch.eye(6, 16) * 3.0
    loss, acc = nt_xent(eye, eye.clone())
    assert acc.item() == 1.0 and loss.item() < 0.05  # 2 * 0.2 * ln(1 + 11 e^-5)


def test_pretrain_loss_combines_with_alpha() -> None:
    g = _gen(3)
    outputs = {"mlm_logits": torch.randn(9, 20, generator=g),
               "proj": torch.randn(8, 32, generator=g)}
    targets = torch.randint(0, 20, (9,), generator=g)
    full = pretrain_loss(outputs, targets)
    mlm_only = pretrain_loss(outputs, targets, alpha=0.0)
    half = pretrain_loss(outputs, targets, alpha=0.5)
    torch.testing.assert_close(mlm_only["loss"], full["mlm_loss"])
    torch.testing.assert_close(full["loss"], full["mlm_loss"] + full["nce_loss"])
    torch.testing.assert_close(half["loss"], full["mlm_loss"] + 0.5 * full["nce_loss"])
    z1, z2 = outputs["proj"].chunk(2)  # first clips, then second clips
    torch.testing.assert_close(full["nce_loss"], nt_xent(z1, z2)[0])
    with pytest.raises(ValueError, match="2N"):
        pretrain_loss({"mlm_logits": outputs["mlm_logits"], "proj": torch.randn(3, 4)}, targets)


def test_moving_codes_accuracy_counts_only_codes_that_changed() -> None:
    tokens = torch.tensor([[[[1, 2]], [[1, 3]], [[4, 3]]]])  # [N=1, T=3, H=1, W=2]
    changed = changed_from_previous_frame(tokens)
    assert changed[0, :, 0, :].tolist() == [[False, False], [False, True], [True, False]]
    targets = tokens.flatten()  # every position masked: 6 targets, 2 of them moving
    logits = F.one_hot(targets, 5).float()
    logits[3] = F.one_hot(torch.tensor(0), 5).float()  # wrong on the moving code at (t=1, w=1)
    out = pretrain_loss({"mlm_logits": logits, "proj": torch.randn(2, 4)}, targets,
                        moving=changed.flatten())
    values = {k: float(v) for k, v in out.items()}
    moving_accuracy(values)
    assert values["mlm_acc"] == pytest.approx(5 / 6)
    assert values["mlm_acc_moving"] == pytest.approx(1 / 2)
    assert "mlm_moving" not in values and "mlm_moving_hits" not in values
    still = {"mlm_moving_hits": 0.0, "mlm_moving": 0.0}
    moving_accuracy(still)
    assert still == {}  # nothing moving was masked: no figure rather than a made-up one


def test_gather_is_identity_without_distributed() -> None:
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


# ------------------------------------------------------------------ two processes (gloo, spawn)

WORLD = 2
LOCAL = 3


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(4)
    return torch.randn(WORLD * LOCAL, 8, generator=g), torch.randn(WORLD * LOCAL, 8, generator=g)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        z1, z2 = _global_batch()
        part = slice(rank * LOCAL, (rank + 1) * LOCAL)
        z1 = z1[part].clone().requires_grad_()
        z2 = z2[part].clone().requires_grad_()
        gathered = gather_with_grad(z1)
        loss, acc = nt_xent(z1, z2)
        loss.backward()
        torch.save({"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad,
                    "gathered": gathered.detach()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_two_processes_matches_one_process(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    z1, z2 = (t.clone().requires_grad_() for t in _global_batch())
    loss, _ = nt_xent(z1, z2)  # one process sees the whole global batch
    loss.backward()
    # Each rank's loss is a mean over its own anchors: their average is the global loss.
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, loss.detach())
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["gathered"], z1.detach())
        part = slice(rank * LOCAL, (rank + 1) * LOCAL)
        # The gather's backward sums every rank's gradient: WORLD x the global-mean gradient
        # (DDP's gradient averaging then divides by WORLD again).
        torch.testing.assert_close(r["g1"], WORLD * z1.grad[part])
        torch.testing.assert_close(r["g2"], WORLD * z2.grad[part])
