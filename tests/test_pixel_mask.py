"""The exported ViLT honours pixel_mask: a padded batch gives the logits of transformers' own ViLT (its
random-order, per-image visual embedding), on PyTorch under the export patch and on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt_deploy.backbones import get_backbone
from tests.conftest import randomize_method

SPEC = get_backbone("vilt")


def padded_batch(height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three images padded bottom/right like ViltProcessor does: full, bottom half padded, and a 16 x 48
    corner of a larger canvas (padding zeroed, as the processor writes it)."""
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 8
    feed = {"input_ids": torch.randint(1, 128, (b, t), generator=g), "attention_mask": torch.ones(b, t, dtype=torch.long),
            "token_type_ids": torch.zeros(b, t, dtype=torch.long),
            "pixel_values": torch.randn(b, 3, height, width, generator=g),
            "pixel_mask": torch.ones(b, height, width, dtype=torch.long)}
    feed["pixel_mask"][1, height // 2:, :] = 0
    feed["pixel_mask"][2, 16:, :] = 0
    feed["pixel_mask"][2, :, 48:] = 0
    feed["pixel_values"] *= feed["pixel_mask"][:, None]
    return feed


@pytest.fixture(scope="module")
def apt_vilt_64():
    import apt_deploy as ad

    model = SPEC.build_tiny(seed=0, image_size=64)  # 4 x 4 position grid: interpolation is not the identity
    ad.apply_apt(model, ad.APTConfig(prompt_len=6, rank=2))
    randomize_method(model)
    return ad.fold(model)


def test_padding_changes_the_logits_and_the_export_patch_follows(apt_vilt_64):
    feed = padded_batch(64, 96)
    with torch.no_grad():
        original = apt_vilt_64(**feed).logits  # transformers' visual_embed (multinomial, per-image loop)
        unmasked = apt_vilt_64(**{**feed, "pixel_mask": torch.ones_like(feed["pixel_mask"])}).logits
        with SPEC.export_context(apt_vilt_64):
            patched = apt_vilt_64(**feed).logits
    assert (original - unmasked)[1:].abs().max() > 1e-3  # the mask matters for the padded rows
    torch.testing.assert_close(patched, original, atol=1e-5, rtol=0)


def test_exported_vilt_gives_the_pytorch_logits_on_a_padded_batch(apt_vilt_64, tmp_path):
    from apt_deploy.settings import TOLERANCES, ExportSettings
    from engines.compare import assert_close
    from engines.runners import OnnxRuntimeRunner
    from exporters.onnx_export import export_artifact

    out = export_artifact(apt_vilt_64, tmp_path / "art", ExportSettings(batch_max=4, text_len=8, dynamic_image=True,
                                                                        image_min=32, image_max=96))
    with OnnxRuntimeRunner(out / "model.onnx") as runner:
        for height, width in ((64, 64), (96, 64)):
            feed = padded_batch(height, width, seed=height)
            with torch.no_grad():
                expected = {"logits": apt_vilt_64(**feed).logits.numpy()}
            got = runner.infer({k: v.numpy() for k, v in feed.items()})
            assert_close(expected, got, TOLERANCES["onnxruntime_vs_torch"], f"padded batch {height}x{width}")
            assert not np.allclose(got["logits"][1], runner.infer({**{k: v.numpy() for k, v in feed.items()},
                                                                    "pixel_mask": np.ones((3, height, width), np.int64)})["logits"][1])
