"""Train many SAEs at once on one shuffled stream of activations from a store.

Every run sees the same batches in the same order (a sweep shares the I/O); the stream
position, SAE weights, optimizer moments and dead-latent counters are checkpointed together,
so a killed run resumes to the same weights as one that never stopped.

Under torchrun the sweep trains data-parallel (`parallel="batch"`): every rank reads the same
stream, computes on its own rows of each batch, and the ranks' gradients are summed before one
identical step (`SAE.train_step`), so N ranks reach the weights one process reaches, within
float rounding; rank 0 alone writes logs, checkpoints and the final SAEs. With
`parallel="runs"` each rank trains every N-th run of the sweep on the whole stream (a sweep
wider than one device), exactly as one process would, and writes those runs' files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from visae.atomic import append_line, read_lines, write_error, write_text
from visae.devices import half_precision_is_emulated, resolve_device
from visae.dist import Ranks, local_device
from visae.errors import VisaeError
from visae.sae import SAE, BatchTopKSAE
from visae.store import ActivationStore
from visae.store.format import shard_file
from visae.train.config import RunSpec, TrainConfig
from visae.train.metrics import evaluate
from visae.train.schedule import lr_factor, sparsity_factor
from visae.train.state import (
    CHECKPOINT,
    latest_checkpoint,
    load_optimizer_tensors,
    load_training_checkpoint,
    read_state,
    save_training_checkpoint,
)

logger = logging.getLogger("visae.train")

LOG_EVERY_STEPS = 10
CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


def resolve_layer(store: ActivationStore, layer: int | None) -> int:
    """The requested layer, or the store's last one; an absent layer names the ones there."""
    if layer is None:
        return store.layers[-1]
    if layer not in store.layers:
        raise VisaeError(f"layer {layer} is not in store {store.path} (layers: {store.layers})")
    return layer


def find_nonfinite(store: ActivationStore, layer: int, tokens: str, scan: bool) -> str | None:
    """Where `layer` of the store holds NaN/inf, as "shard file, image i (source)": from the
    writer's records, else (with `scan`) from reading the chosen tokens; None if nowhere."""
    for i, shard in enumerate(store.manifest["shards"]):
        for bad in shard.get("nonfinite", []):
            if bad["layer"] == layer:
                return f"{shard_file(layer, i)}, image {bad['image']} ({bad.get('source', '?')})"
    if not scan:
        return None
    starts = np.cumsum([s["images"] for s in store.manifest["shards"]])
    for ids, acts in store.ordered(layer, tokens=tokens, batch_images=16):
        bad = ~np.isfinite(acts).all(axis=(1, 2))
        if bad.any():
            image = int(ids[bad.argmax()])
            shard = int(np.searchsorted(starts, image, side="right"))
            source = store.metadata()[image].get("source", "?")
            return f"{shard_file(layer, shard)}, image {image} ({source})"
    return None


def split_images(
    n_images: int, holdout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training images, held-out images), a seeded random split."""
    n_hold = round(holdout_fraction * n_images) if n_images > 1 else 0
    if holdout_fraction > 0 and n_images > 1:
        n_hold = min(max(1, n_hold), n_images - 1)
    perm = np.random.default_rng([seed, 7]).permutation(n_images)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def holdout_record(n_images: int, fraction: float, seed: int, held: np.ndarray) -> dict[str, Any]:
    """How the held-out images `held` were chosen (`split_images`), as a checkpoint records
    it: the rule's inputs and a digest of the ids, so that evaluation can re-derive and check
    them."""
    return {
        "rule": "visae.train.split_images",
        "n_images": n_images,
        "fraction": fraction,
        "seed": seed,
        "n_heldout": len(held),
        "sha256": _ids_digest(held),
    }


def heldout_from_record(record: dict[str, Any]) -> np.ndarray:
    """The held-out image ids a checkpoint's `holdout` record describes (checked)."""
    _, held = split_images(int(record["n_images"]), float(record["fraction"]), int(record["seed"]))
    if _ids_digest(held) != record["sha256"]:
        raise VisaeError(
            "cannot reproduce the SAE's held-out images from its checkpoint record "
            f"(seed {record['seed']}, fraction {record['fraction']}): the split rule differs"
        )
    return held


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def steps_for(total_tokens: int, epoch_tokens: int, batch_size: int) -> int:
    """Optimizer steps to consume `total_tokens`: each epoch ends with its own short batch."""
    full_epochs, rest = divmod(total_tokens, epoch_tokens)
    return full_epochs * math.ceil(epoch_tokens / batch_size) + math.ceil(rest / batch_size)


class Trainer:
    """Fits every `RunSpec` to the store named in `TrainConfig`; see `train()`."""

    def __init__(
        self,
        cfg: TrainConfig,
        runs: list[RunSpec],
        progress: bool = True,
        ranks: Ranks | None = None,
    ) -> None:
        cfg.validate()
        self.ranks = ranks or Ranks()
        self.cfg, self.progress = cfg, progress and self.ranks.main
        self.device = resolve_device(local_device(cfg.device, self.ranks))
        self.store = self.ranks.main_first(
            lambda: ActivationStore.open(cfg.store, progress=self.progress)
        )
        self.layer = resolve_layer(self.store, cfg.layer)
        d = self.store.d(self.layer)
        for run in runs:
            if run.sae.d != d:
                raise VisaeError(
                    f"run {run.name}: SAE width d={run.sae.d} does not match the store's "
                    f"d={d} at layer {self.layer}"
                )
        bad = find_nonfinite(self.store, self.layer, cfg.tokens, scan=False)
        if bad:
            raise VisaeError(f"store {self.store.path}: NaN/inf activations in {bad}")
        per_image = len(self.store.token_positions(self.layer, cfg.tokens))
        if self.store.n_images == 0 or per_image == 0:
            raise VisaeError(f"store {self.store.path} holds no {cfg.tokens} tokens to train on")
        self.train_images, self.eval_images = split_images(
            self.store.n_images, cfg.holdout_fraction, cfg.seed
        )
        self.holdout = holdout_record(
            self.store.n_images, cfg.holdout_fraction, cfg.seed, self.eval_images
        )
        self.epoch_tokens = len(self.train_images) * per_image
        wanted = cfg.total_tokens or self.epoch_tokens
        if wanted > self.epoch_tokens and cfg.beyond_epoch == "stop":
            logger.warning(
                "total_tokens=%d is more than one epoch (%d training tokens); stopping after "
                "one epoch as configured (beyond_epoch=stop)",
                wanted,
                self.epoch_tokens,
            )
            wanted = self.epoch_tokens
        elif wanted > self.epoch_tokens:
            logger.warning(
                "training for %d tokens = %.1f epochs of the store's %d training tokens: "
                "tokens repeat (beyond_epoch=continue)",
                wanted,
                wanted / self.epoch_tokens,
                self.epoch_tokens,
            )
        self.total_tokens = wanted
        self.total_steps = steps_for(wanted, self.epoch_tokens, cfg.batch_size)
        # A warm-up longer than the run would keep the full L1/L0 penalty (or learning rate)
        # from ever reaching the loss: cap both at a tenth of the run.
        self.lr_warmup = min(cfg.lr_warmup_steps, self.total_steps // 10)
        self.sparsity_warmup = min(cfg.sparsity_warmup_steps, self.total_steps // 10)
        self.runs = [self._scaled_dead_window(run) for run in runs]
        self.split_runs = self.ranks.distributed and cfg.parallel == "runs"
        if self.split_runs and len(self.runs) < self.ranks.world:
            raise VisaeError(
                f"parallel=runs shares the sweep's {len(self.runs)} runs among "
                f"{self.ranks.world} ranks: use at most {len(self.runs)} ranks, or "
                "parallel=batch"
            )
        # the runs this rank trains, and the ranks its steps are summed over
        self.mine = self.runs[self.ranks.rank :: self.ranks.world] if self.split_runs else self.runs
        self.step_ranks = Ranks() if self.split_runs else self.ranks
        self.writes_runs = self.split_runs or self.ranks.main
        self.out = Path(cfg.out)
        slow = [r.name for r in self.runs if r.sae.compute_dtype == "bfloat16"]
        if slow and half_precision_is_emulated(self.device):
            logger.warning(
                "run(s) %s use compute_dtype=bfloat16, which this CPU (%s, no AVX-512) "
                "emulates: expect several times the float32 step time",
                ", ".join(slow),
                torch.backends.cpu.get_cpu_capability(),
            )

    def _scaled_dead_window(self, run: RunSpec) -> RunSpec:
        """The run with its dead-latent window scaled to the run's length: a fraction of the
        total tokens (at least a batch), capped by the SAE's own `dead_after_tokens`."""
        scaled = max(self.cfg.batch_size, round(self.cfg.dead_window_fraction * self.total_tokens))
        window = min(run.sae.dead_after_tokens, scaled)
        if window != run.sae.dead_after_tokens:
            logger.info(
                "run %s: a latent counts as dead after %d tokens without firing "
                "(%.0f%% of the run; cap %d)",
                run.name,
                window,
                100 * self.cfg.dead_window_fraction,
                run.sae.dead_after_tokens,
            )
        return dataclasses.replace(run, sae=dataclasses.replace(run.sae, dead_after_tokens=window))

    # -- set-up -----------------------------------------------------------------------------

    def _describe(self) -> dict[str, Any]:
        train = self.cfg.to_dict() | {"layer": self.layer}
        train.pop("device")  # where and how parallel it runs does not change what it computes
        train.pop("parallel")
        return {
            "train": train,
            "runs": [r.to_dict() for r in self.runs],
            "store": {k: v for k, v in self.store.identity().items() if k != "path"},
            "holdout": self.holdout,
            "total_steps": self.total_steps,
        }

    def _prepare_out(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, self.out) from None
        path = self.out / CONFIG_FILE
        desc = json.dumps(self._describe(), indent=2, sort_keys=True)
        if path.exists() and path.read_text() != desc:
            raise VisaeError(
                f"{self.out} holds a different training run ({CONFIG_FILE} differs); "
                "choose another --out or delete it"
            )
        write_text(path, desc)

    def _stream(self, epoch: int, start_batch: int) -> Iterator[np.ndarray]:
        return self.store.shuffled(
            self.layer,
            self.cfg.tokens,
            batch_size=self.cfg.batch_size,
            seed=self.cfg.seed,
            epoch=epoch,
            prefetch=self.cfg.prefetch,
            images=self.train_images,
            start_batch=start_batch,
        )

    def _sample(self, n: int, images: np.ndarray, salt: int) -> np.ndarray:
        """A seeded uniform draw of `n` tokens over `images` (bounded memory), checked finite."""
        sample = self.store.sample_tokens(
            self.layer, self.cfg.tokens, n, seed=self.cfg.seed + salt, images=images
        )
        if not np.isfinite(sample).all():
            where = find_nonfinite(self.store, self.layer, self.cfg.tokens, scan=True)
            raise VisaeError(f"store {self.store.path}: NaN/inf activations in {where}")
        return sample

    def _norm_sample(self) -> np.ndarray:
        """Tokens for the input statistics, b_dec and data-driven initialisation."""
        return self._sample(self.cfg.norm_sample_tokens, self.train_images, salt=1)

    def _eval_tokens(self) -> np.ndarray:
        """Held-out tokens (from images never trained on), at most `eval_tokens` of them."""
        if not len(self.eval_images):
            logger.warning("no held-out images (holdout_fraction=0): evaluating on training data")
            return self._sample(self.cfg.eval_tokens, self.train_images, salt=11)
        return self._sample(self.cfg.eval_tokens, self.eval_images, salt=11)

    def _fresh(self, sample: np.ndarray) -> dict[str, tuple[SAE, torch.optim.Optimizer]]:
        models = {}
        for run in self.mine:
            sae = SAE.create(run.sae).to(self.device)
            sae.init_from_sample(sample)
            models[run.name] = (sae, torch.optim.Adam(sae.parameters(), lr=run.lr))
        return models

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> dict[str, Path]:
        """Train every run to `total_tokens`; returns {run name: final SAE folder}."""
        names = [r.name for r in self.runs]
        start = self.ranks.from_main(self._start)
        if start == "finished":
            logger.warning("%s already holds this finished training run; nothing to do", self.out)
            return {name: self.out / name / "sae" for name in names}
        if start == "fresh":
            models = self._fresh(self._norm_sample())
            state = {"step": 0, "tokens": 0, "epoch": 0, "batch_in_epoch": 0}
        else:
            mine = [r.name for r in self.mine]
            state, loaded = load_training_checkpoint(self.out / CHECKPOINT, mine)
            models = {}
            for run in self.mine:
                sae, opt_tensors = loaded[run.name]
                sae.to(self.device).train()
                opt = torch.optim.Adam(sae.parameters(), lr=run.lr)
                load_optimizer_tensors(sae, opt, opt_tensors)
                models[run.name] = (sae, opt)
            logger.info(
                "resuming %s at step %d (%d tokens)", self.out, state["step"], state["tokens"]
            )
        for sae, _ in models.values():
            self.step_ranks.broadcast([*sae.state_dict().values(), sae.norm_mean, sae.norm_scale])
            sae.train()
        eval_x = self._eval_tokens() if self.writes_runs else None
        self._loop(models, state, eval_x)
        return self._finish(models, state)

    def _start(self) -> str:
        """Prepare the output folder (rank 0): "finished", "fresh" or "resume"."""
        self._prepare_out()
        names = [r.name for r in self.runs]
        if (self.out / SUMMARY_FILE).exists():
            return "finished"
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            for name in names:
                try:
                    (self.out / name).mkdir(exist_ok=True)
                except OSError as exc:
                    raise write_error(exc, self.out / name) from None
                write_text(self.out / name / METRICS_FILE, "")
            return "fresh"
        step = read_state(ckpt)["step"]
        for name in names:
            _truncate_log(self.out / name / METRICS_FILE, step)
        return "resume"

    def _sae_metadata(self, state: dict[str, Any]) -> dict[str, Any]:
        return {
            "store": self.store.identity(),
            "layer": self.layer,
            "tokens": self.cfg.tokens,
            "train_step": state["step"],
            "train_tokens": state["tokens"],
            "total_steps": self.total_steps,
            "holdout": self.holdout,
        }

    def _loop(
        self,
        models: dict[str, tuple[SAE, torch.optim.Optimizer]],
        state: dict[str, Any],
        eval_x: np.ndarray | None,
    ) -> None:
        cfg = self.cfg
        ranks = self.step_ranks
        lrs = {r.name: r.lr for r in self.runs}
        stream = self._stream(state["epoch"], state["batch_in_epoch"])
        bar = tqdm(
            total=self.total_tokens,
            initial=state["tokens"],
            unit="tok",
            unit_scale=True,
            desc=f"train {len(models)} SAE{'s' if len(models) > 1 else ''}",
            disable=not self.progress,
        )
        first = self.mine[0].name
        with bar:
            while state["tokens"] < self.total_tokens:
                batch = next(stream, None)
                if batch is None:
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
                    stream = self._stream(state["epoch"], 0)
                    continue
                batch = batch[: self.total_tokens - state["tokens"]]
                if not np.isfinite(batch).all():
                    where = find_nonfinite(self.store, self.layer, cfg.tokens, scan=True)
                    raise VisaeError(f"store {self.store.path}: NaN/inf activations in {where}")
                lo, hi = (len(batch) * r // ranks.world for r in (ranks.rank, ranks.rank + 1))
                x = torch.from_numpy(batch[lo:hi]).to(self.device)
                step = state["step"]
                factor = lr_factor(
                    step, self.total_steps, self.lr_warmup, cfg.lr_decay, cfg.lr_decay_start
                )
                sparsity = sparsity_factor(step, self.sparsity_warmup)
                logs = {}
                for name, (sae, opt) in models.items():
                    for group in opt.param_groups:
                        group["lr"] = lrs[name] * factor
                    out = sae.train_step(opt, x, sparsity_scale=sparsity, ranks=ranks)
                    if not math.isfinite(float(out.loss.detach())):
                        raise VisaeError(
                            f"run {name} diverged at step {step} (loss is "
                            f"{float(out.loss.detach())}); lower its learning rate"
                        )
                    logs[name] = out
                before = state["tokens"]
                state["step"] += 1
                state["batch_in_epoch"] += 1
                state["tokens"] += len(batch)
                bar.update(len(batch))
                done = state["tokens"] >= self.total_tokens
                if done:
                    self._calibrate(models)
                checkpoint = not done and _crossed(
                    before, state["tokens"], cfg.checkpoint_every_tokens
                )
                if checkpoint and self.split_runs:
                    save_training_checkpoint(
                        self.out, dict(state), models, self._sae_metadata(state), self.ranks
                    )
                if not self.writes_runs:
                    continue
                if state["step"] % LOG_EVERY_STEPS == 0 or done:
                    for name, out in logs.items():
                        record = {
                            "kind": "train",
                            "step": state["step"],
                            "tokens": state["tokens"],
                            "lr": lrs[name] * factor,
                            "sparsity_scale": sparsity,
                            **out.metrics(),
                        }
                        append_line(self.out / name / METRICS_FILE, _json_line(record))
                    m = logs[first]
                    bar.set_postfix_str(
                        f"nmse {m.nmse:.3f} L0 {m.l0:.1f} dead {m.dead_fraction:.1%}"
                        + (f" ({first} +{len(models) - 1})" if len(models) > 1 else ""),
                        refresh=False,
                    )
                if eval_x is not None and (
                    done or _crossed(before, state["tokens"], cfg.eval_every_tokens)
                ):
                    self._evaluate(models, state, eval_x)
                if checkpoint and not self.split_runs:
                    save_training_checkpoint(
                        self.out, dict(state), models, self._sae_metadata(state)
                    )

    def _calibrate(self, models: dict[str, tuple[SAE, torch.optim.Optimizer]]) -> None:
        """Re-derive BatchTopK inference thresholds from the final weights (see
        `BatchTopKSAE.calibrate_threshold`), on training tokens in training-sized batches."""
        batchtopk = [sae for sae, _ in models.values() if isinstance(sae, BatchTopKSAE)]
        if not batchtopk:
            return
        sample = self._norm_sample()
        size = self.cfg.batch_size
        for sae in batchtopk:
            sae.calibrate_threshold(sample[i : i + size] for i in range(0, len(sample), size))

    def _evaluate(
        self,
        models: dict[str, tuple[SAE, torch.optim.Optimizer]],
        state: dict[str, Any],
        eval_x: np.ndarray,
    ) -> None:
        for name, (sae, _) in models.items():
            batches = (eval_x[i : i + 8192] for i in range(0, len(eval_x), 8192))
            metrics = evaluate(sae, batches)
            metrics["eval_tokens"] = metrics.pop("tokens")
            metrics["train_dead_fraction"] = float(sae.dead_mask().float().mean())
            record = {"kind": "eval", "step": state["step"], "tokens": state["tokens"], **metrics}
            append_line(self.out / name / METRICS_FILE, _json_line(record))

    def _finish(
        self, models: dict[str, tuple[SAE, torch.optim.Optimizer]], state: dict[str, Any]
    ) -> dict[str, Path]:
        finals = {run.name: self.out / run.name / "sae" for run in self.runs}
        if self.writes_runs:
            for run in self.mine:
                sae, _ = models[run.name]
                sae.eval()
                sae.save(finals[run.name], run=run.name, lr=run.lr, **self._sae_metadata(state))
        self.ranks.barrier()
        if self.ranks.main:
            summary = {}
            for run in self.runs:
                lines = read_lines(self.out / run.name / METRICS_FILE)
                last_eval = [json.loads(x) for x in lines if '"kind": "eval"' in x][-1]
                summary[run.name] = {
                    "sae": str(finals[run.name]),
                    "dead_after_tokens": run.sae.dead_after_tokens,
                    **last_eval,
                }
            write_text(self.out / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True))
            shutil.rmtree(self.out / CHECKPOINT, ignore_errors=True)
        self.ranks.barrier()
        return finals


def _crossed(before: int, after: int, every: int) -> bool:
    return before // every != after // every


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (and a partial last line
    left by a kill), so that none appears twice."""
    if not path.exists():
        write_text(path, "")
        return
    keep = [x for x in read_lines(path) if json.loads(x)["step"] <= step]
    write_text(path, "".join(x + "\n" for x in keep))


def train(
    cfg: TrainConfig,
    runs: list[RunSpec],
    progress: bool = True,
    ranks: Ranks | None = None,
) -> dict[str, Path]:
    """Train (or resume) every run of a sweep on one shared stream; {run: SAE folder}. With
    the `ranks` of a torchrun job (`visae.dist.current()`), data-parallel over them."""
    return Trainer(cfg, runs, progress=progress, ranks=ranks).run()
