"""Evaluation of a DDPM on MNIST: the variational bound in bits/dim, and sample quality from a trained classifier.

    from ddpm_mnist.metrics import variational_bound, classifier_outputs, sample_quality

See README.md beside this file for what the numbers mean and how they compare with published ones.
"""

from .classifier import MnistClassifier, load_mnist_classifier
from .likelihood import VariationalBound, discretized_gaussian_log_likelihood, gaussian_kl, variational_bound
from .quality import ClassifierOutputs, SampleQuality, classifier_outputs, sample_quality

__all__ = [
    "ClassifierOutputs",
    "MnistClassifier",
    "SampleQuality",
    "VariationalBound",
    "classifier_outputs",
    "discretized_gaussian_log_likelihood",
    "gaussian_kl",
    "load_mnist_classifier",
    "sample_quality",
    "variational_bound",
]
