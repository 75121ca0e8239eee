"""Activation store readers: ordered reads, the shuffled training stream (uniform over the
store, every token once per epoch, exact resume) and uniform token samples."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import pytest
from store_helpers import tagged_store, token_ids

from visae.errors import VisaeError
from visae.store import ActivationStore
from visae.store.reader import _distinct

# scipy.stats.chi2.ppf(0.999, df): the statistic a uniform mix exceeds once in 1000 draws
CHI2_999 = {9: 27.877, 99: 148.23}


def chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    """1000 images written in class order (10 classes x 100), shards of 50: the layout of an
    ImageFolder. The class of every token is its vector's last component."""
    path = tmp_path_factory.mktemp("classes") / "s"
    tagged_store(path, "float16", [50] * 20, classes=[i // 100 for i in range(1000)])
    return ActivationStore.open(path)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_shuffled_every_token_exactly_once(tmp_path, dtype):
    sizes = [7, 7, 7, 5, 7, 3]
    tagged_store(tmp_path / "s", dtype, sizes)
    store = ActivationStore.open(tmp_path / "s")
    n_img = sum(sizes)
    for tokens, positions in (("patch", range(3, 9)), ("cls", [0]), ("all", range(9))):
        expected = sorted((i, t) for i in range(n_img) for t in positions)
        for batch, buffer_tokens, block in (
            (5, 10, 1),
            (64, 100, 4),
            (4096, 1 << 18, 1),
            (13, 1, 3),
        ):
            batches = list(
                store.shuffled(
                    2,
                    tokens,
                    batch_size=batch,
                    seed=3,
                    buffer_tokens=buffer_tokens,
                    block_images=block,
                )
            )
            assert all(len(b) == batch for b in batches[:-1]) and 0 < len(batches[-1]) <= batch
            ids = token_ids(batches)
            assert sorted(ids) == expected, (tokens, batch, buffer_tokens, block)


def test_shuffled_image_subset_exactly_once(tmp_path):
    sizes = [7, 7, 7, 5, 7, 3]
    tagged_store(tmp_path / "s", "float16", sizes)
    store = ActivationStore.open(tmp_path / "s")
    for subset in ([0, 1, 2, 3, 4, 5, 6], [3, 9, 10, 30, 35], [35], [9, 3, 3, 30], []):
        for block, buffer_tokens in ((1, 12), (2, 7)):
            batches = list(
                store.shuffled(
                    2,
                    "patch",
                    batch_size=4,
                    images=np.array(subset),
                    block_images=block,
                    buffer_tokens=buffer_tokens,
                )
            )
            if not subset:
                assert batches == []
                continue
            want = sorted((i, t) for i in set(subset) for t in range(3, 9))
            assert sorted(token_ids(batches)) == want
    with pytest.raises(VisaeError, match="image indices"):
        store.shuffled(2, "patch", images=np.array([36]))
    with pytest.raises(VisaeError, match="block_images must be positive"):
        store.shuffled(2, "patch", block_images=0)


def test_ordered_image_subset(tmp_path):
    tagged_store(tmp_path / "s", "float32", [7, 7, 5])
    store = ActivationStore.open(tmp_path / "s")
    subset = np.array([18, 0, 6, 7, 13])
    batches = list(store.ordered(2, "all", batch_images=2, images=subset))
    ids = np.concatenate([i for i, _ in batches])
    acts = np.concatenate([a for _, a in batches])
    assert ids.tolist() == [0, 6, 7, 13, 18] and [len(i) for i, _ in batches] == [2, 2, 1]
    assert np.array_equal(acts[:, :, 0], np.repeat(ids[:, None], 9, 1))
    assert np.array_equal(acts[:, :, 1], np.tile(np.arange(9), (5, 1)))


def test_shuffled_order_follows_seed_and_epoch_not_prefetch(tmp_path):
    tagged_store(tmp_path / "s", "float16", [8] * 10)
    store = ActivationStore.open(tmp_path / "s")

    def order(**kw: Any) -> list[tuple[int, int]]:
        return token_ids(list(store.shuffled(2, "patch", batch_size=32, buffer_tokens=150, **kw)))

    base = order(seed=0, epoch=0, prefetch=0)
    assert order(seed=0, epoch=0, prefetch=2) == base
    assert order(seed=0, epoch=0, prefetch=1) == base
    assert order(seed=0, epoch=1) != base
    assert order(seed=1, epoch=0) != base
    assert order(seed=0, epoch=0, block_images=2) != base
    assert sorted(order(seed=1, epoch=0)) == sorted(base)
    assert base[:32] != sorted(base[:32])
    with pytest.raises(VisaeError, match="seed must be a non-negative integer"):
        store.shuffled(2, "patch", seed=-1)


def test_batches_of_a_class_sorted_store_have_the_store_class_mix(class_sorted):
    """Each batch of 300 tokens is drawn from the whole store: its class counts pass a
    chi-square test against the store's mix (10% per class). A reader that fills its buffer
    from a few consecutive shards gives batches of a few classes (statistics in the
    hundreds)."""
    stats = []
    for seed in range(3):
        for batch in class_sorted.shuffled(
            2, "patch", batch_size=300, seed=seed, buffer_tokens=3000, prefetch=0
        ):
            if len(batch) == 300:
                counts = np.bincount(batch[:, 3].astype(np.int64), minlength=10)
                stats.append(chi_square(counts, np.full(10, 30.0)))
    assert len(stats) == 60
    assert np.mean(np.array(stats) > CHI2_999[9]) <= 0.1, sorted(stats)[-10:]
    assert np.median(stats) < 2 * 8.34  # chi2(9) median: 8.34


def test_start_batch_resumes_exactly_without_reading_skipped_windows(tmp_path, monkeypatch):
    tagged_store(tmp_path / "s", "float16", [1] * 80)  # one image per shard: shards = images
    store = ActivationStore.open(tmp_path / "s")
    subset = np.arange(0, 80, 3)
    for kw in (
        {"batch_size": 20, "buffer_tokens": 90},  # windows leave tokens over for the next
        {"batch_size": 27, "buffer_tokens": 30, "block_images": 2, "images": subset},
        {"batch_size": 64, "buffer_tokens": 10},  # a batch spans several windows
        {"batch_size": 9, "buffer_tokens": 90},  # nothing left over
    ):
        full = list(store.shuffled(2, "all", seed=5, epoch=2, prefetch=0, **kw))
        n = len(full)
        for k in sorted({0, 1, n // 3, n // 2, n - 2, n - 1, n, n + 4}):
            tail = list(store.shuffled(2, "all", seed=5, epoch=2, prefetch=2, start_batch=k, **kw))
            assert len(tail) == max(0, n - k), (kw, k)
            for got, want in zip(tail, full[k:], strict=True):
                np.testing.assert_array_equal(got, want)

    read: set[int] = set()
    real = store._shard

    def counting(layer: int, shard: int) -> np.ndarray:
        read.add(shard)
        return real(layer, shard)

    monkeypatch.setattr(store, "_shard", counting)
    full = list(store.shuffled(2, "all", batch_size=20, buffer_tokens=90, prefetch=0))
    assert len(full) == 36 and len(read) == 80
    read.clear()
    tail = list(store.shuffled(2, "all", batch_size=20, buffer_tokens=90, start_batch=34))
    assert len(tail) == 2
    # the last window (10 images) and the <= 10 tokens it inherits: at most 20 of 80 images
    assert 0 < len(read) <= 20
    with pytest.raises(VisaeError, match="start_batch must be a non-negative integer"):
        store.shuffled(2, "all", start_batch=-1)


def test_sample_tokens_is_a_uniform_draw_over_the_store(class_sorted):
    sample = class_sorted.sample_tokens(2, "patch", 600, seed=0)
    assert sample.dtype == np.float32 and sample.shape == (600, 4)
    images, tokens, classes = (sample[:, c].astype(np.int64) for c in (0, 1, 3))
    assert len(set(zip(images.tolist(), tokens.tolist(), strict=True))) == 600  # no repeats
    assert np.array_equal(images, sample[:, 2]) and np.array_equal(classes, images // 100)
    assert set(tokens.tolist()) <= set(range(3, 9))
    assert chi_square(np.bincount(classes, minlength=10), np.full(10, 60.0)) < CHI2_999[9]
    assert not np.array_equal(images, np.sort(images))  # random order: chunks are samples too
    again = class_sorted.sample_tokens(2, "patch", 600, seed=0)
    np.testing.assert_array_equal(again, sample)
    assert not np.array_equal(class_sorted.sample_tokens(2, "patch", 600, seed=1), sample)


def test_sample_tokens_gives_every_token_the_same_chance(tmp_path):
    tagged_store(tmp_path / "s", "float32", [10] * 10)
    store = ActivationStore.open(tmp_path / "s")
    per_image = np.zeros(100)
    per_token = np.zeros(6)
    for seed in range(200):
        ids = np.array(token_ids([store.sample_tokens(2, "patch", 60, seed=seed)]))
        np.add.at(per_image, ids[:, 0], 1)
        np.add.at(per_token, ids[:, 1] - 3, 1)
    assert chi_square(per_image, np.full(100, 120.0)) < CHI2_999[99]
    assert chi_square(per_token, np.full(6, 2000.0)) < 22.46  # chi2.ppf(0.999, 5)


def test_sample_tokens_of_a_selection_reads_only_the_images_it_draws(tmp_path, monkeypatch):
    tagged_store(tmp_path / "s", "float16", [1] * 80)
    store = ActivationStore.open(tmp_path / "s")
    subset = np.array([3, 17, 40, 41, 79])
    everything = store.sample_tokens(2, "all", 1000, seed=2, images=subset)
    assert sorted(token_ids([everything])) == [(i, t) for i in subset for t in range(9)]
    assert store.sample_tokens(2, "cls", 0, seed=0).shape == (0, 4)
    assert store.sample_tokens(2, "cls", 5, seed=0, images=np.array([], np.int64)).shape == (0, 4)

    read: set[int] = set()
    real = store._shard

    def counting(layer: int, shard: int) -> np.ndarray:
        read.add(shard)
        return real(layer, shard)

    monkeypatch.setattr(store, "_shard", counting)
    few = store.sample_tokens(2, "patch", 4, seed=9)
    assert len(few) == 4 and read == {i for i, _ in token_ids([few])}
    with pytest.raises(VisaeError, match="n must be a non-negative integer"):
        store.sample_tokens(2, "patch", -1, seed=0)


def test_distinct_draw_needs_memory_of_the_sample_not_the_population():
    rng = np.random.default_rng(0)
    got = _distinct(rng, 10**15, 5000)  # a permutation of the population would need 8 PB
    assert len(np.unique(got)) == 5000 and got.min() >= 0 and got.max() < 10**15
    assert np.array_equal(got, np.sort(got))
    assert np.array_equal(_distinct(rng, 10, 10), np.arange(10))


def test_shuffled_prefetch_thread_stops_when_abandoned(tmp_path):
    tagged_store(tmp_path / "s", "float16", [8] * 10)
    store = ActivationStore.open(tmp_path / "s")
    before = threading.active_count()
    it = store.shuffled(2, "patch", batch_size=4, buffer_tokens=10, prefetch=2)
    next(it)
    assert threading.active_count() == before + 1
    it.close()
    assert threading.active_count() == before


def test_readers_bound_open_files(tmp_path):
    """Maps of shards are not all kept open (each holds a file descriptor)."""
    tagged_store(tmp_path / "s", "float16", [1] * 80)
    store = ActivationStore.open(tmp_path / "s")
    fds = len(os.listdir("/proc/self/fd"))
    n = sum(len(b) for b in store.shuffled(2, "all", batch_size=7, prefetch=0))
    n += sum(len(ids) for ids, _ in store.ordered(2, batch_images=3))
    n += len(store.sample_tokens(2, "all", 500, seed=0))
    assert [int(store.get(2, i, 4)[0]) for i in range(80)] == list(range(80))
    assert n == 80 * 9 + 80 + 500
    assert len(os.listdir("/proc/self/fd")) - fds <= 40
