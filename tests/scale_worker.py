"""One data-parallel SAE training step per architecture, in float64, by each rank of a torchrun
job; rank 0 writes the weights after the step and the step's metrics for test_scale.py to
compare with one process taking the same step on the whole batch.

    torchrun --nproc-per-node 2 tests/scale_worker.py OUT.npz
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from visae.dist import Ranks, current
from visae.sae import SAE, SAEConfig

D, N_LATENTS, BATCH, STEPS = 16, 64, 299, 3
CONFIGS = {
    "topk-auxk": {"arch": "topk", "k": 4, "auxk": True, "k_aux": 8},
    "batchtopk": {"arch": "batchtopk", "k": 4},
    "matryoshka": {"arch": "batchtopk", "k": 4, "matryoshka": (0.25, 1.0)},
    "relu": {"arch": "relu", "l1_coeff": 0.01},
    "jumprelu": {"arch": "jumprelu", "l0_coeff": 0.01, "jumprelu_target_l0": 6},
}


def data(step: int) -> np.ndarray:
    rng = np.random.default_rng([5, step])
    atoms = np.random.default_rng(9).standard_normal((48, D))
    codes = rng.exponential(1.0, (BATCH, 48)) * (rng.random((BATCH, 48)) < 0.1)
    return codes @ atoms + 0.1 * rng.standard_normal((BATCH, D))


def run(name: str, ranks: Ranks) -> tuple[dict[str, np.ndarray], list[dict[str, float]]]:
    """`STEPS` steps of config `name` from the same start, this rank on its rows of each
    batch; some latents start dead so that AuxK acts."""
    cfg = SAEConfig(d=D, n_latents=N_LATENTS, seed=1, dead_after_tokens=BATCH, **CONFIGS[name])
    sae = SAE.create(cfg).to(torch.float64)
    sae.init_from_sample(torch.from_numpy(np.concatenate([data(100), data(101)])))
    sae.tokens_since_fired[: N_LATENTS // 4] = 10 * BATCH
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    logs = []
    for step in range(STEPS):
        x = data(step)
        lo, hi = (BATCH * r // ranks.world for r in (ranks.rank, ranks.rank + 1))
        out = sae.train_step(opt, torch.from_numpy(x[lo:hi]), ranks=ranks)
        logs.append(out.metrics())
    return {k: v.double().numpy() for k, v in sae.state_dict().items()}, logs


def main() -> None:
    ranks = current()
    result = {}
    for name in CONFIGS:
        weights, logs = run(name, ranks)
        result |= {f"{name}/{k}": v for k, v in weights.items()}
        for key in logs[0]:
            result[f"{name}/log/{key}"] = np.array([m[key] for m in logs])
    if ranks.main:
        np.savez(sys.argv[1], **result)


if __name__ == "__main__":
    main()
