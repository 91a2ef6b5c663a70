"""The train_cached objective: classification + SelectiveNet selective risk + coverage penalty + aux + FN risk.

With per-sample cross-entropy ``l_i`` of the cls output, gate ``g_i = sigmoid(gate_i)`` and labels ``y_i``:

* ``cls``       = mean(l_i)                                  (plain classifier on every sample)
* ``selective`` = mean(g_i l_i) / mean(g_i)                  (SelectiveNet empirical selective risk)
* ``coverage``  = max(0, c - mean(g_i))^2                    (quadratic penalty towards target coverage c)
* ``aux``       = mean(cross-entropy of the aux output)      (keeps the shared trunk a full classifier)
* ``fn``        = sum(g_i y_i l_i) / sum(g_i y_i)            (selective risk on roadwork images only: missed
                                                              roadwork among exits is the error the guarantee bounds)

``total = w_cls cls + w_sel selective + w_cov coverage + w_aux aux + w_fn fn`` with weights from
:class:`~roadwork_cli.config.LossWeights`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from roadwork_cli.model.head import HeadOutput

__all__ = ["LOSS_PARTS", "selective_loss"]

LOSS_PARTS = ("total", "cls", "selective", "coverage", "aux", "fn")
_EPS = 1e-6


def selective_loss(
    output: HeadOutput, labels: torch.Tensor, weights: Any, target_coverage: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Objective of one batch.

    Args:
        output: Head logits, each ``(B,)``.
        labels: ``(B,)`` float 0/1 (1 = roadwork).
        weights: :class:`~roadwork_cli.config.LossWeights` (``cls``, ``selective``, ``coverage_penalty``, ``aux``,
            ``fn_weight``).
        target_coverage: Fraction of samples the gate should accept.

    Returns:
        The scalar loss to minimise and its detached parts (keys of :data:`LOSS_PARTS`, unweighted).
    """
    labels = labels.to(output.cls.dtype)
    per_sample = F.binary_cross_entropy_with_logits(output.cls, labels, reduction="none")  # (B,)
    gate = torch.sigmoid(output.gate)  # (B,)
    empirical_coverage = gate.mean()
    cls = per_sample.mean()
    selective = (gate * per_sample).mean() / empirical_coverage.clamp_min(_EPS)
    coverage = torch.relu(target_coverage - empirical_coverage) ** 2
    aux = F.binary_cross_entropy_with_logits(output.aux, labels)
    positive_gate = gate * labels
    fn = (positive_gate * per_sample).sum() / positive_gate.sum().clamp_min(_EPS)
    total = (
        weights.cls * cls
        + weights.selective * selective
        + weights.coverage_penalty * coverage
        + weights.aux * aux
        + weights.fn_weight * fn
    )
    parts = {"total": total, "cls": cls, "selective": selective, "coverage": coverage, "aux": aux, "fn": fn}
    return total, {name: value.detach() for name, value in parts.items()}
