"""Any torch module as a backbone (`ModuleBackbone`): a small custom CNN and ViT (random
weights: these are structure tests) read their layers' token layouts from a probe pass, record
and edit through the same hooks as the built-in models, and then run the whole loop unchanged:
store, trainer, analysis, evaluation, interventions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from visae.backbones import ModuleBackbone, preprocessing
from visae.errors import VisaeError

SIZE = 64


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class Block(nn.Module):
    """A transformer block that returns (tokens, attention weights), as HF blocks do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        a, weights = self.attn(h, h, h)
        x = x + a
        return x + self.mlp(x), weights


class TinyViT(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        for block in self.blocks:
            t = block(t)[0]
        return self.head(t[:, 0])


def _cnn() -> ModuleBackbone:
    torch.manual_seed(0)
    return ModuleBackbone(TinyCNN(), ["stem", "stage1", "stage2"], preprocessing(SIZE), "tiny-cnn")


def _vit() -> ModuleBackbone:
    torch.manual_seed(0)
    return ModuleBackbone(
        TinyViT(), ["blocks.0", "blocks.1"], preprocessing(SIZE), "tiny-vit", n_cls=1
    )


def test_layouts_come_from_the_layers_outputs() -> None:
    cnn, vit = _cnn(), _vit()
    assert [cnn.layout(i).grid for i in range(3)] == [(16, 16), (8, 8), (4, 4)]
    assert [cnn.d(i) for i in range(3)] == [8, 16, 24] and cnn.layout(1).n_special == 0
    assert vit.layout(1).grid == (8, 8) and vit.layout(1).n_cls == 1 and vit.d(0) == 32
    pixels = torch.rand(2, 3, SIZE, SIZE)
    rec = cnn.record(pixels, [1])[1]
    with torch.no_grad():
        fmap = cnn.module.stage1(cnn.module.stem(pixels))
    assert torch.equal(rec, fmap.flatten(2).transpose(1, 2))  # row-major patches, channels last
    assert vit.record(pixels, [0, 1])[1].shape == (2, 65, 32)


@pytest.mark.parametrize("make", [_cnn, _vit])
def test_edits_go_through_the_same_hooks(make) -> None:
    backbone = make()
    pixels = torch.rand(2, 3, SIZE, SIZE)
    plain = backbone.forward(pixels)
    with backbone.edit(0, lambda x: x):
        assert torch.allclose(backbone.forward(pixels), plain)
    with backbone.edit(0, lambda x: x * 0):
        assert not torch.allclose(backbone.forward(pixels), plain)
    # an edit at layer 0 is what layer 1 sees: record(1 | edit 0) = the later blocks run on it
    with backbone.edit(0, lambda x: x * 0.5):
        edited = backbone.record(pixels, [0, 1])
    assert torch.allclose(edited[0], backbone.record(pixels, [0])[0] * 0.5)


def test_bad_descriptions_are_one_line_errors() -> None:
    with pytest.raises(VisaeError, match="no submodule named 'stage9'"):
        ModuleBackbone(TinyCNN(), ["stage9"], preprocessing(SIZE), "x")
    with pytest.raises(VisaeError, match="the 65 left are not a square grid"):
        ModuleBackbone(TinyViT(), ["blocks.0"], preprocessing(SIZE), "x")  # forgot n_cls=1
    with pytest.raises(VisaeError, match="preprocess must be a Preprocessor"):
        ModuleBackbone(TinyCNN(), ["stem"], {"size": 64}, "x")  # type: ignore[arg-type]
    with pytest.raises(VisaeError, match="outputs shape"):
        ModuleBackbone(TinyCNN(), ["head"], preprocessing(SIZE), "x")
    with pytest.raises(VisaeError, match="layer 3 is out of range"):
        _cnn().record(torch.rand(1, 3, SIZE, SIZE), [3])


@pytest.mark.slow
@pytest.mark.parametrize("make", [_cnn, _vit])
def test_the_whole_loop_on_a_custom_module(make, tmp_path: Path) -> None:
    from visae.analysis import Analysis, run_analysis
    from visae.data import SceneConfig, generate_scenes
    from visae.data.scene_dataset import SceneDataset
    from visae.eval import EvalConfig, evaluate
    from visae.intervene import intervene, parse_edit
    from visae.sae import SAE, SAEConfig
    from visae.store import extract
    from visae.train import RunSpec, TrainConfig, train

    backbone = make()
    layer = 0  # the ViT's head reads the CLS token: an edit of patches must precede a block
    scenes = SceneDataset.load(
        generate_scenes(
            SceneConfig(n_scenes=48, size=SIZE, objects="shapes", pairs_per_kind=0),
            tmp_path / "scenes",
            progress=False,
            workers=1,
        )
    )
    store = extract(backbone, scenes, tmp_path / "store", layers=[layer], progress=False)
    d = backbone.d(layer)
    cfg = TrainConfig(
        store=str(tmp_path / "store"),
        out=str(tmp_path / "runs"),
        layer=layer,
        total_tokens=8_000,
        batch_size=256,
        eval_every_tokens=4_000,
        checkpoint_every_tokens=8_000,
    )
    run = RunSpec("topk", SAEConfig(arch="topk", d=d, k=4, n_latents=4 * d), 2e-3)
    sae_dir = train(cfg, [run], progress=False)[run.name]
    analysis = run_analysis(sae_dir, store, tmp_path / "analysis", dataset=scenes, progress=False)
    evaluation = evaluate(
        sae_dir,
        store,
        tmp_path / "eval",
        EvalConfig(encoder="none"),
        dataset=scenes,
        analysis=analysis.path,
        progress=False,
    )
    assert (Path(evaluation.path) / "report.html").is_file()
    a = Analysis.load(analysis.path)
    assert a.grid == backbone.layout(layer).grid
    sae = SAE.load(sae_dir)
    pixels = backbone.preprocess([scenes.image(i) for i in range(4)])
    plain = backbone.forward(pixels)
    with intervene(backbone, sae, []):
        assert torch.allclose(backbone.forward(pixels), plain, atol=1e-5)  # the error term
    live = int(a.table["freq_image"].argmax())
    with intervene(backbone, sae, [parse_edit(f"{live}=x8")]):
        assert not torch.allclose(backbone.forward(pixels), plain, atol=1e-4)
