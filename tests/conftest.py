"""Shared fixtures and functions for the tests: running gan.py, tiny flags, synthetic data.

End-to-end tests run the real CLI as a subprocess (`run_gan`); fast checks call
`gan.main(argv)` in-process (`gan_main`). Everything runs on the CPU with tiny nets.

The program's modules (and with them torch) are imported in the functions that use them:
pytest-xdist's controller loads this file too, before it starts the workers, and uses none of them.
"""

import contextlib
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GAN_PY = ROOT / "gan.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Flags of the smallest useful run: 16x16, 8 channels, 32 fake images in 4 steps of 8.
TINY_ARGS = (
    "--dataset", "fake", "--device", "cpu", "--no-compile", "--workers", "0",
    "--image-size", "16", "--nz", "8", "--ngf", "8", "--ndf", "8",
    "--batch-size", "8", "--subset", "32", "--log-every", "2", "--seed", "1",
)  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny nets on a small, shared CPU: one thread is many times faster than several
    threads fighting for two cores (OpenMP spin-waits), and it makes runs deterministic."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    """The decoded-image cache of every run of the test suite (in-process or a subprocess, which
    inherits the environment) goes to a temp folder, never to the real ~/.cache/dcgan."""
    from foldercache import CACHE_ENV

    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("session_cache"))
    yield
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    """Each test's own cache folder (outside tmp_path, so that tests of tmp_path see only their files)."""
    from foldercache import CACHE_ENV

    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


@pytest.fixture(autouse=True)
def loss_plot_stand_in(request, monkeypatch):
    """An in-process run's losses.png is stand_ins.one_pixel_loss_plot's, but in the tests marked real_loss_plot."""
    from stand_ins import one_pixel_loss_plot

    import artifacts

    if not request.node.get_closest_marker("real_loss_plot"):
        monkeypatch.setattr(artifacts, "plot_losses", one_pixel_loss_plot)


WRITER_STOP_SECONDS = 10  # a job of a tiny run is written in well under a second


@pytest.fixture(autouse=True)
def stop_writer_threads(monkeypatch):
    """Every BackgroundWriter thread a test started is stopped when the test ends, passed or failed:
    one left waiting for jobs (a failed wait(), a close() never reached) is not a daemon, and
    pytest would never exit after reporting the failure. A thread the test left running fails it:
    the code under test, or the test, should have closed its writer."""
    from outputs import BackgroundWriter

    started = []
    real_init = BackgroundWriter.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(BackgroundWriter, "__init__", recording_init)
    try:
        yield
    finally:
        left = [background for background in started if background.thread.is_alive()]
        for background in left:
            with contextlib.suppress(queue.Full):  # a job that never returns keeps the queue full
                background.jobs.put(None, timeout=WRITER_STOP_SECONDS)
            background.thread.join(timeout=WRITER_STOP_SECONDS)
        stuck = sum(background.thread.is_alive() for background in left)
        assert not left, f"the test left {len(left)} writer thread(s) running; {stuck} still blocked in a job"


@pytest.fixture
def tiny_args():
    """A fresh, mutable list of TINY_ARGS (no --epochs: every test says how many)."""
    return list(TINY_ARGS)


def subprocess_env(**extra):
    """The environment for gan.py subprocesses: one thread (deterministic, and kind to a
    2-core machine running several tests) and no torchrun variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.update(extra)
    return env


def pytest_configure(config):
    """Ctrl-C handled as in a terminal, by this process and so by every gan.py it starts: a suite
    started in the background by a shell without job control inherits SIGINT ignored, which a
    child keeps, and Python there never raises KeyboardInterrupt."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# The files that take longest, first: pytest-xdist hands files to its workers in the order they are
# collected (pyproject.toml's --no-loadscope-reorder), and a long file handed out last would keep one
# worker busy while the other waits.
SLOWEST_FILES_FIRST = (
    "test_distributed.py",
    "test_compiled.py",
    "test_faults.py",
    "test_self_check.py",
    "test_export.py",
)


def pytest_collection_modifyitems(items):
    """The slowest files first; the order of every file's own tests, and of the other files, kept."""
    first = {name: index for index, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


def run_gan(args, cwd, timeout=240, script=GAN_PY, **env):
    """Run `python gan.py ARGS` (or another script) in cwd; return the CompletedProcess (text stdout/stderr)."""
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_ok(result):
    """Assert a run_gan result succeeded, showing its output when it did not."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture
def gan_main(monkeypatch, capsys, tmp_path):
    """Call gan.main(argv) in-process with cwd=tmp_path; returns (exit code, stdout, stderr).

    Much faster than a subprocess (no torch import); use it for checks that fail or
    finish before training. The signal handlers of a training run are not installed.
    """
    import gan

    monkeypatch.chdir(tmp_path)
    ready_for_main_in_process(monkeypatch)

    def call(argv, metric_feature=None):
        capsys.readouterr()
        code = gan.main([str(a) for a in argv], metric_feature)
        out, err = capsys.readouterr()
        return code, out, err

    return call


def ready_for_main_in_process(patch):
    """Through the MonkeyPatch patch, what gan.main needs to run inside the test process: a training
    run's signal handlers not installed (pytest's own stay), and no torchrun variables."""
    import faults

    patch.setattr(faults.StopRequest, "install", lambda self: None)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        patch.delenv(name, raising=False)


def run_in_process(argv, folder):
    """gan.main(argv)'s exit code, run in folder in this process as gan_main runs it: for a run that
    a module's tests share, which need not be a new process."""
    import gan

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        ready_for_main_in_process(patch)
        return gan.main([str(a) for a in argv])


# ---------------------------------------------------------------- a trained run, made once


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A folder holding a finished 2-epoch TINY_ARGS run (images/, checkpoints/).

    Shared by every test of the run: never modify it; copy it with `copy_run` first.
    """
    folder = tmp_path_factory.mktemp("trained_run")
    result = check_ok(run_gan([*TINY_ARGS, "--epochs", "2"], folder))
    (folder / "stdout.txt").write_text(result.stdout)
    return folder


def copy_run(source, destination):
    """Copy a run's images/ and checkpoints/ into destination (created); keeps mtimes."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("images", "checkpoints"):
        if (Path(source) / name).is_dir():
            shutil.copytree(Path(source) / name, destination / name, copy_function=shutil.copy2)
    return destination


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of trained_run in tmp_path (the test's cwd for run_gan/gan_main)."""
    return copy_run(trained_run, tmp_path)


def snapshot(folder):
    """{relative path: bytes} of every file under folder, to prove nothing was touched (but the
    lock file a run holds while it runs)."""
    from files import LOCK_NAME

    folder = Path(folder)
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME)
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def png_pixels(path):
    """A PNG's pixels as ints (3, H, W)."""
    import torch
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).int()


def as_pixels(images):
    """Colours in [-1, 1] as the ints a PNG of them holds, in the same layout."""
    import torch

    return images.add(1).div(2).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).int()


def saved_generator(path):
    """The EMA generator of a checkpoint saved at an epoch's end, in eval mode, and its nz: what
    --generate, --interpolate and --evaluate draw with."""
    import torch

    import sampling

    state = torch.load(path, weights_only=True)
    G = sampling.generator_of(state["flags"])
    G.load_state_dict(state["netG_ema"])
    return G.eval(), state["flags"]["nz"]


def truncated_noise(count, nz, truncation, generator):
    """count noise vectors of a standard normal truncated to [-truncation, truncation] (the
    truncation trick), drawn from generator."""
    import torch

    noise = torch.empty(count, nz, 1, 1)
    return torch.nn.init.trunc_normal_(noise, 0.0, 1.0, -truncation, truncation, generator=generator)


def drawn_pixels(G, noise):
    """G's images of noise as the ints (N, 3, H, W) a PNG or the scorer receives."""
    import torch

    with torch.no_grad():
        return as_pixels(G(noise))


# ---------------------------------------------------------------- synthetic CIFAR-10


def cifar_colour(index):
    """The solid RGB colour of synthetic CIFAR-10 image `index` (distinct channels)."""
    return ((index * 5 + 10) % 256, (index * 37 + 60) % 256, (250 - index * 3) % 256)


def write_cifar10_archive(root, images_per_batch=10):
    """Write root/cifar-10-python.tar.gz in CIFAR-10's own format, each image a solid colour.

    Like the real archive it holds cifar-10-batches-py/ with data_batch_1..5, test_batch
    and batches.meta; each batch is a pickled dict with 'data' (uint8, (n, 3072), the
    1024 red, then green, then blue values of each row) and 'labels'. Training image i
    (in batch order) has colour cifar_colour(i) and label i % 10. Returns the training images
    as uint8 (N, 3, 32, 32), the array gan.py should read back.
    """
    root = Path(root)
    staging = root / "_staging" / "cifar-10-batches-py"
    staging.mkdir(parents=True)
    colours = np.array([cifar_colour(i) for i in range(5 * images_per_batch)], dtype=np.uint8)
    images = np.broadcast_to(colours[:, :, None, None], (len(colours), 3, 32, 32)).copy()
    for number in range(1, 6):
        chunk = images[(number - 1) * images_per_batch : number * images_per_batch]
        first = (number - 1) * images_per_batch
        _write_cifar_pickle(staging / f"data_batch_{number}", chunk, f"training batch {number} of 5", first)
    _write_cifar_pickle(
        staging / "test_batch", np.zeros((images_per_batch, 3, 32, 32), np.uint8), "testing batch 1 of 1"
    )
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (staging / "batches.meta").write_bytes(pickle.dumps({**meta, "num_cases_per_batch": images_per_batch}))
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging, arcname="cifar-10-batches-py")
    shutil.rmtree(root / "_staging")
    return images


def _write_cifar_pickle(path, images, label, first=0):
    batch = {
        "batch_label": label,
        "labels": [(first + i) % 10 for i in range(len(images))],
        "data": images.reshape(len(images), 3072),
        "filenames": [f"image_{i}.png" for i in range(len(images))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


class RunsCode:
    """A pickle payload: unpickling it calls open(marker, "w"), so the marker file appears if code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- reading what the program wrote


def measured_values(arch, image_size, width=8, nz=8):
    """What models.count_values estimates, measured on the networks themselves: (their parameters,
    the values their layers output that take memory of their own: not in-place activations, not
    reshapes), for a batch of one."""
    import torch

    from models import build_discriminator, build_generator

    G, D = build_generator(arch, nz, width, image_size), build_discriminator(arch, width, image_size)
    outputs = []

    def record(module, inputs, output):
        if output.data_ptr() != inputs[0].data_ptr():
            outputs.append(output[0].numel())

    for layer in [*G.main, *D.main]:
        layer.register_forward_hook(record)
    D(G(torch.zeros(2, nz, 1, 1)))
    return sum(p.numel() for net in (G, D) for p in net.parameters()), sum(outputs)


def load_folder(root, image_size, workers, cache_dir=None, say=None):
    """A whole folder as the program decodes it: a uint8 CPU tensor (N, 3, S, S), through the cache."""
    import foldercache

    return foldercache.open_folder(foldercache.FolderListing.of(root, image_size), workers, cache_dir, say).to_device(
        "cpu"
    )


def load_cifar10(root, download=True):
    """CIFAR-10's 50k training images as the program reads them: uint8 (N, 3, 32, 32) on the CPU."""
    import utils

    return utils.load_cifar10_labelled(root, download)[0]


def read_metrics_log(path):
    """The metrics log's rows as dicts, read as a resume reads it (torn or damaged lines skipped)."""
    import metricslog

    path = Path(path)
    if not path.is_file():
        return []
    rows, damaged = metricslog.parse_metrics(path.read_bytes().decode("utf-8", errors="replace"))
    if damaged:
        warnings.warn(f"skipped {damaged} damaged lines of {path}", stacklevel=2)
    return rows
