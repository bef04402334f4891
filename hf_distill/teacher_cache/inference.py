"""The teacher run over a dataset: length-sorted batches, outputs gathered on the device, in Arrow.

:class:`_TeacherLogits` is the ``Dataset.map`` function :func:`~.precompute.precompute_teacher_logits`
runs; :func:`length_sorted_batches` shows the batches it forms.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from torch import nn

from .. import tasks
from ..draw_code import encode_draws
from ..errors import InputError
from ..ragged import (
    BatchLayout,
    batch_bounds,
    fixed_size_lists,
    flat_lists,
    lists_of_fixed_size_lists,
    longest_first,
)
from ..tasks import base_model, output_logits
from ..vocab_losses import quantize_probs, sample_sparse_target
from .key import AUTOCAST_DTYPES
from .storage import format_columns, stored_columns

logger = logging.getLogger(__name__)

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def length_sorted_batches(lengths: list[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Positions grouped into batches by length, longest first, so each batch pads little.

    A batch holds at most ``max_batch_size`` rows and at most ``max_batch_tokens`` padded tokens
    (rows times its longest row); a row longer than the budget forms a batch of its own. The
    batches :func:`precompute_teacher_logits` runs (:func:`hf_distill.ragged.batch_bounds`).
    """
    order = longest_first(np.asarray(lengths, dtype=np.int64))
    bounds = batch_bounds(np.asarray(lengths, dtype=np.int64)[order], max_batch_tokens, max_batch_size)
    return [order[start:stop].tolist() for start, stop in bounds]


class _TeacherLogits:
    """The ``Dataset.map`` function: teacher outputs for a window of examples, in their original order.

    It reads the window's token columns as Arrow list arrays and returns Arrow arrays, with no
    per-row Python: each batch is padded by one scatter (:class:`hf_distill.ragged.BatchLayout`),
    only the real tokens' outputs are gathered on the device (top-k taken there too), converted to
    the stored dtype and copied to the host once per batch. On CUDA the inputs go through pinned
    memory and the copy back is asynchronous, so the next batch is built while this one runs.
    """

    def __init__(
        self,
        teacher: nn.Module,
        task: str,
        columns: Mapping[str, str],
        *,
        pad_token_id: int,
        dtype: str,
        autocast_dtype: str | None,
        max_batch_tokens: int,
        max_batch_size: int,
        formats: Mapping[str, Mapping[str, Any]],
    ):
        """``formats``: column prefix -> ``{"top_k": ..., "sampling": ...}`` as in the cache key (one
        prefix ``""`` for a single format). Every format is computed from each batch's one forward."""
        self.teacher, self.task, self.columns = teacher, task, dict(columns)
        self.pad_token_id, self.dtype = pad_token_id, np.dtype(dtype)
        self.formats = {
            prefix: (spec.get("top_k"), dict(spec["sampling"]) if spec.get("sampling") else None)
            for prefix, spec in formats.items()
        }
        # prefix + column name -> (stored dtype, values per token or example), as drawn; and the drawn columns that
        # are stored otherwise (stored_columns): pooled draws -> (their code's column, their tokens' counts' column,
        # and with an exact head its ids' column, coded with them, and its probabilities' column)
        self.outputs, self.coded = {}, {}
        for prefix, (top_k, sampling) in self.formats.items():
            drawn = format_columns(teacher, task, dtype, top_k, sampling)
            self.outputs |= {prefix + name: (np.dtype(stored), width) for name, (stored, width) in drawn.items()}
            if "teacher_sample_code" in stored_columns(drawn):
                head = [prefix + name for name in ("teacher_head_ids", "teacher_head_quanta", "teacher_head_probs")
                        if name in drawn]  # fmt: skip
                self.coded[prefix + "teacher_sample_ids"] = (prefix + "teacher_sample_code",
                                                             prefix + "teacher_sample_lengths", *head)  # fmt: skip
        self.torch_dtype = getattr(torch, dtype)
        self.autocast_dtype = AUTOCAST_DTYPES.get(autocast_dtype) if autocast_dtype else None
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.device = next(teacher.parameters()).device
        self.cuda = self.device.type == "cuda"

    def __call__(self, window: pa.Table) -> pa.Table:
        # Start each window from the budget that last fitted; halve it on out-of-memory (and only
        # then collect garbage and empty the device cache).
        flat = {name: flat_lists(window[column]) for name, column in self.columns.items()}
        ids = flat["input_ids"][1]  # columns with input_ids' row lengths share its offsets (and layouts)
        flat = {name: (v, ids if np.array_equal(o, ids) else o) for name, (v, o) in flat.items()}
        while True:
            try:
                outputs = self._window(flat)
                break
            except RuntimeError as err:
                if not should_reduce_batch_size(err):
                    raise
            clear_device_cache(garbage_collection=True)
            self._halve_budget()
        window = window.drop_columns([name for name in outputs if name in window.column_names])
        for name, values in outputs.items():
            window = window.append_column(name, values)
        return window

    def _halve_budget(self) -> int:
        self.max_batch_tokens //= 2
        if self.max_batch_tokens < 1:
            raise RuntimeError(
                "The teacher runs out of memory on a single example: it needs a bigger device."
            )
        logger.warning("Teacher ran out of memory; max_batch_tokens reduced to %d.", self.max_batch_tokens)
        return self.max_batch_tokens

    @torch.inference_mode()
    def _window(self, flat: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, pa.Array]:
        offsets = flat["input_ids"][1]
        lengths = np.diff(offsets)
        order = longest_first(lengths)
        out = self._allocate(len(lengths), int(offsets[-1]))
        pending = None
        for start, stop in batch_bounds(lengths[order], self.max_batch_tokens, self.max_batch_size):
            launched = self._launch(BatchLayout.of(offsets, order[start:stop]), flat)
            if pending is not None:  # the previous batch's copy back, while this one runs
                self._collect(pending, out)
            pending = launched
        if pending is not None:
            self._collect(pending, out)
        if self.task == tasks.SEQUENCE_CLASSIFICATION:
            return {key: fixed_size_lists(values) for key, values in out.items()}
        coded = {}  # a row's pooled draws (and head ids): one code a row, in the draws' place
        for key, (code, lengths, *head) in self.coded.items():
            if head:  # each token's head ids ascending, its probabilities in the same order
                order = np.argsort(out[head[0]], axis=1, kind="stable")
                for name in head:
                    out[name] = np.take_along_axis(out[name], order, axis=1)
            coded[key] = (code, self._code(out[key], out[lengths], offsets, out[head[0]] if head else None))
        dropped = {head[0] for _, _, *head in self.coded.values() if head}
        return dict(coded[key] if key in coded else (key, lists_of_fixed_size_lists(values, offsets))
                    for key, values in out.items() if key not in dropped)  # fmt: skip

    def _code(self, values: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, head: np.ndarray | None) -> pa.Array:
        """Each row's pooled draws (``values`` ``(tokens, n)``, token after token), with its tokens' head ids
        (``head`` ``(tokens, h)``, each ascending) if any, as its code (:func:`~hf_distill.draw_code.encode_draws`):
        one uint8 list a row, stored as ``teacher_sample_code``."""
        largest = max(int(values.max(initial=0)), int(head.max(initial=0)) if head is not None else 0)
        vocab_size = max(int(base_model(self.teacher).config.vocab_size), largest + 1)
        rows = [encode_draws(values[start:stop].reshape(-1), lengths[start:stop], vocab_size,
                             head=None if head is None else head[start:stop])
                for start, stop in zip(offsets[:-1], offsets[1:], strict=True)]  # fmt: skip
        ends = np.cumsum([0] + [row.size for row in rows]).astype(np.int32)
        values = np.concatenate(rows) if rows else np.zeros(0, np.uint8)
        return pa.ListArray.from_arrays(pa.array(ends), pa.array(values, type=pa.uint8()))

    def _allocate(self, rows: int, tokens: int) -> dict[str, np.ndarray]:
        """The window's outputs in its original order: one row per example or per token."""
        n = rows if self.task == tasks.SEQUENCE_CLASSIFICATION else tokens
        return {name: np.empty((n, width), dtype) for name, (dtype, width) in self.outputs.items()}

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.cuda:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor.cpu()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def _launch(self, layout: BatchLayout, flat: dict[str, tuple[np.ndarray, np.ndarray]]):
        """Start one batch: inputs to the device, the forward, the outputs on their way to the host."""
        # Each column laid out by its own row lengths (normally those of input_ids), to one width.
        layouts = {
            name: layout if offsets is flat["input_ids"][1] else BatchLayout.of(offsets, layout.rows)
            for name, (_, offsets) in flat.items()
        }
        width = max(own.width for own in layouts.values())
        inputs = {}
        for name, (values, _) in flat.items():
            pad = self.pad_token_id if name == "input_ids" else 0
            inputs[name] = self._to_device(layouts[name].pad(values, pad, width))
        if "attention_mask" not in inputs:  # right padding: real tokens first
            inputs["attention_mask"] = self._to_device(layout.mask(width))
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            outputs = self.teacher(**inputs)
        logits = output_logits(outputs, self.task)
        del outputs  # the logits are the only (tokens x C)-sized tensor held from here on
        if self.task != tasks.SEQUENCE_CLASSIFICATION:  # the real tokens only, (tokens, C)
            if bool((layout.lengths == logits.shape[1]).all()):  # no padding (packed blocks): a view, no copy
                logits = logits.reshape(-1, logits.shape[-1])
            else:
                index = self._to_device(np.stack([layout.token_row, layout.token_col]))
                logits = logits[index[0], index[1]]
        logits = logits.float()
        results, stored = {}, []  # stored: the float values kept in the stored dtype
        for prefix, (top_k, sampling) in self.formats.items():
            if sampling:  # NaN or inf in the teacher's logits are refused before sampling
                own = self._sample(logits, layout, flat, sampling)
                stored += [v for k, v in own.items() if k in ("teacher_head_probs", "teacher_sample_weights")]
            elif self.task in tasks.VOCABULARY_TASKS and top_k is not None:
                values, indices = logits.topk(self.outputs[prefix + "teacher_topk_values"][1], dim=-1)
                own = {"teacher_topk_values": values, "teacher_topk_indices": indices.to(torch.int32)}
                stored.append(values)
            else:
                own = {"teacher_logits": logits}
                stored.append(logits)
            results.update({prefix + key: value for key, value in own.items()})
        # The largest magnitude stored, read only once the batch is back (float16 must hold it).
        peak = None
        if self.dtype == np.float16 and any(v.numel() for v in stored):
            peak = torch.stack([v.abs().amax() for v in stored if v.numel()]).amax()
        results = {key: value.to(self.torch_dtype) if value.is_floating_point() else value
                   for key, value in results.items()}  # fmt: skip
        host = {key: self._to_host(value) for key, value in results.items()}
        peak = self._to_host(peak) if peak is not None else None
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
        return layout, host, peak, done

    def _sample(
        self, logits: torch.Tensor, layout: BatchLayout, flat, sampling: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """RS-KD draws for the batch's tokens (``logits``: ``(tokens, V)``, rows in ``layout`` order).

        Each row draws from its own generator, seeded by the sampling seed and a hash of the row's
        tokens, so the draws do not depend on how rows are batched, windowed or sharded, nor on the
        other formats computed from the same forward. With ``sampling["head"] = h`` the ``h`` most
        likely tokens are kept exactly and the draws come from the rest, and with
        ``sampling["proposal_temperature"]`` from a tempered proposal, importance-weighted; with
        ``sampling["counts"] = False`` the draws themselves are stored, and ``sampling["scheme"]`` says how
        they are drawn (:func:`~hf_distill.vocab_losses.sample_sparse_target`); ``sampling["head_quantized"]``
        stores the head's probabilities in 8 bits (:func:`~hf_distill.vocab_losses.quantize_probs`), and
        ``sampling["allocation"] = "adaptive"`` shares each row's draws among its tokens by need.
        """
        # max and min propagate NaN, and are +-inf where any logit is: no (tokens x V) mask is made
        if not bool(torch.isfinite(torch.stack([logits.amax(), logits.amin()])).all()):
            raise InputError(
                "The teacher's logits hold NaN or inf, so no tokens can be sampled from them: check the "
                "teacher's weights and dtype."
            )
        values, offsets = flat["input_ids"]
        n, head, temperature = sampling["num_samples"], sampling.get("head", 0), sampling["temperature"]
        proposal = sampling.get("proposal_temperature", 1.0)
        names = format_columns(self.teacher, self.task, "float32", None, sampling)  # in the order drawn
        out = {
            name: torch.empty(logits.shape[0], width, device=logits.device,
                              dtype=torch.float32 if stored == "float32" else torch.int64)
            for name, (stored, width) in names.items()
        }  # fmt: skip
        start = 0
        for row, length in zip(layout.rows.tolist(), layout.lengths.tolist(), strict=True):
            tokens = np.ascontiguousarray(values[offsets[row] : offsets[row + 1]], dtype=np.int64)
            seed = zlib.crc32(tokens.tobytes(), sampling["seed"] & 0xFFFFFFFF)
            generator = torch.Generator(device=logits.device).manual_seed(seed)
            stop = start + length
            drawn = sample_sparse_target(
                logits[start:stop],
                n,
                temperature,
                head=head,
                proposal_temperature=proposal,
                generator=generator,
                counts=sampling.get("counts", True),
                scheme=sampling.get("scheme", "iid"),
                allocation=sampling.get("allocation", "even"),
            )
            if sampling.get("head_quantized"):  # rounded after the draws: the same draws, independent of them
                drawn = (drawn[0], quantize_probs(drawn[1], generator), *drawn[2:])
            for name, value in zip(out, drawn, strict=True):
                out[name][start:stop] = value
            start = stop
        return out

    def _collect(self, pending, out: dict[str, np.ndarray]) -> None:
        """Wait for a launched batch and write its outputs to their rows of the window."""
        layout, host, peak, done = pending
        if done is not None:
            done.synchronize()
        # NaN and inf pass here: the whole cache is scanned for them before it is marked complete.
        if peak is not None and _FLOAT16_MAX < float(peak) < float("inf"):
            raise InputError(
                f"Teacher logits reach {float(peak):.3g}, beyond float16's range ({_FLOAT16_MAX:g}): "
                "pass dtype='float32'."
            )
        where = layout.rows if self.task == tasks.SEQUENCE_CLASSIFICATION else layout.flat
        for key, value in host.items():
            out[key][where] = value.numpy()
