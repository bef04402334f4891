"""The GLUE metric as a local ``evaluate`` module, loaded by path (the Hub copy needs the network).

Load it with :func:`hf_distill.text_classification.metrics.load_glue_metric` or
``evaluate.load("<path to this folder>", config_name)``. Configurations and what they return:

- ``sst2``, ``mnli``, ``mnli_matched``, ``mnli_mismatched``, ``qnli``, ``rte``, ``wnli``, ``hans``: ``accuracy``
- ``mrpc``, ``qqp``: ``accuracy`` and binary ``f1`` (positive class 1)
- ``cola``: ``matthews_correlation``
- ``stsb``: ``pearson`` and ``spearmanr`` correlations of predicted and gold scores

Same formulas and names as the Hub's ``glue`` metric (scikit-learn and scipy compute F1, Matthews
and the correlations; they are imported only by the configurations that use them).
"""

import evaluate

from hf_distill.text_classification.metrics import shared

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={the Proceedings of ICLR},
  year={2019}
}
"""
_DESCRIPTION = "GLUE evaluation metric: accuracy, F1, Matthews correlation or Pearson/Spearman, per task."
_KWARGS_DESCRIPTION = shared.inputs_description("stsb")

ACCURACY = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans")
ACCURACY_F1 = ("mrpc", "qqp")
CONFIGS = (*ACCURACY, *ACCURACY_F1, "cola", "stsb")


def _accuracy_f1(predictions, references) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {
        "accuracy": shared.accuracy(predictions, references),
        "f1": float(f1_score(references, predictions)),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    def _info(self):
        return shared.metric_info(
            "GLUE",
            self.config_name,
            CONFIGS,
            float_config="stsb",
            description=_DESCRIPTION,
            citation=_CITATION,
        )

    def _compute(self, predictions, references):
        if self.config_name == "cola":
            from sklearn.metrics import matthews_corrcoef

            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            return shared.pearson_spearman(predictions, references)
        if self.config_name in ACCURACY_F1:
            return _accuracy_f1(predictions, references)
        return {"accuracy": shared.accuracy(predictions, references)}
