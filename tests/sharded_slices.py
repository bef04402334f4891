"""``ShardedHeadSlices`` and ``Zero3HeadSlices`` on the ranks of ``torchrun`` (gloo, CPU), each rank with its own
positions and its own grad output (``(rank + 1) * loss``, as a trainer scales a rank's loss by its share of the
tokens), both heads read in 5 slices (the middle one spans both ranks):

- ``fsdp2``: 23-row heads sharded ``Shard(0)`` (12 + 11 rows on 2 ranks);
- ``zero3``: the same heads as ZeRO-3 placeholders, each rank holding its flat partition (the student's 138
  elements 69 + 69, the teacher's 115 padded to 58 + 58): both boundaries fall inside row 11.

``torchrun --nproc_per_node 2 tests/sharded_slices.py OUT [fsdp2|zero3]`` writes ``OUT/rank<R>.pt``: the rank's
loss, its hidden states' gradient and its head gradient, with the values expected from ``chunked_lm_losses`` on
the whole heads: the rank's own loss and hidden gradient, and for the head, under FSDP2 the local rows of the
gradient averaged over the ranks of each rank's scaled gradient (``Partial("avg")``), under ZeRO-3 the rank's own
whole scaled gradient (ZeRO-3's hook, not run here, reduce-scatters and averages it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from hf_distill.sharding import ShardedHeadSlices, Zero3HeadSlices, head_slices
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


def expected(rank: int, world: int, head: torch.Tensor, teacher_head: torch.Tensor):
    """From ``chunked_lm_losses`` on the whole heads in this process: this rank's loss and hidden gradient, and each
    rank's head gradient of its scaled loss ``(r + 1) * loss``."""
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
    return ref_loss, ref_hidden_grad, head_grads


def fsdp2_heads(head: torch.Tensor, teacher_head: torch.Tensor, world: int):
    """The heads as ``DTensor`` s sharded ``Shard(0)``; the student's parameter."""
    mesh = init_device_mesh("cpu", (world,))
    weight = torch.nn.Parameter(distribute_tensor(head.clone(), mesh, [Shard(0)]))
    teacher_weight = distribute_tensor(teacher_head, mesh, [Shard(0)])
    module, teacher_module = torch.nn.Module(), torch.nn.Module()
    module.weight, teacher_module.weight = weight, teacher_weight
    student, teacher = head_slices(module), head_slices(teacher_module)
    assert isinstance(student, ShardedHeadSlices) and isinstance(teacher, ShardedHeadSlices)
    return student, teacher, weight


def zero3_param(weight: torch.Tensor, group, rank: int, world: int) -> torch.nn.Parameter:
    """``weight`` as ZeRO-3 leaves it outside a gather on ``rank`` of ``world``: an empty placeholder, with this rank's
    partition of the flattened weight in ``ds_tensor`` (``P = ceil(numel / world)`` elements, the last padded) and
    the attributes ``Zero3HeadSlices`` reads, as DeepSpeed names them."""
    numel = weight.numel()
    size = -(-numel // world)
    flat = torch.cat([weight.flatten(), weight.new_zeros(size * world - numel)])
    param = torch.nn.Parameter(weight.new_empty(0))
    param.ds_id, param.ds_shape, param.ds_numel, param.ds_process_group = 0, weight.shape, numel, group
    param.ds_tensor = flat[rank * size : (rank + 1) * size].clone()
    param.ds_tensor.ds_numel = size
    return param


def zero3_heads(head: torch.Tensor, teacher_head: torch.Tensor, world: int):
    """The heads as ZeRO-3 placeholders with their flat partitions; the student's parameter."""
    rank, group = dist.get_rank(), dist.group.WORLD
    weight, teacher_weight = (
        zero3_param(head, group, rank, world),
        zero3_param(teacher_head, group, rank, world),
    )
    module, teacher_module = torch.nn.Module(), torch.nn.Module()
    module.weight, teacher_module.weight = weight, teacher_weight.requires_grad_(False)
    student, teacher = head_slices(module), head_slices(teacher_module)
    assert isinstance(student, Zero3HeadSlices) and isinstance(teacher, Zero3HeadSlices)
    return student, teacher, weight


def main(out: Path, engine: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    head, teacher_head = 3 * torch.randn(V, D, generator=g), 3 * torch.randn(V, DT, generator=g)
    ref_loss, ref_hidden_grad, head_grads = expected(rank, world, head, teacher_head)

    student, teacher, weight = (zero3_heads if engine == "zero3" else fsdp2_heads)(head, teacher_head, world)
    x = inputs(rank)
    x["hidden"].requires_grad_()
    loss = loss_of(sliced_lm_losses, x, student, teacher, num_slices=5)
    ((rank + 1) * loss).backward()
    if engine == "zero3":  # the rank's own whole gradient, for ZeRO-3's hook to reduce-scatter and average
        assert weight.shape == (0,)
        head_grad, ref_head_grad = weight.grad, head_grads[rank]
    else:  # the owners' rows, averaged over the ranks
        assert isinstance(weight.grad, DTensor) and weight.grad.placements == (Shard(0),)
        start = [0, 12][rank]
        head_grad = weight.grad.to_local()
        ref_head_grad = torch.stack(head_grads).mean(0)[start : start + weight.to_local().shape[0]]
    result = {
        "loss": loss.detach(),
        "ref_loss": ref_loss,
        "hidden_grad": x["hidden"].grad,
        "ref_hidden_grad": ref_hidden_grad,
        "head_grad": head_grad,
        "ref_head_grad": ref_head_grad,
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "fsdp2")
