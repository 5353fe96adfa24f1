"""Self-contained artifacts: inference assets listed with sha256, readable permissions, and the serving
preprocessing (numpy + Pillow + tokenizers) equal to transformers' processors."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from apt_deploy.fileio import atomic_directory, sha256_file, write_json_atomic
from apt_deploy.serving.preprocess import Postprocessor, Preprocessor, RequestError


def png_bytes(h: int, w: int, seed: int = 0) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fixture,expected", [
    ("vqa_artifact", {"inference/labels.json", "inference/preprocess.json", "inference/tokenizer.json",
                      "inference/processor/processor_config.json"}),
    ("clip_artifact", {"inference/labels.json", "inference/preprocess.json",
                       "inference/processor/preprocessor_config.json"}),
])
def test_export_copies_inference_assets_with_sha256(request, fixture, expected):
    art = request.getfixturevalue(fixture)
    section = json.loads((art / "manifest.json").read_text())["inference"]
    assert "missing" not in section and expected <= set(section["files"])
    for rel, digest in section["files"].items():
        assert sha256_file(art / rel) == digest, rel
    on_disk = {p.relative_to(art).as_posix() for p in (art / "inference").rglob("*") if p.is_file()}
    assert on_disk == set(section["files"])


def test_vqa_labels_are_the_answers_in_logit_order(vqa_artifact):
    from apt_deploy.data.synthetic_vqa import ANSWERS

    assert json.loads((vqa_artifact / "inference" / "labels.json").read_text()) == list(ANSWERS)


def test_artifact_without_processor_says_what_is_missing(apt_artifact):
    section = json.loads((apt_artifact / "manifest.json").read_text())["inference"]
    assert "holds no ViLT processor" in section["missing"] and section["files"] == {}


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix() or ".": stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_artifact_files_are_world_readable_under_the_default_umask(vqa_artifact):
    umask = os.umask(0o022)
    os.umask(umask)
    for rel, mode in _modes(vqa_artifact).items():
        want = (0o777 if (vqa_artifact / rel).is_dir() else 0o666) & ~umask
        assert mode == want, (rel, oct(mode), oct(want))


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_directory(tmp_path / "out") as stage:
            write_json_atomic(stage / "a.json", {"x": 1})
            (stage / "sub").mkdir()
    finally:
        os.umask(old)
    assert _modes(tmp_path / "out") == {".": 0o750, "a.json": 0o640, "sub": 0o750}


def test_vqa_preprocessing_equals_transformers_processor(vqa_artifact):
    from apt_deploy.data.vqa import load_processor

    manifest = json.loads((vqa_artifact / "manifest.json").read_text())
    processor = load_processor(manifest["source"]["model_dir"])
    questions = ["What color is the shape?", "is it a square"]
    images = [png_bytes(32, 32, 1), png_bytes(32, 32, 2)]
    got = Preprocessor(vqa_artifact / "inference")(images, questions)
    from PIL import Image

    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    want = processor(images=pil, text=questions, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    for key in ("input_ids", "attention_mask", "pixel_mask"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], atol=1e-6)
    assert got["pixel_values"].dtype == np.float32 and got["input_ids"].dtype == np.int64


def test_vqa_preprocessing_resizes_any_image_to_the_export_size(vqa_artifact):
    feed = Preprocessor(vqa_artifact / "inference")([png_bytes(45, 70)], ["what color?"])
    assert feed["pixel_values"].shape == (1, 3, 32, 32) and feed["pixel_mask"].all()


@pytest.mark.parametrize("h,w", [(45, 37), (32, 32), (20, 90)])
def test_clip_preprocessing_equals_transformers_processor(clip_artifact, clip_dir, h, w):
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    data = png_bytes(h, w, 3)
    want = CLIPImageProcessorPil.from_pretrained(str(clip_dir))(Image.open(io.BytesIO(data)), return_tensors="np")
    got = Preprocessor(clip_artifact / "inference")([data])
    assert set(got) == {"pixel_values"}
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], atol=1e-6)


@pytest.mark.parametrize("images,questions,match", [
    ([b"not an image"], ["q"], "image 0 .* cannot be decoded"),
    ([b""], ["q"], "image 0 is empty"),
    (["PNG"], ["q"], "not bytes"),
    ([png_bytes(8, 8)], ["   "], "question 0 is empty"),
    ([png_bytes(8, 8)], None, "no question for 1 images"),
])
def test_bad_requests_say_what_was_wrong(vqa_artifact, images, questions, match):
    with pytest.raises(RequestError, match=match):
        Preprocessor(vqa_artifact / "inference")(images, questions)


def test_oversized_image_is_refused(vqa_artifact):
    with pytest.raises(RequestError, match="over the limit of 100"):
        Preprocessor(vqa_artifact / "inference", max_image_bytes=100)([png_bytes(32, 32)], ["q"])


def test_postprocessing_sorts_scores_and_names_labels(clip_artifact):
    post = Postprocessor(clip_artifact / "inference")
    labels, scores = post(np.array([[0.0, 2.0, 1.0]], dtype=np.float32), top_k=5)
    assert labels == [["square", "triangle", "circle"]] and scores.shape == (1, 3)
    assert np.all(np.diff(scores[0]) <= 0) and abs(float(scores.sum()) - 1) < 1e-6


def test_verify_checks_the_inference_files(vqa_artifact, tmp_path, capsys):
    import shutil

    from apt_deploy.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(vqa_artifact, copy)
    with open(copy / "inference" / "labels.json", "a") as f:
        f.write(" ")
    assert main(["verify", str(copy)]) == 2
    assert "inference file inference/labels.json is missing or does not match the sha256" in capsys.readouterr().err
