"""Experiment support (not kernels): tasks, tokenizer, model zoo, metrics, plots, runner."""

import warnings

# In a notebook without ipywidgets, libraries that import tqdm.auto (transformers, datasets)
# warn once at import, before a notebook's setup() can silence anything; the text bars work.
warnings.filterwarnings("ignore", message="IProgress not found")
