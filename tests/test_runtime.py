"""Device, precision and compilation choices, and the layout of the real batches (no GPU needed:
the choices are plain functions of the requested values and a torch.device)."""

import pytest
import torch
import torch.nn.functional as F

import runtime
import utils
from errors import UserError

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")


@pytest.mark.parametrize(
    "requested, device, expected",
    [("auto", MPS, None), ("fp32", CUDA, None), ("bf16", CPU, torch.bfloat16), ("fp16", CPU, torch.float16),
     ("bf16", CUDA, torch.bfloat16), ("fp32", CPU, None)],
)  # fmt: skip
def test_precision_choices(requested, device, expected):
    assert runtime.choose_precision(requested, device) == expected


@pytest.mark.parametrize(
    "capabilities, expected",
    [({"avx512_bf16": True, "amx_bf16": False}, torch.bfloat16), ({"avx512_bf16": False, "amx_bf16": True},
     torch.bfloat16), ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, None), ({"bf16": True}, None)],
)  # fmt: skip
def test_auto_precision_on_the_cpu_is_bf16_where_it_has_bf16_instructions(monkeypatch, capabilities, expected):
    """As torch's cpuinfo reports them (ARM's "bf16" is not counted: not measured there)."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert runtime.choose_precision("auto", CPU) == expected
    assert runtime.choose_precision("fp32", CPU) is None  # typed, it is kept


def test_compile_choices():
    assert runtime.choose_compile("auto", CUDA) is True
    assert runtime.choose_compile("auto", CPU) is False
    assert runtime.choose_compile("off", CUDA) is False
    assert runtime.choose_compile("on", CPU) is True  # this machine has a C++ compiler
    # --sync-bn: auto leaves it uncompiled, an explicit --compile on is refused
    assert runtime.choose_compile("auto", CUDA, sync_bn=True) is False
    with pytest.raises(UserError, match="--sync-bn does not work with --compile on"):
        runtime.choose_compile("on", CUDA, sync_bn=True)


def test_compile_on_without_a_cpp_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
        runtime.choose_compile("on", CPU)


def test_real_batches_come_in_ds_layout_and_dtype():
    """On CUDA with bf16, real batches are bf16 and channels_last like G's output, so D has one graph."""
    cuda_bf16 = runtime.Runtime(CUDA, torch.bfloat16)
    assert cuda_bf16.batch_layout == {"dtype": torch.bfloat16, "memory_format": torch.channels_last}
    cpu_bf16 = runtime.Runtime(CPU, torch.bfloat16)
    assert cpu_bf16.batch_layout == {"dtype": torch.float32, "memory_format": torch.channels_last}
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    batch = next(
        utils.DeviceBatches(images, 8, 8, seed=0, dtype=torch.bfloat16, memory_format=torch.channels_last).epoch(0)
    )
    assert batch.dtype == torch.bfloat16 and batch.is_contiguous(memory_format=torch.channels_last)


def test_upsampling_without_antialiasing_gives_the_same_pixels():
    """Antialiasing only matters when shrinking: 32 -> 64 is the same without its slower kernel."""
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    grown = utils.to_float_images(images, 64)
    reference = F.interpolate(images.float() / 127.5 - 1, size=64, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(grown, reference, atol=1e-6, rtol=0)
    shrunk = utils.to_float_images(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), 32)
    assert shrunk.shape == (4, 3, 32, 32)


def test_shrinking_averages_the_pixels_it_drops():
    """64 -> 32 is bilinear with antialiasing: every source pixel weighs in, where plain bilinear
    would sample between two of every four and alias fine detail."""
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shrunk = utils.to_float_images(images, 32)
    reference = F.interpolate(images.float() / 127.5 - 1, size=32, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(shrunk, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "processes, per_machine, words",
    [(4, "2", ("torchrun", "--nnodes=2", "--nproc_per_node=2")), (4, "4", ("torchrun", "--nproc_per_node=4")),
     (1, None, ("python",))],
)  # fmt: skip
def test_the_resume_command_starts_as_many_machines_and_processes_as_the_run(
    monkeypatch, processes, per_machine, words
):
    if per_machine is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", per_machine)
    assert runtime.launcher_words(runtime.Runtime(torch.device("cpu"), world_size=processes)) == words
