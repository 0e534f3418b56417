"""Recipes end to end: the recipe schema, data, training, the runner, reports and the CLI."""
