"""The full weight of a sharded output embedding, for a loss computed outside the model's forward.

The fused causal-LM loss (:func:`hf_distill.vocab_losses.chunked_lm_losses`) reads the student's and a
live teacher's output-embedding weight after their forward. Sharding engines do not hold that weight
whole there:

- DeepSpeed ZeRO-3 keeps only this rank's partition (``param.data`` is an empty placeholder outside
  ``deepspeed.zero.GatheredParameters``). :func:`gathered_weight` gathers it for reading
  (``modifier_rank=None``) and yields the parameter itself, so the loss's gradient lands on the real
  parameter, whose gradient hook ZeRO-3 registered: it reduce-scatters that gradient to the shards as
  it does for any parameter. That backward comes after the gather; a head no module of the forward uses (an untied
  one) is then an empty placeholder, which takes its full shape for the accumulation (:func:`_accumulate_whole`).
- FSDP2 (``torch.distributed.fsdp.fully_shard``) leaves a resharded parameter as a ``DTensor`` sharded
  on dim 0. :func:`gathered_weight` yields its full tensor; the gradient goes back as a partial sum
  averaged over the mesh (``Partial("avg")``), i.e. reduce-scattered and divided by the world size, as
  FSDP2 reduces the gradients of the parameters it uses in a forward. A parameter that FSDP2 left
  unsharded after the forward (the root's, by default) is a plain tensor and is used as it is.

Anything else (one process, DDP, ZeRO-1/2) yields ``module.weight`` unchanged.

:func:`head_slices` reads the weight in vocabulary slices instead (``lm_vocab_slices > 1``,
:func:`hf_distill.vocab_slices.sliced_lm_losses`): only the rows of one slice are gathered at a time, from
FSDP2's row shards (:class:`ShardedHeadSlices`) or ZeRO-3's flat partitions (:class:`Zero3HeadSlices`, which
keeps the head's gradient whole for ZeRO-3's own reduce-scatter; NVMe-offloaded partitions are refused,
:func:`check_vocab_slices`).

:func:`check_sharded_settings` refuses, before training, a model partitioned by ZeRO-3 in a run that would not
gather it (a ZeRO-0/1/2 config, or no DeepSpeed). Offloading ZeRO-3 to the CPU needs no refusal: the gather reads
offloaded partitions too (``tests/test_sharded_lm.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from .errors import InputError
from .vocab_slices import HeadSlices


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter (DeepSpeed gives each one a ``ds_id``)."""
    return hasattr(param, "ds_id")  # deepspeed.runtime.zero.partition_parameters.is_zero_param


def zero_stage(deepspeed_config: Mapping[str, Any] | None) -> Any:
    """The ZeRO stage of a DeepSpeed config (``zero_optimization.stage``, DeepSpeed's default 0), as written (DeepSpeed
    judges its type); None: no DeepSpeed."""
    if deepspeed_config is None:
        return None
    return deepspeed_config.get("zero_optimization", {}).get("stage", 0)


def deepspeed_config(args) -> dict[str, Any] | None:
    """The DeepSpeed config of a run's ``TrainingArguments`` (``--deepspeed``, or ``accelerate launch`` with a
    DeepSpeed config, which ``TrainingArguments`` reads into ``deepspeed_plugin``); None without DeepSpeed."""
    plugin = args.deepspeed_plugin
    return None if plugin is None else plugin.deepspeed_config


def models_by_name(student: nn.Module, teachers: list[nn.Module]) -> dict[str, nn.Module]:
    """``{"student": ..., "teacher": ...}``, or ``"teacher 1"``, ``"teacher 2"``... for an ensemble."""
    named = (
        {"teacher": teachers[0]}
        if len(teachers) == 1
        else {f"teacher {i + 1}": t for i, t in enumerate(teachers)}
    )
    return {"student": student, **named}


def check_sharded_settings(
    deepspeed_config: Mapping[str, Any] | None, models: Mapping[str, nn.Module]
) -> None:
    """Refuse, as one :class:`hf_distill.errors.InputError` line, a model partitioned by ZeRO-3 in a run that is not.

    ``deepspeed_config``: the run's DeepSpeed config (``args.deepspeed_plugin.deepspeed_config``), None when the
    run does not use DeepSpeed; ``models``: the student and the live teachers by name (``{"student": ...,
    "teacher": ...}``).

    A model loaded while a ZeRO-3 config was active (``from_pretrained`` under ``deepspeed.zero.Init``) holds
    empty placeholders: only a ZeRO-3 engine gathers them for its forward. Under stage 0-2 (a teacher's
    inference engine turns to stage 0, :func:`hf_distill.teachers.prepare_teacher`) or without DeepSpeed, its
    first forward would multiply empty tensors.
    """
    stage = zero_stage(deepspeed_config)
    if stage == 3:
        return
    run = "does not use DeepSpeed" if stage is None else f"uses ZeRO stage {stage} (zero_optimization.stage)"
    for who, model in models.items():
        if any(is_zero3_partitioned(p) for p in model.parameters()):
            raise InputError(
                f"The {who} was partitioned by DeepSpeed ZeRO-3 (loaded while a ZeRO-3 config was active), but this "
                f"run {run}: only a ZeRO-3 run gathers its partitions. Train with a ZeRO-3 config (zero_stage: 3, "
                f"as recipes/accelerate_configs/deepspeed.yaml), or load the {who} with no ZeRO-3 config active."
            )


def check_vocab_slices(deepspeed_config: Mapping[str, Any] | None, num_slices: int) -> None:
    """Refuse ``lm_vocab_slices > 1`` under ZeRO-3 where the partitions are not plain tensors, as one
    :class:`hf_distill.errors.InputError` line: :class:`Zero3HeadSlices` reads each rank's partition
    (``param.ds_tensor``), which DeepSpeed alone swaps in from NVMe (``offload_param.device: nvme``) or dequantizes
    (ZeRO++'s ``zero_quantized_weights``, ``zero_quantized_nontrainable_weights``, the latter a frozen teacher's).
    CPU offload reads as is."""
    if num_slices <= 1 or zero_stage(deepspeed_config) != 3:
        return
    zero = deepspeed_config.get("zero_optimization", {})
    settings = {
        "offload_param.device: nvme": (zero.get("offload_param") or {}).get("device") == "nvme",
        "zero_quantized_weights": zero.get("zero_quantized_weights", False),
        "zero_quantized_nontrainable_weights": zero.get("zero_quantized_nontrainable_weights", False),
    }
    unreadable = [name for name, on in settings.items() if on]
    if unreadable:
        raise InputError(
            f"lm_vocab_slices={num_slices} reads the ZeRO-3 heads' partitions, which only DeepSpeed can read with "
            f"{', '.join(unreadable)}: set lm_vocab_slices=1, or turn {'it' if len(unreadable) == 1 else 'them'} off."
        )


@contextmanager
def gathered_weight(module: nn.Module) -> Iterator[torch.Tensor]:
    """Inside, the full ``(V, D)`` weight of ``module`` (an output embedding), differentiable into its shards.

    Use the yielded tensor only inside the ``with`` block for the forward of a loss; its backward may run
    after the block. Under ZeRO-3 the weight stays gathered only inside the block: a loss whose backward
    needs the weight itself must have formed what it needs by then (``chunked_lm_losses`` forms its
    gradients in its forward).
    """
    weight = module.weight
    if is_zero3_partitioned(weight):
        import deepspeed

        if weight.requires_grad:  # the backward may come after the gather, with no module to regather it
            _accumulate_whole(weight, tuple(weight.ds_shape))
        with deepspeed.zero.GatheredParameters(weight, modifier_rank=None):
            yield weight
    elif isinstance(weight, DTensor):
        mesh = weight.device_mesh
        full = weight.redistribute(mesh, [Replicate()] * mesh.ndim)
        yield full.to_local(grad_placements=[Partial("avg")] * mesh.ndim)
    else:
        yield weight


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``, with its ZeRO-3 partitions gathered, as copies (a collective: call on every rank).

    A model loaded under ZeRO-3 (``from_pretrained`` runs ``deepspeed.zero.Init`` when a ZeRO-3 config is
    active) holds empty placeholders; its plain state dict holds those.
    """
    partitioned = [p for p in model.parameters() if is_zero3_partitioned(p)]
    if not partitioned:
        return model.state_dict()
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return {name: value.detach().clone() for name, value in model.state_dict().items()}


@contextmanager
def gathered_model(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model`` with every ZeRO-3 partition gathered, for reading (evaluation, counting, sampling).

    For a model that no DeepSpeed engine drives (a teacher loaded under ZeRO-3 and evaluated before training):
    its forward then sees whole weights. Holds the whole model on every rank; nothing else changes.
    """
    partitioned = [p for p in model.parameters() if is_zero3_partitioned(p)]
    if not partitioned:
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield model


def owned_parts(owners: list[tuple[int, int, int]], lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """``(rank, a, b)`` for each owner ``(rank, start, end)`` holding part of ``[lo, hi)``: ``[a, b)`` is that part,
    ``a = max(start, lo)``, ``b = min(end, hi)``, in the owners' order; owners holding none of it are left out."""
    for rank, start, end in owners:
        a, b = max(start, lo), min(end, hi)
        if a < b:
            yield rank, a, b


def zero3_owners(numel: int, partition: int, world: int) -> list[tuple[int, int, int]]:
    """``(rank, start, end)``: the flat elements ``[start, end)`` of a ``numel``-element ZeRO-3 parameter that each
    rank of its ``world``-rank group holds, ``partition`` (``param.ds_tensor.ds_numel``) a rank: rank ``r`` holds
    ``[r P, min((r + 1) P, numel))``, the rest of its partition padding; ranks holding only padding are left out."""
    if partition * world < numel:
        raise ValueError(f"{world} partitions of {partition} elements cannot hold {numel} elements.")
    return [
        (r, r * partition, min((r + 1) * partition, numel)) for r in range(world) if r * partition < numel
    ]


def _broadcast_parts(out, lo, owners, local, start, rank, group) -> None:
    """Fill ``out``, positions ``[lo, lo + len(out))`` of a tensor split along dim 0 among ``owners`` (``(rank,
    start, end)`` in ``group``), from its owners: each owner of part of that range copies it from ``local`` (its own
    piece, beginning at position ``start``) and broadcasts it. A collective: every rank calls it with the same range.
    """
    for r, a, b in owned_parts(owners, lo, lo + len(out)):
        part = out[a - lo : b - lo]
        if r == rank:
            part.copy_(local[a - start : b - start])
        dist.broadcast(part, src=dist.get_global_rank(group, r), group=group)


class ShardedHeadSlices(HeadSlices):
    """An FSDP2 output embedding (a ``DTensor`` sharded ``Shard(0)`` on a 1-D mesh) read in row slices.

    Rank ``r`` holds rows ``[a_r, b_r)`` (``torch.chunk``'s split of ``V``, as FSDP2 shards). :meth:`read`
    gathers rows ``[v0, v1)``: each rank whose rows meet the slice broadcasts its part (one broadcast per
    owner, ``V / S`` rows held). :meth:`slice_grad` is a fresh ``(V / S, D)`` buffer, and :meth:`add_grad`
    routes the slice's gradient summed there to its owners: each owner's part is
    summed over the ranks (``dist.reduce`` to the owner) and divided by the world size into the owner's local
    gradient, the reduction of today's whole gather (``Partial("avg")``, FSDP2's averaged reduce-scatter).
    The gradient flows into the parameter through ``to_local()``, so it lands as a ``Shard(0)`` ``DTensor``
    gradient, as FSDP2 keeps it. Every rank must call :meth:`read` and :meth:`add_grad` with the same slices in
    the same order (they are collectives).
    """

    def __init__(self, weight: DTensor):
        mesh = weight.device_mesh
        if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
            raise InputError(
                f"lm_vocab_slices > 1 reads an FSDP2 head sharded Shard(0) on a 1-D mesh; this one is "
                f"{tuple(weight.placements)} on a {mesh.ndim}-D mesh: set lm_vocab_slices=1 (the whole gather)."
            )
        local = weight.to_local()  # differentiable: its gradient becomes the DTensor's Shard(0) gradient
        super().__init__(local)
        self.shape = tuple(weight.shape)
        self.group = mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        rows = [len(c) for c in torch.arange(self.shape[0]).chunk(self.world)]
        rows += [0] * (self.world - len(rows))
        if rows[self.rank] != local.shape[0]:
            raise InputError(
                f"this rank holds {local.shape[0]} rows of the {self.shape[0]}-row head, expected {rows[self.rank]} "
                "(torch.chunk's split, as FSDP2 shards): set lm_vocab_slices=1 (the whole gather)."
            )
        starts = [sum(rows[:r]) for r in range(self.world)]
        self.owners = [(r, a, a + n) for r, (a, n) in enumerate(zip(starts, rows, strict=True)) if n]
        self.start = starts[self.rank]

    def read(self, v0: int, v1: int) -> torch.Tensor:
        out = torch.empty((v1 - v0, self.shape[1]), dtype=self.dtype, device=self.device)
        _broadcast_parts(out, v0, self.owners, self.weight.detach(), self.start, self.rank, self.group)
        return out

    def slice_grad(self, grad_source: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        return torch.zeros((v1 - v0, self.shape[1]), dtype=grad_source.dtype, device=grad_source.device)

    def add_grad(self, grad_source: torch.Tensor, v0: int, v1: int, grad: torch.Tensor) -> None:
        for r, lo, hi in owned_parts(self.owners, v0, v1):
            part = grad[lo - v0 : hi - v0].contiguous()
            dist.reduce(part, dst=dist.get_global_rank(self.group, r), op=dist.ReduceOp.SUM, group=self.group)
            if r == self.rank:
                grad_source[lo - self.start : hi - self.start] += part / self.world


class Zero3HeadSlices(HeadSlices):
    """A DeepSpeed ZeRO-3 output embedding read in row slices, never gathered whole.

    Rank ``r`` of the parameter's group (``param.ds_process_group``) holds flat elements ``[r P, (r + 1) P)`` of the
    flattened ``(V, D)`` weight in ``param.ds_tensor`` (``P = ds_tensor.ds_numel``, the last rank's partition
    padded: :func:`zero3_owners`). :meth:`read` gathers rows ``[v0, v1)``, flat ``[v0 D, v1 D)``: each rank owning
    part of that range broadcasts it (an offloaded partition is copied to the weight's device), so one ``(V / S,
    D)`` slice is held at a time, never the ``(V, D)`` weight.

    The gradient is whole, as :func:`gathered_weight` leaves it: :meth:`new_grad` is a ``(V, D)`` buffer, each
    slice's gradient is summed in its rows (the plain :meth:`HeadSlices.slice_grad`), and the backward returns it
    to :attr:`source`, a ``(V, D)`` view of the parameter, so it lands in ``param.grad`` and ZeRO-3's own hook
    (``register_post_accumulate_grad_hook``) reduce-scatters and averages it into the partitions, as for any
    parameter. Outside a gather the parameter is an empty placeholder, and autograd checks a gradient against its
    parameter's shape (when the view is made, and when the gradient is accumulated): there it takes the full shape
    for the moment, as a stride-0 tensor of one element (:func:`_full_shape`, :func:`_accumulate_whole`).

    A step's peak holds one ``(V / S, D)`` slice of each head and, in backward, the ``(V, D)`` gradient; the whole
    gather holds the ``(V, D)`` weight of each head and, from forward to backward, that gradient.
    """

    def __init__(self, param: torch.Tensor):
        partition = param.ds_tensor
        if len(param.ds_shape) != 2:
            raise ValueError(f"an output embedding must be (V, D), got shape {tuple(param.ds_shape)}.")
        self.param, self.partition = param, partition
        self.shape = tuple(param.ds_shape)
        self.dtype, self.device = param.dtype, param.device
        self.group = param.ds_process_group
        self.rank = dist.get_rank(self.group)
        self.owners = zero3_owners(param.ds_numel, partition.ds_numel, dist.get_world_size(self.group))
        if param.requires_grad:
            _accumulate_whole(param, self.shape)

    @cached_property
    def source(self) -> torch.Tensor:
        """``param`` viewed at ``(V, D)``, made while it has that shape, so autograd takes a ``(V, D)`` gradient for
        it (a gathered parameter, or one ZeRO-3 keeps whole, ``stage3_param_persistence_threshold``, has it)."""
        placeholder = _full_shape(self.param, self.shape)
        try:
            return self.param.view(self.shape)
        finally:
            if placeholder is not None:
                self.param.data = placeholder

    def read(self, v0: int, v1: int) -> torch.Tensor:
        width = self.shape[1]
        out = torch.empty((v1 - v0) * width, dtype=self.dtype, device=self.device)
        start = self.rank * self.partition.ds_numel
        _broadcast_parts(out, v0 * width, self.owners, self.partition, start, self.rank, self.group)
        return out.view(v1 - v0, width)

    def new_grad(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=dtype, device=self.device)


def _full_shape(param: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Give a ZeRO-3 placeholder ``param`` the full ``shape`` without its values: its data becomes one zero expanded
    to ``shape`` (stride 0, one element). Returns the placeholder to put back, None where ``param`` had the shape."""
    if tuple(param.shape) == shape:
        return None
    placeholder = param.data
    param.data = placeholder.new_zeros(()).expand(shape)
    return placeholder


def _accumulate_whole(param: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Let autograd accumulate a whole ``shape`` gradient into ``param`` while it is an empty ZeRO-3 placeholder.

    Autograd's accumulation shapes a gradient like its parameter; DeepSpeed regathers a parameter before its
    module's backward, but a head read in slices has no module in the backward. Once per parameter, two hooks: before
    accumulation (``register_hook``) a placeholder takes the full shape (:func:`_full_shape`; a gathered parameter
    is left as it is); after it (``register_post_accumulate_grad_hook``, behind ZeRO-3's own, which reduce-scatters
    ``param.grad`` and reads the partitions, not ``param.data``) the placeholder is put back.
    """
    if getattr(param, "_hf_distill_accumulates_whole", False):
        return
    param._hf_distill_accumulates_whole = True
    put_back: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before(grad: torch.Tensor) -> None:
        placeholder = _full_shape(param, shape)
        if placeholder is not None:
            put_back.append((placeholder, param.data))

    def after(param: torch.Tensor) -> None:
        if put_back:
            placeholder, full = put_back.pop()
            if param.data_ptr() == full.data_ptr() and param.stride() == full.stride():  # nothing replaced it
                param.data = placeholder

    param.register_hook(before)
    param.register_post_accumulate_grad_hook(after)


def head_slices(module: nn.Module) -> HeadSlices:
    """The output embedding of ``module`` as :class:`~hf_distill.vocab_slices.HeadSlices` for
    :func:`~hf_distill.vocab_slices.sliced_lm_losses`: a :class:`Zero3HeadSlices` for a DeepSpeed ZeRO-3 parameter,
    a :class:`ShardedHeadSlices` for an FSDP2 ``DTensor``, the plain form for a tensor this process holds whole (one
    process, DDP, a parameter FSDP2 left unsharded)."""
    weight = module.weight
    if is_zero3_partitioned(weight):
        return Zero3HeadSlices(weight)
    return ShardedHeadSlices(weight) if isinstance(weight, DTensor) else HeadSlices(weight)
