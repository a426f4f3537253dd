"""Small helpers shared by the adapter-core tests (imported by module name, as pytest puts tests/ on sys.path)."""

import torch


@torch.no_grad()
def compute_logits(model, input_ids):
    return model(input_ids=input_ids).logits


@torch.no_grad()
def randomize_parameters(module, std=0.1, seed=2):
    torch.manual_seed(seed)
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=std)


def requires_grad_names(module):
    return [name for name, p in module.named_parameters() if p.requires_grad]


def word_tokenizer(words):
    """Return a lowercasing whitespace word-level tokenizer over ``words`` that adds [CLS] and [SEP], built offline.

    ``words`` must contain [PAD], [UNK], [CLS] and [SEP]; [MASK] becomes the mask token when present.
    The tokenizer is built from a ``tokenizers`` backend because ``BertTokenizer(vocab=dict)`` works only
    on transformers 5.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocabulary["[CLS]"]), ("[SEP]", vocabulary["[SEP]"])])
    special = {"mask_token": "[MASK]"} if "[MASK]" in vocabulary else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", **special)


def count_forward_calls(model):
    """Register a hook that counts calls of ``model``'s forward in ``calls[0]``, and return ``calls`` and the handle."""
    calls = [0]

    def count(module, args, kwargs):
        calls[0] += 1

    return calls, model.register_forward_pre_hook(count, with_kwargs=True)
