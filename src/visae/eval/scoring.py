"""Every score of the suite on the image-level codes of each variant (trained SAE, untrained
twin, random codes), with bootstrap intervals over concepts, latents or pairs and the verdict
whether the trained SAE's items can be told from a baseline's (the interval of the difference
of means excludes 0)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from visae.eval.bootstrap import bootstrap_ci, difference_ci
from visae.eval.codes import ImageCodes
from visae.eval.config import BASELINES, EvalConfig, EvalInputs
from visae.eval.matching import fbmp, latent_scores, match_concepts, nn_omp
from visae.eval.monosemanticity import MSResult, monosemanticity
from visae.eval.tapa import tapa_score

CRITERION_NAMES = {"f1": "F1", "jaccard": "Jaccard", "nmi": "NMI"}


def _value(items: np.ndarray, config: EvalConfig) -> dict[str, Any]:
    items = np.asarray(items, dtype=np.float64)
    items = items[~np.isnan(items)]
    if not len(items):
        return {"value": None, "ci": None, "n": 0}
    if len(items) < 2:
        return {"value": float(items.mean()), "ci": None, "n": 1}
    mean, lo, hi = bootstrap_ci(items, np.mean, config.n_resamples, config.level, config.seed)
    return {"value": mean, "ci": [lo, hi], "n": len(items)}


def _difference(a: np.ndarray, b: np.ndarray, config: EvalConfig) -> dict[str, Any] | None:
    """mean(a) - mean(b) with its bootstrap interval; None below two items on a side."""
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) < 2 or len(b) < 2:
        return None
    diff, lo, hi = difference_ci(a, b, np.mean, config.n_resamples, config.level, config.seed)
    return {"value": diff, "ci": [lo, hi]}


def _verdict(difference: dict[str, Any] | None) -> bool | None:
    """Separates: the interval of the difference excludes 0."""
    if difference is None:
        return None
    lo, hi = difference["ci"]
    return bool(lo > 0 or hi < 0)


class Scorer:
    """The scores of every variant's codes; per-score item arrays feed intervals and verdicts."""

    def __init__(
        self,
        inputs: EvalInputs,
        config: EvalConfig,
        codes: dict[str, ImageCodes],
        embeddings: tuple[np.ndarray, dict[str, Any]] | None,
    ) -> None:
        self.inputs, self.config, self.codes = inputs, config, codes
        self.embeddings = embeddings
        self.variants = tuple(codes)
        self.rows: list[dict[str, Any]] = []
        self.latent_tables: dict[str, list[list[Any]]] = {}
        self.raw_table: list[list[Any]] | None = None
        self.k_max = max(config.k)
        # what the scores leave out beyond the sources' own exclusions, said in scores.json
        self.unscored: dict[str, list[str]] = {}
        self.dropped_pairs: list[str] = []

    def add(
        self,
        name: str,
        title: str,
        group: str,
        level: str,
        over: str,
        items: dict[str, np.ndarray],
        chance: float | None = None,
        note: str | None = None,
    ) -> None:
        values = {v: _value(x, self.config) for v, x in items.items()}
        differences = {
            b: _difference(
                np.asarray(items["trained"], float), np.asarray(items[b], float), self.config
            )
            for b in BASELINES
            if "trained" in items and b in items
        }
        self.rows.append(
            {
                "name": name,
                "title": title,
                "group": group,
                "level": level,
                "over": over,
                "chance": chance,
                "values": values,
                "separates": {b: _verdict(differences.get(b)) for b in BASELINES},
                "difference": differences,
                "note": note,
            }
        )

    def run(self, lap: Callable[[str], None]) -> dict[str, Any]:
        inputs, cfg = self.inputs, self.config
        rows = {v: np.searchsorted(c.images, inputs.eval_images) for v, c in self.codes.items()}
        subsets = {v: c.subset(rows[v]) for v, c in self.codes.items()}
        labels = inputs.concepts.labels_NC[inputs.eval_images]
        names = inputs.concepts.names
        ms = self._ms(subsets)
        lap("monosemanticity")
        image_match = {
            v: match_concepts(s.binary(cfg.image_rule), labels, max_steps=self.k_max, names=names)
            for v, s in subsets.items()
        }
        self._matching(image_match, subsets, labels, "image")
        lap("matching (image)")
        patch_match = self._patch_matching()
        lap("matching (patch)")
        for level, match in (("image", image_match), ("patch", patch_match)):
            if match:
                self.unscored[level] = [names[c] for c in match["trained"].excluded]
        curves = {"image": self._curve(image_match)}
        if patch_match:
            curves["patch"] = self._curve(patch_match)
        per_concept = self._tapa(image_match, patch_match)
        lap("tapa")
        tops = {v: s.top_images(cfg.top_images) for v, s in subsets.items()}
        groups = self._hierarchy(subsets, tops)
        lap("hierarchy and proxies")
        self._latent_tables(subsets, tops, ms, image_match)
        return {
            "scores": self.rows,
            "curves": {"match_at_k": curves},
            "tapa_per_concept": per_concept,
            "hierarchy_groups": groups,
        }

    # ----- MS
    def _ms(self, subsets: dict[str, ImageCodes]) -> dict[str, MSResult]:
        if self.embeddings is None:
            return {}
        emb = self.embeddings[0]
        results = {
            v: monosemanticity(s.aggregate(self.config.ms_aggregate), emb, progress=False)
            for v, s in subsets.items()
        }
        raw = subsets["trained"].raw
        if raw is not None:
            results["raw_neurons"] = monosemanticity(raw, emb, progress=False)
            r = results["raw_neurons"]
            self.raw_table = [
                [j, _num(r.score[j]), _num(r.corrected[j])] for j in range(len(r.score))
            ]
        chance = results["trained"].chance
        for key, title in (
            ("score", "Monosemanticity Score"),
            ("corrected", "MS, chance-corrected"),
        ):
            items = {v: getattr(r, key)[r.live] for v, r in results.items()}
            self.add(
                "ms" if key == "score" else "ms_corrected",
                title,
                "monosemanticity",
                "image",
                "latents",
                items,
                chance=chance if key == "score" else 0.0,
                note=f"image activation: {self.config.ms_aggregate} over patches; dead latents "
                f"excluded ({results['trained'].dead.mean():.1%} of the trained SAE's)",
            )
        return results

    # ----- matching
    def _matching(
        self,
        match: dict[str, Any],
        subsets: dict[str, ImageCodes],
        labels: np.ndarray,
        level: str,
    ) -> None:
        cfg = self.config
        rule = cfg.image_rule if level == "image" else "fires on the patch"
        hk = cfg.headline_k
        for k in cfg.k:
            self.add(
                f"match@{k}" + ("" if level == "image" else "_patch"),
                f"MATCHScore@{k} (FBMP, beta 1)",
                "matching",
                level,
                "concepts",
                {v: _at(m.fbmp.rec_f1_CS, k) for v, m in match.items()},
                note=f"binary codes: {rule}",
            )
        for criterion in ("f1", "jaccard", "nmi"):
            self.add(
                f"best_single_{criterion}" + ("" if level == "image" else "_patch"),
                f"best single latent by {CRITERION_NAMES[criterion]} (its F1)",
                "matching",
                level,
                "concepts",
                {v: m.best[criterion].f1_C for v, m in match.items()},
            )
        self.add(
            f"topk_union@{hk}" + ("" if level == "image" else "_patch"),
            f"union of the top-{hk} latents by F1",
            "matching",
            level,
            "concepts",
            {v: _at(m.topk_f1_CK, hk) for v, m in match.items()},
        )
        if "frozen" in match:
            trained, frozen = (
                _at(match["trained"].fbmp.rec_f1_CS, hk),
                _at(match["frozen"].fbmp.rec_f1_CS, hk),
            )
            diff, lo, hi = difference_ci(
                trained, frozen, np.mean, cfg.n_resamples, cfg.level, cfg.seed
            )
            self.rows.append(
                {
                    "name": f"delta_match@{hk}" + ("" if level == "image" else "_patch"),
                    "title": f"DeltaMATCHScore@{hk} (trained - frozen)",
                    "group": "matching",
                    "level": level,
                    "over": "concepts",
                    "chance": 0.0,
                    "values": {"trained": {"value": diff, "ci": [lo, hi], "n": len(trained)}},
                    "separates": {"frozen": bool(lo > 0 or hi < 0), "random": None},
                    "difference": {"frozen": {"value": diff, "ci": [lo, hi]}},
                    "note": None,
                }
            )
        if level != "image":
            return
        scored = labels[:, match["trained"].concepts_C]
        for beta in cfg.betas:
            if beta == 1.0:
                continue
            self.add(
                f"fbmp_beta{beta:g}@{hk}",
                f"MATCHScore@{hk}, FBMP selecting by F_{beta:g}",
                "matching",
                level,
                "concepts",
                {
                    v: _at(fbmp(s.binary(cfg.image_rule), scored, beta, hk).rec_f1_CS, hk)
                    for v, s in subsets.items()
                },
            )
        if cfg.omp:
            self.add(
                f"nn_omp@{hk}",
                f"non-negative OMP, {hk} atoms (continuous codes)",
                "matching",
                level,
                "concepts",
                {
                    v: _at(nn_omp(s.aggregate(cfg.ms_aggregate), scored, hk).f1_CK, hk)
                    for v, s in subsets.items()
                },
                note=f"codes: {cfg.ms_aggregate} over patches",
            )

    def _patch_matching(self) -> dict[str, Any]:
        inputs = self.inputs
        pi = inputs.patch_images
        chosen = np.intersect1d(pi, inputs.eval_images)
        if not len(chosen):
            return {}
        labels = inputs.concepts.patch_labels(chosen, inputs.layer)
        match = {}
        for v, c in self.codes.items():
            rows = np.searchsorted(c.patch_images, chosen)
            fire = _patch_rows(c, rows)
            match[v] = match_concepts(
                fire, labels, max_steps=self.k_max, names=inputs.concepts.names
            )
        self._matching(match, {}, labels, "patch")
        return match

    def _curve(self, match: dict[str, Any]) -> dict[str, Any]:
        ks = list(range(1, self.k_max + 1))
        out: dict[str, Any] = {"k": ks}
        for v, m in match.items():
            out[v] = [m.match_score(k) for k in ks]
        return out

    # ----- TAPA
    def _tapa(self, image_match: dict[str, Any], patch_match: dict[str, Any]) -> list[dict]:
        pairs, cfg = self.inputs.pairs, self.config
        if pairs is None or not len(pairs.first_P):
            return []
        names = self.inputs.concepts.names
        per_concept: dict[int, dict[str, Any]] = {}
        levels = {"image": image_match}
        if patch_match:
            levels["patch"] = patch_match
        for level, match in levels.items():
            # a concept without positives at this level has no coalition: its pairs are left out
            scored = set(match["trained"].concepts_C.tolist())
            ok = np.asarray(
                [
                    (o < 0 or o in scored) and (n < 0 or n in scored)
                    for o, n in zip(pairs.old_P, pairs.new_P, strict=True)
                ]
            )
            for p in np.flatnonzero(~ok):
                self.dropped_pairs.append(
                    f"pair {pairs.pair_ids[p]!r}: not in the {level}-level TAPAScore (a concept "
                    f"of it has no positive {level} among the scored images)"
                )
            if not ok.any():
                continue
            first, second = pairs.first_P[ok], pairs.second_P[ok]
            old, new = pairs.old_P[ok], pairs.new_P[ok]
            present = self.inputs.concepts.labels_NC[first]
            results = {}
            for v, c in self.codes.items():
                coalitions = match[v].coalitions(cfg.headline_k)
                if level == "image":
                    scored_codes = c.subset(np.searchsorted(c.images, self.inputs.eval_images))
                    binary = c.binary(cfg.image_rule, reference=scored_codes)
                    rows = np.searchsorted(c.images, first), np.searchsorted(c.images, second)
                    a, b = binary[rows[0]], binary[rows[1]]
                else:
                    region = self._regions(first, second, old, new)
                    a = c.patch_region_codes(first, region)
                    b = c.patch_region_codes(second, region)
                results[v] = tapa_score(a, b, old, new, coalitions, present)
            suffix = "" if level == "image" else "_patch"
            kinds = results["trained"].kind_P
            swap = kinds != "remove"
            score_items = {
                v: (r.delta_add_P - r.delta_rem_P).astype(float) for v, r in results.items()
            }
            note = f"coalitions: FBMP@{cfg.headline_k} on {level}-level codes" + (
                "; codes: any latent of the coalition firing inside the edited region"
                if level == "patch"
                else f"; binary codes: {cfg.image_rule}"
            )
            if swap.any():
                self.add(
                    f"tapa{suffix}",
                    "TAPAScore (swap and add pairs)",
                    "tapa",
                    level,
                    "pairs",
                    {v: x[swap] for v, x in score_items.items()},
                    chance=0.0,
                    note=note,
                )
            if (~swap).any():
                self.add(
                    f"tapa_removal{suffix}",
                    "TAPAScore (removal-only pairs)",
                    "tapa",
                    level,
                    "pairs",
                    {v: x[~swap] for v, x in score_items.items()},
                    chance=0.0,
                    note=note,
                )
            self.add(
                f"leakage{suffix}",
                "leakage (mean |Delta| of other present concepts)",
                "tapa",
                level,
                "pairs",
                {v: r.leakage_P for v, r in results.items()},
                note="logged, not part of TAPAScore; lower is better",
            )
            if level == "image":
                for v, r in results.items():
                    for c, t in r.per_concept.items():
                        entry = per_concept.setdefault(
                            c,
                            {
                                "concept": names[c],
                                "n_swap_add": t.n_swap_add,
                                "swap_add": {},
                                "n_removal": t.n_removal,
                                "removal": {},
                            },
                        )
                        entry["swap_add"][v] = t.swap_add
                        entry["removal"][v] = t.removal
        return [per_concept[c] for c in sorted(per_concept)]

    def _regions(
        self, first: np.ndarray, second: np.ndarray, old: np.ndarray, new: np.ndarray
    ) -> np.ndarray:
        """[P pairs, patches] bool: the patches of the changed concept in either image."""
        concepts, layer = self.inputs.concepts, self.inputs.layer
        n_patches = next(iter(self.codes.values())).n_patches
        la = concepts.patch_labels(first, layer).tocsr()
        lb = concepts.patch_labels(second, layer).tocsr()
        out = np.zeros((len(first), n_patches), bool)
        for p in range(len(first)):
            rows = slice(p * n_patches, (p + 1) * n_patches)
            for labels, c in ((la, old[p]), (lb, new[p]), (la, new[p]), (lb, old[p])):
                if c >= 0:
                    out[p] |= labels[rows][:, c].toarray().ravel()
        return out

    # ----- hierarchy and proxies
    def _hierarchy(
        self, subsets: dict[str, ImageCodes], tops: dict[str, tuple[np.ndarray, np.ndarray]]
    ) -> list[dict[str, Any]]:
        from visae.eval.hierarchy import group_means, lca_depth, matryoshka_boundaries
        from visae.eval.proxies import coarse_fine, locality

        inputs = self.inputs
        self.per_latent: dict[str, dict[str, np.ndarray]] = {v: {} for v in subsets}
        if subsets["trained"].tokens != "cls":
            for v, s in subsets.items():
                total, squares = s.sums()
                self.per_latent[v]["locality"] = locality(total, squares, s.n_patches, tops[v][0])
            self.add(
                "locality",
                "locality of the activation maps",
                "proxies",
                "patch",
                "latents",
                {v: d["locality"] for v, d in self.per_latent.items()},
                note="1 - (PR - 1) / (P - 1), PR = (sum a)^2 / sum a^2 over patches, mean "
                f"over the top-{self.config.top_images} images",
            )
        if inputs.paths is None:
            return []
        paths = paths_subset(inputs.paths, inputs.eval_images)
        coarse_depth = shared_root(paths) + 1
        for v in subsets:
            top, vals = tops[v]
            d = self.per_latent[v]
            d["lca_depth"] = lca_depth(top, vals, paths)
            d["coarse"], d["fine"] = coarse_fine(top, vals, paths, coarse_depth)
        for key, title in (
            ("lca_depth", f"LCA depth of the top-{self.config.top_images} images"),
            (
                "coarse",
                f"coarse consistency (top images share their level-{coarse_depth} category)",
            ),
            ("fine", "fine consistency (top images share the full path)"),
        ):
            self.add(
                key,
                title,
                "hierarchy" if key == "lca_depth" else "proxies",
                "image",
                "latents",
                {v: d[key] for v, d in self.per_latent.items()},
                note=f"taxonomy: {paths.source}",
            )
        fractions = self.inputs.sae.cfg.matryoshka
        if not fractions:
            return []
        bounds = matryoshka_boundaries(self.inputs.sae.n_latents, fractions)
        cfg = self.config
        per_variant = {
            v: group_means(d["lca_depth"], bounds, cfg.n_resamples, cfg.level, cfg.seed)
            for v, d in self.per_latent.items()
        }
        groups = []
        for g, trained in enumerate(per_variant["trained"]):
            entry = {"group": g, "start": trained["start"], "stop": trained["stop"]}
            for v, gs in per_variant.items():
                entry[v] = {"value": gs[g]["mean"], "ci": gs[g]["ci"], "n": gs[g]["n"]}
            groups.append(entry)
        return groups

    def _latent_tables(
        self,
        subsets: dict[str, ImageCodes],
        tops: dict[str, Any],
        ms: dict[str, MSResult],
        match: dict[str, Any],
    ) -> None:
        names = self.inputs.concepts.names
        labels = self.inputs.concepts.labels_NC[self.inputs.eval_images]
        for v, s in subsets.items():
            f1 = latent_scores(s.binary(self.config.image_rule), labels).f_beta_CL
            best_c, best_f1 = f1.argmax(axis=0), f1.max(axis=0)
            freq = s.frequency()
            r = ms.get(v)
            extra = self.per_latent.get(v, {})
            table = []
            for j in range(s.n_latents):
                table.append(
                    [
                        j,
                        _num(freq[j]),
                        _num(r.score[j]) if r else "",
                        _num(r.corrected[j]) if r else "",
                        int(r.dead[j]) if r else int(freq[j] == 0),
                        names[best_c[j]] if best_f1[j] > 0 else "",
                        _num(best_f1[j]) if best_f1[j] > 0 else "",
                        *(
                            _num(extra[c][j]) if c in extra else ""
                            for c in ("locality", "lca_depth", "coarse", "fine")
                        ),
                    ]
                )
            self.latent_tables[v] = table


def _at(table_CK: np.ndarray, k: int) -> np.ndarray:
    return table_CK[:, min(k, table_CK.shape[1]) - 1]


def _patch_rows(codes: ImageCodes, rows: np.ndarray) -> sp.csr_matrix:
    p = codes.n_patches
    idx = (rows[:, None] * p + np.arange(p)[None, :]).ravel()
    assert codes.patch_fire is not None
    return codes.patch_fire[idx]


def shared_root(paths: Any) -> int:
    """Levels every known path shares (e.g. 1 when all start with `shapes/`): the coarse level
    is the first one below them, where the taxonomy first branches."""
    known = [p for p in paths.paths if p is not None]
    if not known:
        return 0
    depth = 0
    while all(len(p) > depth + 1 and p[depth] == known[0][depth] for p in known):
        depth += 1
    return depth


def paths_subset(paths: Any, images: np.ndarray) -> Any:
    return replace(paths, paths=tuple(paths.paths[int(i)] for i in images))


def _num(x: float) -> str:
    x = float(x)
    return "" if math.isnan(x) else f"{x:.6g}"
