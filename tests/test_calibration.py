"""Expected calibration error: hand-computed values, a calibrated model near 0, streaming equals one shot."""

from __future__ import annotations

import math

import pytest
import torch

from hf_distill.calibration import calibration_bins, ece_from_bins, expected_calibration_error


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_a_hand_computed_case():
    # confidences 0.9 (right), 0.9 (wrong), 0.58 (right), 0.55 (wrong): with 15 bins, 0.9 is in bin 14
    # ((13/15, 14/15]) and 0.58, 0.55 both in bin 9 ((8/15, 9/15]).
    logits = _logits([[0.9, 0.1], [0.9, 0.1], [0.42, 0.58], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 1])
    # bin 14: |1 - 1.8| = 0.8; bin 9: |1 - 1.13| = 0.13; over N = 4
    assert expected_calibration_error(logits, labels) == pytest.approx((0.8 + 0.13) / 4)
    # one bin: |acc - mean confidence| = |0.5 - 0.7325|
    assert expected_calibration_error(logits, labels, bins=1) == pytest.approx(0.2325)


def test_always_right_at_full_confidence_is_0_and_always_wrong_is_1():
    logits = torch.tensor([[20.0, -20.0, -20.0]] * 5)
    assert expected_calibration_error(logits, torch.zeros(5, dtype=torch.long)) == pytest.approx(0, abs=1e-9)
    assert expected_calibration_error(logits, torch.ones(5, dtype=torch.long)) == pytest.approx(1, abs=1e-9)


def test_labels_drawn_from_the_models_own_distribution_give_about_0():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40_000, 6, generator=gen) * 2
    labels = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)
    assert expected_calibration_error(logits, labels) < 0.01
    wrong = (labels + 1) % 6  # the same confidences, labels shifted: badly calibrated
    assert expected_calibration_error(logits, wrong) > 0.3


def test_the_mask_drops_predictions_and_batches_add_up():
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(3, 7, 5, generator=gen), torch.randint(0, 5, (3, 7), generator=gen)
    mask = torch.rand(3, 7, generator=gen) > 0.3
    whole = expected_calibration_error(logits, labels, mask)
    assert whole == pytest.approx(expected_calibration_error(logits[mask], labels[mask]))
    streamed = sum(calibration_bins(logits[i], labels[i], mask[i]) for i in range(3))
    assert ece_from_bins(streamed) == pytest.approx(whole)
    assert math.isnan(ece_from_bins(calibration_bins(logits, labels, torch.zeros_like(mask))))


def test_bins_must_be_positive():
    with pytest.raises(ValueError, match="bins must be >= 1, got 0"):
        expected_calibration_error(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), bins=0)
