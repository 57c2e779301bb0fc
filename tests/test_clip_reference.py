"""CLIP as the reference runs it: OpenAI's TorchScript archive format, strict loading into the named
architecture, fp16 precision (CUDA only), and over-long texts refused as ``clip.tokenize`` refuses them.

The archives are made here, in OpenAI's format (a ``torch.jit`` zip whose state dict carries OpenAI's key
names, fp16 tensors and the ``input_resolution``/``context_length``/``vocab_size`` entries), from the tiny
CLIP at random weights: nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from capenext.config import load_preset
from capenext.data.embeddings import expected_metadata
from capenext.models.clip import FrozenCLIP, _is_torchscript

TEXTS = ["left front paw", "tip of the spout"]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # the archive format is torch.jit's


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def torchscript_archive(state: dict[str, torch.Tensor], path, extras: bool = True):
    """``state`` saved the way OpenAI's ``ViT-B-32.pt`` is: a scripted module holding the tensors under their
    dotted names (fp16, as OpenAI's), plus the archive's three integer entries."""
    root = _Holder()
    items = dict(state)
    if extras:
        items |= {"input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
                  "vocab_size": torch.tensor(49408)}
    for key, value in items.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, _Holder())
            node = getattr(node, part)
        value = value.half() if value.is_floating_point() else value
        node.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))
    return path


@pytest.fixture(scope="module")
def source() -> FrozenCLIP:
    return FrozenCLIP("tiny", "random")


def rounded_state(clip: FrozenCLIP) -> dict[str, torch.Tensor]:
    return {k: v.half().float() for k, v in clip.model.state_dict().items()}


def test_openai_torchscript_and_plain_state_dict_load_to_the_same_clip(source, tmp_path):
    archive = torchscript_archive(source.model.state_dict(), tmp_path / "ViT-tiny.pt")
    assert _is_torchscript(str(archive))
    plain = tmp_path / "plain.pt"
    torch.save(rounded_state(source), plain)  # OpenAI's key names, a plain state dict
    from_archive, from_plain = FrozenCLIP("tiny", str(archive)), FrozenCLIP("tiny", str(plain))
    torch.testing.assert_close(from_archive.encode_text(TEXTS), from_plain.encode_text(TEXTS), rtol=0, atol=0)
    img = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(from_archive.encode_image(img), from_plain.encode_image(img), rtol=0, atol=0)
    # the archive's fp16 weights, read into fp32: the random CLIP up to half-precision rounding
    torch.testing.assert_close(from_archive.encode_text(TEXTS), source.encode_text(TEXTS), rtol=0, atol=2e-2)


@pytest.mark.parametrize("case", ["another width", "not a clip"])
def test_torchscript_of_another_model_is_one_line_naming_a_tensor(source, tmp_path, case):
    if case == "another width":
        state = dict(source.model.state_dict())
        state["visual.conv1.weight"] = torch.zeros(64, 3, 8, 8)  # patch 8, not tiny's 16
        fragment = "visual.conv1.weight: [64, 3, 8, 8], tiny has [64, 3, 16, 16]"
    else:
        state, fragment = {"weight": torch.zeros(4, 4), "bias": torch.zeros(4)}, "tensors missing"
    archive = torchscript_archive(state, tmp_path / "other.pt")
    with pytest.raises(ValueError) as err:
        FrozenCLIP("tiny", str(archive))
    msg = str(err.value)
    assert "\n" not in msg and "is not a CLIP tiny" in msg and fragment in msg, msg


def test_openai_archive_needs_quick_gelu_and_a_foreign_file_is_one_line(source, tmp_path):
    archive = torchscript_archive(source.model.state_dict(), tmp_path / "ViT-tiny.pt")
    with pytest.raises(ValueError, match="QuickGELU: set model.clip_quick_gelu=true"):
        FrozenCLIP("tiny", str(archive), quick_gelu=False)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable CLIP weights file"):
        FrozenCLIP("tiny", str(junk))


def test_texts_longer_than_the_context_are_refused_as_clip_tokenize_does(source):
    assert len(source.tokenizer.encode("a " * 75)) == 75
    assert source.encode_text(["a " * 75]).shape == (1, source.embed_dim)  # 75 + start + end = 77 tokens
    with pytest.raises(ValueError, match="is 78 CLIP tokens, more than the context of 77"):
        source.encode_text(["a " * 76])


def test_fp16_is_the_reference_gpu_clip_and_refused_on_cpu(tmp_path, source):
    half = FrozenCLIP("tiny", "random", precision="fp16")
    assert half.precision == "fp16" and half.model.text_projection.dtype == torch.float16
    assert type(half.model.transformer.resblocks[0].ln_1).__name__ == "LayerNormFp32"  # as OpenAI's LayerNorm
    with pytest.raises(ValueError, match="runs on a CUDA device only"):
        half.encode_text(TEXTS)
    with pytest.raises(ValueError, match="clip_precision='fp64'"):
        FrozenCLIP("tiny", "random", precision="fp64")
    cfg = load_preset("tiny")
    cfg.model.clip_precision = "fp16"
    assert expected_metadata(cfg)["clip_precision"] == "fp16"  # the embedding tables record it
