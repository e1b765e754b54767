"""Recipes: named bundles of the method's choices, so that `--recipe paper` reproduces the paper's method
(with the official code's defects fixed, gradient clipping included) whatever the defaults become, and
a single flag still overrides one choice of a recipe."""
from __future__ import annotations

RECIPES = {
    "paper": {"init": "minmax", "loss": "mse"},
    # 2 bits, bundled model, 3 seeds: -10% perplexity after Block-AP + E2E-QP (docs/benchmarks.md, issue 24);
    # opt-in until w3/w4 are measured not to get worse
    "clip-huber": {"init": "clip", "loss": "huber"},
}
DEFAULT_RECIPE = "paper"
# A run's record (manifest, results.json) leaves out a choice at the paper's value, so records from before
# the choice existed compare equal; comparisons read a missing key as this.
RECORD_ABSENT = RECIPES["paper"]


def recipe_choice(recipe: str, setting: str, asked):
    """The value of `setting`: what the user asked, else the recipe's."""
    return asked if asked is not None else RECIPES[recipe][setting]
