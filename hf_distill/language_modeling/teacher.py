"""The teacher: any causal LM by Hub id or folder, a GGUF file, or the offline SmolLM2-135M."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .. import tasks
from ..errors import InputError
from ..optional import require_gguf
from ..tasks import task_of
from . import offline


@dataclass(frozen=True)
class Teacher:
    """The loaded teacher, its tokenizer, and the name a card cites (``teacher_model_name_or_path``)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def load_tokenizer(path: str, **kwargs) -> PreTrainedTokenizerBase:
    """A causal LM's tokenizer, with its EOS token as padding when it has none (blocks are never padded)."""
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, who: str, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(path)``, refused unless it is a causal LM."""
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if task_of(model) != tasks.CAUSAL_LM:
        raise InputError(f"The {who} {path!r} is a {type(model).__name__}, not a causal language model.")
    return model


def load_teacher(script) -> Teacher:
    """The teacher of ``script`` (``teacher_model_name_or_path``, ``teacher_gguf_file``), in eval mode."""
    path = offline.resolve_model_path(script.teacher_model_name_or_path, script.cache_dir)
    kwargs = {}
    if script.teacher_gguf_file:
        require_gguf(f"The GGUF teacher file {script.teacher_gguf_file!r}")
        kwargs = {"gguf_file": script.teacher_gguf_file}
    model = load_causal_lm(path, "teacher", **kwargs).eval()
    return Teacher(model, load_tokenizer(path, **kwargs), script.teacher_model_name_or_path)
