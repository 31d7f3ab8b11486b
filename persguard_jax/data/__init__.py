"""Data: image folders, prompts, the synthetic world, and the grain pipelines that batch them."""
