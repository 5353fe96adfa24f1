"""Model families that transformers does not ship, built from transformers parts (METER)."""
