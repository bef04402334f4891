"""Publishing a student: the real ``huggingface_hub`` client against the Hub-compatible server of ``hub_server.py``.

The client reads ``HF_ENDPOINT`` into ``huggingface_hub.constants`` at import; the ``hub`` fixture points those
constants (endpoint, resolve URL template, cache) at a server started on 127.0.0.1 for each test and disables
Xet uploads (the server speaks LFS). ``transformers`` keeps one ``HfApi`` built on first use: it is reset too.
The tests talk to that local server, so they turn off an offline mode exported in the environment
(``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``, also read once at import): see :func:`online`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert
from hub_server import HubServer
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import filter_repo_objects, get_session
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from hf_distill import DistillationConfig
from hf_distill.errors import InputError
from hf_distill.hub import (
    ALLOW_PATTERNS,
    IGNORE_PATTERNS,
    HubPushError,
    push_student,
    write_cards_and_push_best,
)
from hf_distill.model_card import StudentCardData, count_parameters, render_card, settings_of, write_card
from hf_distill.teacher_cache import weights_hash

TOKEN = "hf_TestTokenThatMustNeverBeWritten0123"
REPO_ID = "test-user/tiny-student"
PUBLISHED = {
    ".gitattributes",
    "README.md",
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def online(monkeypatch) -> None:
    """Undo an exported ``HF_HUB_OFFLINE=1`` for this test: the flags were read at import, so patch them.

    ``huggingface_hub.constants.HF_HUB_OFFLINE`` blocks every request (``OfflineModeIsEnabled``) and
    ``transformers`` asks ``huggingface_hub.is_offline_mode()``; transformers 4.x kept its own
    ``_is_offline_mode`` copy, patched where it exists. The environment variables go too, for subprocesses.
    """
    import transformers.utils.hub as transformers_hub
    import transformers.utils.import_utils as transformers_imports

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for module in (transformers_hub, transformers_imports):
        monkeypatch.setattr(module, "_is_offline_mode", False, raising=False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert not constants.is_offline_mode() and not transformers_hub.is_offline_mode()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import transformers.utils.hub as transformers_hub

    online(monkeypatch)
    with HubServer(token=TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
        yield server


@pytest.fixture
def student():
    return tiny_bert(seed=1).eval()


def card_data(student, **overrides) -> StudentCardData:
    teacher = tiny_bert(seed=0, num_layers=4)
    fields = dict(
        repo_id=REPO_ID,
        task="sequence_classification",
        dataset_name="nyu-mll/glue",
        dataset_config="sst2",
        eval_split="validation",
        teacher="some-org/tiny-teacher",
        teacher_weights_hash=weights_hash(teacher),
        student_init_layers=[0, 2],
        temperature=4.0,
        alpha=0.7,
        beta=0.3,
        teacher_mode="cached",
        teacher_metrics={"accuracy": 0.8, "f1": 0.5},
        student_metrics={"accuracy": 0.6, "f1": 0.45},
        baseline_metrics={"accuracy": 0.55, "f1": 0.4},
        teacher_parameters=count_parameters(teacher),
        student_parameters=count_parameters(student),
        speedup=1.8,
        speedup_hardware="1 CPU core",
        recipe="recipes/tiny.yaml",
        launch_command=f"accelerate launch scripts/distill_glue.py --config recipes/tiny.yaml --hub_token {TOKEN}",
    )
    fields.update(overrides)
    return StudentCardData(**fields)


@pytest.fixture
def output_dir(tmp_path, student, tokenizer):
    """A training output directory as the script leaves it: model, tokenizer, card, args, a checkpoint."""
    out = tmp_path / "output"
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_card(card_data(student), out / "README.md")
    args = TrainingArguments(output_dir=str(out), hub_token=TOKEN, report_to=[])
    (out / "training_args.json").write_text(args.to_json_string())
    (out / "all_results.json").write_text('{"eval_accuracy": 0.6}')
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"optimizer state")
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["w1 w2 w3", "w7 w8"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def assert_same_model(downloaded, local) -> None:
    local_state, state = local.state_dict(), downloaded.state_dict()
    assert state.keys() == local_state.keys()
    for key in state:
        assert torch.equal(state[key], local_state[key]), key


# ---- the card ------------------------------------------------------------------------------------------------


def test_card_metadata_follows_hub_conventions_and_numbers_are_computed(student):
    data = card_data(student)
    card = render_card(data)
    parsed = ModelCard(str(card)).data  # parse back what would be uploaded
    assert parsed.base_model == "some-org/tiny-teacher"
    assert parsed.datasets == ["nyu-mll/glue"]
    assert parsed.pipeline_tag == "text-classification"
    assert parsed.library_name == "transformers"
    assert "knowledge-distillation" in parsed.tags
    assert parsed.model_name == "tiny-student"
    results = {r.metric_type: r for r in parsed.eval_results}
    assert {name: r.metric_value for name, r in results.items()} == data.student_metrics
    assert all(r.dataset_split == "validation" and r.dataset_config == "sst2" for r in results.values())
    text = card.text
    assert data.retention == pytest.approx({"accuracy": 0.75, "f1": 0.9})
    assert "| accuracy | 0.8 | 0.6 | 0.55 | 75.0% |" in text
    assert f"size ratio {data.size_ratio:.3f}" in text
    assert data.teacher_weights_hash in text and "1.80×" in text and "1 CPU core" in text
    assert "layers 0, 2" in text and "cached" in text and "recipes/tiny.yaml" in text
    assert f'AutoModelForSequenceClassification.from_pretrained("{REPO_ID}")' in text
    assert TOKEN not in str(card) and "--hub_token <HUB_TOKEN>" in text


def test_a_calibration_error_is_shown_as_values_without_retention(student):
    data = card_data(
        student,
        task="causal_lm",
        teacher_metrics={"perplexity": 10.0, "loss": 2.0, "ece": 0.01},
        student_metrics={"perplexity": 20.0, "loss": 2.5, "ece": 0.02},
        baseline_metrics={"perplexity": 25.0, "loss": 3.0, "ece": 0.0},
    )
    assert data.retention == pytest.approx(
        {"perplexity": 0.5, "loss": 0.8}
    )  # no "ece": a ratio means nothing
    text = render_card(data).text
    assert "| perplexity | 10 | 20 | 25 | 50.0% |" in text
    assert "| ece | 0.01 | 0.02 | 0 | n/a (compare the values) |" in text
    # a teacher with ECE 0 divides nothing either
    zero = card_data(student, task="causal_lm", teacher_metrics={"ece": 0.0}, student_metrics={"ece": 0.02})
    assert (
        zero.retention == {}
        and "| ece | 0 | 0.02 | not measured | n/a (compare the values) |" in render_card(zero).text
    )


def test_card_without_optional_measurements_says_so(student, tmp_path):
    data = card_data(student, baseline_metrics=None, speedup=None, speedup_hardware=None, launch_command=None)
    text = write_card(data, tmp_path / "cards" / "README.md").text
    assert "No hard-label baseline was run" in text and "baseline (hard labels only)" not in text
    assert "Inference speedup: not measured." in text
    assert "launch line of this run was not recorded" in text
    assert (tmp_path / "cards" / "README.md").read_text(encoding="utf-8") == str(
        ModelCard.load(tmp_path / "cards" / "README.md")
    )


def test_settings_come_from_the_distillation_config(student, tmp_path):
    args = DistillationConfig(
        output_dir=str(tmp_path), temperature=3.0, alpha=0.9, beta=0.1, kd_loss="jsd", report_to=[]
    )
    data = card_data(student, **settings_of(args))
    assert (data.temperature, data.alpha, data.beta, data.kd_loss) == (3.0, 0.9, 0.1, "jsd")
    assert "| kd_loss | `jsd` |" in render_card(data).text


def test_local_teacher_path_is_not_a_base_model(student, tmp_path):
    assert card_data(student, teacher=str(tmp_path)).base_model is None
    assert "base_model" not in render_card(card_data(student, teacher=str(tmp_path))).data.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"task": "image_classification"}, "task must be one of"),
        ({"teacher_weights_hash": ""}, "weights_hash"),
        ({"teacher_mode": "offline"}, "teacher_mode"),
        ({"dataset_name": None}, "dataset_name and eval_split"),
        ({"student_parameters": 0}, "count_parameters"),
        ({"speedup_hardware": None}, "speedup_hardware"),
    ],
)
def test_card_data_refuses_incomplete_facts(student, overrides, message):
    with pytest.raises(ValueError, match=message):
        card_data(student, **overrides)


# ---- push and download -----------------------------------------------------------------------------------------


def test_push_then_from_pretrained_round_trip(hub, student, tokenizer, tmp_path):
    commit = push_student(student, tokenizer, REPO_ID, card=card_data(student), token=TOKEN)

    assert commit.oid == hub.state.repos[REPO_ID].branches["main"]
    assert set(hub.files(REPO_ID)) == PUBLISHED
    assert any(
        method == "PUT" and path.startswith("/lfs/") for method, path, _ in hub.state.requests
    )  # LFS used

    downloaded = AutoModelForSequenceClassification.from_pretrained(REPO_ID, cache_dir=tmp_path / "dl").eval()
    downloaded_tokenizer = AutoTokenizer.from_pretrained(REPO_ID, cache_dir=tmp_path / "dl")
    assert_same_model(downloaded, student)
    torch.testing.assert_close(
        logits(downloaded, downloaded_tokenizer), logits(student, tokenizer), rtol=0, atol=1e-6
    )

    card = ModelCard.load(REPO_ID)
    assert card.data.base_model == "some-org/tiny-teacher"
    assert "knowledge-distillation" in card.data.tags
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"accuracy": 0.6, "f1": 0.45}
    card.validate()  # the server's /api/validate-yaml: YAML parses, ModelCardData and model-index accept it
    bad = "---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\n# a card with a broken model-index\n"
    response = get_session().post(
        f"{hub.endpoint}/api/validate-yaml", json={"content": bad, "repoType": "model"}
    )
    assert response.status_code == 400 and "model_index" in response.json()["errors"][0]["message"]


def test_peft_student_is_pushed_merged(hub, student, tokenizer, tmp_path):
    lora = get_peft_model(
        student, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"])
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.add_(torch.randn_like(param) * 0.5)  # trained adapters and head: the merge must matter
    lora.eval()
    expected = logits(lora, tokenizer)

    push_student(lora, tokenizer, REPO_ID, card=card_data(student), token=TOKEN)

    files = set(hub.files(REPO_ID))
    assert files == PUBLISHED and not any(name.startswith("adapter_") for name in files)
    downloaded = AutoModelForSequenceClassification.from_pretrained(REPO_ID, cache_dir=tmp_path / "dl").eval()
    assert not any("lora" in key for key in downloaded.state_dict())
    torch.testing.assert_close(logits(downloaded, tokenizer), expected, rtol=0, atol=1e-5)
    assert isinstance(lora, PeftModel) and any("lora_A" in n for n, _ in lora.named_parameters())  # kept


def test_token_never_written(hub, student, tokenizer, output_dir):
    push_student(student, tokenizer, REPO_ID, card=card_data(student), token=TOKEN)

    for name, content in hub.files(REPO_ID).items():
        assert TOKEN.encode() not in content, name
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    args = TrainingArguments(output_dir=str(output_dir), hub_token=TOKEN, report_to=[])
    assert TOKEN not in repr(args) and TOKEN not in args.to_json_string()
    # The token went in the Authorization header of writes, and never to the LFS storage host.
    storage_auth = [auth for path, auth in hub.state.authorization_seen if path.startswith("/lfs/")]
    assert storage_auth and all(auth is None for auth in storage_auth)


def test_push_refuses_a_card_that_holds_the_token(hub, student, tokenizer):
    card = ModelCard(f"---\nlicense: mit\n---\nrun with HF_TOKEN={TOKEN[:5]} {TOKEN}\n")
    with pytest.raises(ValueError, match="token appears in README.md"):
        push_student(student, tokenizer, REPO_ID, card=card, token=TOKEN)
    assert hub.state.requests == []  # refused before anything was sent


def test_only_the_student_files_are_uploaded(hub, student, tokenizer, output_dir):
    push_student(student, tokenizer, REPO_ID, card=card_data(student), token=TOKEN)
    assert set(hub.files(REPO_ID)) == PUBLISHED

    # The upload patterns alone refuse training state, adapters, pickles and the teacher.
    candidates = [str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file()] + [
        "training_args.bin",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "pytorch_model.bin",
        "adapter_model.safetensors",
        "adapter_config.json",
        "teacher/model.safetensors",
        "checkpoint-2/model.safetensors",
    ]
    allowed = set(
        filter_repo_objects(candidates, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    )
    assert allowed == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "training_args.json",
        "all_results.json",
    }


# ---- failures ----------------------------------------------------------------------------------------------------


def test_server_down_gives_a_clear_error_and_retry_works(hub, student, tokenizer, output_dir, tmp_path):
    before = snapshot(output_dir)
    hub.stop()
    with pytest.raises(HubPushError) as raised:
        push_student(student, tokenizer, REPO_ID, card=card_data(student), token=TOKEN)
    message = str(raised.value)
    assert f"{hub.endpoint}/{REPO_ID}" in message and "creating the repository" in message
    assert "reachable" in message and "output directory is complete" in message and "push again" in message
    assert TOKEN not in message
    assert snapshot(output_dir) == before

    hub.start()
    push_student(student, tokenizer, REPO_ID, card=card_data(student), token=TOKEN)
    downloaded = AutoModelForSequenceClassification.from_pretrained(REPO_ID, cache_dir=tmp_path / "dl")
    assert_same_model(downloaded, student)


@pytest.mark.parametrize("status, hint", [(403, "write access"), (500, "refused")])
def test_refused_commit_gives_a_clear_error_and_retry_works(
    hub, student, tokenizer, output_dir, status, hint
):
    before = snapshot(output_dir)
    hub.fail("commit", status=status)
    with pytest.raises(HubPushError, match=f"{status}") as raised:
        push_student(student, tokenizer, REPO_ID, card=card_data(student), token=TOKEN)
    assert "uploading 5 files" in str(raised.value) and hint in str(raised.value)
    assert [c.message for c in hub.commits(REPO_ID)] == ["initial commit"]  # no partial commit
    assert snapshot(output_dir) == before

    hub.heal()
    push_student(student, tokenizer, REPO_ID, card=card_data(student), token=TOKEN, commit_message="retry")
    assert [c.message for c in hub.commits(REPO_ID)] == ["initial commit", "retry"]
    assert set(hub.files(REPO_ID)) == PUBLISHED


def test_interrupted_upload_gives_a_clear_error_and_retry_works(
    hub, student, tokenizer, output_dir, monkeypatch
):
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(
        hf_http.time, "sleep", lambda seconds: None
    )  # the client's retry backoff, not our wait
    before = snapshot(output_dir)
    hub.fail("lfs_upload", drop=True)  # every attempt of the weights upload is cut off mid-request
    with pytest.raises(HubPushError) as raised:
        push_student(student, tokenizer, REPO_ID, card=card_data(student), token=TOKEN)
    assert "Error while uploading 'model.safetensors'" in str(raised.value)
    assert "output directory is complete" in str(raised.value)
    assert [c.message for c in hub.commits(REPO_ID)] == ["initial commit"]
    assert hub.state.lfs_objects == {}
    assert snapshot(output_dir) == before

    hub.heal()
    push_student(student, tokenizer, REPO_ID, card=card_data(student), token=TOKEN)
    assert set(hub.files(REPO_ID)) == PUBLISHED


def test_unauthenticated_push_is_refused_with_a_hint(hub, student, tokenizer):
    with pytest.raises(HubPushError, match="write access"):
        push_student(
            student, tokenizer, REPO_ID, card=card_data(student), token="hf_wrongTokenWrongToken0000"
        )


def test_card_file_is_pushed_as_written(hub, student, tokenizer, output_dir):
    push_student(student, tokenizer, REPO_ID, card=output_dir / "README.md", token=TOKEN)
    assert hub.files(REPO_ID)["README.md"] == (output_dir / "README.md").read_bytes()


def test_push_needs_a_card_and_a_tokenizer(hub, student, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="card is None"):
        push_student(student, tokenizer, REPO_ID, card=None, token=TOKEN)
    with pytest.raises(ValueError, match="No model card at .*write_card"):
        push_student(student, tokenizer, REPO_ID, card=tmp_path / "missing" / "README.md", token=TOKEN)
    with pytest.raises(ValueError, match="tokenizer is None"):
        push_student(student, None, REPO_ID, card=card_data(student), token=TOKEN)


# ---- through the trainer -------------------------------------------------------------------------------------


def test_trainer_push_to_hub_publishes_the_student_only(hub, tokenizer, tmp_path):
    from conftest import random_classification_dataset

    from hf_distill import DistillationTrainer

    out = tmp_path / "run"
    args = DistillationConfig(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id=REPO_ID,
        hub_token=TOKEN,
        report_to="none",
        use_cpu=True,
    )
    student = tiny_bert(seed=1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_bert(seed=0, num_layers=4),
        args=args,
        train_dataset=random_classification_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    write_card(card_data(student), out / "README.md")
    trainer.save_model()  # with push_to_hub=True, Trainer.save_model pushes too (with <output_dir>/README.md)
    trainer.push_to_hub()  # pushing again is fine

    assert set(hub.files(REPO_ID)) == PUBLISHED  # no checkpoints, no teacher, no training_args.bin
    downloaded = AutoModelForSequenceClassification.from_pretrained(REPO_ID, cache_dir=tmp_path / "dl").eval()
    torch.testing.assert_close(
        logits(downloaded, tokenizer), logits(student.eval(), tokenizer), rtol=0, atol=1e-6
    )
    saved = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in saved)
    for path in saved:
        assert TOKEN.encode() not in path.read_bytes(), path


# ---- from a notebook: push_to_hub() with no card written ------------------------------------------------------


def notebook_trainer(tmp_path, tokenizer, **kwargs):
    from conftest import random_classification_dataset

    from hf_distill import DistillationTrainer

    args = DistillationConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        hub_model_id=REPO_ID,
        hub_token=TOKEN,
        report_to="none",
        use_cpu=True,
        temperature=3.0,
        alpha=0.8,
        beta=0.2,
    )
    return DistillationTrainer(
        model=tiny_bert(seed=1),
        args=args,
        train_dataset=kwargs.pop("train_dataset", random_classification_dataset(8)),
        processing_class=tokenizer,
        **kwargs,
    )


def test_push_to_hub_after_train_writes_the_card_from_the_trainer(hub, tokenizer, tmp_path):
    import numpy as np
    from conftest import random_classification_dataset

    teacher = tiny_bert(seed=0, num_layers=4)
    teacher.config._name_or_path = "some-org/tiny-teacher"

    def accuracy(eval_pred):
        return {"accuracy": float((np.argmax(eval_pred.predictions, -1) == eval_pred.label_ids).mean())}

    trainer = notebook_trainer(
        tmp_path,
        tokenizer,
        teacher_model=teacher,
        eval_dataset=random_classification_dataset(8, seed=3),
        compute_metrics=accuracy,
    )
    trainer.train()
    measured = trainer.evaluate()
    trainer.push_to_hub()

    card = ModelCard.load(REPO_ID)
    text = card.text
    assert "some-org/tiny-teacher" in text and weights_hash(teacher) in text
    assert (
        f"| accuracy | not measured | {measured['eval_accuracy']:.4g} |" in text
    )  # the teacher was not evaluated
    assert "| temperature (T) | 3.0 |" in text and "| alpha (KD weight) | 0.8 |" in text
    assert f"{count_parameters(trainer.model):,}" in text and f"{count_parameters(teacher):,}" in text
    assert "computed live by the teacher" in text and "No hard-label baseline was run" in text
    assert [r.metric_value for r in card.data.eval_results] == [measured["eval_accuracy"]]
    assert not (tmp_path / "run" / "README.md").exists()  # nothing written into the output folder


def test_push_to_hub_from_cached_logits_without_evaluation(hub, tokenizer, tmp_path):
    from conftest import random_classification_dataset

    from hf_distill import precompute_teacher_logits

    teacher = tiny_bert(seed=0, num_layers=4)
    cached = precompute_teacher_logits(
        teacher,
        random_classification_dataset(8),
        tokenizer=tokenizer,
        cache_dir=tmp_path / "logits",
        teacher_name="some-org/cached-teacher",
    )
    trainer = notebook_trainer(tmp_path, tokenizer, teacher_model=None, train_dataset=cached)
    trainer.train()
    trainer.push_to_hub()

    text = ModelCard.load(REPO_ID).text
    assert "some-org/cached-teacher" in text and weights_hash(teacher) in text  # from the cache's provenance
    assert "Not measured: the student was not evaluated" in text
    assert "| teacher | not measured |" in text  # its size is not in the cache
    assert "precomputed once and cached" in text


# ---- the card's picture ---------------------------------------------------------------------------------------


def picture(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))  # stands in for results.png
    return path


def test_the_card_shows_its_picture_and_the_push_uploads_it(hub, student, tokenizer, tmp_path):
    image = picture(tmp_path / "run" / "results.png")
    data = card_data(student, results_image=str(image))
    assert "](results.png)" in render_card(data).text
    assert "](results.png)" not in render_card(card_data(student)).text  # no picture, no link
    push_student(student, tokenizer, REPO_ID, card=data, token=TOKEN)
    files = hub.files(REPO_ID)
    assert set(files) == PUBLISHED | {"results.png"} and files["results.png"] == image.read_bytes()


def test_a_card_file_is_pushed_with_the_picture_beside_it(hub, student, tokenizer, output_dir):
    image = picture(output_dir / "results.png")
    write_card(card_data(student, results_image=str(image)), output_dir / "README.md")
    push_student(student, tokenizer, REPO_ID, card=output_dir / "README.md", token=TOKEN)
    assert hub.files(REPO_ID)["results.png"] == image.read_bytes()


def test_a_missing_picture_is_refused_before_any_upload(hub, student, tokenizer, tmp_path):
    data = card_data(student, results_image=str(tmp_path / "results.png"))
    with pytest.raises(InputError, match="no such file"):
        push_student(student, tokenizer, REPO_ID, card=data, token=TOKEN)
    assert REPO_ID not in hub.state.repos


# ---- an application's last step: every card written, the best student published -------------------------------


def test_write_cards_and_push_best_writes_every_card_and_publishes_the_best_only(
    hub, student, tokenizer, tmp_path
):
    other = tiny_bert(seed=2).eval()
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    cards = {
        dirs[0]: card_data(student, repo_id="test-user/a"),
        dirs[1]: card_data(other, repo_id="test-user/b"),
    }
    students = {dirs[0]: student, dirs[1]: other}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], hub_token=TOKEN)

    assert write_cards_and_push_best(cards, students, tokenizer, args, dirs[1]) is None  # push_to_hub off
    for folder, card in cards.items():
        assert (Path(folder) / "README.md").read_text(encoding="utf-8") == str(render_card(card))
    assert not hub.state.repos

    args.push_to_hub = True
    write_cards_and_push_best(cards, students, tokenizer, args, dirs[1])
    assert "test-user/b" in hub.state.repos and "test-user/a" not in hub.state.repos
    assert hub.files("test-user/b")["README.md"] == (Path(dirs[1]) / "README.md").read_bytes()
    with pytest.raises(InputError, match="trained none"):
        write_cards_and_push_best({}, {}, tokenizer, args, None)
