"""The `SAE` interface shared by every architecture, and what all of them have in common.

Every SAE works in a normalised input space, (x - mean) / scale, with the statistics stored in
the SAE itself: callers feed raw activations and get raw-space reconstructions back, and a
checkpoint can never be separated from the statistics it was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from visae.dist import Ranks
from visae.errors import VisaeError
from visae.sae.checkpoint import (
    WEIGHTS_NAME,
    CheckpointContents,
    read_checkpoint,
    write_checkpoint,
)
from visae.sae.config import SAEConfig
from visae.sae.registry import ARCHS
from visae.sae.sparse import SparseCodes, bag_sum
from visae.sae.stats import as_tensor, geometric_median, normalization_from_sample

# Tokens per chunk when a whole sample is pushed through the encoder (init_from_sample): bounds
# the [chunk, n_latents] pre-activations to ~100 MB at 6,144 latents.
SAMPLE_CHUNK = 4096

# One process: the batch is all there is.
LOCAL = Ranks()


@dataclass
class LossOutput:
    """One training batch's objective and what to log about it.

    `loss` is the tensor to back-propagate; the other tensors are detached parts of it
    (`recon`: reconstruction, averaged over Matryoshka prefixes when used; `sparsity`: the
    scaled L1/L0 penalty; `auxk`: the unweighted AuxK loss). Under data parallelism each rank
    holds its share of every batch quantity (its tokens' terms over the whole batch's token
    count), and `reduced` sums the shares into the batch's values.

    `extra` holds further batch quantities (shares, like `recon`), `state` what the SAE's
    state says after the batch (the same on every rank), `moments` the sums of x and of
    |x|^2 over the rank's tokens (for the NMSE), `n_batch` the batch's token count.
    """

    loss: Tensor
    recon: Tensor
    sparsity: Tensor
    auxk: Tensor
    l0: float
    dead_fraction: float
    moments: Tensor
    n_batch: int
    extra: dict[str, float] = field(default_factory=dict)
    state: dict[str, float] = field(default_factory=dict)
    mse: float = float("nan")

    @property
    def nmse(self) -> float:
        """SSE / SSE of predicting the batch mean = mse / mean per-dimension variance; the
        variance is E[x^2] - E[x]^2 per dimension, in float64."""
        d = self.moments.numel() - 1
        mean = self.moments[:d] / self.n_batch
        variance = float(self.moments[d]) / (self.n_batch * d) - float(mean.square().mean())
        return self.mse / variance if variance > 0 else float("nan")

    def reduced(self, ranks: Ranks) -> LossOutput:
        """The batch's values from every rank's shares (one all-reduce); itself on one rank."""
        if not ranks.distributed:
            return self
        head = torch.stack([self.loss.detach(), self.recon, self.sparsity, self.auxk]).double()
        tail = torch.tensor([self.l0, self.mse, *self.extra.values()], dtype=torch.float64)
        flat = ranks.all_sum(torch.cat([head.cpu(), tail, self.moments.cpu()]))
        n_extra = len(self.extra)
        loss, recon, sparsity, auxk, l0, mse = flat[:6].tolist()
        extras = flat[6 : 6 + n_extra].tolist()
        as_tensor = partial(torch.tensor, dtype=torch.float64)
        return LossOutput(
            as_tensor(loss),
            as_tensor(recon),
            as_tensor(sparsity),
            as_tensor(auxk),
            l0,
            self.dead_fraction,
            flat[6 + n_extra :],
            self.n_batch,
            dict(zip(self.extra, extras, strict=True)),
            dict(self.state),
            mse,
        )

    def metrics(self) -> dict[str, float]:
        """Plain floats for a JSON-lines log."""
        return {
            "loss": float(self.loss.detach()),
            "recon": float(self.recon),
            "sparsity": float(self.sparsity),
            "auxk": float(self.auxk),
            "l0": self.l0,
            "nmse": self.nmse,
            "dead_fraction": self.dead_fraction,
            **self.extra,
            **self.state,
        }


class SAE(nn.Module):
    """Sparse autoencoder: `encode`, `decode`, `forward -> (x_hat, codes, aux)`, `loss`.

    Create with `SAE.create(cfg)` or `SAE.load(path_or_repo_id)`; the subclass is chosen by
    `cfg.arch`. Parameters: W_enc [n_latents, d] (rows are encoder directions), b_enc, W_dec
    [n_latents, d] (rows are dictionary atoms), b_dec [d].

    A subclass that sets `arch` is registered under that name in `visae.sae.registry.ARCHS`
    (a name already taken is refused); `uses` lists the `SAEConfig` fields it reads beyond the
    common ones, which is what `SAEConfig.validate` checks options against.
    """

    arch: ClassVar[str] = ""
    uses: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "arch" in cls.__dict__ and cls.arch:
            ARCHS.register(cls.arch, cls)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if type(self).arch != cfg.arch:
            raise VisaeError(f"{type(self).__name__} cannot hold an SAE of arch={cfg.arch!r}")
        self.cfg = cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        atoms = torch.randn(cfg.n_latents, cfg.d, generator=generator)
        atoms /= torch.linalg.vector_norm(atoms, dim=1, keepdim=True)
        self.W_dec = nn.Parameter(atoms)
        # Encoder initialised as the decoder's transpose (same [n_latents, d] layout here).
        self.W_enc = nn.Parameter(atoms.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d))
        # Normalisation and token count live in config.json, not in the tensor file.
        self.register_buffer("norm_mean", torch.zeros(cfg.d), persistent=False)
        self.register_buffer("norm_scale", torch.ones(()), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.n_latents, dtype=torch.int64))
        self.checkpoint_info: dict[str, Any] = {}

    # ----------------------------------------------------------------- construction, I/O
    @staticmethod
    def create(cfg: SAEConfig) -> SAE:
        """A freshly initialised SAE of architecture `cfg.arch`."""
        sae: SAE = ARCHS.get(cfg.arch)(cfg)
        return sae

    @staticmethod
    def load(
        path_or_repo_id: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> SAE:
        """Load a checkpoint directory, a Hugging Face hub repo holding one (when online), or a
        published SAE by name (`visae sae list`: downloaded and converted once)."""
        from visae.sae.published import PUBLISHED, fetch

        if str(path_or_repo_id) in PUBLISHED:
            path_or_repo_id = fetch(str(path_or_repo_id))
        contents = read_checkpoint(
            path_or_repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        return SAE._from_contents(contents)

    @staticmethod
    def _from_contents(contents: CheckpointContents) -> SAE:
        """Build the SAE a checkpoint describes, refusing tensors that do not fit it."""
        cfg, tensors = contents.cfg, contents.tensors
        weights_path = Path(contents.info.get("path", ".")) / WEIGHTS_NAME
        sae = SAE.create(cfg)
        expected = sae.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise VisaeError(
                f"{weights_path} does not match a {cfg.arch} SAE: "
                f"missing {missing}, unexpected {unexpected}"
            )
        for name, reference in expected.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(reference.shape):
                raise VisaeError(
                    f"{weights_path}: {name} has shape {tuple(tensor.shape)} but config.json "
                    f"says d={cfg.d}, n_latents={cfg.n_latents} "
                    f"(expected {tuple(reference.shape)})"
                )
        sae.to(tensors["W_enc"].dtype)
        sae.load_state_dict(tensors, strict=True)
        if len(contents.norm_mean) != cfg.d:
            raise VisaeError(
                f"{weights_path.parent}: normalization mean has {len(contents.norm_mean)} "
                f"values, expected d={cfg.d}"
            )
        sae.set_normalization(
            torch.tensor(contents.norm_mean, dtype=sae.W_enc.dtype), contents.norm_scale
        )
        sae.tokens_seen.fill_(contents.tokens_seen)
        sae.checkpoint_info = dict(contents.info)
        return sae

    def save(
        self,
        path: str | Path,
        *,
        store: dict[str, Any] | None = None,
        layer: int | None = None,
        **metadata: Any,
    ) -> Path:
        """Write `config.json` + `model.safetensors` as directory `path`, swapped in whole.

        `store` is the activation store's identity and `layer` the layer trained on; any other
        JSON-serialisable keyword lands under "metadata". A folder at `path` holding anything
        but a checkpoint's files is refused.
        """
        return write_checkpoint(
            Path(path),
            cfg=self.cfg,
            tensors=dict(self.state_dict()),
            norm_mean=self.norm_mean.tolist(),
            norm_scale=float(self.norm_scale),
            tokens_seen=int(self.tokens_seen),
            store=store,
            layer=layer,
            metadata=metadata,
        )

    # ----------------------------------------------------------------- normalisation, init
    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def d(self) -> int:
        return self.cfg.d

    def set_normalization(self, mean: Tensor | np.ndarray, scale: float) -> None:
        """Store the input statistics (see `normalization_from_sample`)."""
        mean_t = torch.as_tensor(mean)
        if tuple(mean_t.shape) != (self.d,):
            raise VisaeError(
                f"normalisation mean has shape {tuple(mean_t.shape)}, expected ({self.d},)"
            )
        if not bool(torch.isfinite(mean_t).all()):
            raise VisaeError("normalisation mean contains non-finite values")
        if not (math.isfinite(float(scale)) and float(scale) > 0):
            raise VisaeError(f"normalisation scale must be a finite number > 0, got {scale}")
        with torch.no_grad():
            self.norm_mean.copy_(mean_t)
            self.norm_scale.fill_(float(scale))

    def normalize(self, x: Tensor | np.ndarray) -> Tensor:
        """Raw activations [N, d] -> the SAE's input space, in the parameters' dtype."""
        x_t = torch.as_tensor(x, device=self.W_dec.device)
        if x_t.ndim != 2 or x_t.shape[1] != self.d:
            raise VisaeError(f"SAE input must be [tokens, {self.d}], got shape {tuple(x_t.shape)}")
        return (x_t.to(self.W_dec.dtype) - self.norm_mean) / self.norm_scale

    def denormalize(self, x_norm: Tensor) -> Tensor:
        """The SAE's input space -> raw activation space."""
        return x_norm * self.norm_scale + self.norm_mean

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor | np.ndarray) -> None:
        """b_dec from a raw sample (normalised first): its mean or geometric median."""
        x_norm = self.normalize(as_tensor(sample, "b_dec sample"))
        if self.cfg.b_dec_init == "mean":
            center = x_norm.double().mean(dim=0)
        else:
            center = geometric_median(x_norm.double())
        self.b_dec.copy_(center.to(self.b_dec.dtype))

    @torch.no_grad()
    def init_from_sample(self, sample: Tensor | np.ndarray) -> None:
        """Every data-dependent initialisation, from raw activations [N, d] drawn uniformly
        from the training tokens: the input normalisation, b_dec, then what the architecture
        derives from the data (JumpReLU's thresholds, BatchTopK's inference threshold).

        Call it once on a fresh SAE, before training; the sample may live on any device.
        """
        sample_t = as_tensor(sample, "initialisation sample")
        if sample_t.shape[1] != self.d:
            raise VisaeError(
                f"initialisation sample must be [tokens, {self.d}], "
                f"got shape {tuple(sample_t.shape)}"
            )
        self.set_normalization(*normalization_from_sample(sample_t))
        self.init_b_dec(sample_t)
        self._init_from_data(sample_t)

    def _init_from_data(self, sample: Tensor) -> None:
        """Architecture-specific initialisation from the raw sample, once the normalisation and
        b_dec are set (nothing for the plain architectures)."""

    def _sample_chunks(self, sample: Tensor) -> Iterator[Tensor]:
        """The sample in normalised chunks of `SAMPLE_CHUNK` tokens, on the SAE's device."""
        for start in range(0, sample.shape[0], SAMPLE_CHUNK):
            yield self.normalize(sample[start : start + SAMPLE_CHUNK])

    # ----------------------------------------------------------------- the interface
    def encode(self, x: Tensor | np.ndarray) -> Tensor:
        """Raw activations [N, d] -> codes [N, n_latents] (inference rule), all >= 0 but for a
        signed TopK's."""
        codes, values = self._encode_sparse_codes(self.normalize(x))
        return codes.to_dense(values)

    def decode(self, codes: Tensor | np.ndarray) -> Tensor:
        """Codes [N, n_latents] (on any device) -> raw-space reconstruction [N, d]."""
        codes_t = torch.as_tensor(codes, device=self.W_dec.device)
        if codes_t.ndim != 2 or codes_t.shape[1] != self.n_latents:
            raise VisaeError(
                f"codes must be [tokens, {self.n_latents}], got shape {tuple(codes_t.shape)}"
            )
        return self.denormalize(codes_t.to(self.W_dec.dtype) @ self.W_dec + self.b_dec)

    def decode_sparse(self, values: Tensor | np.ndarray, indices: Tensor | np.ndarray) -> Tensor:
        """Codes given as ([N, m] values, [N, m] latent indices) -> raw reconstruction [N, d]."""
        values = torch.as_tensor(values, device=self.W_dec.device)
        indices = torch.as_tensor(indices, device=self.W_dec.device)
        if values.shape != indices.shape or values.ndim != 2:
            raise VisaeError(
                f"values {tuple(values.shape)} and indices {tuple(indices.shape)} "
                "must both be [N, m]"
            )
        n_rows, width = values.shape
        ptr = (
            torch.arange(0, n_rows * width + 1, width, device=values.device)
            if width
            else (torch.zeros(n_rows + 1, dtype=torch.int64, device=values.device))
        )
        summed = bag_sum(self.W_dec, indices.reshape(-1).long(), ptr, values.reshape(-1))
        return self.denormalize(summed + self.b_dec)

    def forward(self, x: Tensor | np.ndarray) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(raw reconstruction [N, d], codes [N, n_latents], aux) with aux["l0"] per token."""
        codes, values = self._encode_sparse_codes(self.normalize(x))
        x_hat = self.denormalize(self._decode_codes(codes, values) + self.b_dec)
        l0 = codes.crow[1:] - codes.crow[:-1]
        return x_hat, codes.to_dense(values), {"l0": l0}

    def encode_sparse(self, x: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """([N, m] values, [N, m] indices) of each token's active latents, largest first.

        m is k for TopK and the largest count in the batch otherwise; rows with fewer active
        latents are padded with value 0 (index 0), which decodes to nothing.
        """
        codes, values = self._encode_sparse_codes(self.normalize(x))
        return pad_rows(codes, values)

    def loss(
        self,
        x: Tensor | np.ndarray,
        *,
        sparsity_scale: float = 1.0,
        update_state: bool | None = None,
        ranks: Ranks = LOCAL,
    ) -> LossOutput:
        """The training objective on a raw batch [B, d].

        `sparsity_scale` multiplies the L1/L0 penalty (for a warm-up; the TopK family has none).
        With `update_state` (default: `self.training`) the batch counts as training data: it
        advances `tokens_seen`, the dead-latent counters and BatchTopK's threshold. With the
        `ranks` of a data-parallel job, `x` is this rank's part of the batch: the loss is its
        share of the whole batch's, and every batch-wide rule (the means, AuxK's token count,
        BatchTopK's selection, the dead-latent counters) sees the whole batch.
        """
        x_norm = self.normalize(x)
        n_batch = int(ranks.all_sum(torch.tensor(x_norm.shape[0])))
        if n_batch == 0:
            raise VisaeError("cannot compute the SAE loss of an empty batch")
        update = self.training if update_state is None else update_state
        return self._loss(x_norm, float(sparsity_scale), update, WholeBatch(n_batch, ranks))

    def train_step(
        self,
        optimizer: torch.optim.Optimizer,
        x: Tensor | np.ndarray,
        *,
        sparsity_scale: float = 1.0,
        ranks: Ranks = LOCAL,
    ) -> LossOutput:
        """One complete optimisation step, in the only correct order.

        zero grads -> loss -> backward -> (data-parallel: sum the ranks' gradients) -> remove
        the decoder-parallel gradient -> optimizer step -> renormalise decoder rows. Every rank
        then takes the same step from the same gradient, so the replicas stay equal. Returns
        the whole batch's loss and metrics.
        """
        optimizer.zero_grad(set_to_none=True)
        out = self.loss(x, sparsity_scale=sparsity_scale, update_state=True, ranks=ranks)
        out.loss.backward()
        if ranks.distributed:
            self._sum_gradients(ranks)
        self.remove_parallel_decoder_grad()
        optimizer.step()
        self.after_optimizer_step()
        return out.reduced(ranks)

    @torch.no_grad()
    def _sum_gradients(self, ranks: Ranks) -> None:
        """Each parameter's gradient summed over ranks, in one all-reduce of one buffer (a
        parameter no rank's loss reached keeps no gradient, as in one process)."""
        params = list(self.parameters())
        reached = torch.tensor([p.grad is not None for p in params], dtype=torch.int64)
        reached = ranks.all_sum(reached.to(self.W_dec.device)) > 0
        params = [p for p, r in zip(params, reached.tolist(), strict=True) if r]
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        flat = ranks.all_sum(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project W_dec's gradient onto each row's tangent space (call before the step)."""
        grad = self.W_dec.grad
        if not self.cfg.normalize_decoder or grad is None:
            return
        rows = self.W_dec.detach()
        norms = torch.linalg.vector_norm(rows, dim=1)
        coef = torch.linalg.vecdot(grad, rows) / norms.square().clamp_min(1e-30)
        grad.addcmul_(coef[:, None], rows, value=-1.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Put decoder rows back at unit norm (call after the step)."""
        if self.cfg.normalize_decoder:
            norms = torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True)
            self.W_dec /= norms.clamp_min(1e-12)

    def dead_mask(self) -> Tensor:
        """[n_latents] bool: latents that have not fired for `dead_after_tokens` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    # ----------------------------------------------------------------- for subclasses
    def _encode_sparse_codes(self, x_norm: Tensor) -> tuple[SparseCodes, Tensor]:
        """Inference codes of normalised inputs: entries and their (differentiable) values."""
        raise NotImplementedError

    def _decode_codes(self, codes: SparseCodes, values: Tensor) -> Tensor:
        """Reconstruction without b_dec, in normalised space."""
        return codes.to_dense(values) @ self.W_dec

    def _loss(
        self, x_norm: Tensor, sparsity_scale: float, update: bool, batch: WholeBatch
    ) -> LossOutput:
        raise NotImplementedError

    def _preacts(self, x_norm: Tensor) -> Tensor:
        """Dense pre-activations (x - b_dec) @ W_enc.T + b_enc, differentiable."""
        return torch.addmm(self.b_enc, x_norm - self.b_dec, self.W_enc.t())

    @torch.no_grad()
    def _record_batch(self, cols: Tensor, fired: Tensor, batch: WholeBatch) -> None:
        """Advance the token count and the dead-latent counters by one training batch (the
        whole batch, over every rank).

        `cols` are latent indices of code entries and `fired` says which entries are nonzero.
        """
        self.tokens_seen += batch.n
        self.tokens_since_fired += batch.n
        counts = torch.bincount(cols, weights=fired.to(torch.float32), minlength=self.n_latents)
        counts = batch.ranks.all_sum(counts)
        self.tokens_since_fired.masked_fill_(counts > 0, 0)

    def _output(
        self,
        loss: Tensor,
        recon: Tensor,
        sparsity: Tensor,
        auxk: Tensor,
        x_norm: Tensor,
        mse: Tensor,
        nnz: int,
        batch: WholeBatch,
        extra: dict[str, float] | None = None,
    ) -> LossOutput:
        """The rank's LossOutput: shares of the batch's quantities, with the moments of its
        tokens (`mse` is its share of the batch's mean squared error of x_hat)."""
        x = x_norm.detach().double()
        moments = torch.cat([x.sum(dim=0), x.square().sum().reshape(1)])
        return LossOutput(
            loss,
            recon.detach(),
            sparsity.detach(),
            auxk.detach(),
            nnz / batch.n,
            float(self.dead_mask().double().mean()),
            moments,
            batch.n,
            extra or {},
            self._state_metrics(),
            float(mse.detach()),
        )

    def _state_metrics(self) -> dict[str, float]:
        """What the SAE's state says after a batch (the same on every rank)."""
        return {}


@dataclass(frozen=True)
class WholeBatch:
    """The whole batch a rank holds a part of: its token count over every rank, and the ranks
    (one process: the rank's part is the batch)."""

    n: int
    ranks: Ranks

    def mean(self, per_token: Tensor) -> Tensor:
        """The rank's share of the batch mean of a per-token quantity: its tokens' sum over the
        batch's token count (the shares add up to the mean)."""
        return per_token.sum(dim=0) / self.n


def pad_rows(codes: SparseCodes, values: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Row-grouped entries -> ([N, m] values, [N, m] indices), largest value first per row.

    m is `width` when given (it must cover every row), else the largest count in the batch.
    """
    if width is None:
        counts = codes.crow[1:] - codes.crow[:-1]
        width = int(counts.max()) if codes.n_rows else 0
    out_values = values.new_zeros(codes.n_rows, width)
    out_index = torch.zeros(codes.n_rows, width, dtype=torch.int64, device=values.device)
    if codes.nnz:
        position = torch.arange(codes.nnz, device=values.device) - codes.crow[codes.rows]
        out_values = out_values.index_put((codes.rows, position), values)
        out_index[codes.rows, position] = codes.cols
    order = out_values.detach().argsort(dim=1, descending=True, stable=True)
    return out_values.gather(1, order), out_index.gather(1, order)
