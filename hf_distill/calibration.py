"""Calibration of a classifier's top-1 prediction: expected calibration error (Guo et al., ICML 2017).

For ``N`` predictions with top-1 confidence ``c_i = max_v softmax(z_i)_v`` and correctness
``a_i = [argmax_v z_i = y_i]``, split ``(0, 1]`` into ``B`` equal-width bins ``((b-1)/B, b/B]``; with
``S_b`` the predictions whose confidence falls in bin ``b``::

    ECE = sum_b |S_b| / N * |acc(S_b) - conf(S_b)| = 1/N * sum_b |sum_{i in S_b} (a_i - c_i)|

0 for a perfectly calibrated model; at most 1. For a language model each predicted token is one
prediction (token-weighted). :func:`calibration_bins` gives per-bin sums that add up over batches;
:func:`ece_from_bins` turns their total into the ECE, so it streams with any other per-token metric.
"""

from __future__ import annotations

import torch

DEFAULT_BINS = 15


def calibration_bins(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, bins: int = DEFAULT_BINS
) -> torch.Tensor:
    """Per-bin sums ``[3, bins]`` (float64): predictions, their confidences, their correct ones.

    Args:
        logits: ``[..., V]`` unnormalised scores (softmax is taken over the last dimension).
        labels: ``[...]`` the true class ids.
        mask: ``[...]`` bool, the predictions that count (default: all).
        bins: ``B``, equal-width confidence bins over ``(0, 1]``.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}.")
    confidence, predicted = logits.float().softmax(-1).max(-1)
    correct = (predicted == labels).double()
    confidence = confidence.double()
    if mask is not None:
        confidence, correct = confidence[mask], correct[mask]
    confidence, correct = confidence.flatten(), correct.flatten()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)  # bin b holds ((b-1)/B, b/B]
    sums = torch.zeros(3, bins, dtype=torch.float64, device=confidence.device)
    sums[0].index_add_(0, index, torch.ones_like(confidence))
    sums[1].index_add_(0, index, confidence)
    sums[2].index_add_(0, index, correct)
    return sums.cpu()


def ece_from_bins(sums: torch.Tensor) -> float:
    """``1/N * sum_b |correct_b - confidence_b|`` from :func:`calibration_bins`' (summed) output; NaN if N = 0."""
    count = sums[0].sum().item()
    return (sums[2] - sums[1]).abs().sum().item() / count if count else float("nan")


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, bins: int = DEFAULT_BINS
) -> float:
    """The ECE of the module docstring over the predictions ``logits [..., V]`` of ``labels [...]``."""
    return ece_from_bins(calibration_bins(logits, labels, mask, bins))
