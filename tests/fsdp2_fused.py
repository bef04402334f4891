"""FSDP2 (``fully_shard``, gloo, CPU) on the ranks of ``torchrun``: the fused causal-LM loss of a sharded
student against a sharded live teacher, and one optimizer step, against the same models unsharded on the
whole batch in this process.

``torchrun --nproc_per_node 2 tests/fsdp2_fused.py OUT [--tie] [--slices S]`` writes ``OUT/rank<R>.pt`` with both
losses and both students' full weights after the step. With ``--slices S`` the ranks read both heads in ``S``
vocabulary slices (:func:`hf_distill.sharding.head_slices`, :func:`hf_distill.vocab_slices.sliced_lm_losses`);
the one-process reference reads them whole. The loss is formed as the trainer's fused path forms it
(:func:`hf_distill.tasks.last_hidden_state`, :func:`hf_distill.sharding.gathered_weight`,
:func:`hf_distill.vocab_losses.chunked_lm_losses`); Accelerate's Trainer refuses FSDP on the CPU, so the
ranks call it directly.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lm_fixtures import VOCAB, tiny_llama
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaForCausalLM

from hf_distill.sharding import gathered_weight, head_slices
from hf_distill.tasks import last_hidden_state
from hf_distill.vocab_losses import chunked_lm_losses
from hf_distill.vocab_slices import sliced_lm_losses

ROWS, LENGTH = 4, 12


def shard(model: LlamaForCausalLM, tie: bool) -> LlamaForCausalLM:
    for layer in model.model.layers:
        fully_shard(layer)
    if not tie:  # its own unit, resharded after the forward: a DTensor when the loss reads it
        fully_shard(model.lm_head)
    fully_shard(model)
    return model


def fused_loss(student, teacher, input_ids, labels, slices: int = 1) -> tuple[torch.Tensor, str]:
    """0.5 * KL + 0.5 * CE over every position, as DistillationTrainer.compute_fused_lm_loss forms it (the
    heads in ``slices`` vocabulary slices when ``slices > 1``), and the type of the student's head there."""
    inputs = {"input_ids": input_ids}
    hidden = last_hidden_state(student, inputs)[:, :-1].reshape(-1, 32)
    with torch.no_grad():
        t_hidden = last_hidden_state(teacher, inputs)[:, :-1].reshape(-1, 32)
    settings = {
        "kd": "kl",
        "temperature": 2.0,
        "labels": labels[:, 1:].reshape(-1),
        "chunk_size": 7,
        "teacher_hidden": t_hidden,
        "kd_weight": 0.5,
        "ce_weight": 0.5,
    }
    if slices > 1:
        head, t_head = head_slices(student.lm_head), head_slices(teacher.lm_head)
        out = sliced_lm_losses(hidden, head, teacher_head=t_head, num_slices=slices, **settings)
        return out.loss, type(head).__name__
    kind = type(student.lm_head.weight).__name__
    with gathered_weight(student.lm_head) as head, gathered_weight(teacher.lm_head) as t_head:
        out = chunked_lm_losses(hidden, head, teacher_head=t_head, **settings)
    return out.loss, kind


def full_state(model) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def main(out: Path, tie: bool, slices: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    student, teacher = tiny_llama(2, 2, tie=tie), tiny_llama(1, 3, tie=tie).eval()
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, VOCAB, (ROWS, LENGTH), generator=g)

    # one process, the whole batch
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    ref_opt = torch.optim.AdamW(ref_student.parameters(), lr=1e-2)
    ref_loss, _ = fused_loss(ref_student, ref_teacher, input_ids, input_ids)
    ref_loss.backward()
    ref_opt.step()

    # the ranks, each its slice of the batch; every position counts, so the mean of the ranks' losses is
    # the whole batch's loss and FSDP2's averaged gradient is the whole batch's gradient
    shard(student, tie)
    shard(teacher, tie)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    rows = input_ids.chunk(world)[rank]
    loss, head_kind = fused_loss(student, teacher, rows, rows, slices)
    loss.backward()
    opt.step()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    result = {
        "loss": mean_loss,
        "ref_loss": ref_loss.detach(),
        "state": full_state(student),
        "head": head_kind,
    }
    result["ref_state"] = {k: v.detach().clone() for k, v in ref_student.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    flags = sys.argv[2:]
    slices = int(flags[flags.index("--slices") + 1]) if "--slices" in flags else 1
    main(Path(sys.argv[1]), tie="--tie" in flags, slices=slices)
