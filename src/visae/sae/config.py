"""`SAEConfig`: the one description of an SAE, shared by CLI flags, config files and checkpoints."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from visae.errors import VisaeError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
TOPK_FAMILY = ("topk", "batchtopk")
B_DEC_INITS = ("mean", "geometric_median")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass
class SAEConfig:
    """Every hyperparameter of an SAE, validated on construction.

    Units: inputs are normalised inside the SAE (see `SAE.set_normalization`) so that the mean
    squared norm of a token is `d`; the reconstruction loss is the mean over tokens *and*
    dimensions of the squared error in that space (about the fraction of variance unexplained),
    and sparsity penalties are summed over latents and averaged over tokens. Coefficients
    therefore transfer between layers and backbones.
    """

    arch: str = "topk"
    d: int = 384
    n_latents: int = 6144
    # TopK / BatchTopK: active latents per token (BatchTopK: k * batch over the whole batch).
    k: int = 32
    # ReLU: L1 coefficient; `decoder_norm_l1` weights each code by its decoder row norm, which
    # only matters when `normalize_decoder` is off (with unit rows the weights are all 1).
    l1_coeff: float = 8e-4
    decoder_norm_l1: bool = False
    # JumpReLU: initial threshold, rectangle-kernel bandwidth of the straight-through estimator,
    # and the L0 penalty coefficient.
    jumprelu_threshold_init: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    l0_coeff: float = 1e-3
    # BatchTopK: EMA momentum of the inference threshold (min selected activation per batch).
    batchtopk_momentum: float = 0.99
    # Matryoshka (TopK family): nested dictionary prefixes as fractions of n_latents, last is 1.
    matryoshka: tuple[float, ...] | None = None
    # AuxK for dead latents (TopK family). None: on for the TopK family, off otherwise.
    auxk: bool | None = None
    k_aux: int = 512
    auxk_coeff: float = 1 / 32
    dead_after_tokens: int = 10_000_000
    # Decoder rows at unit norm (gradient component parallel to each row removed before a step).
    normalize_decoder: bool = True
    b_dec_init: str = "geometric_median"
    # Precision of the encoder's dense matmul: "float32" (the parameters' own precision) or
    # "bfloat16" (TopK family: bf16 selects the latents, their values are recomputed exactly).
    compute_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.matryoshka is not None:
            self.matryoshka = tuple(float(f) for f in self.matryoshka)
        if self.auxk is None:
            self.auxk = self.arch in TOPK_FAMILY
        self.validate()

    def validate(self) -> None:
        """Raise `VisaeError` naming the first bad field."""
        if self.arch not in ARCHITECTURES:
            raise VisaeError(
                f"unknown SAE architecture {self.arch!r}; expected one of {ARCHITECTURES}"
            )
        _positive_int("d", self.d)
        _positive_int("n_latents", self.n_latents)
        topk_family = self.arch in TOPK_FAMILY
        if topk_family and not 1 <= self.k <= self.n_latents:
            raise VisaeError(f"k={self.k} must be between 1 and n_latents={self.n_latents}")
        for name in ("l1_coeff", "l0_coeff", "auxk_coeff"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise VisaeError(f"{name}={value} must be a finite number >= 0")
        for name in ("jumprelu_threshold_init", "jumprelu_bandwidth"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise VisaeError(f"{name}={value} must be > 0")
        if not 0 <= self.batchtopk_momentum < 1:
            raise VisaeError(f"batchtopk_momentum={self.batchtopk_momentum} must be in [0, 1)")
        if self.matryoshka is not None:
            if not topk_family:
                raise VisaeError(
                    f"matryoshka is implemented for {TOPK_FAMILY}, not arch={self.arch!r}"
                )
            self.matryoshka_sizes()
        if self.auxk and not topk_family:
            raise VisaeError(f"auxk applies to {TOPK_FAMILY} only, not arch={self.arch!r}")
        _positive_int("k_aux", self.k_aux)
        _positive_int("dead_after_tokens", self.dead_after_tokens)
        if self.b_dec_init not in B_DEC_INITS:
            raise VisaeError(f"b_dec_init={self.b_dec_init!r} must be one of {B_DEC_INITS}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise VisaeError(
                f"compute_dtype={self.compute_dtype!r} must be one of {COMPUTE_DTYPES}"
            )
        if self.compute_dtype == "bfloat16" and not topk_family:
            raise VisaeError(f"compute_dtype='bfloat16' is implemented for {TOPK_FAMILY} only")
        if not isinstance(self.seed, int):
            raise VisaeError(f"seed={self.seed!r} must be an integer")

    def matryoshka_sizes(self) -> tuple[int, ...]:
        """Prefix sizes in latents (increasing, last = n_latents); () without Matryoshka."""
        if self.matryoshka is None:
            return ()
        fractions = self.matryoshka
        if not fractions or fractions[-1] != 1.0:
            raise VisaeError(f"matryoshka fractions {fractions} must end with 1")
        sizes = tuple(max(1, round(f * self.n_latents)) for f in fractions)
        if any(not 0 < f <= 1 for f in fractions) or any(
            b <= a for a, b in itertools.pairwise(sizes)
        ):
            raise VisaeError(
                f"matryoshka fractions {fractions} must be strictly increasing in (0, 1] and give "
                f"distinct prefix sizes of n_latents={self.n_latents} (got {sizes})"
            )
        return sizes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        if self.matryoshka is not None:
            out["matryoshka"] = list(self.matryoshka)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Inverse of `to_dict`; unknown keys are refused so a typo never goes unnoticed."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise VisaeError(f"unknown SAE config field(s): {', '.join(unknown)}")
        return cls(**data)


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise VisaeError(f"{name}={value!r} must be a positive integer")
