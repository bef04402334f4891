"""Students built from teacher layers, for each supported family."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    T5Config,
    T5ForConditionalGeneration,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from hf_distill import build_student, select_teacher_layers
from hf_distill.student import teacher_layers_of


def _teachers():
    torch.manual_seed(0)
    small = dict(vocab_size=50, num_attention_heads=2)
    return {
        "bert": (tiny_bert(num_layers=4), "bert.encoder.layer.{}.attention.self.query.weight"),
        "roberta": (
            RobertaForMaskedLM(
                RobertaConfig(hidden_size=32, num_hidden_layers=4, intermediate_size=37, **small)
            ),
            "roberta.encoder.layer.{}.output.dense.weight",
        ),
        "distilbert": (
            DistilBertForSequenceClassification(
                DistilBertConfig(dim=32, n_layers=4, n_heads=2, hidden_dim=37, vocab_size=50)
            ),
            "distilbert.transformer.layer.{}.ffn.lin1.weight",
        ),
        "gpt2": (
            GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=50)),
            "transformer.h.{}.mlp.c_fc.weight",
        ),
        "llama": (
            LlamaForCausalLM(
                LlamaConfig(
                    hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_key_value_heads=2, **small
                )
            ),
            "model.layers.{}.mlp.up_proj.weight",
        ),
        "mistral": (
            MistralForCausalLM(
                MistralConfig(
                    hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_key_value_heads=2, **small
                )
            ),
            "model.layers.{}.self_attn.k_proj.weight",
        ),
        "qwen2": (  # the one family with per-layer `layer_types`: each layer's own kind must follow it
            Qwen2ForCausalLM(
                Qwen2Config(
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=4,
                    num_key_value_heads=2,
                    use_sliding_window=True,
                    sliding_window=8,
                    max_window_layers=2,  # layers 0, 1: full attention; 2, 3: sliding
                    **small,
                )
            ),
            "model.layers.{}.self_attn.q_proj.bias",
        ),
        "xlm-roberta": (
            XLMRobertaForSequenceClassification(
                XLMRobertaConfig(hidden_size=32, num_hidden_layers=4, intermediate_size=37, **small)
            ),
            "roberta.encoder.layer.{}.attention.self.value.weight",
        ),
        "electra": (
            ElectraForSequenceClassification(
                ElectraConfig(
                    embedding_size=16, hidden_size=32, num_hidden_layers=4, intermediate_size=37, **small
                )
            ),
            "electra.encoder.layer.{}.intermediate.dense.weight",
        ),
    }


@pytest.mark.parametrize(
    "family", ["bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "xlm-roberta", "electra"]
)
def test_student_copies_chosen_teacher_layers(family):
    teacher, layer_key = _teachers()[family]
    student = build_student(teacher, layers=[1, 3], teacher_name_or_path="some/teacher")
    assert type(student) is type(teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for s_layer, t_layer in enumerate([1, 3]):
        torch.testing.assert_close(s_state[layer_key.format(s_layer)], t_state[layer_key.format(t_layer)])
    # Everything outside the layers (embeddings, head) is the teacher's.
    for key, value in s_state.items():
        if ".layer." not in key and ".h." not in key and ".layers." not in key:
            torch.testing.assert_close(value, t_state[key])
    assert student.config.distillation == {
        "teacher": "some/teacher",
        "teacher_num_layers": 4,
        "teacher_layers": [1, 3],
    }
    assert student.num_parameters() < teacher.num_parameters()
    layer_types = getattr(teacher.config, "layer_types", None)
    if family == "qwen2":
        assert layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    if layer_types is not None:  # shrunk with the layers: each copied layer keeps its kind
        assert student.config.layer_types == [layer_types[1], layer_types[3]]
    ids = torch.randint(5, 50, (2, 6))
    with torch.no_grad():  # the student runs
        student(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_default_is_every_other_layer_and_mapping_survives_save(tmp_path):
    teacher = tiny_bert(num_layers=6)
    student = build_student(teacher)
    assert student.config.num_hidden_layers == 3
    assert student.config.distillation["teacher_layers"] == [0, 2, 4]
    student.save_pretrained(tmp_path)
    reloaded = type(student).from_pretrained(tmp_path)
    assert reloaded.config.distillation["teacher_layers"] == [0, 2, 4]


def test_teacher_layers_of_reads_the_mapping_through_a_peft_wrapper():
    from peft import LoraConfig, TaskType, get_peft_model

    student = build_student(tiny_bert(num_layers=4), layers=[0, 3])
    assert teacher_layers_of(student) == [0, 3]
    lora = get_peft_model(student, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query"]))
    assert teacher_layers_of(lora) == [0, 3]
    assert teacher_layers_of(tiny_bert()) is None  # not built by build_student


def test_student_with_all_layers_reproduces_teacher():
    teacher = tiny_bert(num_layers=3).eval()
    student = build_student(teacher, layers=[0, 1, 2]).eval()
    ids = torch.randint(5, 60, (2, 7))
    torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_select_teacher_layers():
    assert select_teacher_layers(12) == [0, 2, 4, 6, 8, 10]
    assert select_teacher_layers(12, 3) == [0, 6, 11]
    assert select_teacher_layers(6, 1) == [0]
    with pytest.raises(ValueError, match="num_layers must be between 1 and the teacher's 6 layers, got 7"):
        select_teacher_layers(6, 7)


def test_bad_layers_raise():
    teacher = tiny_bert(num_layers=4)
    with pytest.raises(
        ValueError, match=r"layers=\[0, 4\] must be a non-empty list of teacher layers in \[0, 4\)"
    ):
        build_student(teacher, layers=[0, 4])
    with pytest.raises(ValueError, match="num_layers=3 but layers"):
        build_student(teacher, num_layers=3, layers=[0, 1])


def test_unsupported_architecture_raises():
    t5 = T5ForConditionalGeneration(
        T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, vocab_size=50, d_kv=8)
    )
    with pytest.raises(ValueError, match="does not know the layer layout of model_type='t5'"):
        build_student(t5)
