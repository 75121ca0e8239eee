"""Image-level codes of a code source (a trained SAE, its untrained twin, random activations)
from one ordered pass over a store, in memory bounded by the codes that fire.

Per image and latent the pass keeps, over the image's patch tokens, the max, the sum, the sum
of squares and the number of patches where the latent fires (all four share one sparsity
pattern: the latents that fire somewhere on the image), and for a CLS SAE the CLS token's code.
For the images chosen for patch-level scores it also keeps which latents fire on each patch.
The layer's raw neurons (max over patches, or the CLS token) come from the same pass.

Baselines (Klotz et al.): `frozen_twin` is an SAE of the same architecture, width and
sparsity, randomly initialised (seed + 1) and given only the data-driven initialisation a
training run starts from (normalisation, b_dec, thresholds), never trained; `RandomCodes`
draws Gaussian pre-activations for every token and keeps the top k, k being the SAE's (or,
for an SAE without a fixed k, its mean L0 rounded), so the codes have the SAE's sparsity and no
relation to the images.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from visae.atomic import write_bytes
from visae.backbones.identity import weights_sha256
from visae.errors import VisaeError

if TYPE_CHECKING:
    from visae.sae import SAE
    from visae.store import ActivationStore

CODES_FORMAT = "visae.eval-codes/1"
AGGREGATES = ("max", "mean", "fraction")
INIT_SAMPLE_TOKENS = 32_768


class CodeSource(Protocol):
    """What the pass needs: per-token sparse codes, `(values [T, m], latents [T, m])`, value 0
    marking padding (as `SAE.encode_sparse` returns them)."""

    n_latents: int

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class SAECodes:
    """An SAE as a code source, named by its weights."""

    def __init__(self, sae: SAE, label: str) -> None:
        self.sae = sae
        self.n_latents = int(sae.cfg.n_latents)
        self.label = label
        self.identity = f"sae:{weights_sha256(sae)}"

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sae.encode_sparse(x)


class RandomCodes:
    """Gaussian pre-activations through a top-k: codes with a fixed sparsity and no relation to
    the input. The draw of a batch depends on (seed, the batch's first image) only."""

    def __init__(self, n_latents: int, k: int, seed: int = 0) -> None:
        if not 1 <= k <= n_latents:
            raise VisaeError(f"random codes need 1 <= k <= n_latents, got k={k}, {n_latents}")
        self.n_latents, self.k, self.seed = int(n_latents), int(k), int(seed)
        self.label = "random"
        self.identity = f"random:{self.n_latents}:{self.k}:{self.seed}"
        self._generator = torch.Generator()

    def reseed(self, first_image: int) -> None:
        self._generator.manual_seed(self.seed * 1_000_003 + first_image)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top k of n iid Gaussians without drawing all n: their positions are a uniform
        k-subset, and their values the top order statistics, which Renyi's representation
        gives from k uniforms: U_(n) = V_1^(1/n), U_(n-i) = U_(n-i+1) V_(i+1)^(1/(n-i))."""
        t, n, k, g = x.shape[0], self.n_latents, self.k, self._generator
        latents = torch.randint(n, (t, k), generator=g)
        while True:  # rows with a repeated latent are drawn again (~k^2 / 2n of them)
            ordered = latents.sort(dim=1).values
            bad = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1).nonzero().squeeze(1)
            if not len(bad):
                break
            latents[bad] = torch.randint(n, (len(bad), k), generator=g)
        exponents = 1.0 / torch.arange(n, n - k, -1, dtype=torch.float64)
        v = torch.rand((t, k), generator=g, dtype=torch.float64).clamp_(min=1e-300)
        u = torch.exp(torch.cumsum(torch.log(v) * exponents, dim=1))
        values = torch.special.ndtri(u).float()
        return values.clamp_(min=0).to(x.device), latents.to(x.device)


def frozen_twin(sae: SAE, store: ActivationStore, layer: int, tokens: str, seed: int = 0) -> SAE:
    """The untrained baseline: same config, another seed, the data-driven initialisation of a
    fresh training run (from a uniform token sample of the store), no training step."""
    from visae.sae import SAE

    twin = SAE.create(replace(sae.cfg, seed=sae.cfg.seed + 1))
    twin.init_from_sample(store.sample_tokens(layer, tokens, INIT_SAMPLE_TOKENS, seed))
    return twin.eval()


@dataclass(frozen=True)
class ImageCodes:
    """Image-level codes of one source over `images` (store indices, ascending).

    `pattern` is a CSR [N, L] whose entries are the latents firing somewhere on each image;
    `max`, `sum`, `sumsq` (float32) and `count` (patches firing) are its data arrays. For a
    CLS SAE the "patch" is the CLS token (`n_patches` 1). `patch_fire` is CSR bool
    [len(patch_images) * n_patches, L] (rows image-major), None without patch-level images.
    `raw` is [N, d] float32: the layer's neurons, max over patches (or the CLS token).
    """

    label: str
    images: np.ndarray
    n_latents: int
    n_patches: int
    tokens: str
    indptr: np.ndarray
    indices: np.ndarray
    max: np.ndarray
    sum: np.ndarray
    sumsq: np.ndarray
    count: np.ndarray
    patch_images: np.ndarray
    patch_fire: sp.csr_matrix | None
    raw: np.ndarray | None

    def _csr(self, data: np.ndarray) -> sp.csr_matrix:
        """A matrix of its own: scipy shares the arrays it is built from, and an in-place
        operation on it (eliminate_zeros) would otherwise rewrite these codes."""
        shape = (len(self.images), self.n_latents)
        return sp.csr_matrix((data.copy(), self.indices.copy(), self.indptr.copy()), shape=shape)

    def aggregate(self, how: str = "max") -> sp.csr_matrix:
        """[N, L] continuous image activations: "max" or "mean" over patches, or "fraction" of
        the patches where the latent fires."""
        if how == "max":
            return self._csr(self.max)
        if how == "mean":
            return self._csr(self.sum / np.float32(self.n_patches))
        if how == "fraction":
            return self._csr(self.count.astype(np.float32) / np.float32(self.n_patches))
        raise VisaeError(f"unknown image aggregate {how!r}: one of {', '.join(AGGREGATES)}")

    def subset(self, rows: np.ndarray) -> ImageCodes:
        """The image-level codes of some rows (indices into `images`); per-patch codes kept."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        lengths = stops - starts
        indptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        entries = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return replace(
            self,
            images=self.images[rows],
            indptr=indptr,
            indices=self.indices[entries],
            max=self.max[entries],
            sum=self.sum[entries],
            sumsq=self.sumsq[entries],
            count=self.count[entries],
            raw=None if self.raw is None else self.raw[rows],
        )

    def sums(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """Per image the sum and the sum of squares of each latent's patch activations."""
        return self._csr(self.sum), self._csr(self.sumsq)

    def frequency(self) -> np.ndarray:
        """[L] fraction of the images on which each latent fires somewhere."""
        counts = np.bincount(self.indices, minlength=self.n_latents)
        return counts / max(1, len(self.images))

    def top_images(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each latent's k images of highest max activation: (rows into `images` [L, k], -1
        past the images where it fires; their values [L, k], 0 there), ties to the lower row."""
        csc = self.aggregate("max").tocsc()
        top = np.full((self.n_latents, k), -1, dtype=np.int64)
        vals = np.zeros((self.n_latents, k), dtype=np.float32)
        for j in range(self.n_latents):
            lo, hi = csc.indptr[j], csc.indptr[j + 1]
            if lo == hi:
                continue
            rows, v = csc.indices[lo:hi], csc.data[lo:hi]
            order = np.lexsort((rows, -v))[:k]
            top[j, : len(order)] = rows[order]
            vals[j, : len(order)] = v[order]
        return top, vals

    def binary(self, rule: str, reference: ImageCodes | None = None) -> sp.csr_matrix:
        """[N, L] bool image-level codes under a rule (see `parse_rule`); a quantile rule's
        per-latent thresholds come from `reference` (default: these codes), so that codes of
        other images (pairs) are cut where the scored images' were."""
        kind, param = parse_rule(rule)
        if kind == "any":
            return self._csr(np.ones(len(self.indices), bool))
        if kind == "fraction":
            on = self.count.astype(np.float64) / self.n_patches >= param
            return _keep(self._csr(on))
        thresholds = (reference or self).quantile_thresholds(param)
        return _keep(self._csr(self.max > thresholds[self.indices]))

    def quantile_thresholds(self, q: float) -> np.ndarray:
        """[L] each latent's q-quantile of its max activation over these images, zeros
        included (the value of rank floor(q N) in ascending order): rare latents get 0."""
        csc = self.aggregate("max").tocsc()
        n = len(self.images)
        rank = int(np.floor(q * n))
        out = np.zeros(self.n_latents, np.float32)
        for j in range(self.n_latents):
            lo, hi = csc.indptr[j], csc.indptr[j + 1]
            zeros = n - (hi - lo)
            if rank >= zeros:
                out[j] = np.partition(csc.data[lo:hi], rank - zeros)[rank - zeros]
        return out

    def patch_region_codes(self, rows: np.ndarray, region_RP: np.ndarray) -> sp.csr_matrix:
        """[R, L] bool: which latents fire on some patch of a region, per (patch image row,
        [P] bool region) pair."""
        if self.patch_fire is None:
            raise VisaeError("these codes keep no per-patch codes (no patch-level images)")
        pos = {int(img): r for r, img in enumerate(self.patch_images)}
        out_rows = []
        for image, region in zip(rows, region_RP, strict=True):
            r = pos.get(int(image))
            if r is None:
                raise VisaeError(f"store image {int(image)} has no per-patch codes kept")
            block = self.patch_fire[r * self.n_patches : (r + 1) * self.n_patches]
            out_rows.append(sp.csr_matrix(block[np.flatnonzero(region)].sum(axis=0) > 0))
        return sp.vstack(out_rows, format="csr") if out_rows else sp.csr_matrix((0, self.n_latents))

    # ----- cache --------------------------------------------------------------------------
    def save(self, path: Path, key: str) -> None:
        arrays: dict[str, Any] = {
            name: getattr(self, name)
            for name in ("images", "indptr", "indices", "max", "sum", "sumsq", "count")
        }
        arrays["patch_images"] = self.patch_images
        if self.patch_fire is not None:
            arrays["patch_indptr"] = self.patch_fire.indptr
            arrays["patch_indices"] = self.patch_fire.indices
        if self.raw is not None:
            arrays["raw"] = self.raw
        meta = {
            "format": CODES_FORMAT,
            "key": key,
            "label": self.label,
            "n_latents": self.n_latents,
            "n_patches": self.n_patches,
            "tokens": self.tokens,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path, key: str) -> ImageCodes | None:
        """The cached codes at `path` if they were made under `key`, else None."""
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("format") != CODES_FORMAT or meta.get("key") != key:
                return None
            patch_images = z["patch_images"]
            fire = None
            if "patch_indptr" in z:
                indices = z["patch_indices"]
                fire = sp.csr_matrix(
                    (np.ones(len(indices), bool), indices, z["patch_indptr"]),
                    shape=(len(patch_images) * meta["n_patches"], meta["n_latents"]),
                )
            return cls(
                label=meta["label"],
                images=z["images"],
                n_latents=meta["n_latents"],
                n_patches=meta["n_patches"],
                tokens=meta["tokens"],
                indptr=z["indptr"],
                indices=z["indices"],
                max=z["max"],
                sum=z["sum"],
                sumsq=z["sumsq"],
                count=z["count"],
                patch_images=patch_images,
                patch_fire=fire,
                raw=z.get("raw"),
            )


def _keep(m: sp.csr_matrix) -> sp.csr_matrix:
    m.eliminate_zeros()
    return m


def parse_rule(rule: str) -> tuple[str, float]:
    """Image-level binary rules: `any` (fires on some patch: the published rule, which
    saturates on patch SAEs), `fraction:F` (fires on at least a fraction F of the patches),
    `quantile:Q` (max over patches above the latent's Q-quantile over the images, zeros
    included, so a latent is on for at most a fraction 1 - Q of the images)."""
    kind, _, value = rule.partition(":")
    if kind == "any" and not value:
        return "any", 0.0
    if kind in ("fraction", "quantile"):
        try:
            param = float(value)
        except ValueError:
            param = -1.0
        if 0.0 < param < 1.0 or (kind == "fraction" and param == 1.0):
            return kind, param
    raise VisaeError(
        f"image rule {rule!r}: expected any, fraction:F (0 < F <= 1) or quantile:Q (0 < Q < 1)"
    )


def codes_key(source: Any, store: ActivationStore, layer: int, tokens: str, **extra: Any) -> str:
    """Identity of a pass: the source, the store's data, the layer, tokens and image sets."""
    h = hashlib.sha256()
    data = {k: v for k, v in store.identity().items() if k != "path"}  # a moved store is the same
    h.update(json.dumps([CODES_FORMAT, source.identity, data, layer, tokens]).encode())
    for name in sorted(extra):
        value = extra[name]
        h.update(name.encode())
        h.update(
            np.ascontiguousarray(value).tobytes()
            if isinstance(value, np.ndarray)
            else json.dumps(value).encode()
        )
    return h.hexdigest()


def image_codes(
    source: SAECodes | RandomCodes,
    store: ActivationStore,
    layer: int,
    *,
    tokens: str,
    images: np.ndarray,
    patch_images: np.ndarray | None = None,
    raw: bool = False,
    batch_images: int = 32,
    encode_tokens: int = 8192,
    device: str = "cpu",
    progress: bool = True,
) -> ImageCodes:
    """One ordered pass over `images` through `source` (module docstring)."""
    if tokens not in ("patch", "cls", "all"):
        raise VisaeError(f"tokens must be patch, cls or all, not {tokens!r}")
    kind = "cls" if tokens == "cls" else "patch"
    positions = store.token_positions(layer, kind)
    if not len(positions):
        raise VisaeError(f"store {store.path} layer {layer} holds no {kind} token")
    sl = slice(int(positions[0]), int(positions[-1]) + 1)
    n_patches = sl.stop - sl.start
    n_latents = source.n_latents
    images = np.unique(np.asarray(images, dtype=np.int64))
    patch_images = (
        np.zeros(0, np.int64) if patch_images is None or kind == "cls" else np.unique(patch_images)
    )
    keep_patch = np.isin(images, patch_images)
    if keep_patch.sum() != len(patch_images):
        raise VisaeError("patch-level images must be among the evaluated images")
    d = store.d(layer)
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("counts", "indices", "max", "sum", "sumsq", "count")
    }
    fire_indptr: list[np.ndarray] = [np.zeros(1, np.int64)]
    fire_indices: list[np.ndarray] = []
    fire_total = 0
    raw_rows: list[np.ndarray] = []
    bar = tqdm(total=len(images), unit="img", desc=f"codes ({source.label})", disable=not progress)
    with torch.inference_mode():
        for ids, acts in store.ordered(
            layer, tokens="all", batch_images=batch_images, images=images
        ):
            b = len(ids)
            x = torch.from_numpy(np.ascontiguousarray(acts[:, sl])).reshape(b * n_patches, d)
            if raw:
                raw_rows.append(acts[:, sl].max(axis=1).astype(np.float32))
            if isinstance(source, RandomCodes):
                source.reseed(int(ids[0]))
            vals, lats = _encode(source, x.to(device), encode_tokens)
            vals, lats = vals.float().cpu(), lats.long().cpu()
            on = vals > 0
            row = torch.arange(b * n_patches).unsqueeze(1).expand_as(lats)[on]
            lat, val = lats[on], vals[on]
            image = row // n_patches
            key = image * n_latents + lat
            uniq, inverse = torch.unique(key, return_inverse=True)
            m = len(uniq)
            mx = torch.zeros(m).scatter_reduce_(0, inverse, val, "amax", include_self=False)
            sm = torch.zeros(m, dtype=torch.float64).index_add_(0, inverse, val.double())
            sq = torch.zeros(m, dtype=torch.float64).index_add_(0, inverse, val.double() ** 2)
            ct = torch.zeros(m, dtype=torch.int32).index_add_(
                0, inverse, torch.ones_like(inverse, dtype=torch.int32)
            )
            parts["counts"].append(np.bincount((uniq // n_latents).numpy(), minlength=b))
            parts["indices"].append((uniq % n_latents).numpy().astype(np.int32))
            parts["max"].append(mx.numpy())
            parts["sum"].append(sm.float().numpy())
            parts["sumsq"].append(sq.float().numpy())
            parts["count"].append(ct.numpy())
            kept = np.flatnonzero(keep_patch[np.searchsorted(images, ids)])
            for r in kept:
                rows = slice(r * n_patches, (r + 1) * n_patches)
                pr_on = on[rows]
                per_row = pr_on.sum(1).numpy()
                cols = lats[rows][pr_on].numpy().astype(np.int32)
                # each patch's latents once, sorted (TopK rows hold distinct latents already)
                fire_indices.append(cols)
                fire_indptr.append(fire_total + np.cumsum(per_row))
                fire_total += int(per_row.sum())
            bar.update(b)
    bar.close()
    indptr = np.zeros(len(images) + 1, np.int64)
    np.cumsum(np.concatenate(parts["counts"]) if parts["counts"] else [], out=indptr[1:])
    fire = None
    if len(patch_images):
        indices = np.concatenate(fire_indices) if fire_indices else np.zeros(0, np.int32)
        fire = sp.csr_matrix(
            (np.ones(len(indices), bool), indices, np.concatenate(fire_indptr)),
            shape=(len(patch_images) * n_patches, n_latents),
        )
        fire.sum_duplicates()
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    return ImageCodes(
        label=source.label,
        images=images,
        n_latents=n_latents,
        n_patches=n_patches,
        tokens=tokens,
        indptr=indptr,
        indices=cat["indices"].astype(np.int32),
        max=cat["max"].astype(np.float32),
        sum=cat["sum"].astype(np.float32),
        sumsq=cat["sumsq"].astype(np.float32),
        count=cat["count"].astype(np.int32),
        patch_images=patch_images,
        patch_fire=fire,
        raw=np.concatenate(raw_rows) if raw_rows else None,
    )


def _encode(
    source: SAECodes | RandomCodes, x: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`source.encode_sparse` in chunks of tokens, rows padded to one width."""
    parts = [source.encode_sparse(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
    if len(parts) == 1:
        return parts[0]
    width = max(v.shape[1] for v, _ in parts)
    pad = torch.nn.functional.pad
    return (
        torch.cat([pad(v, (0, width - v.shape[1])) for v, _ in parts]),
        torch.cat([pad(i, (0, width - i.shape[1])) for _, i in parts]),
    )


def mean_l0(codes: ImageCodes) -> float:
    """Mean active latents per token over the pass."""
    return float(codes.count.sum()) / max(1, len(codes.images) * codes.n_patches)


def cached_codes(path: Path, key: str, make: Any, progress: bool = True) -> tuple[ImageCodes, bool]:
    """The codes cached at `path` under `key`, else `make()` written there: (codes, cached)."""
    found = ImageCodes.load(path, key)
    if found is not None:
        return found, True
    codes = make()
    codes.save(path, key)
    return codes, False


def sequence_hash(values: Sequence[int] | np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()
