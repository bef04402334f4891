"""Run by test_sharded_lm.py: DistillationTrainer's fused causal-LM loss for 3 steps on a tiny Llama, under
``accelerate launch`` (ZeRO-3 with tests/zero3_cpu.yaml, or one CPU process), then each step's loss and the
student's full weights to ``<out>/student.pt``.

    python tests/zero3_train.py OUT PER_DEVICE_BATCH {live,topk,sampled} [LM_VOCAB_SLICES [{tied,untied}]]

One global batch is the whole dataset (4 rows of one length, every token labelled), so the launchers'
shuffling cannot matter and the mean of the ranks' losses is the whole batch's loss.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
from datasets import Dataset
from launch import leave_worker
from lm_fixtures import VOCAB, tiny_llama

from hf_distill import DistillationConfig, DistillationTrainer, precompute_teacher_logits
from hf_distill.sharding import gathered_weight, is_zero3_partitioned
from hf_distill.tasks import output_embedding


def main(out: Path, per_device_batch: int, source: str, slices: int = 1, head: str = "tied") -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (4, 12), generator=g).tolist()
    rows = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 4, "labels": ids})
    teacher = tiny_llama(1, layers=3)
    if source == "topk":
        rows = precompute_teacher_logits(teacher, rows, top_k=9, dtype="float32")
    elif source == "sampled":
        rows = precompute_teacher_logits(teacher, rows, num_samples=6, sample_temperature=2.0, sample_seed=4)
    args = DistillationConfig(
        output_dir=str(out / "run"),
        per_device_train_batch_size=per_device_batch,
        max_steps=3,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        temperature=2.0,
        alpha=0.6,
        beta=0.4,
        lm_chunk_size=7,
        lm_vocab_slices=slices,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        data_seed=0,
    )
    if (
        args.deepspeed_plugin is not None
    ):  # partition every parameter: DeepSpeed keeps those under 1e5 elements whole
        args.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    trainer = DistillationTrainer(
        model=tiny_llama(2, layers=2, tie=head == "tied"),
        teacher_model=teacher if source == "live" else None,
        args=args,
        train_dataset=rows,
    )
    runtime = trainer.train().metrics["train_runtime"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(f"rank {trainer.accelerator.process_index}: train_runtime {runtime:.2f} s, peak RSS {peak:.0f} MB")
    sharded = is_zero3_partitioned(trainer.model.lm_head.weight)
    # What the ZeRO-3 optimizer offloaded (tests/zero3_offload_cpu.yaml): its parameters' partitions, its states.
    zero = trainer.model_wrapped.optimizer if trainer.is_deepspeed_enabled else None
    offload = {"param": zero.offload_param, "optimizer": zero.offload_optimizer} if zero else {}
    if offload:
        offload["optimizer_class"] = type(zero.optimizer).__name__
    teacher_sharded = source == "live" and is_zero3_partitioned(output_embedding(trainer.teacher).weight)
    state = {}
    for name, param in trainer.model.named_parameters():  # gathered on every rank (a collective)
        with gathered_weight(_Holder(param)) as full:
            state[name] = full.detach().clone()
    if trainer.accelerator.is_main_process:
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        torch.save(
            {
                "losses": losses,
                "state": state,
                "num_processes": trainer.accelerator.num_processes,
                "sharded": sharded,
                "persistent": sharded and trainer.model.lm_head.weight.ds_persist,
                "teacher_sharded": teacher_sharded,
                "offload": offload,
            },
            out / "student.pt",
        )


class _Holder(torch.nn.Module):
    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:5]), *sys.argv[5:6])
    leave_worker()
