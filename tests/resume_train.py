"""Run by test_resume.py: a tiny distillation run that checkpoints every step, in one of four setups.

``python resume_train.py SETUP OUT [RESUME]``: trains 6 steps of 4 examples, saving a checkpoint each
step to ``OUT``; with ``RESUME`` (a checkpoint folder) it resumes from it. The final student (and the
hidden-state projection) go to ``OUT/final.pt``. ``SLOW_STEP_SECONDS`` in the environment sleeps
after each step, so a test has time to kill the process between checkpoints.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import VOCAB, config, random_classification_dataset, tiny_bert  # noqa: E402
from launch import leave_worker  # noqa: E402
from transformers import BertTokenizerFast, TrainerCallback  # noqa: E402

from hf_distill import DistillationTrainer  # noqa: E402
from hf_distill.teacher_cache import precompute_teacher_logits  # noqa: E402

SETUPS = ("live", "cached", "hidden", "ensemble")


class Sleep(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_save(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def make_trainer(setup: str, out: Path) -> DistillationTrainer:
    out.mkdir(parents=True, exist_ok=True)
    dataset = random_classification_dataset(24, seed=4)
    teacher = tiny_bert(seed=1, num_layers=2, hidden=48 if setup == "hidden" else 32)
    kwargs = {"teacher_model": teacher}
    settings = {}
    if setup == "cached":
        dataset = precompute_teacher_logits(teacher, dataset, cache_dir=out / "cache", dtype="float32")
        kwargs = {}
    elif setup == "hidden":  # student width 32, teacher 48: the trainer's projection is trained
        settings = {"hidden_loss": "mse", "hidden_loss_weight": 1.0}
    elif setup == "ensemble":
        kwargs = {"teacher_model": [teacher, tiny_bert(seed=3, num_layers=1)]}
        settings = {"teacher_weights": [2.0, 1.0]}
    args = config(
        out,
        output_dir=str(out / "run"),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,  # AdamW: its moments must come back on resume
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        dataloader_num_workers=0,
        **settings,
    )
    callbacks = [Sleep(float(os.environ.get("SLOW_STEP_SECONDS", "0")))]
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return DistillationTrainer(
        model=tiny_bert(seed=2),
        args=args,
        train_dataset=dataset,
        processing_class=BertTokenizerFast(vocab_file=str(vocab)),
        callbacks=callbacks,
        **kwargs,
    )


def final_state(trainer: DistillationTrainer) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    if trainer.hidden_projection is not None:
        state |= {
            f"projection.{k}": v.detach().cpu().clone()
            for k, v in trainer.hidden_projection.state_dict().items()
        }
    return state


def main(setup: str, out: str, resume: str | None = None) -> None:
    trainer = make_trainer(setup, Path(out))
    trainer.train(resume_from_checkpoint=resume)
    torch.save(final_state(trainer), Path(out) / "final.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_worker()
