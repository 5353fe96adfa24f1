"""Grounding DINO + SDPT end to end on the tiny model: COCO few-shot data checks, ``apt-deploy train``,
export (ONNX Runtime vs PyTorch, -inf pattern), verify, and detection post-processing (predict)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gdino(tmp_path_factory):
    """A saved tiny Grounding DINO + processor, a synthetic COCO set, and SDPT prompts trained by the CLI."""
    from apt_deploy.backbones.grounding_dino import save_tiny_grounding_dino
    from apt_deploy.cli import main
    from apt_deploy.data.synthetic_shapes import write_detection_coco

    root = tmp_path_factory.mktemp("gdino")
    save_tiny_grounding_dino(root / "model", seed=0, layers=1)
    data = write_detection_coco(root / "data", "solid", 8, seed=0)
    rc = main(["train", "--backbone", "grounding_dino", "--method", "sdpt", "--model", str(root / "model"),
               "--data", str(data), "--shots", "1", "--tokens", "3", "--steps", "2", "--batch-size", "2",
               "--lr", "0.05", "--text-len", "16", "--out", str(root / "prompts")])
    assert rc == 0
    return {"root": root, "model": root / "model", "data": data, "prompts": root / "prompts"}


@pytest.fixture(scope="module")
def gdino_artifact(gdino):
    from apt_deploy.cli import main

    out = gdino["root"] / "artifact"
    rc = main(["export", "--model", str(gdino["model"]), "--prompts", str(gdino["prompts"]), "--batch", "1,1,2",
               "--text-len", "16", "--out", str(out)])
    assert rc == 0
    return out


def _coco(tmp_path, mutate):
    from apt_deploy.data.synthetic_shapes import detection_coco

    coco, images = detection_coco("solid", 8, seed=0, size=64)
    for entry, img in zip(coco["images"], images):
        img.save(tmp_path / entry["file_name"])
    mutate(coco)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["images"][0].pop("width"), "lacks width"),
    (lambda c: c["annotations"][0].update(bbox=[50, 50, 30, 30]), "outside image"),
    (lambda c: c.pop("categories"), "'categories' is missing"),
])
def test_coco_errors_say_received_expected_fix(tmp_path, mutate, message):
    from apt_deploy.data.coco import load_coco_detection
    from apt_deploy.errors import DataError

    with pytest.raises(DataError, match=message) as e:
        load_coco_detection(_coco(tmp_path, mutate))
    assert "Expected:" in str(e.value) and "Fix:" in str(e.value)


def test_coco_shots_absent_categories_and_undecodable_images(tmp_path):
    from apt_deploy.backbones.grounding_dino import build_tiny_processor
    from apt_deploy.data.coco import load_coco_detection
    from apt_deploy.errors import DataError

    path = _coco(tmp_path, lambda c: None)
    with pytest.raises(DataError, match="--shots 9"):
        load_coco_detection(path, shots=9)
    tokenizer = build_tiny_processor().tokenizer
    with pytest.raises(DataError, match="absent from the text prompt"):
        load_coco_detection(path, tokenizer=tokenizer, max_text_len=6)  # "circle . square ." fits, the rest not
    (tmp_path / json.loads(path.read_text())["images"][0]["file_name"]).write_bytes(b"not an image")
    data = load_coco_detection(path, tokenizer=tokenizer, max_text_len=40)
    assert len(data.skipped) == 1 and len(data.examples) == 7
    assert data.prompt == "circle . square . triangle . cross ."
    assert all(0 <= v <= 1 for e in data.examples for box in e.boxes for v in box)
    a = load_coco_detection(path, shots=1, seed=3)
    b = load_coco_detection(path, shots=1, seed=3)
    assert [e.image_id for e in a.examples] == [e.image_id for e in b.examples]  # seeded


def test_cli_train_bad_input_exits_2(gdino, tmp_path, capsys):
    from apt_deploy.cli import main

    bad = _coco(tmp_path, lambda c: c["annotations"][0].update(bbox=[-20, 0, 10, 10]))
    rc = main(["train", "--backbone", "grounding_dino", "--method", "sdpt", "--model", str(gdino["model"]),
               "--data", str(bad), "--out", str(tmp_path / "p")])
    assert rc == 2 and "outside image" in capsys.readouterr().err


def test_cli_train_wrote_an_sdpt_checkpoint(gdino):
    cfg = json.loads((gdino["prompts"] / "apt_config.json").read_text())
    assert cfg["method"] == "sdpt" and cfg["sdpt"]["tokens"] == 3 and cfg["backbone"] == "grounding_dino"


@pytest.mark.slow  # a second Grounding DINO export (~1 min of CPU); the registry round trip exports one by default
def test_export_validates_and_verify_passes(gdino, gdino_artifact):
    import onnx

    from exporters.validate import verify_artifact

    manifest = json.loads((gdino_artifact / "manifest.json").read_text())
    runs = manifest["validation"]["onnxruntime_vs_torch"]["runs"]
    assert [r["shapes"] for r in runs] == ["opt", "max"] and manifest["outputs"][0]["name"] == "logits"
    assert all(o["max_abs"] <= 1e-4 for r in runs for o in r["outputs"])
    ops = {n.op_type for n in onnx.load(str(gdino_artifact / "model.onnx"), load_external_data=False).graph.node}
    assert not ops & {"SVD", "Einsum"} and "GridSample" in ops  # no pseudo-inverse at inference
    report = verify_artifact(gdino_artifact)
    assert report["onnxruntime_vs_torch"]["runs"]


@pytest.mark.slow  # shares the exported artifact above
def test_predict_detection_matches_pytorch_post_processing(gdino, gdino_artifact):
    import torch

    from apt_deploy.backbones.grounding_dino import load_detection_processor
    from apt_deploy.data.synthetic_shapes import detection_coco
    from apt_deploy.detection_predict import predict_detection
    from apt_deploy.detection_training import encode
    from apt_deploy.pipeline import load_trained
    import apt_deploy as ad

    _, images = detection_coco("solid", 1, seed=5, size=96)
    path = gdino["root"] / "query.png"
    images[0].save(path)
    got = predict_detection(gdino_artifact, path, "Circle . square", threshold=0.0)
    assert len(got) == 10 and {"box", "label", "score"} <= set(got[0])
    assert all(0 <= v <= 96 for d in got for v in d["box"]) and got[0]["score"] >= got[-1]["score"]
    processor = load_detection_processor(gdino["model"])
    feed = encode(processor, images, "circle . square .", 128, 16)
    model = ad.fold(load_trained(gdino["model"], gdino["prompts"]))
    with torch.no_grad():
        out = model(**feed)
    want = processor.post_process_grounded_object_detection(out, input_ids=feed["input_ids"], threshold=0.0,
                                                             text_threshold=0.0, target_sizes=[(96, 96)])[0]
    order = torch.argsort(want["scores"], descending=True)
    assert [d["label"] for d in got] == [want["text_labels"][i] for i in order]
    assert max(abs(d["box"][j] - float(want["boxes"][i][j])) for d, i in zip(got, order) for j in range(4)) < 0.02


def test_coco_eval_scores_ground_truth_as_perfect():
    """The experiment's AP plumbing (pycocotools, boxes in pixels x, y, w, h) gives 1.0 for the ground truth."""
    pytest.importorskip("pycocotools")
    from apt_deploy.data.synthetic_shapes import detection_coco
    from apt_deploy.experiments.sdpt_experiment import coco_eval

    gt, _ = detection_coco("inverted", 6, seed=0, size=128)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    assert coco_eval(gt, dets) == {"mAP": 1.0, "AP50": 1.0}
    shifted = [dict(d, bbox=[d["bbox"][0] + d["bbox"][2], *d["bbox"][1:]]) for d in dets]
    assert coco_eval(gt, shifted)["AP50"] == 0.0


def test_comparator_requires_an_identical_inf_pattern():
    """-inf logits at padded text slots compare equal only where both sides have them; NaN never passes."""
    import numpy as np

    from apt_deploy.settings import tolerance
    from engines.compare import diff_outputs

    tol, want = tolerance("onnxruntime_vs_torch"), np.array([1.0, -np.inf, 2.0])
    ok = [diff_outputs({"x": want}, {"x": np.array(got)}, tol)[0].ok
          for got in ([1.00005, -np.inf, 2.0], [1.0, np.inf, 2.0], [1.0, -5.0, 2.0], [1.0, -np.inf, np.nan],
                      [1.001, -np.inf, 2.0])]
    assert ok == [True, False, False, False, False]
