"""Training the packaged VLM's projector (`visae vlm build`), LLaVA's recipe at toy scale: the
tower and the language model frozen, only the two-layer MLP projector trained, first on
image-caption pairs (stage 1: "a dumper, a yellow pepper and a dog on a dots pattern", from the
scenes' exact labels and the stamps' own captions), then on the one-word answer to "What is
shown in this image? Use exactly one word!" (a short instruction stage).

LLaVA's stage 1 takes ~2k steps of 256 pairs; on two CPU cores a few hundred steps of 8 fit in
20 minutes, too few to align the features from scratch (measured: 1.6% of held-out answers name
an object). So a warm start comes first (stage 0, seconds): every image token is regressed onto
the language model's input embedding of the word for what covers its patch (the object's kind
from the scene's mask, or "background"), which puts the projected tokens where words live.

The frozen tower's features are computed once per image. A step embeds the prompt, puts the
projected features at the image tokens' positions (as `LlavaForConditionalGeneration` does) and
takes the language model's cross-entropy on the answer tokens only; the logits are computed
at those positions alone, which makes a step ~2x cheaper than the class's forward (tested equal).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from visae.data import SceneConfig
from visae.data.default import cached_scenes
from visae.errors import VisaeError
from visae.vlm.captions import one_word_answer, scene_caption
from visae.vlm.model import INSTRUCTION, VLM

CAPTION_PROMPT = "Describe the image briefly."
TRAIN_SCENES = SceneConfig(n_scenes=2400, size=224, seed=101, pairs_per_kind=0)


@dataclass(frozen=True)
class BuildConfig:
    """The projector's training run (defaults: ~15 min on 2 CPU cores)."""

    align_epochs: int = 10
    caption_samples: int = 400
    answer_samples: int = 1600
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0
    scenes: int = TRAIN_SCENES.n_scenes
    scene_seed: int = TRAIN_SCENES.seed

    def __post_init__(self) -> None:
        for name in ("align_epochs", "caption_samples", "answer_samples"):
            if getattr(self, name) < 0:
                raise VisaeError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.caption_samples + self.answer_samples == 0:
            raise VisaeError("nothing to train: caption_samples and answer_samples are both 0")
        if self.batch_size < 1 or self.lr <= 0 or self.scenes < 1:
            raise VisaeError("batch_size, lr and scenes must be positive")

    def scene_config(self) -> SceneConfig:
        return SceneConfig(
            n_scenes=self.scenes, size=TRAIN_SCENES.size, seed=self.scene_seed, pairs_per_kind=0
        )


def training_example(vlm: VLM, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of one example: the prompt (image tokens expanded) then the answer and
    the end-of-turn token; labels are -100 except on the answer."""
    prompt = vlm.prompt_ids(question)[0].tolist()
    eos = vlm.tokenizer.eos_token_id
    answer_ids = vlm.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
    return prompt + answer_ids, [-100] * len(prompt) + answer_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(vlm: VLM, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given the image features (module docstring)."""
    model = vlm.model
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    image = model.model.multi_modal_projector(features.to(embeds.dtype))
    slots = (ids == vlm.image_token_id)[..., None].expand_as(embeds)
    if int(slots.sum()) != image.numel():
        raise VisaeError("the prompts hold a different number of image tokens than the features")
    embeds = embeds.masked_scatter(slots, image)
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"]
    ).last_hidden_state
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def tower_features(
    vlm: VLM, images: list[Any], batch_size: int = 32, progress: bool = True
) -> torch.Tensor:
    """`[N, n_image_tokens, d]` float16: the projector's inputs for every image, once."""
    chunks = []
    for start in tqdm(
        range(0, len(images), batch_size), desc="tower features", disable=not progress, unit="batch"
    ):
        pixels = vlm.pixels(images[start : start + batch_size])
        chunks.append(vlm.image_features(pixels).to(torch.float16).cpu())
    return torch.cat(chunks)


BACKGROUND_WORD = "background"


def patch_words(vlm: VLM, scenes: Any) -> tuple[torch.Tensor, list[str]]:
    """`[N, n_image_tokens]` indices into the word list: per image token the kind of the object
    covering most of its patch (`category_word`) when objects cover a quarter of it, else
    "background"."""
    from visae.data.masks import patch_fractions
    from visae.geometry import preprocessing_box
    from visae.vlm.captions import category_word

    h, w = vlm.preprocessor.output_hw
    patch = int(vlm.config.vision_config.patch_size)
    grid = (h // patch, w // patch)
    words, index = [BACKGROUND_WORD], {BACKGROUND_WORD: 0}
    rows = []
    for i in range(len(scenes)):
        labels = scenes.label_map(i)
        objects = scenes.records[i]["objects"]
        box = preprocessing_box(vlm.preprocessor.to_dict(), labels.shape[1], labels.shape[0])
        frac = patch_fractions(labels, len(objects) + 1, grid, box)
        owner = np.where(frac[:, 1:].sum(axis=1) >= 0.25, frac[:, 1:].argmax(axis=1) + 1, 0)
        ids = []
        for layer in owner:
            word = BACKGROUND_WORD if layer == 0 else category_word(objects[layer - 1]["item"])
            ids.append(index.setdefault(word, len(words)))
            if len(words) < len(index):
                words.append(word)
        rows.append(ids)
    return torch.tensor(rows), words


def word_embeddings(vlm: VLM, words: list[str]) -> torch.Tensor:
    """`[n_words, D]` the language model's mean input embedding of each word's tokens."""
    table = vlm.model.get_input_embeddings().weight.detach()
    out = []
    for word in words:
        ids = vlm.tokenizer(word, add_special_tokens=False)["input_ids"]
        out.append(table[torch.tensor(ids)].mean(dim=0))
    return torch.stack(out)


def align_projector(
    vlm: VLM,
    features: torch.Tensor,
    targets: torch.Tensor,
    background: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int,
    progress: bool = False,
) -> list[float]:
    """Stage 0: MSE of each projected image token to its word's embedding (module docstring),
    background tokens weighted down to the object tokens' total (they are ~85% of the tokens
    at 112 px); the weighted mean loss per epoch."""
    projector = vlm.model.model.multi_modal_projector
    x = features.reshape(-1, features.shape[-1])
    y = targets.reshape(-1, targets.shape[-1])
    is_bg = background.reshape(-1)
    n_bg = int(is_bg.sum())
    weight = torch.ones(len(x))
    if 0 < n_bg < len(x):
        weight[is_bg] = (len(x) - n_bg) / n_bg
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(epochs), desc="align", disable=not progress, unit="epoch"):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), 2048):
            rows = order[start : start + 2048]
            err = ((projector(x[rows].float()) - y[rows]) ** 2).mean(dim=1)
            loss = (err * weight[rows]).sum() / weight[rows].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / len(x))
    return losses


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_projector(vlm: VLM, config: BuildConfig, progress: bool = True) -> dict[str, Any]:
    """Train `vlm`'s projector in place; returns the run's record (losses per stage, time)."""
    scenes = cached_scenes(config.scene_config(), progress=progress)
    n = len(scenes)
    images = [scenes.image(i) for i in range(n)]
    started = time.perf_counter()
    features = tower_features(vlm, images, progress=progress)
    feature_seconds = time.perf_counter() - started
    record: dict[str, Any] = {"stages": {}}
    if config.align_epochs:
        index, words = patch_words(vlm, scenes)
        targets = word_embeddings(vlm, words)[index]
        losses = align_projector(
            vlm,
            features,
            targets,
            index == 0,
            config.align_epochs,
            config.lr,
            config.seed,
            progress,
        )
        record["stages"]["align"] = {
            "epochs": config.align_epochs,
            "words": words,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "losses": [round(x, 6) for x in losses],
        }
    rng = np.random.default_rng(config.seed)
    stages = [
        ("caption", CAPTION_PROMPT, config.caption_samples, lambda i: scene_caption(scenes, i)),
        ("answer", INSTRUCTION, config.answer_samples, lambda i: one_word_answer(scenes, i)),
    ]
    steps = [math.ceil(s / config.batch_size) for _, _, s, _ in stages]
    optimizer = torch.optim.AdamW(vlm.trainable(), lr=config.lr, weight_decay=0.0)
    total, step = sum(steps), 0
    pad = vlm.pad_token_id
    bar = tqdm(total=total, desc="projector", disable=not progress, unit="step")
    vlm.model.train()
    for (name, question, samples, target), n_steps in zip(stages, steps, strict=True):
        order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(samples / n) or 1)])
        order = order[:samples]
        losses = []
        for s in range(n_steps):
            chosen = order[s * config.batch_size : (s + 1) * config.batch_size]
            batch = collate([training_example(vlm, question, target(int(i))) for i in chosen], pad)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _schedule(step, total, config.warmup_steps)
            loss = answer_loss(vlm, features[torch.as_tensor(chosen)], batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(stage=name, loss=f"{np.mean(losses[-20:]):.3f}")
        record["stages"][name] = {
            "samples": int(samples),
            "steps": n_steps,
            "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-10:])) if losses else None,
            "losses": [round(x, 4) for x in losses],
        }
    bar.close()
    vlm.model.eval()
    record |= {
        "config": asdict(config),
        "scenes": asdict(config.scene_config()),
        "feature_seconds": round(feature_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    return record


def build(out: str | Path, config: BuildConfig = BuildConfig(), progress: bool = True) -> Path:
    """Train a projector from scratch for the packaged parts and save it to `out`."""
    from visae.vlm.packaged import IMAGE_SIZE, NAME, packaged_vlm, save_projector

    vlm = packaged_vlm(projector=None, seed=config.seed)
    record = train_projector(vlm, config, progress=progress)
    info = {
        "vlm": NAME,
        "image_size": IMAGE_SIZE,
        "vision_feature_layer": int(vlm.config.vision_feature_layer),
        "command": "visae vlm build",
    } | record
    return save_projector(vlm.model, out, info)
