"""Run `training/train.py` as `__main__` with test instrumentation, under `python` or `accelerate launch`.

Writes to $RECORD_DIR, per process: `pid-<rank>.txt` (for the test to signal a hung worker, which torch's
launcher starts in a session of its own), `seen-<rank>.txt` (the id, top-left pixel, of every example trained
on), `noise-<rank>.txt` (per batch: the timesteps drawn and a digest of the noise eps), `labels-<rank>.txt` (the class
labels a conditional UNet was given in training, one line per batch) and, at the end,
`weights-<rank>.txt` (a digest of that process's final training weights). With $INJECT_NAN_AT_BATCH=k the k-th batch
(1-based) becomes NaN, as corrupt data would; with $STOP_AFTER_CHECKPOINT set, each process sends itself SIGTERM
once its first checkpoint is saved, as Ctrl-C at that moment would. With $TRIAL_STEPS_PER_SECOND=r, a time budget
measures r steps per second whatever the machine's load: its trial steps run, on a clock that gives each 1/r seconds.
"""

import hashlib
import itertools
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from accelerate import Accelerator

from ddpm_mnist import DDPMMnistScheduler, DDPMMnistUNet, training_utils
from ddpm_mnist.data import ImagePreprocessor

ROOT = Path(__file__).resolve().parents[1]
RECORD_DIR = Path(os.environ["RECORD_DIR"])
RANK = os.environ.get("RANK", "0")
NAN_AT = int(os.environ.get("INJECT_NAN_AT_BATCH", "0"))
STOP_AFTER_CHECKPOINT = "STOP_AFTER_CHECKPOINT" in os.environ
TRIAL_STEPS_PER_SECOND = float(os.environ.get("TRIAL_STEPS_PER_SECOND", "0"))
(RECORD_DIR / f"pid-{RANK}.txt").write_text(str(os.getpid()))
scale_batch = ImagePreprocessor.scale
end_training = Accelerator.end_training
save_state = Accelerator.save_state
add_noise = DDPMMnistScheduler.add_noise
unet_forward = DDPMMnistUNet.forward
batches = 0
checkpoints = 0


def recording_scale(self, pixels):
    global batches
    batches += 1
    with open(RECORD_DIR / f"seen-{RANK}.txt", "a") as f:
        f.write("\n".join(str(int(pixel)) for pixel in pixels[:, 0, 0]) + "\n")
    x_0 = scale_batch(self, pixels)
    return x_0 * float("nan") if batches == NAN_AT else x_0


def recording_add_noise(self, x_0, eps, t):
    digest = hashlib.sha256(eps.detach().cpu().numpy().tobytes()).hexdigest()[:16]
    with open(RECORD_DIR / f"noise-{RANK}.txt", "a") as f:
        f.write(f"{' '.join(str(int(step)) for step in t)} {digest}\n")
    return add_noise(self, x_0, eps, t)


def recording_forward(self, sample, timestep, class_labels=None, return_dict=True):
    if self.training and class_labels is not None:
        with open(RECORD_DIR / f"labels-{RANK}.txt", "a") as f:
            f.write(" ".join(str(int(label)) for label in class_labels) + "\n")
    return unet_forward(self, sample, timestep, class_labels, return_dict)


def recording_end_training(self):
    digest = hashlib.sha256()
    for tensor in self.unwrap_model(self._models[0]).state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    (RECORD_DIR / f"weights-{RANK}.txt").write_text(digest.hexdigest())
    end_training(self)


def stopping_save_state(self, *args, **kwargs):
    global checkpoints
    checkpoints += 1
    saved = save_state(self, *args, **kwargs)
    if STOP_AFTER_CHECKPOINT and checkpoints == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return saved


ImagePreprocessor.scale = recording_scale
DDPMMnistScheduler.add_noise = recording_add_noise
DDPMMnistUNet.forward = recording_forward
Accelerator.end_training = recording_end_training
Accelerator.save_state = stopping_save_state
if TRIAL_STEPS_PER_SECOND:
    trial_clock = itertools.count(0.0, 1 / TRIAL_STEPS_PER_SECOND)
    training_utils.time = SimpleNamespace(time=time.time, perf_counter=lambda: next(trial_clock))
sys.argv[0] = str(ROOT / "training" / "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
