"""Tests for class-conditional generation: the UNet's class embedding and the pipeline's classifier-free guidance."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
from tests.utils import tiny_unet


@pytest.fixture(scope="module")
def conditional() -> DDPMMnistUNet:
    unet = tiny_unet(num_class_embeds=10)
    with torch.no_grad():  # rows far apart, so that every label visibly changes the prediction
        unet.class_embedding.weight.copy_(torch.randn(11, unet.class_embedding.embedding_dim))
    return unet


@pytest.fixture
def pipe(conditional) -> DDPMMnistPipeline:
    pipeline = DDPMMnistPipeline(conditional, DDPMMnistScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def x_t(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_without_num_class_embeds_the_model_is_the_unconditional_one():
    # The class embedding is the only addition: a conditional model whose embedding rows are zero, holding an
    # unconditional model's weights, predicts exactly what that model predicts.
    plain, conditional = tiny_unet(), tiny_unet(num_class_embeds=10)
    assert plain.class_embedding is None and plain.config.num_class_embeds is None
    extra = sum(p.numel() for p in conditional.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 11 * 4 * plain.config.base_channels  # (10 digits + null) x the timestep embedding's width
    missing, unexpected = conditional.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["class_embedding.weight"] and unexpected == []
    with torch.no_grad():
        conditional.class_embedding.weight.zero_()
        t = torch.tensor([0, 10, 500, 999])
        assert torch.equal(conditional(x_t(), t, torch.tensor([0, 3, 9, 10])).sample, plain(x_t(), t).sample)


def test_the_released_unconditional_weights_load_into_todays_model():
    unet = DDPMMnistUNet.from_pretrained("pretrained/ddpm-mnist-small/unet")
    assert unet.class_embedding is None and sum(p.numel() for p in unet.parameters()) == 1_623_169


def test_labels_change_the_prediction_and_no_labels_mean_the_null_class(conditional):
    with torch.no_grad():
        by_label = [conditional(x_t(), 500, torch.full((4,), label)).sample for label in range(11)]
        unlabelled = conditional(x_t(), 500).sample
    assert torch.equal(unlabelled, by_label[10])
    for a in range(11):
        for b in range(a + 1, 11):
            assert not torch.allclose(by_label[a], by_label[b]), (a, b)


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.tensor([0, 1, 2, 11]), r"class_labels must lie in \[0, 10\]"),
        (torch.tensor([0, 1, -1, 2]), r"class_labels must lie in \[0, 10\]"),
        (torch.tensor([0, 1]), r"must be \(4,\) integer class ids"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), r"must be \(4,\) integer class ids"),
    ],
)
def test_bad_labels_are_refused_by_the_unet(conditional, labels, match):
    with pytest.raises(ValueError, match=match):
        conditional(x_t(), 500, labels)


def test_labels_for_an_unconditional_unet_are_refused():
    with pytest.raises(ValueError, match="class_labels were given to an unconditional model"):
        tiny_unet()(x_t(), 500, torch.zeros(4, dtype=torch.long))


def test_guidance_scale_1_is_the_conditional_prediction(pipe, conditional):
    labels = torch.tensor([1, 4, 4, 7])
    with torch.no_grad():
        assert torch.equal(pipe.predict_noise(x_t(), 300, labels, 1.0), conditional(x_t(), 300, labels).sample)


@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_guidance_in_one_batched_call_equals_two_separate_calls(pipe, conditional, scale):
    labels = torch.tensor([1, 4, 4, 7])
    with torch.no_grad():
        guided = pipe.predict_noise(x_t(), 300, labels, scale)
        eps_cond = conditional(x_t(), 300, labels).sample
        eps_null = conditional(x_t(), 300, torch.full((4,), 10)).sample
    torch.testing.assert_close(guided, eps_null + scale * (eps_cond - eps_null), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, eps_cond)


def test_the_pipeline_sends_labels_and_the_null_batch_in_one_call(pipe, monkeypatch):
    calls, forward = [], pipe.unet.forward

    def recording_forward(sample, timestep, class_labels=None, return_dict=True):
        calls.append((len(sample), None if class_labels is None else class_labels.tolist()))
        return forward(sample, timestep, class_labels, return_dict)

    monkeypatch.setattr(pipe.unet, "forward", recording_forward)
    pipe(class_labels=[3, 3, 7], guidance_scale=2.0, num_inference_steps=4, output_type="np")
    assert calls == [(6, [3, 3, 7, 10, 10, 10])] * 4
    calls.clear()
    pipe(class_labels=[3, 7], num_inference_steps=2, output_type="np")
    assert calls == [(2, [3, 7])] * 2
    calls.clear()
    pipe(batch_size=2, num_inference_steps=2, output_type="np")
    assert calls == [(2, None)] * 2  # a conditional model without labels: the UNet's null class


def test_labels_and_guidance_change_the_digits_deterministically(pipe):
    def draw(**kwargs) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        return pipe(num_inference_steps=5, output_type="np", generator=generator, **kwargs).images

    assert np.array_equal(draw(class_labels=[2, 5]), draw(class_labels=[2, 5]))
    assert not np.allclose(draw(class_labels=[2, 5]), draw(class_labels=[5, 2]))
    assert not np.allclose(draw(class_labels=[2, 5]), draw(class_labels=[2, 5], guidance_scale=4.0))
    assert draw(class_labels=torch.tensor([2, 5])).shape == (2, 28, 28, 1)


@pytest.mark.parametrize(
    "scheduler_class", [DDPMMnistScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
                        EulerDiscreteScheduler],
)  # fmt: skip
def test_guidance_runs_with_every_compatible_scheduler(pipe, scheduler_class):
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    images = pipe(class_labels=[0, 9], guidance_scale=3.0, num_inference_steps=4, output_type="pt").images
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels=[3, 10]), r"class_labels must be digits between 0 and 9, got \[3, 10\]"),
        (dict(class_labels=[-1]), "class_labels must be digits between 0 and 9"),
        (dict(class_labels=[]), "class_labels must be a non-empty list of integers"),
        (dict(class_labels=[1.5]), "class_labels must be a non-empty list of integers"),
        (dict(class_labels=[1], guidance_scale=0.5), "guidance_scale must be a number of at least 1"),
        (dict(class_labels=[1], guidance_scale=float("nan")), "guidance_scale must be a number of at least 1"),
        (dict(guidance_scale=2.0), "guidance_scale > 1 needs class_labels"),
        (dict(batch_size=3, class_labels=[1, 2]), "batch_size=3 disagrees with the 2 class_labels"),
        (dict(class_labels=[1], guidance_interval=(-1, 500)), r"0 <= low <= high <= 1000, got \(-1, 500\)"),
        (dict(class_labels=[1], guidance_interval=(82, 1001)), r"0 <= low <= high <= 1000, got \(82, 1001\)"),
        (dict(class_labels=[1], guidance_interval=(581, 82)), r"0 <= low <= high <= 1000, got \(581, 82\)"),
        (dict(class_labels=[1], guidance_interval=(82,)), "guidance_interval must be a pair of timesteps"),
        (dict(class_labels=[1], guidance_interval=("a", "b")), "guidance_interval must be a pair of timesteps"),
    ],
)
def test_bad_class_inputs_are_one_line_errors_before_sampling(pipe, kwargs, match, monkeypatch):
    monkeypatch.setattr(pipe.scheduler, "set_timesteps", lambda *a, **k: pytest.fail("sampling started"))
    with pytest.raises(ValueError, match=match) as error:
        pipe(num_inference_steps=2, **kwargs)
    assert "\n" not in str(error.value)


def test_labels_for_an_unconditional_pipeline_are_refused():
    pipe = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler())
    with pytest.raises(ValueError, match="class_labels were given to an unconditional model; load a"):
        pipe(class_labels=[1], num_inference_steps=2)
    assert not pipe.is_class_conditional


def test_a_conditional_pipeline_saves_and_loads_with_its_classes(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "cond")
    loaded = DDPMMnistPipeline.from_pretrained(tmp_path / "cond")
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[4, 8], guidance_scale=2.0, num_inference_steps=3, output_type="np")
    assert np.array_equal(
        pipe(generator=torch.Generator().manual_seed(1), **kwargs).images,
        loaded(generator=torch.Generator().manual_seed(1), **kwargs).images,
    )


def reverse_process_by_hand(pipe, unet, labels, scale, interval, steps=6, seed=0):
    """Algorithm 2 with classifier-free guidance written out step by step, the conditional and the null prediction
    from separate UNet calls: eps = eps(x_t, null) + s (eps(x_t, y) - eps(x_t, null)) where low <= t <= high (every
    step without an interval), eps(x_t, y) elsewhere. Returns x_0 and the timesteps that were guided."""
    generator = torch.Generator().manual_seed(seed)
    scheduler = DDPMMnistScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    x = torch.randn(len(labels), 1, 28, 28, generator=generator)
    null, guided = torch.full_like(labels, 10), []
    for t in scheduler.timesteps:
        with torch.no_grad():
            eps = unet(x, t, labels).sample
            if interval is None or interval[0] <= int(t) <= interval[1]:
                eps_null = unet(x, t, null).sample
                eps = eps_null + scale * (eps - eps_null)
                guided.append(int(t))
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x, guided


@pytest.mark.parametrize("interval", [None, (0, 1000)])
def test_guidance_at_every_step_is_todays_guidance_and_the_default(pipe, conditional, interval):
    labels = torch.tensor([2, 9])
    x_0, guided = reverse_process_by_hand(pipe, conditional, labels, 2.5, interval)
    assert len(guided) == 6
    kwargs = dict(class_labels=labels, guidance_scale=2.5, num_inference_steps=6, output_type="pt")
    default = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    with_interval = pipe(generator=torch.Generator().manual_seed(0), guidance_interval=interval, **kwargs).images
    assert torch.equal(default, with_interval)
    torch.testing.assert_close(default, (x_0 / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_outside_the_guidance_interval_a_step_is_the_conditional_prediction_alone(pipe, conditional, monkeypatch):
    # Six steps, at t = 830, 664, 498, 332, 166 and 0: guided at 664, 498 and 332 only.
    labels, interval = torch.tensor([2, 9]), (300, 700)
    x_0, guided = reverse_process_by_hand(pipe, conditional, labels, 2.5, interval)
    assert guided == [664, 498, 332]
    calls, forward = [], pipe.unet.forward

    def recording_forward(sample, timestep, class_labels=None, return_dict=True):
        calls.append((int(timestep), class_labels.tolist()))
        return forward(sample, timestep, class_labels, return_dict)

    monkeypatch.setattr(pipe.unet, "forward", recording_forward)
    images = pipe(
        class_labels=labels,
        guidance_scale=2.5,
        guidance_interval=interval,
        num_inference_steps=6,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    # Step by step: a batch with the null class inside the interval, the labels alone (one call of N) outside it.
    assert [t for t, _ in calls] == pipe.scheduler.timesteps.tolist()
    for t, sent in calls:
        assert sent == ([2, 9, 10, 10] if t in guided else [2, 9])
    torch.testing.assert_close(images, (x_0 / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)
    everywhere = pipe(class_labels=labels, guidance_scale=2.5, num_inference_steps=6,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    assert not torch.allclose(images, everywhere)
