"""Where and how the numbers are computed: device, precision, compilation and torchrun's
process group, decided once at start-up and passed to everything else.
"""

import contextlib
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

from errors import UserError
from options import MAX_SEED

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# How long a rank waits for the others at a training collective (DDP's all-reduces, the logged means,
# a stop request): NCCL's default. The ranks step together, so a rank that hangs there (a stuck GPU,
# a disk that no longer answers) stops the job after this long, not hours later.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# How long the ranks wait for one process working alone, at barrier(): it downloads CIFAR-10 or
# decodes a folder into the cache (an hour for millions of images: BENCHMARKS.md, folders.py),
# or rank 0 runs the first FID pass over every real image at an epoch's end. These waits go through
# torchrun's key-value store, not through a collective bound by the timeout above.
PREPARATION_TIMEOUT = timedelta(hours=2)
# the store's wait blocks in C++, where a signal is not seen: waited in slices, a SIGTERM from
# torchrun (another rank has failed) or a Ctrl-C is handled between two of them
WAIT_SLICE = timedelta(seconds=1)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None = None  # None: full fp32
    compile: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's rank on its machine: local rank 0 prepares the machine's data
    compile_mode: str | None = None  # torch.compile's mode; None is its default (benchmarks try others)
    channels_last: bool = True  # benchmarks compare it with the contiguous layout
    waits: "StoreBarrier | None" = None  # the barriers of the ranks, under torchrun
    compile_auto: bool = False  # --compile auto: compiled only if the run's steps repay it (compiling.py)
    whole_step: bool = False  # --compile max: the whole step compiled into CUDA graphs (compiling.py)

    @property
    def is_main(self):
        return self.rank == 0

    def say(self, message):
        """A line for the user, from rank 0 alone, printed above the progress bar."""
        if self.is_main:
            tqdm.write(message)

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def precision_name(self):
        return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.amp_dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self):
        # bf16 has fp32's range and needs no loss scaling; fp16 does
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    @property
    def batch_layout(self):
        """dtype and memory format of the real batches: D's, so real and fake batches share one D graph."""
        dtype = self.amp_dtype if self.device.type == "cuda" and self.amp_dtype else torch.float32
        return {"dtype": dtype, "memory_format": self.memory_format}

    @property
    def memory_format(self):
        # channels_last pays on CUDA tensor cores and on the CPU's oneDNN convolutions (BENCHMARKS.md)
        wins = self.channels_last and self.device.type in ("cuda", "cpu")
        return torch.channels_last if wins else torch.contiguous_format


def choose_device(requested, local_rank=0):
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: no CUDA GPU is available here (try --device cpu)")
        index = int(requested[5:]) if ":" in requested else local_rank
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", index)
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here")
    return torch.device(requested)


def choose_precision(requested, device):
    """auto: bf16 on CUDA where supported, else fp16 with loss scaling; bf16 on a CPU with native
    bf16 instructions, else fp32; fp32 on MPS."""
    if requested != "auto":
        if requested == "fp16" and device.type == "mps":
            raise UserError("--precision fp16 is not supported on MPS; use fp32")
        return PRECISIONS[requested]
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if device.type != "cuda":
        return None
    # emulated bf16 (V100, T4) runs, but slower than fp16 with loss scaling
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def cpu_has_native_bf16():
    """Whether the CPU has bf16 instructions (x86's AVX512-BF16 or AMX-BF16), as torch's cpuinfo reports.

    With them oneDNN's bf16 convolutions trained 1.5x faster than fp32 at the same FD (BENCHMARKS.md);
    without them bf16 is emulated, which was not measured, nor were ARM's bf16 extensions.
    """
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(name, False) for name in ("avx512_bf16", "amx_bf16"))


def choose_compile(requested, device, sync_bn=False):
    """auto: compiled on CUDA, where it may pay (compiling.py then asks whether the run is long
    enough); on the CPU it costs a minute of start-up. max: on CUDA alone (CUDA graphs).

    Not with --sync-bn: dynamo breaks its graphs at SyncBatchNorm, and compile + DDP + SyncBatchNorm
    has open upstream error reports; auto leaves such a run uncompiled.
    """
    if requested == "off" or (requested == "auto" and (device.type != "cuda" or sync_bn)):
        return False
    if requested == "max" and device.type != "cuda":
        raise UserError(
            f"--compile max captures the step as CUDA graphs, which need CUDA (not {device.type}); use --compile on"
        )
    if sync_bn:
        raise UserError(f"--sync-bn does not work with --compile {requested}; use --compile off (or auto)")
    if sys.platform == "win32":
        raise UserError(f"--compile {requested}: torch.compile does not run on Windows here; use --compile off")
    missing = missing_compiler(device)
    if missing and requested == "auto":
        warnings.warn(f"torch.compile needs {missing}: training uncompiled (--compile off)", stacklevel=2)
        return False
    if missing:
        raise UserError(f"--compile {requested} needs {missing}: install one or use --compile off")
    return True


def check_whole_step(amp_dtype, world_size, r1, ada=False):
    """--compile max's limits: one process, no loss scaling (its checks read the GPU between the
    graphs), no double backward (--r1), no count kept in Python inside the step (--ada's)."""
    if world_size > 1:
        raise UserError("--compile max runs in one process; under torchrun use --compile on")
    if amp_dtype == torch.float16:
        raise UserError("--compile max needs --precision bf16 or fp32 (fp16's loss scaling reads the GPU each step)")
    if r1:
        raise UserError("--compile max does not take --r1 (torch.compile takes no double backward); use --compile on")
    if ada:
        raise UserError("--compile max does not take --ada (its steps are counted in Python); use --compile on")


def missing_compiler(device):
    """What torch.compile's backend would fail to find on device (a sentence), or None.

    Looked up as torch and Triton look them up: on the CPU inductor builds C++ with $CXX (or g++),
    nothing else; on CUDA Triton builds its kernels' launcher with $CC, or gcc or clang.
    """
    if device.type == "cpu":
        cxx = os.environ.get("CXX")
        default = "clang++" if sys.platform == "darwin" else "g++"
        if shutil.which(cxx or default):
            return None
        return f"the C++ compiler CXX={cxx}, which is not there" if cxx else f"a C++ compiler ({default})"
    if device.type == "cuda":
        cc = os.environ.get("CC")
        if shutil.which(cc) if cc else (shutil.which("gcc") or shutil.which("clang")):
            return None
        return f"the C compiler CC={cc}, which is not there" if cc else "a C compiler (gcc or clang) for Triton"
    return None


def setup_runtime(opts):
    """Device, precision and compilation; joins the torchrun process group if there is one."""
    rank, world_size, local_rank, waits = start_distributed(opts.device)
    device = choose_device(opts.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = choose_precision(opts.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # TF32 keeps 10 of fp32's 23 mantissa bits: --precision fp32 means fp32 in every matmul and
        # convolution; under autocast, the fp32 left (losses, normalisations) may take its speed
        tf32 = precision is not None
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    compile = choose_compile(opts.compile, device, opts.sync_bn)
    whole_step = opts.compile == "max"
    if whole_step:
        check_whole_step(precision, world_size, opts.r1, opts.ada)
    return Runtime(
        device,
        precision,
        compile,
        rank,
        world_size,
        local_rank,
        compile_mode="reduce-overhead" if whole_step else None,
        compile_auto=compile and opts.compile == "auto",
        whole_step=whole_step,
        waits=waits,
    )


def start_distributed(requested_device):
    """Join torchrun's process group when its variables are set: (rank, world size, local rank,
    the ranks' StoreBarrier); else (0, 1, 0, None)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0, None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_nccl = requested_device in ("auto", "cuda") or requested_device.startswith("cuda:")
    use_nccl = use_nccl and torch.cuda.is_available()
    gpu = None
    if use_nccl:
        gpu = torch.device("cuda", gpu_of_process(requested_device, local_rank))
        torch.cuda.set_device(gpu)
    # the rendezvous init_process_group would make, kept: the barriers wait in its store
    store, rank, world_size = next(dist.rendezvous("env://", timeout=PREPARATION_TIMEOUT))
    backend = "nccl" if use_nccl else "gloo"
    # device_id: NCCL binds the group to this GPU at once
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT, device_id=gpu
    )
    return dist.get_rank(), dist.get_world_size(), local_rank, StoreBarrier(store, world_size)


def launcher_words(runtime):
    """How this process was started, for the resume command it prints: python, or torchrun's process counts."""
    if not runtime.distributed:
        return ("python",)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", runtime.world_size))
    nodes = runtime.world_size // per_node if per_node else 1
    return ("torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []), f"--nproc_per_node={per_node}")


def gpu_of_process(requested_device, local_rank):
    """The GPU index of this torchrun process (its LOCAL_RANK unless --device names one), checked
    before CUDA is asked to use it."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    index = int(requested_device[5:]) if requested_device.startswith("cuda:") else local_rank
    if requested_device.startswith("cuda:") and processes > 1:
        raise UserError(
            f"--device {requested_device} under torchrun puts all {processes} processes of this machine on one "
            "GPU; give --device cuda (or auto): each process takes the GPU of its LOCAL_RANK"
        )
    count = torch.cuda.device_count()
    if index >= count and requested_device.startswith("cuda:"):
        raise UserError(f"--device {requested_device}: only {count} GPU(s) here")
    if index >= count:
        raise UserError(
            f"this machine has {count} GPU(s) visible but starts process LOCAL_RANK={local_rank}: "
            f"start at most {count} processes per machine (torchrun --nproc_per_node={count})"
        )
    return index


def stop_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime):
    """Wait for every rank, up to PREPARATION_TIMEOUT: where the others wait for one at work alone."""
    if runtime.distributed:
        runtime.waits.wait()


class StoreBarrier:
    """Barriers in torchrun's key-value store: each rank counts itself in, and the last one in
    opens the barrier for all. No collective runs, so the wait has its own timeout.

    Every rank passes the same barriers in the same order: the count names each one.
    """

    def __init__(self, store, world_size):
        self.store, self.world_size = store, world_size
        self.passed = 0

    def wait(self):
        self.passed += 1
        key = f"gan.py/barrier/{self.passed}"
        if self.store.add(key, 1) == self.world_size:
            self.store.set(f"{key}/all", "1")
        deadline = time.monotonic() + PREPARATION_TIMEOUT.total_seconds()
        while True:
            try:
                self.store.wait([f"{key}/all"], WAIT_SLICE)
                return
            except dist.DistStoreError:
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"waited {PREPARATION_TIMEOUT} (h:mm:ss) for the other processes, which did not come: "
                        "one of them is stuck or has died"
                    ) from None


def broadcast_object(value, runtime):
    """Rank 0's value (anything pickle takes: a checkpoint's state, an error) on every rank."""
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_rng_states(runtime):
    """Every rank's RNG state (CPU, and CUDA on a GPU), in rank order, on every rank; None in one process.

    Each rank draws its own noise, so an exact resume needs each rank's state, not only rank 0's.
    Every rank must call this at the same point.
    """
    if not runtime.distributed:
        return None
    own = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(runtime.device)
    states = [None] * runtime.world_size
    dist.all_gather_object(states, own)
    return states


def any_rank(flag, runtime):
    """Whether flag is true on any rank; every rank must call this at the same point."""
    return any_ranks((flag,), runtime)[0]


def any_ranks(flags, runtime):
    """Each flag: whether it is true on any rank (a tuple of bools), in one collective; every rank
    calls this at the same point."""
    if not runtime.distributed:
        return tuple(bool(flag) for flag in flags)
    counts = torch.tensor([float(flag) for flag in flags], device=runtime.device)
    dist.all_reduce(counts)
    return tuple(bool(count) for count in counts.tolist())


def random_seed():
    """A fresh seed, small enough to print and retype."""
    return int.from_bytes(os.urandom(3), "little")


def mixed_seed(*parts):
    """A seed made of several numbers (seed, rank, step, ...) that stays in torch's range."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % MAX_SEED
    return value
