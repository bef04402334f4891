"""Metrics of any text classification or regression task, as a local ``evaluate`` module loaded by path.

Load it with :func:`hf_distill.text_classification.metrics.load_metric` or
``evaluate.load("<path to this file>", config_name)``. Configurations and what they return:

- ``single_label``: ``accuracy`` and ``macro_f1`` (the unweighted mean of the per-class F1 scores, over
  the classes present in references or predictions)
- ``regression``: ``pearson`` and ``spearmanr`` correlations of predicted and gold scores

scikit-learn computes F1, scipy the correlations (imported only by the configuration that uses them).
"""

import evaluate

from hf_distill.text_classification.metrics import shared

_DESCRIPTION = "Text classification metrics: accuracy and macro-F1, or Pearson and Spearman for regression."
_KWARGS_DESCRIPTION = shared.inputs_description("regression")
CONFIGS = ("single_label", "regression")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        return shared.metric_info(
            "classification",
            self.config_name,
            CONFIGS,
            float_config="regression",
            description=_DESCRIPTION,
        )

    def _compute(self, predictions, references):
        if self.config_name == "regression":
            return shared.pearson_spearman(predictions, references)
        from sklearn.metrics import f1_score

        return {
            "accuracy": shared.accuracy(predictions, references),
            "macro_f1": float(f1_score(references, predictions, average="macro")),
        }
