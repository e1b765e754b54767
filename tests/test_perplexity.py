import math

import torch

from conftest import tiny_model
from eqat_dist.eval import perplexity


def test_perplexity_equals_exp_of_the_models_own_mean_loss():
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss.item()  # mean over all predicted tokens
    assert math.isclose(perplexity(model, windows, batch_size=3), math.exp(loss), rel_tol=1e-5)
