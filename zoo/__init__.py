"""The zoo: evaluation, recipes, model cards, Hub publishing and the mla-zoo CLI."""
