"""The ``adapterkit`` command line, run as a real subprocess on a tiny saved model and real files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "day", "film", "food", "was"]


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace, word-level tokenizer over WORDS with BERT's special tokens, built offline."""
    vocabulary = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocabulary["[CLS]"]), ("[SEP]", vocabulary["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny BERT classifier and its tokenizer saved to a folder, as from_pretrained expects.

    The wide initialisation (0.2 instead of 0.02) makes the random blocks pass enough of the input
    to the first token that a few epochs separate the two classes.
    """
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = word_level_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, initializer_range=0.2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def reviews_csv(tmp_path) -> Path:
    rows = ["review,stars"]
    for i in range(60):
        rows.append(f"the {'film' if i % 2 else 'food'} was good great nice,positive")
        rows.append(f"the {'day' if i % 2 else 'food'} was bad awful poor,negative")
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapterkit.cli", "--quiet", *map(str, arguments)],
                          capture_output=True, text=True, timeout=300)


def train(model_dir: Path, data: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("train", "--model", model_dir, "--data", data, "--text-column", "review",
                   "--label-column", "stars", "--adapter", "pfeiffer", "--epochs", "3",
                   "--learning-rate", "0.01", "--output", output, *extra)


def test_train_writes_run_folder(tiny_model_dir, reviews_csv, tmp_path):
    output = tmp_path / "run"
    result = train(tiny_model_dir, reviews_csv, output)
    assert result.returncode == 0, result.stderr
    assert (output / "adapter" / "adapterkit_model.safetensors").is_file()
    assert (output / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    assert not (output / "checkpoint").exists()
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.9, metrics
    history = json.loads((output / "history.json").read_text())
    assert history["epochs"][0]["epoch"] == 1
    assert "accuracy" in result.stdout


def test_predict_and_evaluate_after_train(tiny_model_dir, reviews_csv, tmp_path):
    output = tmp_path / "run"
    assert train(tiny_model_dir, reviews_csv, output).returncode == 0
    result = run_cli("predict", "--adapter", output / "adapter", "--model", tiny_model_dir, "--json",
                     "the food was good great nice", "the day was bad awful poor")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["label"] for row in rows] == ["positive", "negative"]
    scored = run_cli("evaluate", "--adapter", output / "adapter", "--model", tiny_model_dir, "--data",
                     reviews_csv, "--text-column", "review", "--label-column", "stars",
                     "--output", tmp_path / "metrics.json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["num_examples"] == 120


def test_train_missing_column_leaves_no_output(tiny_model_dir, reviews_csv, tmp_path):
    output = tmp_path / "run"
    result = run_cli("train", "--model", tiny_model_dir, "--data", reviews_csv, "--text-column", "body",
                     "--label-column", "stars", "--output", output)
    assert result.returncode == 2
    assert "'body'" in result.stderr
    assert "review" in result.stderr
    assert not output.exists()


def test_train_missing_label_column(tiny_model_dir, reviews_csv, tmp_path):
    result = run_cli("train", "--model", tiny_model_dir, "--data", reviews_csv, "--text-column", "review",
                     "--output", tmp_path / "run")
    assert result.returncode == 2
    assert "'label'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_train_empty_file(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    result = run_cli("train", "--model", tiny_model_dir, "--data", empty, "--output", tmp_path / "run")
    assert result.returncode == 2
    assert "empty" in result.stderr
    assert not (tmp_path / "run").exists()


def test_train_unknown_preset(tiny_model_dir, reviews_csv, tmp_path):
    result = train(tiny_model_dir, reviews_csv, tmp_path / "run", "--adapter", "nonsense")
    assert result.returncode == 2
    assert "'nonsense'" in result.stderr
    assert "houlsby" in result.stderr
    assert not (tmp_path / "run").exists()


def test_train_refuses_finished_output(tiny_model_dir, reviews_csv, tmp_path):
    output = tmp_path / "run"
    assert train(tiny_model_dir, reviews_csv, output).returncode == 0
    again = train(tiny_model_dir, reviews_csv, output)
    assert again.returncode == 2
    assert "--overwrite" in again.stderr


def test_evaluate_unseen_label(tiny_model_dir, reviews_csv, tmp_path):
    output = tmp_path / "run"
    assert train(tiny_model_dir, reviews_csv, output).returncode == 0
    other = tmp_path / "other.csv"
    other.write_text("review,stars\nthe film was fine,neutral\n", encoding="utf-8")
    result = run_cli("evaluate", "--adapter", output / "adapter", "--model", tiny_model_dir, "--data", other,
                     "--text-column", "review", "--label-column", "stars")
    assert result.returncode == 2
    assert "'neutral'" in result.stderr


def test_predict_without_texts(tiny_model_dir, tmp_path):
    result = run_cli("predict", "--adapter", tmp_path, "--model", tiny_model_dir)
    assert result.returncode == 2
    assert "No texts" in result.stderr


def saved_lora_adapter(model_dir: Path, folder: Path, name: str, seed: int):
    """Save a LoRA adapter with random non-zero weights for the tiny model; return the model with it active."""
    import adapterkit

    model = adapterkit.init(BertForSequenceClassification.from_pretrained(model_dir).eval())
    model.add_adapter(name, adapterkit.LoRAConfig(r=4, targets=("query", "value", "ff_out")))
    torch.manual_seed(seed)
    for parameter in model._adapterkit.modules_of(name).parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    model.save_adapter(folder, name)
    return model


def test_merge_writes_plain_model(tiny_model_dir, tmp_path):
    saved_lora_adapter(tiny_model_dir, tmp_path / "first", "first", seed=1)
    second = saved_lora_adapter(tiny_model_dir, tmp_path / "second", "second", seed=2)
    second.load_adapter(tmp_path / "first", set_active=False)
    second.set_active_adapters(["first", "second"])
    input_ids = torch.tensor([[2, 5, 8, 13, 3]])
    with torch.no_grad():
        expected = second(input_ids=input_ids).logits

    result = run_cli("merge", "--model", tiny_model_dir, "--adapter", tmp_path / "first", "--adapter",
                     tmp_path / "second", "--output", tmp_path / "merged")

    assert result.returncode == 0, result.stderr
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        actual = merged(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_merge_rejects_bottleneck_adapter(tiny_model_dir, tmp_path):
    import adapterkit

    model = adapterkit.init(BertForSequenceClassification.from_pretrained(tiny_model_dir))
    model.add_adapter("series", "pfeiffer")
    model.save_adapter(tmp_path / "series", "series")

    result = run_cli("merge", "--model", tiny_model_dir, "--adapter", tmp_path / "series", "--output",
                     tmp_path / "merged")

    assert result.returncode == 2
    assert "cannot be merged" in result.stderr
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_existing_output(tiny_model_dir, tmp_path):
    saved_lora_adapter(tiny_model_dir, tmp_path / "first", "first", seed=1)
    (tmp_path / "merged").mkdir()

    result = run_cli("merge", "--model", tiny_model_dir, "--adapter", tmp_path / "first", "--output",
                     tmp_path / "merged")

    assert result.returncode == 2
    assert "--overwrite" in result.stderr


def test_convert_to_peft_and_back(tiny_model_dir, tmp_path):
    model = saved_lora_adapter(tiny_model_dir, tmp_path / "native", "task", seed=3)
    model.set_active_adapters("task")
    input_ids = torch.tensor([[2, 5, 8, 13, 3]])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits

    to_peft = run_cli("convert", tmp_path / "native", tmp_path / "peft", "--to", "peft", "--model", tiny_model_dir)
    back = run_cli("convert", tmp_path / "peft", tmp_path / "back", "--to", "adapterkit", "--model", tiny_model_dir)

    assert to_peft.returncode == 0, to_peft.stderr
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    import adapterkit

    reloaded = adapterkit.init(BertForSequenceClassification.from_pretrained(tiny_model_dir).eval())
    reloaded.load_adapter(tmp_path / "back")
    with torch.no_grad():
        actual = reloaded(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_convert_rejects_unknown_folder(tmp_path):
    (tmp_path / "empty").mkdir()

    result = run_cli("convert", tmp_path / "empty", tmp_path / "out", "--to", "peft")

    assert result.returncode == 2
    assert "contains no adapter checkpoint" in result.stderr
