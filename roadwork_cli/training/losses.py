"""The train_cached objective: classification + SelectiveNet selective risk + coverage penalty + aux + FN risk + gate.

With per-sample cross-entropy ``l_i`` of the cls output, gate ``g_i = sigmoid(gate_i)`` and labels ``y_i``:

* ``cls``       = mean(l_i)                                  (plain classifier on every sample)
* ``selective`` = mean(g_i l_i) / mean(g_i)                  (SelectiveNet empirical selective risk)
* ``coverage``  = max(0, c - mean(g_i))^2                    (quadratic penalty towards target coverage c)
* ``aux``       = mean(cross-entropy of the aux output)      (keeps the shared trunk a full classifier)
* ``fn``        = sum(g_i y_i l_i) / sum(g_i y_i)            (selective risk on roadwork images only: missed
                                                              roadwork among exits is the error the guarantee bounds)
* ``gate``      = mean(BCE(gate logit_i, t_i)), t_i = exp(-l_i) detached: the probability the cls output gives the
                  true label (ConfidNet's "true class probability" target)

* ``conformal`` = the conformal-training term of ``train_crc`` (:mod:`roadwork_cli.training.conftr`): smoothed
                  error on exits + FNR-on-exits excess over alpha + shortfall below xi of the coverage affordable at
                  FNR alpha, under thresholds fitted on the other half of the batch; 0 in the other modes

``total = w_cls cls + w_sel selective + w_cov coverage + w_aux aux + w_fn fn + w_gate gate + w_conformal conformal``
with weights from :class:`~roadwork_cli.config.LossWeights`.

Why the ``gate`` term: SelectiveNet's coverage penalty is one-sided and its selective risk only sees training errors;
once the head fits the training set every loss is near zero, the penalty pushes all gates up together and the gate
saturates (every value ~1, no ranking). The soft correctness target keeps a per-sample signal that does not vanish:
the gate learns how sure the cls output is of the true label, which is what selection needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from roadwork_cli.config import LossWeights, Settings
from roadwork_cli.model.head import HeadOutput
from roadwork_cli.training.conftr import conformal_training_loss

__all__ = ["LOSS_PARTS", "ConformalTarget", "selective_loss"]

LOSS_PARTS = ("total", "cls", "selective", "coverage", "aux", "fn", "gate", "conformal")
_EPS = 1e-6


@dataclass(frozen=True)
class ConformalTarget:
    """What the conformal-training term simulates: the calibration targets and how the rule is relaxed.

    Attributes:
        alpha: False-negative rate among exits (``calibration.fnr``).
        coverage: Exit rate xi (``calibration.coverage``).
        temperature: Sigmoid temperature in logit units (``train.crc_temperature``).
        score: Selection score of the rule (``train.crc_score``).
    """

    alpha: float
    coverage: float
    temperature: float
    score: Literal["gate", "softmax_response"] = "gate"

    @classmethod
    def from_settings(cls, settings: Settings) -> ConformalTarget:
        """From the resolved :class:`~roadwork_cli.config.Settings` (train and calibration sections)."""
        return cls(
            alpha=settings.calibration.fnr,
            coverage=settings.calibration.coverage,
            temperature=settings.train.crc_temperature,
            score=settings.train.crc_score,
        )


def selective_loss(
    output: HeadOutput,
    labels: torch.Tensor,
    weights: LossWeights,
    target_coverage: float,
    conformal: ConformalTarget | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Objective of one batch.

    Args:
        output: Head logits, each ``(B,)``.
        labels: ``(B,)`` float 0/1 (1 = roadwork).
        weights: :class:`~roadwork_cli.config.LossWeights` (``cls``, ``selective``, ``coverage_penalty``, ``aux``,
            ``fn_weight``, ``gate_correctness``).
        target_coverage: Fraction of samples the gate should accept.
        conformal: Targets of the conformal-training term (``train_crc``); None leaves the term out (it reads 0).

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
    # Detached target: the cls output is never pulled towards what the gate predicts about it.
    true_class_probability = torch.exp(-per_sample.detach())  # (B,)
    gate_fit = F.binary_cross_entropy_with_logits(output.gate, true_class_probability)
    if conformal is not None and weights.conformal > 0:
        conformal_term, _ = conformal_training_loss(
            output, labels, conformal.alpha, conformal.coverage, conformal.temperature, conformal.score
        )
    else:
        conformal_term = torch.zeros((), dtype=cls.dtype, device=cls.device)
    total = (
        weights.cls * cls
        + weights.selective * selective
        + weights.coverage_penalty * coverage
        + weights.aux * aux
        + weights.fn_weight * fn
        + weights.gate_correctness * gate_fit
        + weights.conformal * conformal_term
    )
    parts = {
        "total": total, "cls": cls, "selective": selective, "coverage": coverage, "aux": aux, "fn": fn,
        "gate": gate_fit, "conformal": conformal_term,
    }  # fmt: skip
    return total, {name: value.detach() for name, value in parts.items()}
