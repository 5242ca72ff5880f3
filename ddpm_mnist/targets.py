"""The quality targets a release states in its model card, and their verdicts: met, or missed by how much.

Each release states its own numbers; `training/release.py` checks them and `ddpm_mnist.model_card.evaluation_section`
writes the verdicts into the card:

    targets = ReleaseTargets(min_confidence=0.95, max_fid_ratio=2.0, digit_shares=(0.07, 0.13))
    targets.markdown("DDPM, 50 steps", quality, floor)
    # ["**Targets** (at DDPM, 50 steps, N=1000):",
    #  "",
    #  "- mean classifier confidence 0.962 (target >= 0.95): **met**",
    #  "- every digit's share between 8.1% and 12.4% (target 7.0% to 13.0%): **met**",
    #  "- FID 45.10, 2.26x the real-vs-real floor of 19.96 (target <= 2x): **missed by 0.26x the floor**"]

`quality` and `floor` are the `SampleQuality` of the samples and of as many real training digits
(`ddpm_mnist.evaluation.QualityReference`); a target on the NLL bound also takes the bound in bits/dim, and one on the
class accuracy the samples' `ClassAccuracy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # scores are read by attribute: checking them needs no metric code
    from .metrics.quality import ClassAccuracy, SampleQuality


@dataclass(frozen=True)
class TargetCheck:
    """One target against its measurement: `measured` states both as the card does, `gap` is how far the measurement
    falls short of the target in the target's own terms (0 or less: met), and `missed` formats the gap."""

    measured: str
    gap: float
    missed: str  # a format string of the gap and its unit, "{:.1%} of the samples"

    @property
    def met(self) -> bool:
        """Whether the measurement reaches the target."""
        return self.gap <= 0

    def line(self) -> str:
        """A Markdown bullet: the measurement, the target, and **met** or **missed by** the gap."""
        verdict = "met" if self.met else f"missed by {self.missed.format(self.gap)}"
        return f"- {self.measured}: **{verdict}**"


@dataclass(frozen=True)
class ReleaseTargets:
    """What a release must reach at its recommended scheduler setting; a target left at None is not checked.

    Args:
        min_confidence: the least mean classifier confidence of the samples.
        max_fid_ratio: the most FID of the samples, as a multiple of the real-vs-real floor's FID at the same N.
        digit_shares: (low, high): every digit's share of the samples (by the classifier's prediction) in this range.
        max_nll_bpd: the most NLL bound, in bits/dim.
        min_class_accuracy: for class-conditional samples, the least share read as the digit they were drawn as.
        min_digit_accuracy: likewise, the least class accuracy of every digit 0-9 on its own.
    """

    min_confidence: float
    max_fid_ratio: float
    digit_shares: tuple[float, float] | None = None
    max_nll_bpd: float | None = None
    min_class_accuracy: float | None = None
    min_digit_accuracy: float | None = None

    def checks(
        self,
        quality: SampleQuality,
        floor: SampleQuality,
        nll_bpd: float | None = None,
        accuracy: ClassAccuracy | None = None,
    ) -> list[TargetCheck]:
        """Each target against the samples' scores, the floor's and, for the NLL target, the bound in bits/dim; for
        the class-accuracy targets, the samples' `accuracy`."""
        if self.max_nll_bpd is not None and nll_bpd is None:
            raise ValueError("these targets include the NLL bound; pass nll_bpd, the bound in bits/dim.")
        if (self.min_class_accuracy is not None or self.min_digit_accuracy is not None) and accuracy is None:
            raise ValueError("these targets include the class accuracy; pass accuracy, the samples' ClassAccuracy.")
        confidence, fid_ratio = quality.mean_confidence, quality.fid / floor.fid
        measured = f"mean classifier confidence {confidence:.3f} (target >= {self.min_confidence:g})"
        checks = [TargetCheck(measured, self.min_confidence - confidence, "{:.3f}")]
        if self.digit_shares is not None:
            (low, high), shares = self.digit_shares, quality.class_histogram
            rarest, commonest = min(shares), max(shares)
            measured = f"every digit's share between {rarest:.1%} and {commonest:.1%} (target {low:.1%} to {high:.1%})"
            checks.append(TargetCheck(measured, max(low - rarest, commonest - high), "{:.1%} of the samples"))
        if self.min_class_accuracy is not None:
            measured = f"class accuracy {accuracy.accuracy:.1%} (target >= {self.min_class_accuracy * 100:g}%)"
            checks.append(TargetCheck(measured, self.min_class_accuracy - accuracy.accuracy, "{:.1%} of the samples"))
        if self.min_digit_accuracy is not None:  # the worst digit's, digits never requested left out
            requested = {digit: share for digit, share in enumerate(accuracy.per_class) if not math.isnan(share)}
            worst = min(requested, key=requested.get)
            measured = (
                f"lowest class accuracy of a digit {requested[worst]:.1%}, digit {worst}'s (target >= "
                f"{self.min_digit_accuracy * 100:g}% for every digit)"
            )
            gap = self.min_digit_accuracy - requested[worst]
            checks.append(TargetCheck(measured, gap, f"{{:.1%}} of digit {worst}'s samples"))
        measured = (
            f"FID {quality.fid:.2f}, {fid_ratio:.2f}x the real-vs-real floor of {floor.fid:.2f} "
            f"(target <= {self.max_fid_ratio:g}x)"
        )
        checks.append(TargetCheck(measured, fid_ratio - self.max_fid_ratio, "{:.2f}x the floor"))
        if self.max_nll_bpd is not None:
            measured = f"NLL bound {nll_bpd:.3f} bits/dim (target <= {self.max_nll_bpd:g})"
            checks.append(TargetCheck(measured, nll_bpd - self.max_nll_bpd, "{:.3f} bits/dim"))
        return checks

    def all_met(self, quality: SampleQuality, floor: SampleQuality, **measured: float | ClassAccuracy | None) -> bool:
        """Whether every target is met; `measured` is the `nll_bpd` and `accuracy` of `checks`."""
        return all(check.met for check in self.checks(quality, floor, **measured))

    def markdown(
        self, setting: str, quality: SampleQuality, floor: SampleQuality, **measured: float | ClassAccuracy | None
    ) -> list[str]:
        """The card's lines on the targets: a heading naming the scheduler `setting` and N, then one bullet per
        target with the measured value, the target, and met or missed by how much (`measured` as for `all_met`)."""
        heading = f"**Targets** (at {setting}, N={quality.num_images}):"
        return [heading, "", *(check.line() for check in self.checks(quality, floor, **measured))]
