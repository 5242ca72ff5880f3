"""Tests for the MNIST stream (`ddpm_mnist.data`)."""

import logging

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image

from ddpm_mnist.data import (
    ImagePreprocessor,
    count_examples,
    decode_stream,
    epoch_order,
    load_image_stream,
    part_read,
    shuffled_shard,
)
from tests.utils import png_bytes


def ids(stream) -> list[int]:
    """The id (top-left pixel) of each example of a stream, as the fixture wrote it."""
    return [int(ImagePreprocessor().decode(example["image"]["bytes"])[0, 0]) for example in stream]


def test_stream_yields_undecoded_pngs_of_one_column(mnist_folder):
    stream = load_image_stream(str(mnist_folder))
    first = next(iter(stream))
    assert list(first) == ["image"] and first["image"]["bytes"].startswith(b"\x89PNG")
    assert count_examples(stream) == 96
    assert count_examples(load_image_stream(str(mnist_folder), split="test")) == 32


def test_parquet_files_load_directly(mnist_folder):
    stream = load_image_stream(str(mnist_folder / "mnist" / "train-00000-of-00001.parquet"))
    assert ids(stream) == list(range(96))


def test_count_without_metadata_counts_the_stream(tmp_path):
    features = Features({"picture": Image()})
    rows = {"picture": [{"bytes": png_bytes(np.full((28, 28), i, np.uint8)), "path": None} for i in range(5)]}
    Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "data.parquet")
    stream = load_image_stream(str(tmp_path / "data.parquet"), image_column="picture")
    assert count_examples(stream) == 5
    assert ids(stream) == [0, 1, 2, 3, 4]


def test_part_read_ends_the_read_when_left_early_or_by_an_error():
    ended = []

    class Stream:
        def __iter__(self):
            try:
                yield from range(10)
            finally:
                ended.append(True)  # where a parquet stream closes its file and its Arrow scan

    with part_read(Stream()) as examples:
        assert next(examples) == 0
    assert ended == [True]  # though `examples` still holds the iterator
    with pytest.raises(KeyError), part_read(Stream()) as examples:
        next(examples)
        raise KeyError
    assert ended == [True, True]


def test_missing_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="dataset_name './no/such/mnist' does not exist"):
        load_image_stream("./no/such/mnist")


def test_missing_column_lists_the_columns_there_are(mnist_folder):
    with pytest.raises(ValueError, match="no column 'img'; its columns are image, label"):
        load_image_stream(str(mnist_folder), image_column="img")


def test_each_epoch_is_a_new_permutation_of_all_examples(mnist_folder):
    stream = load_image_stream(str(mnist_folder))
    epoch_0 = ids(shuffled_shard(stream, seed=0, epoch=0, buffer_size=32))
    epoch_1 = ids(shuffled_shard(stream, seed=0, epoch=1, buffer_size=32))
    assert sorted(epoch_0) == sorted(epoch_1) == list(range(96))
    assert epoch_0 != epoch_1 and epoch_0 != list(range(96))
    assert ids(shuffled_shard(stream, seed=0, epoch=1, buffer_size=32)) == epoch_1, "the order is reproducible"


def test_processes_see_disjoint_shares_that_cover_the_data(mnist_folder):
    stream = load_image_stream(str(mnist_folder))
    shares = [ids(shuffled_shard(stream, seed=3, epoch=2, rank=r, world_size=3, buffer_size=32)) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(96))
    assert all(len(share) == 32 for share in shares)


def test_decoding_once_keeps_every_digit_in_stream_order(mnist_folder):
    digits = decode_stream(load_image_stream(str(mnist_folder)), ImagePreprocessor())
    assert digits.dtype == torch.uint8 and digits.shape == (96, 28, 28)
    assert digits[:, 0, 0].tolist() == list(range(96))


@pytest.mark.parametrize("num_examples, world_size", [(96, 1), (96, 3), (97, 2)])
def test_epoch_orders_are_exact_shuffles_dealt_in_disjoint_equal_shares(num_examples, world_size):
    def shares(seed: int, epoch: int) -> list[list[int]]:
        return [
            epoch_order(num_examples, seed=seed, epoch=epoch, rank=r, world_size=world_size).tolist()
            for r in range(world_size)
        ]

    epoch_0 = shares(seed=0, epoch=0)
    seen = sum(epoch_0, [])
    assert all(len(share) == num_examples // world_size for share in epoch_0)
    assert len(set(seen)) == len(seen) == num_examples // world_size * world_size
    assert set(seen) <= set(range(num_examples))
    assert shares(seed=0, epoch=0) == epoch_0, "a pure function of its arguments"
    assert shares(seed=0, epoch=1) != epoch_0 and shares(seed=1, epoch=0) != epoch_0
    assert seen != sorted(seen)


def test_preprocessing_scales_to_minus_one_one_and_pads_with_background():
    pixels = np.zeros((28, 28), np.uint8)
    pixels[0, 0], pixels[27, 27], pixels[10, 10] = 255, 255, 51
    example = {"image": {"bytes": png_bytes(pixels)}}
    x_0 = ImagePreprocessor(28)([example])
    assert x_0.shape == (1, 1, 28, 28) and x_0.dtype == torch.float32
    assert x_0[0, 0, 0, 0] == 1.0 and x_0[0, 0, 1, 1] == -1.0
    assert x_0[0, 0, 10, 10] == pytest.approx(51 / 127.5 - 1)
    padded = ImagePreprocessor(32)([example])
    assert padded.shape == (1, 1, 32, 32)
    torch.testing.assert_close(padded[:, :, 2:30, 2:30], x_0)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded[0, 0][border] == -1).all()


def test_other_modes_and_sizes_are_converted_and_logged(caplog):
    rgb = np.zeros((56, 56, 3), np.uint8)
    rgb[:, :, 1] = 200
    with caplog.at_level(logging.WARNING):
        x_0 = ImagePreprocessor(28)([{"image": {"bytes": png_bytes(rgb, mode="RGB")}}] * 2)
    assert x_0.shape == (2, 1, 28, 28)
    expected_grey = round(200 * 587 / 1000)  # PIL's ITU-R 601-2 luma for pure green
    assert x_0[0, 0, 5, 5].item() == pytest.approx(expected_grey / 127.5 - 1, abs=1 / 127.5)
    assert caplog.text.count("converting RGB images of size (56, 56)") == 1


def test_random_flip_flips_some_images_left_right():
    pixels = np.zeros((28, 28), np.uint8)
    pixels[:, 0] = 255
    torch.manual_seed(0)
    x_0 = ImagePreprocessor(28, random_flip=True)([{"image": {"bytes": png_bytes(pixels)}}] * 64)
    flipped = (x_0[:, 0, 0, 27] == 1).sum().item()
    assert 10 < flipped < 54 and ((x_0[:, 0, 0, 0] == 1) | (x_0[:, 0, 0, 27] == 1)).all()


@pytest.mark.parametrize("sample_size", [27, 31])
def test_sizes_that_cannot_centre_a_digit_are_refused(sample_size):
    with pytest.raises(ValueError, match=f"sample_size={sample_size} cannot hold centred 28x28 digits"):
        ImagePreprocessor(sample_size)


def test_real_mnist_streams_with_the_known_pixel_mean(real_mnist):
    stream = load_image_stream(str(real_mnist))
    assert count_examples(stream) == 60_000
    x_0 = ImagePreprocessor(28)(list(stream.take(2000)))
    # MNIST's mean pixel intensity is 0.1307 of full scale, i.e. 2 * 0.1307 - 1 in [-1, 1].
    assert x_0.mean().item() == pytest.approx(2 * 0.1307 - 1, abs=0.01)
    assert x_0.min() == -1.0 and x_0.max() == 1.0
