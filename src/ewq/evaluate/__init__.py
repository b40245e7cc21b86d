"""Evaluation: metrics (pure), data loaders, runtimes (llama.cpp, transformers) and
the tasks built on them (perplexity, KL divergence, MMLU)."""
