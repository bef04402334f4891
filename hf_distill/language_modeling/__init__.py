"""The language-model application behind ``scripts/distill_lm.py``: distil a causal LM on text.

One module per concept: :mod:`.arguments` (settings and recipes), :mod:`.offline` (the offline teacher
and corpora), :mod:`.data` (corpus, checks, packing), :mod:`.instruct_data` (prompts, instruction data and
their checks), :mod:`.teacher`, :mod:`.students`,
:mod:`.evaluation` (perplexity, speed, samples), :mod:`.report` (results, table, cards), :mod:`.run`.
It uses the library's public pieces and never imports the text-classification application.
"""

from .arguments import DATACLASSES, DistillLMArguments, LMRecipeParser
from .report import format_table
from .run import prepare, run

__all__ = ["DATACLASSES", "DistillLMArguments", "LMRecipeParser", "format_table", "prepare", "run"]
