"""The full weight of a sharded output embedding, for a loss computed outside the model's forward.

The fused causal-LM loss (:func:`hf_distill.vocab_losses.chunked_lm_losses`) reads the student's and a
live teacher's output-embedding weight after their forward. Sharding engines do not hold that weight
whole there:

- DeepSpeed ZeRO-3 keeps only this rank's partition (``param.data`` is an empty placeholder outside
  ``deepspeed.zero.GatheredParameters``). :func:`gathered_weight` gathers it for reading
  (``modifier_rank=None``) and yields the parameter itself, so the loss's gradient lands on the real
  parameter, whose gradient hook ZeRO-3 registered: it reduce-scatters that gradient to the shards as
  it does for any parameter.
- FSDP2 (``torch.distributed.fsdp.fully_shard``) leaves a resharded parameter as a ``DTensor`` sharded
  on dim 0. :func:`gathered_weight` yields its full tensor; the gradient goes back as a partial sum
  averaged over the mesh (``Partial("avg")``), i.e. reduce-scattered and divided by the world size, as
  FSDP2 reduces the gradients of the parameters it uses in a forward. A parameter that FSDP2 left
  unsharded after the forward (the root's, by default) is a plain tensor and is used as it is.

Anything else (one process, DDP, ZeRO-1/2) yields ``module.weight`` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter (DeepSpeed gives each one a ``ds_id``)."""
    return hasattr(param, "ds_id")  # deepspeed.runtime.zero.partition_parameters.is_zero_param


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
