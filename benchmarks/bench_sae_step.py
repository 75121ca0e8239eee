"""Speed of the TopK SAE training step against the `overcomplete` package and plain PyTorch.

Targets (d=384, 16x = 6,144 latents, k=32, batch 4,096 tokens):
  (a) float32 training throughput >= 3x overcomplete's TopKSAE on the same tensors, at equal
      or lower NMSE after the same number of tokens;
  (b) the bf16 path >= 5x, with NMSE within 1% (relative) of the float32 run;
  (c) the whole float32 training step <= 2x the bare float32 encoder matmul of the same shapes.
The contenders: overcomplete's TopKSAE with a Linear + BatchNorm encoder (the targets'
baseline: its default encoder in the releases they were set against) and with a plain linear
encoder (`encoder_module="linear"`, the same model as visae's; overcomplete 0.3.0's default),
a plain-PyTorch dense TopK SAE written here (Linear encoder, top-k, scatter, Linear decoder:
what a 20-line implementation does), visae float32 and bf16, and the bare matmul and top-k.
All are timed in one process (so on one torch, whose version the report states beside the
project environment's), interleaved step by step with the order rotating, so load from other
work on the machine hits them alike. Every model sees the same batches in the same order and
the same Adam settings. Needs the separate environment of `benchmarks/make-bench-env.sh`:

    bash benchmarks/make-bench-env.sh
    .venv-bench/bin/python benchmarks/bench_sae_step.py            # synthetic data
    .venv-bench/bin/python benchmarks/bench_sae_step.py --store runs/store --layer 10

Data: without --store, a fixed synthetic sparse-dictionary dataset (seeded): 12,288 random unit
atoms in R^384 with Zipf-like frequencies, 32 draws per token with log-normal magnitudes, plus
Gaussian noise, standardised to zero mean and mean squared norm 384. With --store, shuffled
patch tokens of an activation store (the NMSE set is drawn from the same store with another
seed, so it may overlap the training tokens).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.sae import SAE, SAEConfig, normalization_from_sample

SECTION = "bench_sae_step"


# Added to every data seed: the models are initialised from `torch.Generator().manual_seed(seed)`
# too, and drawing the atoms from that same stream would start visae's and the dense SAE's
# dictionaries at the planted atoms (the most frequent ones first), a head start that
# overcomplete's differently drawn init does not get. Below 2^32: torch's CPU generator keeps
# only a seed's low 32 bits.
DATA_SEED_OFFSET = 1_000_000_007


class SyntheticActivations:
    """Seeded sparse-dictionary data; batch i is the same whatever else has been drawn."""

    def __init__(self, d: int, n_atoms: int = 12_288, active: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(DATA_SEED_OFFSET + seed)
        self.atoms = torch.randn(n_atoms, d, generator=gen)
        self.atoms /= self.atoms.norm(dim=1, keepdim=True)
        self.freq = (torch.arange(1, n_atoms + 1, dtype=torch.float64) ** -0.7).float()
        self.active, self.seed, self.d = active, seed, d
        sample = torch.cat([self._raw(-1 - i, 4096) for i in range(8)])
        mean, scale = normalization_from_sample(sample)
        self.mean, self.scale = mean, scale

    def _raw(self, index: int, size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(DATA_SEED_OFFSET + self.seed * 1_000_003 + index + 7)
        ids = torch.multinomial(self.freq, size * self.active, replacement=True, generator=gen)
        mags = torch.exp(torch.randn(size * self.active, generator=gen) * 0.5)
        offsets = torch.arange(0, size * self.active, self.active)
        x = F.embedding_bag(ids, self.atoms, offsets, per_sample_weights=mags, mode="sum")
        return x + 0.1 * torch.randn(size, self.d, generator=gen)

    def batch(self, index: int, size: int) -> torch.Tensor:
        return (self._raw(index, size) - self.mean) / self.scale


def store_batches(path: str, layer: int, size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled patch-token batches of a store (epoch after epoch), full batches only."""
    from visae.store import ActivationStore

    store = ActivationStore.open(path, verify=False, progress=False)
    epoch = 0
    while True:
        for batch in store.shuffled(
            layer, "patch", batch_size=size, seed=seed, epoch=epoch, prefetch=0
        ):
            if len(batch) == size:
                yield torch.from_numpy(np.ascontiguousarray(batch))
        epoch += 1


class Contender:
    """A named training step with the wall time of each timed call."""

    def __init__(self, name: str, step: Callable[[torch.Tensor], None]) -> None:
        self.name, self.step, self.times = name, step, []

    def run(self, x: torch.Tensor, timed: bool) -> None:
        start = time.perf_counter()
        self.step(x)
        if timed:
            self.times.append(time.perf_counter() - start)

    def median_ms(self) -> float:
        """Median step time: robust to the steps that other processes' bursts slow down."""
        return 1e3 * float(np.median(self.times))

    def mean_ms(self) -> float:
        return 1e3 * float(np.mean(self.times))


def overcomplete_contender(
    d: int, n: int, k: int, lr: float, seed: int, batchnorm: bool
) -> tuple[Contender, torch.nn.Module]:
    """overcomplete's TopKSAE trained as its `train_sae` loop does, without the logging.

    Both encoders are named explicitly, so the comparison does not move with the package's
    default (Linear + BatchNorm in the releases the targets were set against; 0.3.0's default
    is the plain linear one): `encoder_module="linear"`, or an `MLPEncoder` with no hidden
    block and BatchNorm1d as its norm layer (one Linear layer, then the BatchNorm).
    """
    from overcomplete.sae import MLPEncoder, TopKSAE

    torch.manual_seed(seed)
    encoder: str | torch.nn.Module = "linear"
    if batchnorm:
        encoder = MLPEncoder(d, n, nb_blocks=0, norm_layer=torch.nn.BatchNorm1d, device="cpu")
    model = TopKSAE(d, nb_concepts=n, top_k=k, encoder_module=encoder, device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    model.train()

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        _, _, x_hat = model(x)
        loss = (x - x_hat).square().mean()
        loss.backward()
        opt.step()

    label = f"overcomplete TopKSAE, {'Linear+BatchNorm' if batchnorm else 'linear'} encoder"
    return Contender(label, step), model


def overcomplete_note() -> str:
    """overcomplete's version and what its default encoder is."""
    from importlib.metadata import version

    import overcomplete.sae as oc_sae

    default = oc_sae.TopKSAE(8, nb_concepts=16, top_k=2).encoder
    has_bn = any(isinstance(m, torch.nn.BatchNorm1d) for m in default.modules())
    kind = "Linear+BatchNorm" if has_bn else "linear"
    return f"overcomplete {version('overcomplete')} (its default TopKSAE encoder: {kind})"


class DenseTopK(torch.nn.Module):
    """The plain-PyTorch TopK SAE: Linear encoder, ReLU'd top-k scattered into dense codes,
    Linear decoder; tied initialisation with unit atoms, as visae's."""

    def __init__(self, d: int, n: int, k: int, seed: int) -> None:
        super().__init__()
        self.k = k
        self.encoder = torch.nn.Linear(d, n)
        self.decoder = torch.nn.Linear(n, d)
        atoms = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
        atoms /= atoms.norm(dim=1, keepdim=True)
        with torch.no_grad():
            self.encoder.weight.copy_(atoms)
            self.encoder.bias.zero_()
            self.decoder.weight.copy_(atoms.t())
            self.decoder.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.encoder(x)
        top = pre.topk(self.k, dim=1, sorted=False)
        codes = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
        return self.decoder(codes)


def dense_contender(d: int, n: int, k: int, lr: float, seed: int) -> tuple[Contender, DenseTopK]:
    model = DenseTopK(d, n, k, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = (x - model(x)).square().mean()
        loss.backward()
        opt.step()

    return Contender("plain PyTorch dense TopK (float32)", step), model


def ours_contender(
    cfg: SAEConfig, sample: torch.Tensor, lr: float, label: str
) -> tuple[Contender, SAE]:
    sae = SAE.create(cfg)
    sae.init_from_sample(sample)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)

    def step(x: torch.Tensor) -> None:
        sae.train_step(opt, x)

    return Contender(label, step), sae


def project_torch_version() -> str:
    """torch of the project's own environment (.venv), which the test suite runs on."""
    python = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    if not python.exists():
        return "unknown (no .venv)"
    code = "import importlib.metadata as m; print(m.version('torch'))"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


@torch.no_grad()
def nmse(reconstruct: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """SSE / SSE of predicting the mean, accumulated in float64 over 4,096-token chunks."""
    sse = 0.0
    x64 = x.double()
    base = float(((x64 - x64.mean(dim=0)) ** 2).sum())
    for chunk in x.split(4096):
        sse += float(((reconstruct(chunk).double() - chunk.double()) ** 2).sum())
    return sse / base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 20, help="training tokens per model")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam lr, the same for all")
    parser.add_argument("--warmup-steps", type=int, default=3, help="trained but not timed")
    parser.add_argument("--eval-tokens", type=int, default=32_768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", help="activation store directory (default: synthetic data)")
    parser.add_argument("--layer", type=int, help="store layer (with --store)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    load_start = load_note()
    d, n, k, b = args.d, args.d * args.expansion, args.k, args.batch
    steps = math.ceil(args.tokens / b)
    if args.store:
        if args.layer is None:
            parser.error("--store needs --layer")
        stream = store_batches(args.store, args.layer, b, args.seed)
        eval_stream = store_batches(args.store, args.layer, b, args.seed + 1)
        eval_x = torch.cat([next(eval_stream) for _ in range(math.ceil(args.eval_tokens / b))])
        sample = torch.cat([next(eval_stream) for _ in range(16)])
        d = eval_x.shape[1]
        n = d * args.expansion
        data_note = f"activation store {args.store}, layer {args.layer}, patch tokens"

        def next_batch(_: int) -> torch.Tensor:
            return next(stream)
    else:
        synthetic = SyntheticActivations(d, seed=args.seed)
        eval_x = torch.cat(
            [synthetic.batch(10_000_000 + i, b) for i in range(args.eval_tokens // b)]
        )
        sample = torch.cat([synthetic.batch(20_000_000 + i, b) for i in range(16)])
        data_note = "synthetic sparse-dictionary data (seeded; see the script's docstring)"

        def next_batch(i: int) -> torch.Tensor:
            return synthetic.batch(i, b)

    try:
        oc, oc_model = overcomplete_contender(d, n, k, args.lr, args.seed, batchnorm=True)
        oc_lin, oc_lin_model = overcomplete_contender(d, n, k, args.lr, args.seed, False)
        oc_note = overcomplete_note()
    except ImportError as exc:
        sys.exit(
            f"cannot import overcomplete ({exc}); run: bash benchmarks/make-bench-env.sh "
            "and use .venv-bench/bin/python"
        )
    dense, dense_model = dense_contender(d, n, k, args.lr, args.seed)
    base_cfg = {"arch": "topk", "d": d, "n_latents": n, "k": k, "seed": args.seed}
    fp32, sae32 = ours_contender(SAEConfig(**base_cfg), sample, args.lr, "visae TopK, float32")
    bf16, sae16 = ours_contender(
        SAEConfig(**base_cfg, compute_dtype="bfloat16"), sample, args.lr, "visae TopK, bf16 matmul"
    )
    w_enc = sae32.W_enc.detach().clone()
    pre = torch.mm(sample[:b], w_enc.t())

    def bare_matmul(x: torch.Tensor) -> None:
        torch.mm(x, w_enc.t())

    def bare_topk(_: torch.Tensor) -> None:
        pre.topk(k, dim=1, sorted=False)

    matmul = Contender("bare encoder matmul x @ W_enc.T (float32)", bare_matmul)
    topk_only = Contender("top-k of a [batch, n_latents] matrix", bare_topk)
    trained = [oc, oc_lin, dense, fp32, bf16]
    contenders = [*trained, matmul, topk_only]

    loads = []
    progress = tqdm(range(steps), desc="training side by side", disable=args.no_progress)
    for i in progress:
        x = next_batch(i)
        order = contenders[i % len(contenders) :] + contenders[: i % len(contenders)]
        for contender in order:
            contender.run(x, timed=i >= args.warmup_steps)
        loads.append(os.getloadavg()[0])
    load_end = load_note()

    oc_model.eval()  # overcomplete fuses its dictionary for inference
    oc_lin_model.eval()
    results = {
        oc.name: nmse(lambda x: oc_model(x)[2], eval_x),
        oc_lin.name: nmse(lambda x: oc_lin_model(x)[2], eval_x),
        dense.name: nmse(dense_model, eval_x),
        fp32.name: nmse(lambda x: sae32(x)[0], eval_x),
        bf16.name: nmse(lambda x: sae16(x)[0], eval_x),
    }
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def tps(c: Contender) -> float:
        return b / (c.median_ms() / 1e3)

    ratio_a = tps(fp32) / tps(oc)
    ratio_b = tps(bf16) / tps(oc)
    ratio_c = fp32.median_ms() / matmul.median_ms()
    nmse_gap = results[bf16.name] / results[fp32.name] - 1
    verdict = {True: "met", False: "NOT met"}
    lines = [
        f"data: {data_note}",
        f"shapes: d={d}, n_latents={n} ({n // d}x), k={k}, batch {b}; {steps} steps = "
        f"{steps * b:,} tokens per model ({args.warmup_steps} warm-up steps untimed); "
        f"Adam lr {args.lr} (fused) for all; torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__} for every contender (one process, this environment); "
        f"the project environment (.venv, where the tests run) has torch "
        f"{project_torch_version()}; {oc_note}",
        f"{load_start}; at end: {load_end.split(': ', 1)[1]}; mean during the run: "
        f"{np.mean(loads):.2f} (this run alone makes about 2)",
        "tokens/s = batch / median step time; ratios use medians",
        "",
        f"{'contender':48s} {'median ms':>9s} {'mean ms':>8s} {'tokens/s':>9s} {'NMSE':>7s}",
    ]
    for c in trained:
        lines.append(
            f"{c.name:48s} {c.median_ms():9.1f} {c.mean_ms():8.1f} {tps(c):9,.0f} "
            f"{results[c.name]:7.4f}"
        )
    for c in (matmul, topk_only):
        lines.append(f"{c.name:48s} {c.median_ms():9.1f} {c.mean_ms():8.1f}")
    lines += [
        "",
        f"(a) float32 throughput / overcomplete Linear+BatchNorm: {ratio_a:.2f}x (target >= 3x) "
        f"and NMSE "
        f"{results[fp32.name]:.4f} vs {results[oc.name]:.4f} (target <=): "
        f"{verdict[ratio_a >= 3 and results[fp32.name] <= results[oc.name]]}",
        f"(b) bf16 throughput / overcomplete Linear+BatchNorm: {ratio_b:.2f}x (target >= 5x), "
        f"NMSE vs float32 "
        f"{100 * nmse_gap:+.2f}% (target within 1%): "
        f"{verdict[ratio_b >= 5 and abs(nmse_gap) <= 0.01]}",
        f"(c) float32 step / bare matmul: {ratio_c:.2f}x (target <= 2x): {verdict[ratio_c <= 2]}",
        f"visae float32 throughput / overcomplete with a linear encoder: "
        f"{tps(fp32) / tps(oc_lin):.2f}x; / plain PyTorch dense TopK: "
        f"{tps(fp32) / tps(dense):.2f}x (no target: same model, other implementations)",
        f"peak resident memory of the whole run (all models, data, eval set): {peak_mib:,.0f} MiB",
    ]
    print("\n".join(lines))
    if not args.no_write:
        command = (
            "bash benchmarks/make-bench-env.sh && "
            ".venv-bench/bin/python benchmarks/bench_sae_step.py"
        )
        if args.store:
            command += f" --store {args.store} --layer {args.layer}"
        if args.tokens != 1 << 20:
            command += f" --tokens {args.tokens}"
        section = report(
            "SAE training step: visae TopK vs overcomplete and plain PyTorch (bench_sae_step.py)",
            command,
            lines,
        )
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
