"""Run by test_multiprocess.py under `accelerate launch`: three distillation steps whose global batch
is the whole dataset, then the student's weights, the hidden-state projection's (teacher width 48,
student 32: the projection lives outside DDP, so the trainer averages its gradients itself) and the
number of processes saved to <out>/student.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import VOCAB, config, random_classification_dataset, tiny_bert  # noqa: E402
from launch import leave_worker  # noqa: E402
from transformers import BertTokenizerFast  # noqa: E402

from hf_distill import DistillationTrainer  # noqa: E402


def main(out: str, per_device_batch: int) -> None:
    vocab = Path(out) / "vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    args = config(
        Path(out),
        per_device_train_batch_size=per_device_batch,
        max_steps=3,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        temperature=2.0,
        alpha=0.6,
        beta=0.4,
        hidden_loss="mse",
        hidden_loss_weight=0.5,
    )
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2, num_layers=2),
        teacher_model=tiny_bert(seed=1, num_layers=3, hidden=48),
        args=args,
        # One global batch is the whole dataset, so the shuffling of each launcher cannot matter; rows of
        # one length, so that each process's token mean (hidden-state loss) weighs alike.
        train_dataset=random_classification_dataset(8, max_len=6),
        processing_class=tokenizer,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        state = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
        state |= {f"projection.{k}": v.cpu() for k, v in trainer.hidden_projection.state_dict().items()}
        torch.save(
            {"state": state, "num_processes": trainer.accelerator.num_processes}, Path(out) / "student.pt"
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    leave_worker()
