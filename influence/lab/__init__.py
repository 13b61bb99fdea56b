"""Experiment support (not kernels): tasks, tokenizer, model zoo, metrics, plots, runner."""
