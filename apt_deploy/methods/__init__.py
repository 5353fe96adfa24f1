"""Prompt-tuning methods in their training form (plain ``torch.nn`` modules)."""
