"""Streaming MNIST -> x_0 tensors in [-1, 1] (the paper's data scaling, section 3.3).

Used by training and by the metrics. The stream yields PNG bytes, undecoded: shuffling, sharding across
processes then cost no decoding; `ImagePreprocessor` decodes a batch at a time, as the DataLoader's collate.
"""

from __future__ import annotations

import gc
import io
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cached_property, partial

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Image, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from PIL import Image as PILImage
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .errors import first_line

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "ylecun/mnist"
IMAGE_SIZE = 28  # MNIST digits are 28x28 greyscale.


def load_image_stream(
    dataset_name: str | os.PathLike = DEFAULT_DATASET,
    split: str = "train",
    config_name: str | None = None,
    image_column: str = "image",
    label_column: str | None = None,
) -> IterableDataset:
    """Stream one split of an image dataset (a Hub id or a local folder of parquet files) as PNG bytes.

    Nothing is downloaded in full. The returned stream has the column `image`, holding `{"bytes", "path"}`, and with a
    `label_column` also `label`, the class id of each image (`class_count` tells how many classes there are).

    A path that does not exist is a FileNotFoundError, data that cannot be read an OSError, a missing column a
    ValueError.
    """
    dataset_name = os.fspath(dataset_name)
    path = os.path.expanduser(dataset_name)
    looks_like_path = dataset_name.startswith((".", "/", "~")) or dataset_name.count("/") > 1
    if looks_like_path and not os.path.exists(path) and "*" not in path:
        raise FileNotFoundError(
            f"dataset_name {dataset_name!r} does not exist; pass a Hub dataset id such as {DEFAULT_DATASET!r} "
            "or a local folder (or parquet files) laid out like it."
        )
    try:
        if path.endswith(".parquet"):  # one file or a glob of files of one split
            stream = load_dataset("parquet", data_files={split: path}, split=split, streaming=True)
        else:
            stream = load_dataset(path, config_name, split=split, streaming=True)
    except Exception as e:  # datasets and pyarrow raise many types for unreadable data; all mean the same here
        raise OSError(
            f"cannot read the {split!r} split of dataset_name {dataset_name!r} ({first_line(e)}); check or "
            "re-download its files."
        ) from e
    columns = {"image": image_column, **({"label": label_column} if label_column is not None else {})}
    for role, column in columns.items():
        if stream.column_names is None or column not in stream.column_names:
            raise ValueError(
                f"dataset {dataset_name!r} has no column {column!r}; its columns are "
                f"{', '.join(stream.column_names or [])}. Pass the right one as {role}_column."
            )
    stream = stream.select_columns(list(columns.values()))
    stream = stream.rename_columns({column: role for role, column in columns.items() if column != role})
    return stream.cast_column("image", Image(decode=False))


def class_count(stream: IterableDataset, dataset_name: str) -> int:
    """The number of classes of a stream's `label` column (a `datasets.ClassLabel`: 10 for MNIST)."""
    feature = (stream.features or {}).get("label")
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"the label column of dataset {dataset_name!r} is not a class label column ({feature}); pass a column of "
            "class ids as label_column."
        )
    return feature.num_classes


def count_examples(stream: IterableDataset) -> int:
    """The number of examples in a stream: from the dataset's metadata when it has it, else by one pass."""
    splits = stream.info.splits
    if splits and stream.split in splits and splits[stream.split].num_examples:
        return splits[stream.split].num_examples
    return sum(1 for _ in stream)


def shuffled_shard(
    stream: IterableDataset, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1, buffer_size: int = 10_000
) -> IterableDataset:
    """The examples process `rank` sees in `epoch`: the stream shuffled by (seed, epoch), then its disjoint share.

    Every process shuffles the same way and keeps its own share (`split_dataset_by_node`), so one epoch shows
    each example once across all processes. The order is a pure function of the arguments, which is what lets
    a resumed run skip exactly the batches it had trained on. Iterate the result directly: `datasets` forgets
    the epoch on derived streams (`.take()`, `.skip()`).
    """
    shard = split_dataset_by_node(stream.shuffle(seed=seed, buffer_size=buffer_size), rank=rank, world_size=world_size)
    shard.set_epoch(epoch)
    return shard


class ImagePreprocessor:
    """A collate function: PNG bytes -> a (B, 1, sample_size, sample_size) float tensor x_0 in [-1, 1].

    Images of another mode or size are converted to 28x28 greyscale (and the log says so once). When the
    model's `sample_size` is larger than 28, digits are padded with the background value, -1.
    """

    def __init__(self, sample_size: int = IMAGE_SIZE, random_flip: bool = False):
        if sample_size < IMAGE_SIZE or (sample_size - IMAGE_SIZE) % 2:
            raise ValueError(
                f"sample_size={sample_size} cannot hold centred {IMAGE_SIZE}x{IMAGE_SIZE} digits; use 28 or an "
                "even size above it, such as 32."
            )
        self.border = (sample_size - IMAGE_SIZE) // 2  # background pixels on each side
        self.random_flip = random_flip
        self._conversions_logged: set[tuple[str, tuple[int, int]]] = set()

    def decode(self, png: bytes) -> np.ndarray:
        """One PNG -> a 28x28 uint8 array, converting other modes and sizes."""
        image = PILImage.open(io.BytesIO(png))
        if image.mode != "L" or image.size != (IMAGE_SIZE, IMAGE_SIZE):
            key = (image.mode, image.size)
            if key not in self._conversions_logged:
                self._conversions_logged.add(key)
                logger.warning("converting %s images of size %s to 28x28 greyscale (mode L)", image.mode, image.size)
            image = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), PILImage.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    def __call__(self, examples: list[dict]) -> torch.Tensor:
        """Decode and scale a batch of stream examples."""
        return self.scale(torch.from_numpy(np.stack([self.decode(example["image"]["bytes"]) for example in examples])))

    def scale(self, pixels: torch.Tensor) -> torch.Tensor:
        """Decoded digits (B, 28, 28) uint8 -> x_0 (B, 1, sample_size, sample_size) in [-1, 1]."""
        x_0 = pixels.unsqueeze(1).float() / 127.5 - 1.0
        if self.random_flip:
            flip = torch.rand(len(pixels)) < 0.5
            x_0[flip] = x_0[flip].flip(-1)
        if self.border:
            x_0 = F.pad(x_0, (self.border,) * 4, value=-1.0)
        return x_0


def decode_stream(stream: IterableDataset, preprocess: ImagePreprocessor) -> torch.Tensor:
    """Every image of a stream decoded once, in the stream's order: (N, 28, 28) uint8 (47 MB for MNIST's train split).

    The fast alternative to `shuffled_shard` for datasets that fit in memory: the PNGs are decoded once instead of
    every epoch, and each epoch is then an exact shuffle (`epoch_order`) rather than a buffered one.
    """
    digits = []
    with tqdm(desc="decoding the dataset once", unit="image") as bar:
        for batch in stream.iter(batch_size=1000):
            digits.extend(preprocess.decode(image["bytes"]) for image in batch["image"])
            bar.update(len(batch["image"]))
    return torch.from_numpy(np.stack(digits))


def decode_labels(stream: IterableDataset) -> torch.Tensor:
    """Every class id of a stream's `label` column, in the stream's order (that of `decode_stream`): (N,) int64."""
    labels = [torch.as_tensor(batch["label"]) for batch in stream.select_columns(["label"]).iter(batch_size=10_000)]
    return torch.cat(labels).long()


def epoch_order(num_examples: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The indices process `rank` trains on in `epoch`, for `decode_stream`'s digits.

    A permutation drawn from (seed, epoch), dealt round-robin: the processes' shares are disjoint, of equal size
    num_examples // world_size, and, like `shuffled_shard`'s, a pure function of the arguments (exact resume).
    """
    order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(num_examples))
    return order[: num_examples // world_size * world_size][rank::world_size]


@contextmanager
def part_read(stream: Iterable) -> Iterator[Iterator]:
    """Iterate a stream that may be left part-read; on leaving, close the iterator and collect it at once.

    A part-read parquet stream holds an open file and an Arrow scan. Freed just before the process exits, they can make
    Arrow abort it ("terminate called without an active exception", apache/arrow#45214; `datasets` works around it only
    for pyarrow <= 24).
    """
    iterator = iter(stream)
    try:
        yield iterator
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
        del iterator
        gc.collect()


def check_readable(stream: IterableDataset, preprocess: ImagePreprocessor, dataset_name: str) -> None:
    """Read and decode a stream's first image, cheaply (one row group), so that training refuses bad data before it
    builds a model or scans the whole split: a corrupt file or an undecodable image is an OSError, an empty split a
    ValueError."""
    try:
        with part_read(stream) as examples:
            first = next(examples, None)
        if first is not None:
            preprocess.decode(first["image"]["bytes"])
    except Exception as e:  # pyarrow, datasets and PIL each raise their own types for damaged data
        raise OSError(
            f"cannot read dataset_name {dataset_name!r} ({first_line(e)}); check or re-download its files."
        ) from e
    if first is None:
        raise ValueError(
            f"dataset {dataset_name!r} has no examples in its {stream.split!r} split; pass a non-empty one."
        )


def _labelled_batch(
    preprocess: ImagePreprocessor, labelled: bool, examples: list[dict]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A collate function: stream examples -> (x_0, class labels), the labels None for a stream without them."""
    return preprocess(examples), torch.tensor([example["label"] for example in examples]) if labelled else None


class TrainingData:
    """The training split as batches of (x_0, class labels), epoch by epoch, for one process of `world_size`.

    Streamed through a shuffle buffer (`shuffled_shard`, the default), or with `decode_once` decoded once into memory
    and shuffled exactly (`epoch_order`): either order is a pure function of (seed, epoch, rank), for an exact resume.
    The class labels are those of the stream's `label` column, or None when it has none.
    """

    def __init__(
        self,
        stream: IterableDataset,
        preprocess: ImagePreprocessor,
        *,
        batch_size: int,
        seed: int,
        decode_once: bool = False,
        shuffle_buffer_size: int = 10_000,
        num_workers: int = 0,
    ):
        self.stream, self.preprocess, self.batch_size, self.seed = stream, preprocess, batch_size, seed
        self.decode_once, self.shuffle_buffer_size, self.num_workers = decode_once, shuffle_buffer_size, num_workers
        self.labelled = "label" in (stream.column_names or [])
        self.num_examples = count_examples(stream)

    @cached_property
    def digits(self) -> torch.Tensor:
        """With `decode_once`: every image, decoded on the first call of `batches`."""
        return decode_stream(self.stream, self.preprocess)

    @cached_property
    def labels(self) -> torch.Tensor | None:
        """With `decode_once`: every class label, in the order of `digits`; None for a stream without labels."""
        return decode_labels(self.stream) if self.labelled else None

    def batches(
        self, epoch: int, rank: int = 0, world_size: int = 1
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
        """The batches (x_0 of shape (B, 1, sample_size, sample_size), labels (B,) or None) of `rank` in `epoch`."""
        share = dict(seed=self.seed, epoch=epoch, rank=rank, world_size=world_size)
        if self.decode_once:
            order = epoch_order(len(self.digits), **share)
            return (
                (self.preprocess.scale(self.digits[indices]), None if self.labels is None else self.labels[indices])
                for indices in order.split(self.batch_size)
            )
        return DataLoader(
            shuffled_shard(self.stream, buffer_size=self.shuffle_buffer_size, **share), batch_size=self.batch_size,
            collate_fn=partial(_labelled_batch, self.preprocess, self.labelled), num_workers=self.num_workers,
            generator=torch.Generator(),  # its own seed draw must not advance the global RNG that resume restores
        )  # fmt: skip


def load_x_0(
    dataset_name: str | os.PathLike = DEFAULT_DATASET,
    split: str = "test",
    num_images: int | None = None,
    *,
    sample_size: int = IMAGE_SIZE,
    seed: int | None = None,
) -> torch.Tensor:
    """`num_images` digits of a split (all by default) as one x_0 tensor (N, 1, sample_size, sample_size) in [-1, 1].

    Without a `seed` they are the split's first digits; with one, a random subset (kept in the split's order). Only
    the chosen digits are decoded. Asking for more digits than the split holds is an error, raised before any work.
    """
    stream = load_image_stream(dataset_name, split)
    available = count_examples(stream)
    count = available if num_images is None else num_images
    if not 1 <= count <= available:
        raise ValueError(f"asked for {num_images} digits of the {split!r} split, which holds {available}.")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    wanted = torch.zeros(available, dtype=torch.bool)
    wanted[torch.arange(count) if seed is None else torch.randperm(available, generator=generator)[:count]] = True
    preprocess = ImagePreprocessor(sample_size)
    batches = []
    with tqdm(total=count, desc=f"loading {split} digits", unit="digit") as bar, part_read(stream.iter(1000)) as rows:
        for start, batch in zip(itertools.count(0, 1000), rows):
            chosen = wanted[start : start + 1000].nonzero().flatten().tolist()
            if chosen:
                batches.append(preprocess([{"image": batch["image"][i]} for i in chosen]))
                bar.update(len(chosen))
            if bar.n == count:
                break
    return torch.cat(batches)
