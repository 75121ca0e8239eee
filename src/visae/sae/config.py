"""`SAEConfig`: the one description of an SAE, shared by CLI flags, config files and checkpoints."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from visae.errors import VisaeError
from visae.sae.registry import ARCHS

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
    # TopK: keep the k largest pre-activations as they are, negative ones included, instead of
    # rectifying them (saev's TopK, imported faithfully; see visae.sae.convert).
    signed_topk: bool = False
    # ReLU: L1 coefficient; `decoder_norm_l1` weights each code by its decoder row norm, which
    # only matters when `normalize_decoder` is off (with unit rows the weights are all 1).
    l1_coeff: float = 8e-4
    decoder_norm_l1: bool = False
    # JumpReLU: the L0 it starts at (`SAE.init_from_sample` puts each latent's threshold at the
    # quantile of its pre-activations above which it fires on jumprelu_target_l0 / n_latents of
    # the tokens), the rectangle-kernel bandwidth of the straight-through estimator (in units of
    # the normalised pre-activations) and the L0 penalty coefficient.
    jumprelu_target_l0: int = 32
    jumprelu_bandwidth: float = 0.05
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
            self.auxk = "auxk" in ARCHS.get(self.arch).uses
        self.validate()

    def validate(self) -> None:
        """Raise `VisaeError` naming the first bad field.

        Options an architecture does not take (its class's `uses`) are refused when set away
        from their neutral value (Matryoshka, AuxK, bf16), so a sweep never silently ignores one.
        """
        uses = ARCHS.get(self.arch).uses
        _positive_int("d", self.d)
        _positive_int("n_latents", self.n_latents)
        if "k" in uses and not 1 <= self.k <= self.n_latents:
            raise VisaeError(f"k={self.k} must be between 1 and n_latents={self.n_latents}")
        for name in ("l1_coeff", "l0_coeff", "auxk_coeff"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise VisaeError(f"{name}={value} must be a finite number >= 0")
        if not (math.isfinite(self.jumprelu_bandwidth) and self.jumprelu_bandwidth > 0):
            raise VisaeError(f"jumprelu_bandwidth={self.jumprelu_bandwidth} must be > 0")
        _positive_int("jumprelu_target_l0", self.jumprelu_target_l0)
        if "jumprelu_target_l0" in uses and self.jumprelu_target_l0 >= self.n_latents:
            raise VisaeError(
                f"jumprelu_target_l0={self.jumprelu_target_l0} must be below "
                f"n_latents={self.n_latents}"
            )
        if not 0 <= self.batchtopk_momentum < 1:
            raise VisaeError(f"batchtopk_momentum={self.batchtopk_momentum} must be in [0, 1)")
        if self.matryoshka is not None:
            _refuse_unused("matryoshka", self.arch)
            self.matryoshka_sizes()
        if self.auxk:
            _refuse_unused("auxk", self.arch)
        if self.signed_topk:
            _refuse_unused("signed_topk", self.arch)
        _positive_int("k_aux", self.k_aux)
        _positive_int("dead_after_tokens", self.dead_after_tokens)
        if self.b_dec_init not in B_DEC_INITS:
            raise VisaeError(f"b_dec_init={self.b_dec_init!r} must be one of {B_DEC_INITS}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise VisaeError(
                f"compute_dtype={self.compute_dtype!r} must be one of {COMPUTE_DTYPES}"
            )
        if self.compute_dtype != "float32":
            _refuse_unused("compute_dtype", self.arch, f"compute_dtype={self.compute_dtype!r}")
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


def architectures_using(option: str) -> tuple[str, ...]:
    """The registered architectures that take `option` (a config field name)."""
    return tuple(name for name in ARCHS.names() if option in ARCHS.get(name).uses)


def _refuse_unused(option: str, arch: str, what: str | None = None) -> None:
    if option not in ARCHS.get(arch).uses:
        raise VisaeError(
            f"{what or option} is implemented for {architectures_using(option)}, not arch={arch!r}"
        )
