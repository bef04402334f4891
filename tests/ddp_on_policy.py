"""Run by test_on_policy_ddp.py under `accelerate launch`: two on-policy steps (lmbda = 1) of DistillationTrainer on
tiny Llamas, each step's global batch the whole dataset (8 prompts). Each process writes
<out>/rank<R>.json: the prompts its generator saw at each step, its completion tokens at each step, the loss
normaliser (num_items_in_batch) its trainer used, and the number of processes; the main process also saves the
student's weights to <out>/student.pt.

``sampled``: the student's own samples are trained on. ``fixed``: the student samples, then each completion is
replaced by one written from its prompt alone (:func:`fixed_completions`, of lengths 1 to max_new_tokens), so that
one process and two train on the same completions and their updates can be compared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import config  # noqa: E402
from instruct_fixtures import SPECIAL, WORDS, chat_tokenizer, tiny_llama  # noqa: E402
from launch import leave_worker  # noqa: E402
from test_on_policy import instruction_rows  # noqa: E402

from hf_distill import DistillationTrainer  # noqa: E402
from hf_distill.generation import Generation  # noqa: E402
from hf_distill.rollouts import completion_tokens  # noqa: E402

MAX_NEW_TOKENS = 6


def fixed_completions(prompts: list[list[int]], max_new_tokens: int, pad: int, eos: int) -> Generation:
    """Row ``i``'s completion: ``k - 1`` word ids derived from its prompt, then EOS, ``k = 1 + sum(prompt) %
    max_new_tokens``; padded to ``max_new_tokens``."""
    ids = torch.full((len(prompts), max_new_tokens), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), max_new_tokens), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        k = 1 + sum(prompt) % max_new_tokens
        words = [len(SPECIAL) + (sum(prompt) + 7 * j) % len(WORDS) for j in range(k - 1)]
        ids[row, :k] = torch.tensor([*words, eos])
        mask[row, :k] = True
    return Generation(completion_ids=ids, completion_mask=mask, num_truncated=0)


class RecordingGenerator:
    """Wraps the trainer's generator: the prompts of each call (unpadded token lists); in ``fixed`` mode, the
    sampled completions replaced by :func:`fixed_completions`."""

    def __init__(self, inner, fixed: bool, pad: int, eos: int):
        self.inner, self.fixed, self.pad, self.eos = inner, fixed, pad, eos
        self.prompts: list[list[list[int]]] = []

    def generate(self, model, prompt_input_ids, prompt_attention_mask, **kwargs):
        out = self.inner.generate(model, prompt_input_ids, prompt_attention_mask, **kwargs)
        prompts = [
            ids[m.bool()].tolist() for ids, m in zip(prompt_input_ids, prompt_attention_mask, strict=True)
        ]
        self.prompts.append(prompts)
        if self.fixed:
            return fixed_completions(prompts, kwargs["max_new_tokens"], self.pad, self.eos)
        return out


def main(out: str, per_device_batch: int, mode: str) -> None:
    tokenizer = chat_tokenizer()
    args = config(
        Path(out),
        per_device_train_batch_size=per_device_batch,
        max_steps=2,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        temperature=2.0,
        alpha=0.6,
        beta=0.4,
        kd_loss="jsd",
        jsd_mixture=0.5,
        lmbda=1.0,
        rollout_max_new_tokens=MAX_NEW_TOKENS,
        rollout_samples=0,
    )
    trainer = DistillationTrainer(
        model=tiny_llama(1),
        teacher_model=tiny_llama(2),
        args=args,
        train_dataset=instruction_rows(8),
        processing_class=tokenizer,
    )
    recorder = RecordingGenerator(
        trainer.rollouts.generator, mode == "fixed", tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    trainer.rollouts.generator = recorder
    local_tokens: list[int] = []
    normalisers: list[float] = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        local_tokens.append(int(completion_tokens(inputs)))
        normalisers.append(float(num_items_in_batch))
        return compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    rank = trainer.accelerator.process_index
    record = {
        "prompts": recorder.prompts,
        "local_tokens": local_tokens,
        "num_items_in_batch": normalisers,
        "num_processes": trainer.accelerator.num_processes,
        "student_completions": trainer.rollouts.counts["student_completions"],
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    if trainer.accelerator.is_main_process:
        state = {k: v.cpu() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
        torch.save(state, Path(out) / "student.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    leave_worker()
