"""Datasets for training prompts: the VQA loader for user data (JSONL + answer vocabulary) and the
built-in synthetic visual-question task used by the demo and the tests."""

from apt_deploy.data.vqa import VQADataset, VQAExample, collate, load_answers, load_processor, load_vqa_jsonl

__all__ = ["VQADataset", "VQAExample", "collate", "load_answers", "load_processor", "load_vqa_jsonl"]
