"""kdlab: a knowledge-distillation lab for causal language models."""
