"""`evaluate`: every score of the suite for one SAE on one store, each beside its sanity
baselines (an untrained twin, random codes, and for MS the layer's raw neurons), with
bootstrap intervals and the verdict whether the trained SAE can be told from each baseline.

Writes an evaluation folder: the per-latent tables `latents_<variant>.csv` and
`raw_neurons.csv`, then `scores.json` (every number, its interval, the settings and the inputs'
provenance: its presence means the scores are complete; a rerun removes it first), then the
report card `report.html` (rebuilt from the files by `visae.eval.report.write_report`), and
`cache/` (image codes and encoder embeddings, reused by a later run with the same inputs).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visae import __version__
from visae.atomic import write_text
from visae.errors import VisaeError
from visae.eval.codes import (
    ImageCodes,
    RandomCodes,
    SAECodes,
    cached_codes,
    codes_key,
    frozen_twin,
    image_codes,
    mean_l0,
)
from visae.eval.config import (
    BASELINES,
    LATENT_COLUMNS,
    NEURON_COLUMNS,
    SCHEMA,
    VARIANTS,
    EvalConfig,
    EvalInputs,
    finite_json,
)
from visae.eval.scoring import Scorer, paths_subset

if TYPE_CHECKING:
    from visae.data.base import ImageDataset
    from visae.eval.sources import PairSet
    from visae.sae import SAE
    from visae.store import ActivationStore

logger = logging.getLogger("visae.eval")


@dataclass
class Evaluation:
    """A finished evaluation: its folder and the parsed scores.json."""

    path: Path
    scores: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, path: str | Path) -> Evaluation:
        path = Path(path)
        file = path / "scores.json"
        if not file.is_file():
            raise VisaeError(f"{path} is not an evaluation folder (no scores.json)")
        scores = json.loads(file.read_text(encoding="utf-8"))
        if scores.get("schema") != SCHEMA:
            raise VisaeError(f"{file} has schema {scores.get('schema')!r}, expected {SCHEMA!r}")
        return cls(path, scores)

    def score(self, name: str, variant: str = "trained") -> float | None:
        for row in self.scores["scores"]:
            if row["name"] == name:
                return (row["values"].get(variant) or {}).get("value")
        raise VisaeError(f"no score {name!r} in {self.path}")

    def summary(self) -> str:
        """The main table as text: each score, trained and baselines with intervals, verdict."""
        lines = [f"{'score':<28} {'trained':>24} {'frozen':>24} {'random':>24}  verdict"]
        for row in self.scores["scores"]:
            cells = [_cell(row["values"].get(v)) for v in VARIANTS]
            verdict = ", ".join(
                _verdict(row, b) for b in BASELINES if row["separates"].get(b) is not None
            )
            lines.append(
                f"{row['name']:<28} {cells[0]:>24} {cells[1]:>24} {cells[2]:>24}  {verdict}"
            )
            if "raw_neurons" in row["values"]:
                lines.append(f"{'  raw neurons':<28} {_cell(row['values']['raw_neurons']):>24}")
        return "\n".join(lines)


def _verdict(row: dict[str, Any], baseline: str) -> str:
    if not row["separates"][baseline]:
        return f"NOT distinguishable from {baseline}"
    diff = (row.get("difference") or {}).get(baseline) or {}
    return f"{'above' if diff.get('value', 0) > 0 else 'below'} {baseline}"


def _cell(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    if v.get("value") is None:
        return "undefined"
    ci = v.get("ci")
    return f"{v['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v['value']:.3f}"


# ---------------------------------------------------------------- the evaluation


def evaluate(
    sae: SAE | str | Path,
    store: ActivationStore | str | Path,
    out: str | Path,
    config: EvalConfig | None = None,
    *,
    layer: int | None = None,
    dataset: ImageDataset | str | None = None,
    analysis: str | Path | None = None,
    cache: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Evaluation:
    """Score `sae` on `store` and write the evaluation folder `out` (module docstring).
    `analysis`: an analysis folder of the same SAE to which the per-latent scores are added,
    so the feature browser shows and sorts them. `cache`: where codes and embeddings are kept
    (default `out/cache`; a folder shared by a sweep's evaluations computes the encoder's
    embeddings once); entries are keyed by everything they depend on."""
    from visae.devices import resolve_device
    from visae.pairing import resolve_pair
    from visae.sae import SAE
    from visae.store import ActivationStore, open_dataset

    config = config or EvalConfig()
    device = resolve_device(device)
    if not isinstance(sae, SAE):
        sae = SAE.load(sae)
    sae = sae.to(device).eval()
    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store, progress=progress)
    layer, tokens = resolve_pair(sae, store, layer)
    if analysis is not None:
        _check_analysis(analysis, sae, store)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    _remove_outputs(out)
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = round(now - clock[0], 2)
        clock[0] = now
        logger.info("%s done in %.1f s", stage, timings[stage])

    if dataset is None or isinstance(dataset, str):
        try:
            dataset = open_dataset(store, dataset, progress=progress)
        except VisaeError as exc:
            if isinstance(dataset, str):
                raise
            logger.warning("images of store %s not available (%s)", store.path, exc)
            dataset = None
    inputs = _gather_inputs(sae, store, layer, tokens, dataset, config)
    lap("inputs")

    variants = ("trained", *config.baselines)
    codes: dict[str, ImageCodes] = {}
    all_images = np.union1d(inputs.eval_images, _pair_images(inputs.pairs))
    trained_source = SAECodes(sae, "trained")
    for variant in variants:
        source: SAECodes | RandomCodes
        if variant == "trained":
            source = trained_source
        elif variant == "frozen":
            twin = frozen_twin(
                sae, store, layer, "cls" if tokens == "cls" else "patch", config.seed
            )
            source = SAECodes(twin.to(device), "frozen")
        else:
            k = int(sae.cfg.k) if "k" in _uses(sae) else max(1, round(mean_l0(codes["trained"])))
            source = RandomCodes(sae.n_latents, k, config.seed)
        key = codes_key(
            source,
            store,
            layer,
            tokens,
            images=all_images,
            patch=inputs.patch_images,
            raw=variant == "trained",
            batch=config.batch_images,  # random codes are drawn per batch
        )

        def make(source: SAECodes | RandomCodes = source, variant: str = variant) -> ImageCodes:
            return image_codes(
                source,
                store,
                layer,
                tokens=tokens,
                images=all_images,
                patch_images=inputs.patch_images,
                raw=variant == "trained",
                batch_images=config.batch_images,
                device=device,
                progress=progress,
            )

        codes[variant], _ = cached_codes(cache / f"codes-{variant}-{key[:16]}.npz", key, make)
        lap(f"codes {variant}")

    embeddings = _embeddings(inputs, config, cache, device, progress)
    lap("encoder embeddings")

    scorer = Scorer(inputs, config, codes, embeddings)
    scores = scorer.run(lap)
    provenance = _provenance(inputs, config, embeddings)
    provenance["concepts"]["not_scored"] = scorer.unscored
    if provenance["pairs"] is not None:
        provenance["pairs"]["dropped"] += scorer.dropped_pairs
    result = {
        "schema": SCHEMA,
        "visae_version": __version__,
        "inputs": provenance,
        "settings": _settings(config, variants),
        **scores,
        "timings": timings,
    }
    for variant, table in scorer.latent_tables.items():
        write_text(out / f"latents_{variant}.csv", _csv(LATENT_COLUMNS, table))
    if scorer.raw_table is not None:
        write_text(out / "raw_neurons.csv", _csv(NEURON_COLUMNS, scorer.raw_table))
    write_text(
        out / "scores.json", json.dumps(finite_json(result), indent=1, sort_keys=False) + "\n"
    )
    evaluation = Evaluation(out, json.loads((out / "scores.json").read_text(encoding="utf-8")))
    from visae.eval.report import write_report

    write_report(out)
    if analysis is not None:
        add_to_analysis(evaluation, analysis)
    return evaluation


OUTPUTS = ("scores.json", "report.html", "raw_neurons.csv", *(f"latents_{v}.csv" for v in VARIANTS))


def _remove_outputs(out: Path) -> None:
    """A rerun first removes what an earlier run wrote (scores.json first: until the new one
    is written the folder reads as unfinished), so no file of the old run survives beside it."""
    import shutil

    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "plots", ignore_errors=True)


def _check_analysis(path: str | Path, sae: SAE, store: ActivationStore) -> None:
    """Refuse an analysis of another SAE or other images before any work is done."""
    from visae.analysis import Analysis

    meta = Analysis.load(path).meta
    if meta["sae"].get("config") != sae.cfg.to_dict():
        raise VisaeError(f"analysis {path} is of another SAE (its config differs)")
    fingerprint = (meta.get("store") or {}).get("dataset_fingerprint")
    if fingerprint != store.dataset.get("fingerprint"):
        raise VisaeError(f"analysis {path} was made on other images than store {store.path}")


def _uses(sae: SAE) -> tuple[str, ...]:
    from visae.sae.registry import ARCHS

    return tuple(ARCHS.get(sae.cfg.arch).uses)


def _pair_images(pairs: PairSet | None) -> np.ndarray:
    if pairs is None:
        return np.zeros(0, np.int64)
    return np.union1d(pairs.first_P, pairs.second_P)


def _gather_inputs(
    sae: SAE,
    store: ActivationStore,
    layer: int,
    tokens: str,
    dataset: ImageDataset | None,
    config: EvalConfig,
) -> EvalInputs:
    from visae.data import SceneDataset
    from visae.eval.sources import load_concepts, load_pairs

    meta = store.metadata()
    scenes = _scenes_of(dataset)
    concepts = load_concepts(config.concepts, store, dataset, config.min_positives)
    if not concepts.names:
        raise VisaeError(
            f"no concept of {concepts.source} has {config.min_positives} positive images in "
            f"store {store.path}"
        )
    pairs_spec = config.pairs
    if pairs_spec is None:
        pairs_spec = "scenes" if scenes is not None else "none"
    pairs = None if pairs_spec == "none" else load_pairs(pairs_spec, store, concepts, dataset)
    # the scenes' edited copies are near-duplicates of scenes: they enter the pair scores only
    roles = [m.get("role") for m in meta]
    eval_images = np.asarray(
        [i for i, r in enumerate(roles) if r != "edit"]
        if isinstance(scenes, SceneDataset)
        else range(len(meta)),
        dtype=np.int64,
    )
    patch_images = np.zeros(0, np.int64)
    if concepts.has_masks and tokens != "cls":
        rng = np.random.default_rng(config.seed)
        chosen = eval_images
        if len(chosen) > config.patch_images:
            chosen = np.sort(rng.choice(chosen, config.patch_images, replace=False))
        patch_images = np.union1d(chosen, _pair_images(pairs))
    paths = _taxonomy(config.taxonomy, scenes, meta)
    return EvalInputs(
        sae, store, layer, tokens, dataset, concepts, pairs, eval_images, patch_images, paths, meta
    )


def _scenes_of(dataset: ImageDataset | None) -> Any:
    from visae.data import SceneDataset, Subset

    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, SceneDataset) else None


def _taxonomy(spec: str | None, scenes: Any, meta: list[dict[str, Any]]) -> Any:
    from visae.eval.hierarchy import paths_from_json, paths_from_scenes, paths_from_sources

    sources = [str(m.get("source", "")) for m in meta]
    if spec is None:
        if scenes is None:
            return None
        spec = "scenes"
    if spec == "none":
        return None
    if spec == "scenes":
        if scenes is None:
            raise VisaeError("taxonomy 'scenes' needs a store of concept scenes")
        return paths_from_scenes(
            scenes, [int(m.get("dataset_index", i)) for i, m in enumerate(meta)]
        )
    if spec == "folders":
        return paths_from_sources(sources)
    if spec.startswith("json:"):
        return paths_from_json(Path(spec[5:]), sources)
    raise VisaeError(f"taxonomy {spec!r}: expected scenes, folders, json:FILE or none")


def _embeddings(
    inputs: EvalInputs, config: EvalConfig, cache: Path, device: str, progress: bool
) -> tuple[np.ndarray, dict[str, Any]] | None:
    from visae.backbones import load_backbone
    from visae.eval.embeddings import EMBEDDING_RULE, default_encoder, embed_images

    if config.encoder == "none":
        return None
    if inputs.dataset is None:
        logger.warning("no images: the Monosemanticity Score is not computed")
        return None
    name = config.encoder or default_encoder(inputs.store)
    backbone = load_backbone(name, device=device)
    indices = np.asarray(
        [int(inputs.meta[i].get("dataset_index", i)) for i in inputs.eval_images], dtype=np.int64
    )
    emb = embed_images(backbone, inputs.dataset, indices, cache, progress=progress)
    info = {
        "name": backbone.name,
        "weights_hash": backbone.weights_hash,
        "embedding": EMBEDDING_RULE,
    }
    return emb, info


def _csv(header: tuple[str, ...], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _provenance(
    inputs: EvalInputs, config: EvalConfig, embeddings: tuple[np.ndarray, dict[str, Any]] | None
) -> dict[str, Any]:
    sae, store = inputs.sae, inputs.store
    cfg = sae.cfg
    out: dict[str, Any] = {
        "sae": {
            "path": str(sae.checkpoint_info.get("path", "")),
            "arch": cfg.arch,
            "n_latents": cfg.n_latents,
            "k": cfg.k if "k" in _uses(sae) else None,
            "d": cfg.d,
            "tokens": inputs.tokens,
            "layer": inputs.layer,
            "matryoshka": list(cfg.matryoshka) if cfg.matryoshka else None,
        },
        "store": {
            "path": str(store.path),
            "backbone": store.backbone.get("name"),
            "dataset": store.dataset.get("name"),
            "fingerprint": store.dataset.get("fingerprint"),
            "n_images": store.n_images,
        },
        "images": {
            "n": len(inputs.eval_images),
            "rule": "every store image except the scenes' edited pair copies"
            if len(inputs.eval_images) < store.n_images
            else "every store image",
            "patch_level": len(np.intersect1d(inputs.patch_images, inputs.eval_images)),
        },
        "concepts": {
            "source": inputs.concepts.source,
            "n_scored": len(inputs.concepts.names),
            "excluded": list(inputs.concepts.excluded),
            "min_positives": config.min_positives,
        },
        "pairs": None,
        "encoder": None if embeddings is None else embeddings[1],
        "taxonomy": None,
    }
    if inputs.pairs is not None:
        out["pairs"] = {
            "source": inputs.pairs.source,
            "n_pairs": len(inputs.pairs.first_P),
            "dropped": list(inputs.pairs.dropped),
        }
    if inputs.paths is not None:
        known = sum(p is not None for p in paths_subset(inputs.paths, inputs.eval_images).paths)
        out["taxonomy"] = {"source": inputs.paths.source, "n_with_path": known}
    return out


def _settings(config: EvalConfig, variants: tuple[str, ...]) -> dict[str, Any]:
    s = asdict(config)
    for name in ("concepts", "pairs", "taxonomy", "encoder"):
        s[name] = s[name] or "auto"  # what auto resolved to is under inputs
    s["variants"] = list(variants)
    s["image_codes"] = config.image_rule
    s["top_images"] = config.top_images
    return s


def add_to_analysis(evaluation: Evaluation, analysis: str | Path) -> None:
    """Put the trained SAE's per-latent scores into an analysis of the same SAE."""
    from visae.analysis import Analysis

    a = Analysis.load(analysis)
    table = list(
        csv.DictReader(
            io.StringIO((evaluation.path / "latents_trained.csv").read_text(encoding="utf-8"))
        )
    )
    if len(table) != a.n_latents:
        raise VisaeError(
            f"analysis {analysis} has {a.n_latents} latents, the evaluation {len(table)}"
        )
    numeric = ("ms", "ms_corrected", "concept_f1", "locality", "lca_depth", "coarse", "fine")
    metrics = {
        name: np.asarray([float(r[name]) if r[name] else np.nan for r in table])
        for name in numeric
        if any(r[name] for r in table)
    }
    texts = {"concept": [r["concept"] or None for r in table]}
    a.add_columns(metrics=metrics, texts=texts, source=str(evaluation.path.resolve()))
