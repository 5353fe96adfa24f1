"""VQA data: the JSONL loader on real PNG files with a saved tiny model dir, its errors, the synthetic task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apt_deploy.data.synthetic_vqa import ANSWERS, build_synthetic_vqa, build_tokenizer, synthetic_vocab
from apt_deploy.data.vqa import answer_scores, collate, load_answers, load_processor, load_vqa_jsonl
from apt_deploy.errors import ConfigError, InputPathError
from apt_deploy.tiny import save_tiny_vilt

KEYS = {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "pixel_mask", "labels"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_vilt(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def write_png(path: Path, h: int, w: int, seed: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    write_png(tmp_path / "img" / "a.png", 32, 32, 1)
    write_png(tmp_path / "img" / "b.png", 32, 48, 2)  # non-square: padded by collate
    write_jsonl(tmp_path / "train.jsonl", [
        {"image": "img/a.png", "question": "what color is the shape?", "answers": ["red", "red", "blue"]},
        {"image": str(tmp_path / "img" / "b.png"), "question": "is it a circle?", "answers": ["yes"]},
        {"image": "img/a.png", "question": "what is it?", "answers": ["banana", "circle"]},
    ])
    return tmp_path


def test_answer_scores_follow_vqa_rule():
    label2id = {a: i for i, a in enumerate(ANSWERS)}
    scores, unknown = answer_scores(["red"] * 2 + ["blue"] * 8, label2id)
    assert dict(scores) == {label2id["red"]: pytest.approx(2 / 3), label2id["blue"]: 1.0}
    assert answer_scores(["Yes"], label2id) == (((label2id["yes"], 1.0),), [])
    assert answer_scores(["cat", "no"], label2id) == (((label2id["no"], 0.5),), ["cat"])


def test_processor_loads_offline_from_saved_model_dir(model_dir):
    processor = load_processor(model_dir)
    assert type(processor.image_processor).__name__ == "ViltImageProcessorPil"
    assert processor.tokenizer.cls_token_id == 101 and processor.tokenizer.unk_token_id == 100
    config = json.loads((model_dir / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(ANSWERS))] == ANSWERS


def test_jsonl_dataset_items_and_collate(model_dir, data_dir, caplog):
    processor = load_processor(model_dir)
    ds = load_vqa_jsonl(data_dir / "train.jsonl", ANSWERS, processor, text_len=12)
    assert len(ds) == 3 and "skipped 1 answers" in caplog.text
    item = ds[0]
    assert set(item) == KEYS and item["input_ids"].shape == (12,) and item["input_ids"][0] == 101
    scores = item["labels"].tolist()
    assert scores[ANSWERS.index("red")] == pytest.approx(2 / 3) and scores[ANSWERS.index("blue")] == pytest.approx(1 / 3)
    assert ds[2]["labels"].sum().item() == 0.5  # "banana" skipped, "circle" 1 of 2
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 48) and batch["pixel_mask"][0, :, 32:].sum() == 0
    assert batch["pixel_mask"][1].all() and batch["labels"].dtype == torch.float32


def test_dataset_feeds_the_model(model_dir, data_dir):
    from apt_deploy.backbones import get_backbone

    model = get_backbone("vilt").load(str(model_dir))
    batch = collate([load_vqa_jsonl(data_dir / "train.jsonl", ANSWERS, load_processor(model_dir), 12)[i] for i in range(3)])
    labels = batch.pop("labels")
    assert model(**batch).logits.shape == labels.shape


@pytest.mark.parametrize("line, match", [
    ('{"image": "img/a.png", "question": "q", "answers": ["yes"]', r"train\.jsonl:2 is not valid JSON"),
    ('{"image": "img/a.png", "question": "q"}', r"train\.jsonl:2 has the wrong fields"),
    ('{"image": "img/missing.png", "question": "q", "answers": ["yes"]}', r"train\.jsonl:2: image .* does not exist"),
])
def test_bad_lines_name_the_line(data_dir, model_dir, line, match):
    good = json.dumps({"image": "img/a.png", "question": "q", "answers": ["yes"]})
    path = write_jsonl(data_dir / "train.jsonl", [good, line])
    with pytest.raises((ConfigError, InputPathError), match=match):
        load_vqa_jsonl(path, ANSWERS, load_processor(model_dir), 12)


def test_undecodable_image_is_a_clear_error(data_dir, model_dir):
    (data_dir / "img" / "bad.png").write_bytes(b"not an image at all")
    path = write_jsonl(data_dir / "train.jsonl", [{"image": "img/bad.png", "question": "q", "answers": ["yes"]}])
    ds = load_vqa_jsonl(path, ANSWERS, load_processor(model_dir), 12)
    with pytest.raises(InputPathError, match=r"cannot be decoded.*Fix:"):
        ds[0]


def test_no_answer_in_vocab_and_missing_files(data_dir, model_dir):
    path = write_jsonl(data_dir / "train.jsonl", [{"image": "img/a.png", "question": "q", "answers": ["cat"]}])
    with pytest.raises(ConfigError, match="none of the answers"):
        load_vqa_jsonl(path, ANSWERS, load_processor(model_dir), 12)
    with pytest.raises(InputPathError, match="does not exist"):
        load_vqa_jsonl(data_dir / "nope.jsonl", ANSWERS, load_processor(model_dir), 12)


def test_answer_vocabulary_checks(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(ANSWERS))
    assert load_answers(path, num_labels=len(ANSWERS)) == ANSWERS
    with pytest.raises(ConfigError, match=r"has 11 answers but the model has num_labels=10.*Fix:"):
        load_answers(path, num_labels=10)
    path.write_text(json.dumps(["yes", "Yes"]))
    with pytest.raises(ConfigError, match="repeats"):
        load_answers(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_answers(path)
    with pytest.raises(InputPathError):
        load_answers(tmp_path / "missing.json")


def test_missing_tokenizer_is_a_clear_error(model_dir, tmp_path):
    import shutil

    copy = shutil.copytree(model_dir, tmp_path / "copy")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (copy / name).unlink(missing_ok=True)
    with pytest.raises(InputPathError, match="has no tokenizer"):
        load_processor(copy)
    with pytest.raises(InputPathError, match="does not exist"):
        load_processor(tmp_path / "nowhere")


def test_synthetic_vocab_has_bert_layout():
    vocab = synthetic_vocab()
    assert vocab[:1] == ["[PAD]"] and vocab[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(set(vocab)) == len(vocab)
    tok = build_tokenizer()
    ids = tok("What color is the shape?")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and 100 not in ids


def test_synthetic_task_is_deterministic_and_balanced():
    a, b = (build_synthetic_vqa(60, 20, image_size=32, text_len=12, seed=3) for _ in range(2))
    assert all(np.array_equal(x.image, y.image) and x.question == y.question for x, y in zip(a.train.examples, b.train.examples))
    assert not np.array_equal(a.train.examples[0].image, a.test.examples[0].image)
    assert a.answers == ANSWERS and len(a.train) == 60 and len(a.test) == 20
    item = a.train[0]
    assert set(item) == KEYS and item["pixel_values"].shape == (3, 32, 32) and item["labels"].sum() == 1.0
    seen = {a.answers[ex.scores[0][0]] for ex in a.train.examples}
    assert len(seen) >= 8  # most answers occur in 60 questions
    c = build_synthetic_vqa(60, 20, image_size=32, text_len=12, seed=4)
    assert not np.array_equal(a.train.examples[0].image, c.train.examples[0].image)
