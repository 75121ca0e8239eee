"""Study specs and trials on a real analysis (DINOv2-S at 112 px over rendered scenes, a TopK
SAE trained on it): sampling, what each trial holds, and simulated observers scoring the real
activation maps (random 0, oracle 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from visae.errors import VisaeError
from visae.study.observers import click, pick
from visae.study.scoring import anchored, localization_trial, naming_trial
from visae.study.spec import load_spec, parse_spec
from visae.study.trials import build_trials, sample_features

pytestmark = pytest.mark.slow  # a real extraction, training, analysis, evaluation (~40 s, shared)


@pytest.fixture(scope="module")
def analysis_dir(study_analysis: Path) -> Path:
    return study_analysis


def _spec(analysis_dir: Path, **kw) -> dict:
    return {"name": "pilot", "analyses": [str(analysis_dir)], "features_per_sae": 12} | kw


def test_features_are_sampled_from_every_frequency_stratum(analysis_dir: Path) -> None:
    from visae.analysis import Analysis

    a = Analysis.load(analysis_dir)
    features = sample_features(a, 12, 4, 0.5, seed=0)
    assert len({f.latent for f in features}) == 12
    assert sorted({f.stratum for f in features}) == [0, 1, 2, 3]
    assert [f.stratum for f in features].count(0) == 3  # equal shares
    freq = a.table["freq_image"]
    assert all(0 < freq[f.latent] <= 0.5 and not a.dead[f.latent] for f in features)
    assert features == sample_features(a, 12, 4, 0.5, seed=0)
    assert features != sample_features(a, 12, 4, 0.5, seed=1)


def test_trials_hold_references_a_held_out_query_and_silent_distractors(analysis_dir: Path) -> None:
    from visae.analysis import Analysis

    a = Analysis.load(analysis_dir)
    spec = parse_spec(_spec(analysis_dir))
    trials = build_trials(spec)
    assert len(trials) == 12
    for t in trials:
        top = [e.image for e in a.top(t.feature.latent)]
        assert list(t.references) == top[:6] and t.query == top[6]
        assert t.query not in t.references and len(t.choices) == 4
        assert t.choices[t.correct] == top[7]
        for k, image in enumerate(t.choices):
            if k != t.correct:
                assert not a.latent_map(image, t.feature.latent).any()
    assert [t.correct for t in trials] == [t.correct for t in build_trials(spec)]  # seeded


def test_simulated_observers_on_the_real_maps(analysis_dir: Path) -> None:
    from visae.analysis import Analysis

    a = Analysis.load(analysis_dir)
    trials = build_trials(parse_spec(_spec(analysis_dir)))
    rng = np.random.default_rng(0)
    maps = {t.feature.key: a.latent_map(t.query, t.feature.latent) for t in trials}

    def localize(skill: float, repeats: int) -> float:
        s = []
        for t in trials:
            m = maps[t.feature.key]
            for _ in range(repeats):
                s.append(anchored(*localization_trial(m, [click(m, skill, rng)])))
        return float(np.mean(s))

    def name(skill: float, repeats: int) -> float:
        s = []
        for t in trials:
            for _ in range(repeats):
                picked = pick(t.correct, len(t.choices), skill, rng)
                s.append(anchored(*naming_trial(picked, t.correct, len(t.choices))))
        return float(np.mean(s))

    assert localize(1.0, 1) == pytest.approx(1.0) and name(1.0, 1) == pytest.approx(1.0)
    assert abs(localize(0.0, 400)) < 0.05 and abs(name(0.0, 400)) < 0.05
    assert 0.3 < localize(0.5, 200) < 0.7


def test_bad_specs_are_one_line_errors(analysis_dir: Path, tmp_path: Path) -> None:
    good = _spec(analysis_dir)
    for change, msg in (
        ({"features_per_sae": 0}, "features_per_sae must be a positive integer"),
        ({"choices": 1}, "choices must be an integer >= 2"),
        ({"protocols": ["rate"]}, "protocols must be among"),
        ({"colour": 1}, "unknown field 'colour'"),
        ({"analyses": "a"}, "analyses must be a list"),
        ({"exclusions": {"max_seconds": 3}}, "exclusions takes"),
    ):
        with pytest.raises(VisaeError, match=msg):
            parse_spec(good | change)
    with pytest.raises(VisaeError, match="missing field 'name'"):
        parse_spec({"analyses": ["a"]})
    path = tmp_path / "spec.yaml"
    path.write_text("name: pilot\nanalyses: [" + str(analysis_dir) + "]\nreferences: 3\n")
    assert load_spec(path).references == 3
    path.write_text("name: [unclosed\n")
    with pytest.raises(VisaeError, match="not valid YAML"):
        load_spec(path)
    bad_json = tmp_path / "spec.json"
    bad_json.write_text("{")
    with pytest.raises(VisaeError, match="not valid JSON"):
        load_spec(bad_json)
    rel = tmp_path / "rel.json"
    rel.write_text(json.dumps({"name": "x", "analyses": ["sub/a"]}))
    assert load_spec(rel).analyses == (str(tmp_path / "sub/a"),)
    with pytest.raises(VisaeError, match="keeps 16 top images per latent; the study needs 17"):
        build_trials(parse_spec(good | {"references": 15}))
    with pytest.raises(VisaeError, match="fewer than the 5000 features"):
        build_trials(parse_spec(good | {"features_per_sae": 5000}))


def test_study_plan_command(analysis_dir: Path, tmp_path: Path, capsys) -> None:
    from visae.cli import main

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec(analysis_dir)))
    out = tmp_path / "plan.json"
    assert main(["study", "plan", str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "12 features (stratum 0: 3, stratum 1: 3, stratum 2: 3, stratum 3: 3)" in printed
    plan = json.loads(out.read_text())
    assert len(plan["features"]) == 12 and plan["spec"]["features_per_sae"] == 12
    spec.write_text(json.dumps(_spec(analysis_dir, references=0)))
    assert main(["study", "plan", str(spec)]) == 2
    assert "references must be a positive integer" in capsys.readouterr().err


def _responses(trials, a, path: Path, skill_of, n_participants: int, seed: int = 0) -> None:
    """Simulated participants answering every feature's two trials, two checks and a
    practice trial each, written in the responses format."""
    import csv

    from visae.study.responses import COLUMNS

    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        base = {c: "" for c in COLUMNS} | {"seconds": "3.0"}
        for p in range(n_participants):
            pid, skill = f"p{p}", skill_of(p)
            w.writerow(base | {"participant": pid, "kind": "practice", "protocol": "name"})
            for k in range(2):
                ok = "0" if (p == 0 and k == 0) else "1"  # p0 fails a check
                w.writerow(base | {"participant": pid, "kind": "check", "passed": ok})
            for t in trials:
                m = a.latent_map(t.query, t.feature.latent)
                x, y = click(m, skill, rng)
                row = base | {"participant": pid, "kind": "main", "sae": t.feature.sae}
                w.writerow(
                    row
                    | {
                        "protocol": "localize",
                        "latent": t.feature.latent,
                        "image": t.query,
                        "clicks": f"{x},{y}",
                        "seconds": "0.2" if (p == 1 and t is trials[0]) else "3.0",
                    }
                )
                w.writerow(
                    row
                    | {
                        "protocol": "name",
                        "latent": t.feature.latent,
                        "pick": pick(t.correct, len(t.choices), skill, rng),
                        "correct": t.correct,
                        "choices": len(t.choices),
                    }
                )


def test_scoring_collected_responses_with_exclusions_and_proxies(
    analysis_dir: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    from visae.analysis import Analysis
    from visae.cli import main
    from visae.study.responses import read_responses, score_responses

    shutil.copytree(analysis_dir, tmp_path / "analysis")  # a proxy column is added below
    analysis_dir = tmp_path / "analysis"
    a = Analysis.load(analysis_dir)
    spec = parse_spec(_spec(analysis_dir))
    trials = build_trials(spec)
    oracle, random = tmp_path / "oracle.csv", tmp_path / "random.csv"
    _responses(trials, a, oracle, lambda p: 1.0, 8)
    _responses(trials, a, random, lambda p: 0.0, 100, seed=1)
    s = score_responses(spec, read_responses(oracle), boot=200)
    assert s["exclusions"] == {"participants": ("p0",), "fast_trials": 1}
    by = {x["protocol"]: x for x in s["scores"]}
    assert by["localize"]["mean"] == pytest.approx(1.0) and by["name"]["mean"] == pytest.approx(1)
    assert by["localize"]["n_participants"] == 7 and by["localize"]["n_features"] == 12
    r = {
        x["protocol"]: x for x in score_responses(spec, read_responses(random), boot=200)["scores"]
    }
    for protocol in ("localize", "name"):
        assert abs(r[protocol]["mean"]) < 0.05 and r[protocol]["lo"] < 0 < r[protocol]["hi"]
    # a proxy column as `visae evaluate --analysis` puts it into the analysis: its Spearman
    # correlation with the per-feature human scores is reported
    locality = np.zeros(a.n_latents)
    locality[[t.feature.latent for t in trials]] = np.arange(len(trials))
    a.add_metric("locality", locality)
    noisy = tmp_path / "noisy.csv"
    _responses(trials, a, noisy, lambda p: 0.5, 30, seed=2)
    scored = score_responses(parse_spec(_spec(analysis_dir)), read_responses(noisy), boot=200)
    rho = [x["proxy_correlation"]["locality"] for x in scored["scores"]]
    assert all(r["n"] == 12 and -1 <= r["spearman"] <= 1 for r in rho)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(_spec(analysis_dir)))
    out = tmp_path / "scores.json"
    assert main(["study", "score", str(oracle), "--spec", str(spec_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "excluded: 1 participants (failed checks), 1 trials faster than 1 s" in printed
    assert "locality rho undefined (constant) (n 12)" in printed  # the oracle scores 1 everywhere
    assert json.loads(out.read_text())["exclusions"]["participants"] == ["p0"]
    bad = tmp_path / "bad.csv"
    bad.write_text("participant,kind\np,main\n")
    assert main(["study", "score", str(bad), "--spec", str(spec_file)]) == 2
    assert "lack the column 'protocol'" in capsys.readouterr().err


def test_trials_score_against_exact_maps_when_patch_codes_are_truncated(
    analysis_dir: Path, tmp_path: Path
) -> None:
    # per-patch codes that keep 2 of the SAE's 16 active latents miss most latents on most
    # patches; the study's maps come from the latents' own top-image maps, which are exact
    from visae.analysis import Analysis, AnalysisConfig, run_analysis
    from visae.study.trials import activation_map

    root = analysis_dir.parent
    sae_dir = next((root / "runs").glob("*/sae"))
    truncated = run_analysis(
        sae_dir,
        root / "store",
        tmp_path / "k2",
        config=AnalysisConfig(patch_codes_k=2),
        progress=False,
    )
    exact = Analysis.load(analysis_dir)
    trials = build_trials(parse_spec(_spec(truncated.path)))
    missed = 0
    for t in trials:
        for image in (*t.references, t.query, t.choices[t.correct]):
            m = activation_map(truncated, t.feature.latent, image)
            assert m.max() > 0
            assert np.allclose(m, activation_map(exact, t.feature.latent, image), atol=1e-5)
            missed += not truncated.latent_map(image, t.feature.latent).any()
    assert missed > 0  # the per-patch codes alone would have scored these against nothing
