"""apt-deploy predict / Predictor: raw image (+ question) -> labels and scores from the artifact alone,
equal to the PyTorch model fed by transformers' processor."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from apt_deploy.cli import main
from tests.test_serving_artifact import png_bytes


def test_vqa_predict_equals_pytorch_with_transformers_processor(vqa_artifact):
    import torch
    from PIL import Image

    from apt_deploy import Predictor
    from apt_deploy.data.vqa import load_processor
    from apt_deploy.folding import fold
    from apt_deploy.pipeline import load_trained

    source = json.loads((vqa_artifact / "manifest.json").read_text())["source"]
    image, question = png_bytes(32, 32, 5), "what color is the shape?"
    got = Predictor(vqa_artifact).predict(image, question, top_k=3)
    processor = load_processor(source["model_dir"])
    enc = processor(images=Image.open(io.BytesIO(image)).convert("RGB"), text=question, padding="max_length",
                    truncation=True, max_length=16, return_tensors="pt")
    model = fold(load_trained(source["model_dir"], source["prompts_dir"]))
    with torch.no_grad():
        probs = torch.sigmoid(model(**enc).logits)[0].numpy()
    order = np.argsort(-probs)[:3]
    labels = json.loads((vqa_artifact / "inference" / "labels.json").read_text())
    assert [p["label"] for p in got] == [labels[i] for i in order]
    np.testing.assert_allclose([p["score"] for p in got], probs[order], atol=1e-5)


def test_batches_larger_than_the_export_are_chunked(vqa_artifact):
    from apt_deploy import Predictor

    predictor = Predictor(vqa_artifact)
    requests = [{"image": png_bytes(32, 32, i), "question": f"is it a square {i}"} for i in range(11)]
    batched = predictor.predict_batch(requests, top_k=2)
    assert len(batched) == 11 and predictor.max_batch == 8
    for r, b in zip(requests[:3], batched[:3]):
        one = predictor.predict(r["image"], r["question"], top_k=2)
        assert [p["label"] for p in one] == [p["label"] for p in b]
        np.testing.assert_allclose([p["score"] for p in one], [p["score"] for p in b], atol=1e-6)


def test_cli_json_for_clip(clip_artifact, tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(png_bytes(40, 30))
    assert main(["predict", str(clip_artifact), "--image", str(tmp_path / "x.png"), "--json", "--top-k", "2"]) == 0
    preds = json.loads(capsys.readouterr().out)["predictions"]
    assert len(preds) == 2 and {p["label"] for p in preds} <= {"circle", "square", "triangle"}
    assert preds[0]["score"] >= preds[1]["score"]


def test_cli_requests_jsonl_with_one_bad_image(vqa_artifact, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png_bytes(32, 32, 1))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines = [{"image": "a.png", "question": "what color?", "id": "q1"}, {"image": "bad.png", "question": "what?"},
             {"image": "a.png", "question": "which side?"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc = main(["predict", str(vqa_artifact), "--requests", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "o.jsonl")])
    out = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rc == 2 and "1 of 3 requests failed" in capsys.readouterr().err
    assert out[0]["id"] == "q1" and len(out[0]["predictions"]) == 5 and out[2]["line"] == 3
    assert "cannot be decoded" in out[1]["error"] and "predictions" not in out[1]


@pytest.mark.parametrize("argv,match", [
    (["--image", "{img}"], "no --question for a visual question answering"),
    (["--image", "{tmp}/nope.png", "--question", "q"], "image .*nope.png' does not exist"),
    ([], "exactly one of them"),
    (["--image", "{img}", "--question", "q", "--top-k", "0"], "--top-k 0"),
    (["--image", "{img}", "--text", "a cat"], "--text for an artifact that is not a detection model"),
])
def test_cli_bad_input_exits_2(vqa_artifact, tmp_path, capsys, argv, match):
    import re

    (tmp_path / "a.png").write_bytes(png_bytes(32, 32))
    argv = [a.format(img=tmp_path / "a.png", tmp=tmp_path) for a in argv]
    assert main(["predict", str(vqa_artifact), *argv]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_artifact_without_assets_is_refused_with_the_fix(apt_artifact, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png_bytes(32, 32))
    assert main(["predict", str(apt_artifact), "--image", str(tmp_path / "a.png"), "--question", "q"]) == 2
    err = capsys.readouterr().err
    assert "has no inference assets" in err and "re-run apt-deploy export" in err


def fake_detection(artifact_dir, image_path, text, threshold, backend):
    return [{"label": text, "score": threshold, "box": [0, 0, 1, 1], "backend": backend}]


def test_detection_backbones_dispatch_through_the_table(vqa_artifact, tmp_path, capsys, monkeypatch):
    from apt_deploy.serving import predict

    monkeypatch.setitem(predict.TASK_PREDICTORS, "vilt", "tests.test_predict:fake_detection")
    (tmp_path / "a.png").write_bytes(png_bytes(32, 32))
    assert main(["predict", str(vqa_artifact), "--image", str(tmp_path / "a.png"), "--text", "a cat",
                 "--threshold", "0.25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0] == {"label": "a cat", "score": 0.25,
                                                                      "box": [0, 0, 1, 1], "backend": "onnxruntime"}
    assert predict.TASK_PREDICTORS["grounding_dino"] == "apt_deploy.detection_predict:predict_detection"
