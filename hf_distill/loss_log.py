"""The loss components a trainer logs: summed on the device between logs, so that no step waits for the host."""

from __future__ import annotations

import torch


class LossMeans(dict):
    """``{"<name>_loss": (sum on the device, count)}`` since the last log."""

    def add(self, components: dict[str, torch.Tensor]) -> None:
        for name, value in components.items():
            total, count = self.get(f"{name}_loss", (0.0, 0))
            self[f"{name}_loss"] = (total + value.detach().float(), count + 1)

    def pop_means(self, accelerator, device) -> dict[str, float]:
        """Each component's mean since the last log, averaged over processes; then empty."""
        means = {
            name: accelerator.reduce((total / count).to(device), reduction="mean").item()
            for name, (total, count) in self.items()
        }
        self.clear()
        return means
