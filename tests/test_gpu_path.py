"""The CUDA and NCCL code paths, checked on the CPU: torch.cuda's answers monkeypatched, the
optimizer's state placed on the meta device (a device other than the CPU), CUDA's autocast
policy for torch.mv imitated on the CPU, and the order of torchrun's collectives recorded.
"""

import copy
import datetime

import pytest
import torch
from conftest import TINY_ARGS, run_gan
from torch import nn

import checkpoint
import models
import options
import runtime
import steps
import utils
from errors import UserError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


# ---------------------------------------------------------------- optimizer state across devices

ADAM_ON = {  # the Adam settings build_nets picks on each device
    "cpu": {"fused": None, "foreach": True, "capturable": False},
    "cuda": {"fused": True, "foreach": None, "capturable": False},
    "cuda graphs": {"fused": None, "foreach": None, "capturable": True},
}


def saved_adam_state(settings, parameter_shapes, step=3.0):
    """An Adam state_dict as a run with these settings writes it (loaded back on the CPU)."""
    group = {
        "lr": 2e-4, "betas": (0.5, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False, "maximize": False,
        "differentiable": False, "decoupled_weight_decay": False, **settings, "params": list(range(len(parameter_shapes))),
    }  # fmt: skip
    state = {
        index: {"step": torch.tensor(step), "exp_avg": torch.full(shape, 0.1), "exp_avg_sq": torch.full(shape, 0.01)}
        for index, shape in enumerate(parameter_shapes)
    }
    return {"state": state, "param_groups": [group]}


@pytest.mark.parametrize("saved_on", list(ADAM_ON))
@pytest.mark.parametrize("resumed_on", ["cpu", "cuda", "cuda graphs"])
def test_optimizer_state_lands_where_this_runs_adam_reads_it(saved_on, resumed_on):
    """The meta device stands in for the GPU: the moments follow the parameters, the step counts
    go where this run's kernels read them (beside the parameters for fused or capturable Adam,
    on the CPU otherwise), and the group flags are this run's."""
    device = CPU if resumed_on == "cpu" else torch.device("meta")
    parameters = [nn.Parameter(torch.zeros(4, 3, device=device)), nn.Parameter(torch.zeros(3, device=device))]
    optimizer = torch.optim.Adam(parameters, lr=1e-4, betas=(0.0, 0.99), **ADAM_ON[resumed_on])
    saved = saved_adam_state(ADAM_ON[saved_on], [p.shape for p in parameters])
    optimizer.load_state_dict(checkpoint.with_this_runs_settings(saved, optimizer))
    group = optimizer.param_groups[0]
    assert {key: group[key] for key in ADAM_ON[resumed_on]} == ADAM_ON[resumed_on]
    assert (group["lr"], group["betas"]) == (1e-4, (0.0, 0.99))  # this run's, not the checkpoint's
    step_device = CPU if resumed_on == "cpu" else device
    for parameter in parameters:
        entry = optimizer.state[parameter]
        assert entry["exp_avg"].device == device and entry["exp_avg_sq"].device == device
        assert entry["step"].device == step_device and entry["step"].dtype == torch.float32


def test_restore_state_loads_the_optimizers_with_this_runs_settings(tmp_path):
    """restore_state goes through with_this_runs_settings: a CPU checkpoint's foreach flag does
    not replace the settings of the Adam this run built."""
    opts, _ = options.parse_flags([*TINY_ARGS])
    cpu = runtime.setup_runtime(opts)
    nets = steps.build_nets(opts, cpu)
    saved = checkpoint.checkpoint_state(nets, checkpoint.Progress(), torch.zeros(1), opts, cpu)
    saved["optG"]["param_groups"][0]["foreach"] = False
    saved["optG"]["param_groups"][0]["lr"] = 0.5
    checkpoint.restore_state(nets, saved, cpu, tmp_path / "checkpoint.pt")
    assert nets.opt_G.param_groups[0]["foreach"] is True and nets.opt_G.param_groups[0]["lr"] == opts.lr


# ---------------------------------------------------------------- torchrun's process group


class FakeCuda:
    """torch.cuda's answers on a machine with `count` GPUs; records the device it is told to use."""

    def __init__(self, monkeypatch, count, bf16_native=True):
        self.devices = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.devices.append)
        # bf16 emulated in software (V100, T4) counts only when including_emulation is left True
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_native or including_emulation
        )


class FakeStore:
    """torchrun's key-value store, as a dict; wait() returns once the keys are there (or fails)."""

    def __init__(self):
        self.values, self.waits = {}, []

    def add(self, key, amount):
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]

    def set(self, key, value):
        self.values[key] = value

    def wait(self, keys, timeout):
        self.waits.append(timeout)
        assert all(key in self.values for key in keys), f"{keys} would wait {timeout}"


@pytest.fixture
def joined_groups(monkeypatch):
    """The arguments of every init_process_group call (no group is made), with the store and the
    timeout of torchrun's rendezvous."""
    calls = []
    store = FakeStore()

    def rendezvous(url, **kwargs):
        calls.append(("rendezvous", url, kwargs))
        yield store, 1, 2

    monkeypatch.setattr(runtime.dist, "rendezvous", rendezvous)
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(runtime.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(runtime.dist, "get_world_size", lambda: 2)
    return calls


def torchrun_environment(monkeypatch, local_rank, processes_here=2, world_size=2):
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes_here))


def test_the_process_group_knows_its_gpu_and_its_collectives_wait_ten_minutes(monkeypatch, joined_groups):
    fake = FakeCuda(monkeypatch, count=2)
    torchrun_environment(monkeypatch, local_rank=1)
    rank, world_size, local_rank, waits = runtime.start_distributed("auto")
    assert (rank, world_size, local_rank) == (1, 2, 1)
    rendezvous, (args, kwargs) = joined_groups
    assert rendezvous == ("rendezvous", "env://", {"timeout": runtime.PREPARATION_TIMEOUT})
    assert args == ("nccl",)
    assert kwargs["timeout"] == runtime.COLLECTIVE_TIMEOUT == datetime.timedelta(minutes=10)
    assert (kwargs["store"], kwargs["rank"], kwargs["world_size"]) == (waits.store, 1, 2)
    assert kwargs["device_id"] == torch.device("cuda", 1) and fake.devices == [torch.device("cuda", 1)]


def test_gloo_groups_wait_as_long(monkeypatch, joined_groups):
    torchrun_environment(monkeypatch, local_rank=1)
    waits = runtime.start_distributed("cpu")[3]
    assert joined_groups[1] == (
        ("gloo",),
        {"store": waits.store, "rank": 1, "world_size": 2, "timeout": runtime.COLLECTIVE_TIMEOUT, "device_id": None},
    )


def test_the_ranks_wait_hours_for_one_another_through_the_store(monkeypatch, joined_groups):
    """barrier(): each rank counts itself in; the last one in opens the barrier for all. Rank 0
    preparing the data (or scoring FID) may take hours: the wait's timeout is not the collectives'."""
    torchrun_environment(monkeypatch, local_rank=1)
    waits = runtime.start_distributed("cpu")[3]
    two = runtime.Runtime(CPU, rank=1, world_size=2, waits=waits)
    waits.store.add("gan.py/barrier/1", 1)  # the other rank came first
    runtime.barrier(two)
    assert waits.store.values == {"gan.py/barrier/1": 2, "gan.py/barrier/1/all": "1"}
    assert waits.store.waits == [runtime.WAIT_SLICE]
    with pytest.raises(AssertionError, match=r"\['gan.py/barrier/2/all'\] would wait"):
        runtime.barrier(two)  # the next barrier has its own keys, and this rank is the first there

    slices = []

    def timed_out(keys, timeout):
        slices.append(timeout)
        raise runtime.dist.DistStoreError(f"wait timeout after {timeout}, keys: {keys}")

    # waited in slices of a second (a signal is handled between two), for two hours in all
    clock = iter([0.0, 1.0, 3600.0, 7199.0, 7200.0])
    monkeypatch.setattr(runtime.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(waits.store, "wait", timed_out)
    with pytest.raises(UserError) as refused:
        runtime.barrier(two)
    assert slices == [datetime.timedelta(seconds=1)] * 4 and runtime.PREPARATION_TIMEOUT == datetime.timedelta(hours=2)
    assert str(refused.value) == (
        "waited 2:00:00 (h:mm:ss) for the other processes, which did not come: one of them is stuck or has died"
    )


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch, joined_groups, gan_main):
    """torchrun --nproc_per_node=2 on a 1-GPU machine (or one GPU per task, as SLURM sets it)."""
    fake = FakeCuda(monkeypatch, count=1)
    torchrun_environment(monkeypatch, local_rank=1)
    code, out, err = gan_main([*TINY_ARGS[:2], "--device", "auto"])
    assert code == 2
    assert "has 1 GPU(s) visible but starts process LOCAL_RANK=1" in err and "--nproc_per_node=1" in err
    assert "Traceback" not in err and fake.devices == [] and joined_groups == []


@pytest.mark.parametrize("device", ["cuda:1", "cuda:2"])
def test_a_gpu_past_the_ones_here_is_one_clear_error(monkeypatch, gan_main, tmp_path, device):
    fake = FakeCuda(monkeypatch, count=1)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--device", device])
    assert code == 2 and err == f"gan.py: error: --device {device}: only 1 GPU(s) here\n"
    assert fake.devices == [] and list(tmp_path.iterdir()) == []


def test_one_named_gpu_for_every_process_of_a_machine_is_refused(monkeypatch, joined_groups, gan_main):
    fake = FakeCuda(monkeypatch, count=2)
    torchrun_environment(monkeypatch, local_rank=0)
    code, out, err = gan_main([*TINY_ARGS[:2], "--device", "cuda:1"])
    assert code == 2
    assert "--device cuda:1 under torchrun puts all 2 processes of this machine on one GPU" in err
    assert fake.devices == [] and joined_groups == []
    # one process per machine may name its GPU
    torchrun_environment(monkeypatch, local_rank=0, processes_here=1)
    runtime.start_distributed("cuda:1")
    assert fake.devices == [torch.device("cuda", 1)] and joined_groups[1][1]["device_id"] == torch.device("cuda", 1)


@pytest.mark.parametrize(
    "rank, local_rank, turns",
    [(0, 0, ["load", "barrier", "barrier", "barrier"]),  # rank 0 first: on a shared filesystem its copy serves all
     (1, 1, ["barrier", "barrier", "load", "barrier"]),  # rank 0's machine: reads rank 0's copy
     (2, 0, ["barrier", "load", "barrier", "barrier"]),  # another machine's first process: its machine's copy
     (3, 1, ["barrier", "barrier", "load", "barrier"])],  # and the rest of that machine after it
)  # fmt: skip
def test_each_machine_prepares_its_data_before_its_other_processes_read_it(monkeypatch, rank, local_rank, turns):
    order = []
    monkeypatch.setattr(utils, "barrier", lambda runtime: order.append("barrier"))
    loaded = utils.TrainingData(torch.zeros(32, 3, 16, 16, dtype=torch.uint8), None, None)  # one step of 4 ranks
    monkeypatch.setattr(utils, "load_training_data", lambda *args, **kwargs: order.append("load") or loaded)
    opts, _ = options.parse_flags([*TINY_ARGS])
    two_machines = runtime.Runtime(CPU, rank=rank, world_size=4, local_rank=local_rank)
    utils.load_batches(opts, two_machines)
    assert order == turns


# ---------------------------------------------------------------- precision and compilation


@pytest.fixture
def cuda_math_settings():
    """torch.backends' CUDA settings as they are now, put back after the test (monkeypatch cannot:
    they are properties computed by torch's C++ side)."""
    settings = ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"))
    settings += ((torch.backends.cudnn, "benchmark"),)
    saved = [getattr(module, name) for module, name in settings]
    yield
    for (module, name), value in zip(settings, saved):
        setattr(module, name, value)


@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("bf16", True), ("fp16", True), ("auto", True)])
def test_fp32_runs_no_tf32_on_cuda(monkeypatch, cuda_math_settings, precision, tf32):
    """TF32 keeps 10 bits of an fp32 input's 23: --precision fp32 asks for full fp32 matmuls and
    convolutions; under autocast the fp32 that is left (losses, Adam) may take TF32's speed."""
    FakeCuda(monkeypatch, count=1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32  # the opposite first
    opts, _ = options.parse_flags([*TINY_ARGS[:2], "--device", "cuda", "--no-compile", "--precision", precision])
    on_cuda = runtime.setup_runtime(opts)
    assert on_cuda.device == CUDA and on_cuda.precision_name.startswith(precision if precision != "auto" else "bf16")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)


def test_auto_precision_counts_only_native_bf16(monkeypatch):
    FakeCuda(monkeypatch, count=1, bf16_native=False)  # a V100 or T4: bf16 only in emulation
    assert runtime.choose_precision("auto", CUDA) == torch.float16
    FakeCuda(monkeypatch, count=1, bf16_native=True)  # an A100 or H100
    assert runtime.choose_precision("auto", CUDA) == torch.bfloat16


@pytest.mark.parametrize("distributed", [False, True])
def test_the_compile_mode_reaches_torch_compile(monkeypatch, distributed):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: modes.append(kwargs.get("mode")) or function)
    monkeypatch.setattr(steps, "DDP", lambda module, **kwargs: module)
    opts, _ = options.parse_flags([*TINY_ARGS])
    world_size = 2 if distributed else 1
    compiled = runtime.Runtime(CPU, compile=True, world_size=world_size, compile_mode="max-autotune")
    steps.build_nets(opts, compiled)
    assert modes == ["max-autotune"] * 3


def without_compilers(monkeypatch, present=()):
    monkeypatch.setattr(runtime.shutil, "which", lambda name: name if name in present else None)


def test_compile_on_cuda_needs_a_c_compiler_for_triton(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    without_compilers(monkeypatch, present=("g++",))  # a C++ compiler is no help to Triton
    with pytest.warns(UserWarning, match=r"needs a C compiler \(gcc or clang\) for Triton: training uncompiled"):
        assert runtime.choose_compile("auto", CUDA) is False
    with pytest.raises(UserError, match=r"--compile on needs a C compiler \(gcc or clang\) for Triton"):
        runtime.choose_compile("on", CUDA)
    monkeypatch.setenv("CC", "/opt/missing/cc")  # Triton uses $CC and nothing else when it is set
    without_compilers(monkeypatch, present=("gcc",))
    with pytest.raises(UserError, match="the C compiler CC=/opt/missing/cc, which is not there"):
        runtime.choose_compile("on", CUDA)
    without_compilers(monkeypatch, present=("/opt/missing/cc",))
    assert runtime.choose_compile("on", CUDA) is True


def test_compile_on_with_cxx_missing_at_its_full_path_writes_nothing(tmp_path):
    """inductor runs $CXX itself, by its full path (read when torch starts): a c++ on the PATH does
    not stand in for it."""
    missing = tmp_path / "no-such-dir" / "g++"
    result = run_gan([*TINY_ARGS, "--epochs", "1", "--compile", "on"], tmp_path, CXX=str(missing))
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        result.stderr
        == f"gan.py: error: --compile on needs the C++ compiler CXX={missing}, which is not there: install one or use --compile off\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the CUDA generator on resume


def test_a_checkpoint_without_cuda_rng_state_seeds_the_cuda_generator(monkeypatch, tmp_path):
    """A CPU-written checkpoint resumed on CUDA: the noise goes on from (seed, step), not from step 0."""
    seeded, restored = [], []
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    opts, _ = options.parse_flags([*TINY_ARGS])
    nets = steps.build_nets(opts, runtime.Runtime(CPU))
    progress = checkpoint.Progress(epoch=3, step=12)
    saved = checkpoint.checkpoint_state(nets, progress, torch.zeros(1), opts, runtime.Runtime(CPU))
    assert "cuda" not in saved["rng"]
    on_cuda = runtime.Runtime(CUDA)
    checkpoint.restore_state(nets, saved, on_cuda, tmp_path / "checkpoint.pt")
    assert seeded == [runtime.mixed_seed(1, 12)] and restored == []
    # a checkpoint written on CUDA carries its generator's state, restored as it was
    saved["rng"]["cuda"] = torch.arange(4, dtype=torch.uint8)
    checkpoint.restore_state(nets, saved, on_cuda, tmp_path / "checkpoint.pt")
    assert seeded == [runtime.mixed_seed(1, 12)] and restored[0][1] == CUDA
    assert torch.equal(restored[0][0], torch.arange(4, dtype=torch.uint8))


# ---------------------------------------------------------------- spectral norm under autocast


@pytest.fixture
def cuda_autocast_on_the_cpu():
    """CPU autocast with CUDA's policy for the ops of spectral norm: mv in bf16, vdot promoted."""
    library = torch.library.Library("aten", "IMPL")

    def mv_in_bf16(matrix, vector):
        with torch.autocast("cpu", enabled=False):
            return torch.mv(matrix.to(torch.bfloat16), vector.to(torch.bfloat16))

    def vdot_promoted(first, second):
        widest = torch.promote_types(first.dtype, second.dtype)
        with torch.autocast("cpu", enabled=False):
            return torch.vdot(first.to(widest), second.to(widest))

    library.impl("mv", mv_in_bf16, "AutocastCPU")
    library.impl("vdot", vdot_promoted, "AutocastCPU")
    yield
    library._destroy()


def test_spectral_norm_keeps_fp32_under_cudas_autocast(cuda_autocast_on_the_cpu):
    """sigma from a bf16 power iteration has about 3 significant digits; D's weights must not."""
    torch.manual_seed(0)
    D = models.build_discriminator("dcgan", 16, 32, spectral_norm=True).train()
    D_fp32 = copy.deepcopy(D)
    layer, layer_fp32 = D.main[2], D_fp32.main[2]  # a 32 -> 64 channel convolution
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mv(torch.ones(2, 2), torch.ones(2)).dtype == torch.bfloat16  # the imitation is on
        weight = layer.weight
    weight_fp32 = layer_fp32.weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, weight_fp32, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.parametrizations.weight[0]._u, layer_fp32.parametrizations.weight[0]._u)
