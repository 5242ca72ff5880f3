"""Train the MNIST classifier behind the sample-quality metrics: `python training/train_classifier.py --help`.

Writes `ddpm_mnist/metrics/mnist_classifier.safetensors` (the weights that ship with the package) with the measured
test accuracy in its metadata, and refuses to write weights below `--min_test_accuracy`. Runs on a CPU in minutes.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ddpm_mnist.data import DEFAULT_DATASET, decode_labels, load_image_stream, load_x_0
from ddpm_mnist.errors import UsageError, WorkFailed, run_entry_point
from ddpm_mnist.metrics.classifier import WEIGHTS_PATH, MnistClassifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, each with its default."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset_name", default=DEFAULT_DATASET, help="Hub dataset id or local folder with image/label")
    p.add_argument("--output_dir", default=str(WEIGHTS_PATH.parent),
                   help=f"the folder to write {WEIGHTS_PATH.name} into")  # fmt: skip
    p.add_argument("--num_epochs", type=int, default=3, help="passes over the 60,000 training digits")
    p.add_argument("--train_batch_size", type=int, default=128, help="digits per optimizer step")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="peak AdamW learning rate (one-cycle schedule)")
    p.add_argument("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    p.add_argument("--min_test_accuracy", type=float, default=0.99, help="write no weights below this accuracy")
    return p.parse_args(argv)


def load_split(dataset_name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits of a split as (N, 1, 28, 28) floats in [0, 1], decoded by the project's preprocessor, and labels."""
    labels = decode_labels(load_image_stream(dataset_name, split, label_column="label"))
    return (load_x_0(dataset_name, split) + 1) / 2, labels


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small affine jitter per digit: rotation +-10 degrees, scale 0.9-1.1, shift +-2 pixels."""
    u = torch.rand(4, images.shape[0], generator=generator) * 2 - 1
    angle, zoom = u[0] * math.pi / 18, 1 + 0.1 * u[1]
    shift = u[2:] * 4 / 28  # 2 pixels in the [-1, 1] units of affine_grid
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def accuracy(model: MnistClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of digits whose arg-max logit is their label."""
    model.eval()
    predictions = torch.cat([model(batch).argmax(1) for batch in images.split(1000)])
    return (predictions == labels).float().mean().item()


def main(args: argparse.Namespace) -> None:
    """Train, measure test accuracy, write the weights if they are good enough."""
    if min(args.num_epochs, args.train_batch_size) < 1 or args.learning_rate <= 0:
        raise UsageError("--num_epochs, --train_batch_size and --learning_rate must be positive.")
    if Path(args.output_dir).is_file():
        raise UsageError(f"--output_dir {args.output_dir} is a file; pass a folder.")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_images, train_labels = load_split(args.dataset_name, "train")
    test_images, test_labels = load_split(args.dataset_name, "test")

    model = MnistClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    total_steps = args.num_epochs * math.ceil(len(train_images) / args.train_batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=total_steps)
    start = time.perf_counter()
    for epoch in range(args.num_epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        progress = tqdm(order.split(args.train_batch_size), desc=f"epoch {epoch + 1}/{args.num_epochs}")
        for index in progress:
            loss = F.cross_entropy(model(augment(train_images[index], generator)), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.4f}")
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, test_images, test_labels):.4f}")

    test_accuracy = accuracy(model, test_images, test_labels)
    minutes = (time.perf_counter() - start) / 60
    print(f"test accuracy {test_accuracy:.4f} ({len(test_images)} digits) after {minutes:.1f} min of training")
    if test_accuracy < args.min_test_accuracy:
        failed = f"test accuracy {test_accuracy:.4f} < --min_test_accuracy {args.min_test_accuracy}; not saved."
        raise WorkFailed(f"{failed} Train longer (--num_epochs) or with another --seed.")
    metadata = {"test_accuracy": f"{test_accuracy:.4f}", "epochs": str(args.num_epochs), "seed": str(args.seed)}
    output = Path(args.output_dir) / WEIGHTS_PATH.name
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, output, metadata=metadata)
    print(f"wrote {output}")


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()), "train_classifier.py")
