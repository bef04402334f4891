"""The learned projection of TinyBERT's hidden-state loss, from the student's width to the teacher's.

It lives outside the student (the saved student stays a plain model), so its whole life is here: made when
the widths differ, trained in its own optimizer parameter group, its gradients zeroed after each optimizer
step and averaged over processes by hand (it is outside the DDP-wrapped student), saved beside each
checkpoint and loaded back on resume.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from .errors import InputError, MissingFileError

# The projection's weights in a checkpoint folder (its optimizer state is in optimizer.pt).
HIDDEN_PROJECTION_NAME = "hidden_projection.safetensors"


class HiddenProjection(nn.Linear):
    """``h_s @ W.T + b``: student width ``d_s`` -> teacher width ``d_t``."""

    @classmethod
    def between(cls, student_width: int, teacher_width: int, device) -> HiddenProjection | None:
        """A projection when the widths differ, else None (the hidden states are compared as they are)."""
        return None if student_width == teacher_width else cls(student_width, teacher_width).to(device)

    @classmethod
    def for_models(cls, student, teacher, args) -> HiddenProjection | None:
        """The projection a hidden-state loss needs between these models (None without that loss or a teacher)."""
        from .tasks import base_model

        if args.hidden_loss_weight <= 0 or teacher is None:
            return None
        widths = (base_model(m).config.hidden_size for m in (student, teacher))
        return cls.between(*widths, args.device)

    def param_group(self) -> dict:
        return {"params": list(self.parameters()), "weight_decay": 0.0}

    def average_gradients(self, accelerator) -> None:
        """Average the gradients over processes, as DDP does for the student's."""
        if accelerator.num_processes > 1:
            for param in self.parameters():
                if param.grad is not None:
                    param.grad = accelerator.reduce(param.grad, reduction="mean")

    def save_to(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / HIDDEN_PROJECTION_NAME))

    def load_from(self, checkpoint: str | os.PathLike) -> None:
        path = os.path.join(checkpoint, HIDDEN_PROJECTION_NAME)
        if not os.path.isfile(path):
            raise MissingFileError(
                f"{checkpoint} has no {HIDDEN_PROJECTION_NAME}: the hidden-state projection this run "
                "trains (student width != teacher width) was not saved with it (a checkpoint from an older "
                "hf-distill or another trainer). Resume from a checkpoint this trainer wrote, or start afresh."
            )
        state = load_file(path, device=str(self.weight.device))
        try:
            self.load_state_dict(state)
        except RuntimeError as err:
            raise InputError(
                f"{path} does not fit this run's hidden-state projection "
                f"({self.in_features} -> {self.out_features}): {err}. "
                "Resume with the student and teacher that wrote the checkpoint."
            ) from None
