"""Sparse autoencoders: ReLU, TopK, BatchTopK, JumpReLU (+ Matryoshka, AuxK), checkpoints.

    from visae.sae import SAE, SAEConfig
    sae = SAE.create(SAEConfig(arch="topk", d=384, n_latents=6144, k=32))
    sae.init_from_sample(sample)                     # normalisation, b_dec, data-driven state
    out = sae.train_step(optimizer, batch)           # or sae.loss(batch) for a custom loop
    sae.save("runs/sae"); SAE.load("runs/sae")

See docs/sae.md for the full API and the training step's contract.
"""

from visae.sae.checkpoint import SCHEMA_VERSION
from visae.sae.config import SAEConfig, architectures_using
from visae.sae.jumprelu import JumpReLUSAE
from visae.sae.model import SAE, LossOutput
from visae.sae.registry import ARCHS, Registry
from visae.sae.relu import ReLUSAE
from visae.sae.stats import geometric_median, normalization_from_sample
from visae.sae.topk import BatchTopKSAE, TopKSAE

# Snapshots of the registry once every built-in architecture is defined (ARCHS.names() is live).
ARCHITECTURES = ARCHS.names()
TOPK_FAMILY = architectures_using("k")

__all__ = [
    "ARCHITECTURES",
    "ARCHS",
    "SAE",
    "SCHEMA_VERSION",
    "TOPK_FAMILY",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "LossOutput",
    "ReLUSAE",
    "Registry",
    "SAEConfig",
    "TopKSAE",
    "architectures_using",
    "geometric_median",
    "normalization_from_sample",
]
