"""ImageFolder few-shot data, synthetic shapes with domain shift, captions JSONL, and the CLIP train entry."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from tests.clip_helpers import tiny_processor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def processor():
    return tiny_processor()


def test_synthetic_shapes_are_deterministic_and_styles_differ():
    import numpy as np

    from apt_deploy.data.synthetic_shapes import SHAPES, make_samples

    a, b = make_samples("solid", 2, seed=3), make_samples("solid", 2, seed=3)
    assert [l for _, l in a] == [0, 0, 1, 1, 2, 2, 3, 3] and len(SHAPES) == 4
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b))
    dark = np.asarray(make_samples("inverted", 1, seed=3)[0][0]).mean()
    assert dark < np.asarray(a[0][0]).mean()


def test_image_folder_few_shot_is_seeded_and_balanced(tmp_path, processor):
    from apt_deploy.data.imagefolder import load_image_folder
    from apt_deploy.data.synthetic_shapes import write_image_folder

    root = write_image_folder(tmp_path / "train", "outline", 6, seed=0)
    d1 = load_image_folder(root, processor, shots=3, seed=5)
    d2 = load_image_folder(root, processor, shots=3, seed=5)
    assert d1.class_names == ["circle", "cross", "square", "triangle"]
    assert d1.pixel_values.shape == (12, 3, 32, 32) and torch.equal(d1.pixel_values, d2.pixel_values)
    assert torch.bincount(d1.labels).tolist() == [3, 3, 3, 3]
    assert not torch.equal(load_image_folder(root, processor, shots=3, seed=6).pixel_values, d1.pixel_values)


def test_image_folder_errors(tmp_path, processor):
    from apt_deploy.data.imagefolder import check_class_names, load_image_folder
    from apt_deploy.data.synthetic_shapes import write_image_folder
    from apt_deploy.errors import ConfigError, InputPathError

    root = write_image_folder(tmp_path / "d", "solid", 2, seed=0)
    with pytest.raises(ConfigError, match="fewer images than --shots 5"):
        load_image_folder(root, processor, shots=5)
    (root / "hexagon").mkdir()
    with pytest.raises(InputPathError, match=r"\['hexagon'\].*hold no images"):
        load_image_folder(root, processor)
    (root / "hexagon").rmdir()
    with pytest.raises(ConfigError, match="has 4 classes .* but 3 were expected"):
        check_class_names(["a", "b", "c", "d"], ["a", "b", "c"], "image folder")
    with pytest.raises(InputPathError, match="does not exist"):
        load_image_folder(tmp_path / "missing", processor)


def test_undecodable_images_are_skipped_with_a_count(tmp_path, processor, caplog):
    from apt_deploy.data.imagefolder import load_image_folder
    from apt_deploy.data.synthetic_shapes import write_image_folder
    from apt_deploy.errors import InputPathError

    root = write_image_folder(tmp_path / "d", "solid", 2, seed=0)
    (root / "circle" / "broken.png").write_bytes(b"not a png")
    data = load_image_folder(root, processor)
    assert len(data) == 8 and len(data.skipped) == 1 and "broken.png" in data.skipped[0]
    assert "skipped 1 image" in caplog.text
    for p in (root / "square").iterdir():
        p.write_bytes(b"junk")
    with pytest.raises(InputPathError, match="no image in class folder 'square' could be decoded"):
        load_image_folder(root, processor)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.data.imagefolder import load_clip_preprocessing
    from apt_deploy.errors import InputPathError

    get_backbone("clip").build_tiny(seed=0).save_pretrained(tmp_path / "bare")
    with pytest.raises(InputPathError, match="has no tokenizer.*save_pretrained"):
        load_clip_preprocessing(tmp_path / "bare")


def test_captions_jsonl_reader(tmp_path):
    from apt_deploy.data.captions import read_caption_pairs
    from apt_deploy.data.synthetic_shapes import write_caption_pairs
    from apt_deploy.errors import ConfigError

    path = write_caption_pairs(tmp_path / "pairs", ("solid", "noisy"), 5, seed=0)
    pairs = read_caption_pairs(path)
    assert len(pairs) == 5 and all(isinstance(c, str) and c for _, c in pairs)
    with path.open("a") as f:
        f.write(json.dumps({"image": "images/none.png", "caption": "x"}) + "\n")
    assert len(read_caption_pairs(path)) == 5
    path.write_text('{"image": 3}\n')
    with pytest.raises(ConfigError, match="line 1"):
        read_caption_pairs(path)


def _args(**kw) -> argparse.Namespace:
    from apt_deploy.clip_training import add_clip_arguments

    parser = argparse.ArgumentParser()
    add_clip_arguments(parser)
    base = parser.parse_args([])
    defaults = dict(backbone="clip", eval_data=None, image_root=None, prompt_len=4, rank=2, steps=3, batch_size=8,
                    lr=None, seed=0, overwrite=False)
    return argparse.Namespace(**{**vars(base), **defaults, **kw})


@pytest.mark.parametrize("method", ["coop", "apt", "gram"])
def test_train_from_args_writes_loadable_prompts(clip_dir, tmp_path, method):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.checkpoint import load_prompts
    from apt_deploy.clip_training import train_from_args
    from apt_deploy.data.synthetic_shapes import write_caption_pairs, write_image_folder

    data = write_image_folder(tmp_path / "train", "solid", 3, seed=0)
    extra = {}
    if method == "gram":
        extra = dict(captions=str(write_caption_pairs(tmp_path / "pairs", ("solid", "noisy", "inverted"), 60, 0)),
                     meta_steps=1, meta_shots=2, meta_ways=2, domains=2, pseudo_classes=8)
    args = _args(model=str(clip_dir), data=str(data), eval_data=str(data), out=str(tmp_path / "out"), method=method,
                 shots=2, context_len=3, **extra)
    assert train_from_args(args) == 0
    model = load_prompts(get_backbone("clip").load(str(clip_dir)), tmp_path / "out")
    assert model.apt_deploy_state.method == method and model.prompt_learner.class_names[0] == "circle"


def test_train_from_args_rejects_gram_without_captions(clip_dir, tmp_path):
    from apt_deploy.clip_training import train_from_args
    from apt_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="--captions"):
        train_from_args(_args(model=str(clip_dir), data=str(tmp_path), out=str(tmp_path / "o"), method="gram"))
