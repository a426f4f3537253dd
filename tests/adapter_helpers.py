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
