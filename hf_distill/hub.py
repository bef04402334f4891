"""Publish a distilled student on the Hub: the student alone (PEFT adapters merged), its tokenizer, config and card.

``push_student`` saves what it uploads into a temporary folder with ``save_pretrained`` and uploads that folder in
one commit (``HfApi.create_repo(exist_ok=True)`` + ``HfApi.upload_folder``). So the teacher, checkpoints,
optimizer states and ``training_args.bin`` are never uploaded (they are not in that folder, and the upload
patterns refuse them too), and the training output directory is never read or written: a failed push leaves it
as it was, and pushing again uploads everything again.

The Hub is the one ``HF_ENDPOINT`` names (``huggingface_hub.constants.ENDPOINT``, read when ``push_student``
runs). The token is handed to ``huggingface_hub`` only: it is not logged, not written to any file, and it is
removed from the error messages of a failed push.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from .errors import InputError
from .model_card import StudentCardData, card_data_from_trainer, render_card, write_card

# What a published student folder holds: weights, config and tokenizer files, and its card.
# The card's pictures (results.png) are the PNG files.
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.tiktoken",
    "README.md",
    "*.png",
]
# Never uploaded, even if they were staged: training state, unmerged adapters, pickles, the teacher.
IGNORE_PATTERNS = [
    "checkpoint-*",
    "**/checkpoint-*/**",
    "training_args.bin",
    "trainer_state.json",
    "optimizer.*",
    "scheduler.*",
    "rng_state*",
    "adapter_*",
    "teacher*",
    "*.bin",
    "*.pt",
    "*.pth",
    ".*",
]


class HubPushError(InputError, RuntimeError):
    """A push to the Hub failed. The message says where, what failed and how to retry; the cause is chained.

    An :class:`~hf_distill.errors.InputError` (a token without write access, a repository that cannot be
    created, no network): a script prints it as one line. Also a ``RuntimeError``, as it was before.
    """


def merged_student(model: nn.Module) -> PreTrainedModel:
    """The model to publish: ``model`` itself, or for a ``PeftModel`` a merged copy.

    A PEFT student is deep-copied and the copy merged with ``merge_and_unload``, so the trained ``model`` keeps
    its adapters (training can go on; the copy costs one student's memory for the time of the push).
    """
    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"Can push a transformers PreTrainedModel or a peft PeftModel, got {type(model).__name__}. "
            "Wrap custom students in a PreTrainedModel so that from_pretrained can load them."
        )
    return model


def stage_student(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    card: ModelCard,
    folder: str | Path,
    images: list[Path] | tuple[Path, ...] = (),
) -> list[str]:
    """Write what a push uploads into ``folder``: the merged student (config + safetensors), its tokenizer,
    ``README.md`` and the pictures the card shows (``images``, by file name). Returns the staged file names
    (relative to ``folder``)."""
    if tokenizer is None:
        raise InputError(
            "tokenizer is None: a student on the Hub needs its tokenizer for from_pretrained/pipeline to work. "
            "Pass the tokenizer the student was trained with (the trainer's processing_class)."
        )
    folder = Path(folder)
    merged_student(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    card.save(folder / "README.md")
    for image in images:
        shutil.copyfile(image, folder / image.name)
    staged = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    adapters = [name for name in staged if name.startswith("adapter_")]
    if adapters:
        raise RuntimeError(
            f"Staged adapter files {adapters} although the student was merged; refusing to push."
        )
    return staged


def _card_image(path: Path) -> Path:
    if not path.is_file():
        raise InputError(
            f"The card shows {path.name} (results_image={str(path)!r}) but there is no such file: give the path of "
            "the run's results.png, or results_image=None for a card without a picture."
        )
    return path


_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def _images_beside(card_path: Path) -> list[Path]:
    """The pictures a card file shows by a file name beside it (``![...](results.png)``)."""
    if not card_path.is_file():
        return []
    names = _IMAGE_LINK.findall(card_path.read_text(encoding="utf-8"))
    return [
        card_path.parent / n
        for n in dict.fromkeys(names)
        if "/" not in n and (card_path.parent / n).is_file()
    ]


def _refuse_token_in_files(folder: Path, staged: list[str], token: str) -> None:
    for name in staged:
        if token.encode() in (folder / name).read_bytes():
            raise InputError(
                f"The Hub token appears in {name}, which would be published. Remove it from what produced "
                "that file (a card's launch line, a config field) and push again."
            )


def _cause(err: Exception, token: str | None) -> Exception | None:
    """The exception to chain: ``err``, unless its message holds the token (then none, so it is not printed)."""
    return None if token and token in str(err) else err


def _push_error(err: Exception, stage: str, url: str, token: str | None) -> HubPushError:
    if (
        isinstance(err, HfHubHTTPError)
        and err.response is not None
        and err.response.status_code in (401, 403)
    ):
        hint = (
            "Check that the token has write access to this repo (--hub_token, HF_TOKEN or `hf auth login`)."
        )
    elif isinstance(err, HfHubHTTPError):
        hint = "The Hub refused the request; see its answer above."
    else:
        hint = "Check that the Hub is reachable (HF_ENDPOINT, network, proxy)."
    message = (
        f"Pushing the student to {url} failed while {stage}: {type(err).__name__}: {err}\n{hint}\n"
        "Nothing local was changed (the upload is staged in a temporary folder), so the training output "
        "directory is complete. The push is a single commit: the repo got no partial commit. "
        "Fix the cause and push again (push_student, trainer.push_to_hub or the script's --push_to_hub)."
    )
    return HubPushError(message.replace(token, "<HUB_TOKEN>") if token else message)


def push_student(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    repo_id: str,
    *,
    card: ModelCard | StudentCardData | str | os.PathLike,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload distilled student",
    revision: str | None = None,
) -> CommitInfo:
    """Upload the student ``model`` (PEFT adapters merged), its ``tokenizer``, config and ``card`` to ``repo_id``.

    ``card`` is the README.md: a ``ModelCard`` (e.g. from ``render_card``), a ``StudentCardData`` rendered
    here, or the path of a card file (e.g. ``<output_dir>/README.md`` written by ``write_card``).
    ``token`` defaults to the saved login / ``HF_TOKEN``; ``private`` applies when the repo is created;
    ``revision`` is the branch to commit to (default ``main``). Returns the commit's ``CommitInfo``.

    Raises ``HubPushError`` when the Hub cannot be reached or refuses the repo or the commit (nothing local is
    touched: pushing again is the retry); ``ValueError`` before any upload when the card, tokenizer or token
    checks fail.
    """
    if card is None:
        raise InputError(
            "card is None: a distilled student is published with its card. Pass card=StudentCardData(...) "
            "or card=hf_distill.model_card.render_card(StudentCardData(...))."
        )
    images: list[Path] = []
    if isinstance(card, StudentCardData):
        if card.results_image is not None:
            images.append(_card_image(Path(card.results_image)))
        card = render_card(card)
    elif isinstance(card, (str, os.PathLike)):
        images = _images_beside(Path(card))
        if not Path(card).is_file():
            raise InputError(
                f"No model card at {card}. Write it first with hf_distill.model_card.write_card(data, path) "
                "(the script writes <output_dir>/README.md after evaluation), or pass card=StudentCardData(...)."
            )
        card = ModelCard.load(card)
    api = HfApi(token=token)
    url = f"{api.endpoint}/{repo_id}"
    with tempfile.TemporaryDirectory(prefix="hf-distill-push-") as folder:
        staged = stage_student(model, tokenizer, card, folder, images)
        if token:
            _refuse_token_in_files(Path(folder), staged, token)
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        except Exception as err:  # the network boundary: re-raised with context
            raise _push_error(err, "creating the repository", url, token) from _cause(err, token)
        try:
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
            )
        except Exception as err:  # the network boundary: re-raised with context
            stage = f"uploading {len(staged)} files ({', '.join(staged)})"
            raise _push_error(err, stage, url, token) from _cause(err, token)


def push_trainer_student(trainer, card=None, *, token=None, private=None, commit_message=None, revision=None):
    """:func:`push_student` of a trainer's student, from the main process only (None elsewhere).

    ``card``: a ``StudentCardData``, a ``ModelCard`` or a README path; default ``<output_dir>/README.md`` when
    there is one, else a card written from what the trainer knows
    (:func:`hf_distill.model_card.card_data_from_trainer`). Unset options come from ``trainer.args``.
    """
    if not trainer.is_world_process_zero():
        return None
    args = trainer.args
    repo_id = trainer.hub_model_id or args.hub_model_id or Path(args.output_dir).name
    if card is None:
        written = Path(args.output_dir) / "README.md"
        card = written if written.is_file() else card_data_from_trainer(trainer, repo_id)
    return push_student(
        trainer.model,
        trainer.processing_class,
        repo_id,
        card=card,
        token=token if token is not None else args.hub_token,
        private=private if private is not None else args.hub_private_repo,
        commit_message=commit_message,
        revision=revision if revision is not None else args.hub_revision,
    )


def write_cards_and_push_best(
    cards: Mapping[str, StudentCardData],
    students: Mapping[str, nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    args: TrainingArguments,
    best: str | None,
) -> CommitInfo | None:
    """The end of an application's run: write each student's card, then publish the best student.

    ``cards`` and ``students`` are keyed by the student's output directory; each card is written there as
    ``README.md`` (:func:`~hf_distill.model_card.write_card`). With ``args.push_to_hub``, the student at ``best``
    (one of those directories: the application's pick) is published with :func:`push_student` under its card's
    ``repo_id``, with ``args.hub_token`` and ``args.hub_private_repo``. Returns the push's ``CommitInfo``, None
    without a push.
    """
    for output_dir, card in cards.items():
        write_card(card, Path(output_dir) / "README.md")
    if not args.push_to_hub:
        return None
    if best is None:
        raise InputError(
            "push_to_hub publishes the best distilled student, but this run trained none. "
            "Train at least one distilled student, or drop --push_to_hub."
        )
    card = cards[best]
    return push_student(
        students[best],
        tokenizer,
        card.repo_id,
        card=card,
        token=args.hub_token,
        private=args.hub_private_repo,
    )
