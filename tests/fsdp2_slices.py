"""``ShardedHeadSlices`` on the ranks of ``torchrun`` (gloo, CPU): a 23-row head sharded ``Shard(0)`` (12 + 11 rows on
2 ranks), read in 5 slices (the middle one spans both ranks), each rank with its own positions and its own grad
output (``(rank + 1) * loss``, as a trainer scales a rank's loss by its share of the tokens).

``torchrun --nproc_per_node 2 tests/fsdp2_slices.py OUT`` writes ``OUT/rank<R>.pt``: the rank's loss, its hidden
states' gradient and the local rows of the head's gradient, with the values expected from
``chunked_lm_losses`` on the whole heads: the rank's own loss and hidden gradient, and the head gradient averaged
over the ranks of each rank's scaled gradient (``Partial("avg")``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from hf_distill.sharding import ShardedHeadSlices, head_slices
from hf_distill.vocab_losses import chunked_lm_losses
from hf_distill.vocab_slices import sliced_lm_losses

N, D, DT, V = 9, 6, 5, 23


def inputs(rank: int) -> dict:
    g = torch.Generator().manual_seed(100 + rank)  # each rank's own positions
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:2] = -100
    return {
        "hidden": torch.randn(N, D, generator=g),
        "teacher_hidden": torch.randn(N, DT, generator=g),
        "labels": labels,
    }


def loss_of(fn, x: dict, head, teacher_head, **kwargs):
    return fn(
        x["hidden"],
        head,
        kd="jsd",
        temperature=2.0,
        teacher_hidden=x["teacher_hidden"],
        teacher_head=teacher_head,
        labels=x["labels"],
        chunk_size=4,
        kd_weight=0.6,
        ce_weight=0.4,
        **kwargs,
    ).loss


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    head, teacher_head = 3 * torch.randn(V, D, generator=g), 3 * torch.randn(V, DT, generator=g)

    # expected: the whole heads, every rank's inputs, in this process
    head_grads = []
    for r in range(world):
        x = inputs(r)
        x["hidden"].requires_grad_()
        whole = head.clone().requires_grad_()
        loss = loss_of(chunked_lm_losses, x, whole, teacher_head)
        ((r + 1) * loss).backward()
        head_grads.append(whole.grad)
        if r == rank:
            ref_loss, ref_hidden_grad = loss.detach(), x["hidden"].grad
    ref_head_grad = torch.stack(head_grads).mean(0)

    mesh = init_device_mesh("cpu", (world,))
    weight = torch.nn.Parameter(distribute_tensor(head.clone(), mesh, [Shard(0)]))
    teacher_weight = distribute_tensor(teacher_head, mesh, [Shard(0)])
    module, teacher_module = torch.nn.Module(), torch.nn.Module()
    module.weight, teacher_module.weight = weight, teacher_weight
    student, teacher = head_slices(module), head_slices(teacher_module)
    assert isinstance(student, ShardedHeadSlices) and isinstance(teacher, ShardedHeadSlices)
    x = inputs(rank)
    x["hidden"].requires_grad_()
    loss = loss_of(sliced_lm_losses, x, student, teacher, num_slices=5)
    ((rank + 1) * loss).backward()
    assert isinstance(weight.grad, DTensor) and weight.grad.placements == (Shard(0),)
    start = [0, 12][rank]
    result = {
        "loss": loss.detach(),
        "ref_loss": ref_loss,
        "hidden_grad": x["hidden"].grad,
        "ref_hidden_grad": ref_hidden_grad,
        "head_grad": weight.grad.to_local(),
        "ref_head_grad": ref_head_grad[start : start + weight.to_local().shape[0]],
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
