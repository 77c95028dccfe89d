"""Train a DCGAN on CIFAR-10 or a folder of images, then sample, interpolate or evaluate it.

    python gan.py --epochs 25                 # train; grids in images/, checkpoints in checkpoints/
    python gan.py --generate 64               # images from the latest checkpoint
    torchrun --nproc_per_node=8 gan.py ...    # several GPUs

The file reads top to bottom: flags, device and precision, models, the two update
steps, the training loop, the after-training modes, main().
"""

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sampling
import utils
from models import IMAGE_SIZES, Discriminator, ema_decay_at, init_weights, update_ema
from sampling import build_generator, generated_batches, open_metrics, sample
from utils import ARCHITECTURE_FLAGS, UserError, latest_checkpoint

# Flags that describe this invocation or this machine, never taken from a checkpoint.
NOT_RESUMED_FLAGS = (
    "resume",
    "checkpoint",
    "generate",
    "interpolate",
    "evaluate",
    "device",
    "no_compile",
    "workers",
    "tensorboard",
)
EXIT_DIVERGED = 3
MAX_ROLLBACKS = 3


# ---------------------------------------------------------------- losses


def bce_d_loss(real_logits, fake_logits, label_smoothing):
    real_target = torch.full_like(real_logits, 1.0 - label_smoothing)
    loss_real = F.binary_cross_entropy_with_logits(real_logits, real_target)
    loss_fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return loss_real + loss_fake


def bce_g_loss(fake_logits):
    # the non-saturating loss of Goodfellow et al.: maximise log D(G(z))
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def hinge_d_loss(real_logits, fake_logits, label_smoothing):
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits):
    return -fake_logits.mean()


LOSSES = {"bce": (bce_d_loss, bce_g_loss), "hinge": (hinge_d_loss, hinge_g_loss)}


# ---------------------------------------------------------------- flags


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def image_size(text):
    value = int(text)
    if value not in IMAGE_SIZES:
        raise argparse.ArgumentTypeError(f"must be a power of two from 16 to 256, got {text}")
    return value


def device_name(text):
    if text in ("auto", "cpu", "mps", "cuda") or (text.startswith("cuda:") and text[5:].isdecimal()):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, cpu, mps, cuda or cuda:N, got {text}")


def build_parser():
    p = Parser(description="Train a DCGAN and use the trained generator.")
    train = p.add_argument_group("training")
    train.add_argument(
        "--epochs", type=positive_int, default=25, help="total epochs to train (a resumed run continues to this many)"
    )
    train.add_argument(
        "--batch-size", type=positive_int, default=128, help="images per step, per process under torchrun"
    )
    train.add_argument(
        "--image-size", type=image_size, default=64, help="side of the images in pixels: 16, 32, 64, 128 or 256"
    )
    train.add_argument("--nz", type=positive_int, default=100, help="length of the noise vector")
    train.add_argument("--ngf", type=positive_int, default=64, help="generator width (channels of its last stage)")
    train.add_argument("--ndf", type=positive_int, default=64, help="discriminator width (channels of its first stage)")
    train.add_argument("--lr", type=positive_float, default=2e-4, help="Adam learning rate of both networks")
    train.add_argument("--beta1", type=fraction, default=0.5, help="Adam beta1")
    train.add_argument("--beta2", type=fraction, default=0.999, help="Adam beta2")
    train.add_argument("--label-smoothing", type=fraction, default=0.0, help="real labels become 1-s (bce loss only)")
    train.add_argument("--loss", choices=list(LOSSES), default="bce", help="bce: the DCGAN loss; hinge: as in SN-GAN")
    train.add_argument(
        "--spectral-norm", action="store_true", help="spectral normalisation on D's convolutions (drops D's BatchNorm)"
    )
    train.add_argument(
        "--diffaugment",
        action="store_true",
        help="differentiable color/translation/cutout on D's inputs (Zhao et al. 2020)",
    )
    train.add_argument(
        "--ttur", action="store_true", help="two time-scale update rule: D lr 4e-4, G lr 1e-4 (overrides --lr)"
    )
    train.add_argument("--d-steps", type=positive_int, default=1, help="D updates per G update, each on its own batch")
    train.add_argument(
        "--ema", type=fraction, default=0.999, help="decay of the generator's moving average; 0 turns it off"
    )
    train.add_argument("--seed", type=non_negative_int, default=None, help="random seed [random, printed and saved]")
    train.add_argument(
        "--on-nan",
        choices=["stop", "rollback"],
        default="stop",
        help="on non-finite losses: stop, or reload the last checkpoint with a new seed",
    )
    train.add_argument(
        "--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes under torchrun"
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=["cifar10", "folder", "fake"],
        default="cifar10",
        help="cifar10 (downloaded), folder (any image folder) or fake (random, for smoke tests)",
    )
    data.add_argument("--dataroot", default="data", help="where CIFAR-10 is downloaded, or the image folder")
    data.add_argument("--subset", type=positive_int, default=None, help="train on N randomly drawn images [all]")
    data.add_argument(
        "--workers",
        type=non_negative_int,
        default=min(4, os.cpu_count() or 1),
        help="processes decoding a folder dataset",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--device", type=device_name, default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu"
    )
    run.add_argument(
        "--no-compile", action="store_true", help="do not torch.compile the networks (compiled on CUDA by default)"
    )
    run.add_argument("--image-dir", default="images", help="folder for grids, plots and generated images")
    run.add_argument("--checkpoint-dir", default="checkpoints", help="folder for checkpoints and the metrics log")
    run.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="continue a run [PATH: the latest checkpoint in --checkpoint-dir]",
    )
    run.add_argument(
        "--log-every", type=positive_int, default=100, help="steps between progress-bar updates and metrics-log rows"
    )
    run.add_argument(
        "--tensorboard", action="store_true", help="also log to TensorBoard (needs the tensorboard package)"
    )
    after = p.add_argument_group("after training")
    after.add_argument(
        "--generate",
        type=positive_int,
        default=None,
        metavar="N",
        help="write N single images and a grid from a checkpoint, then exit",
    )
    after.add_argument(
        "--interpolate", action="store_true", help="write latent walks (grid and GIF) from a checkpoint, then exit"
    )
    after.add_argument("--steps", type=positive_int, default=10, help="images per latent walk for --interpolate")
    after.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint for --generate/--interpolate/--evaluate [latest in --checkpoint-dir]",
    )
    after.add_argument("--evaluate", action="store_true", help="FID, IS and KID of a checkpoint, then exit")
    after.add_argument("--eval-samples", type=positive_int, default=10_000, help="generated images per evaluation")
    after.add_argument(
        "--fid-every",
        type=non_negative_int,
        default=0,
        help="evaluate every E epochs while training; keeps best.pt [0: never]",
    )
    return p


def parse_options(argv=None):
    """Parse and check the flags; also return the set of flags given explicitly."""
    parser = build_parser()
    try:
        opts = parser.parse_args(argv)
    except UserError:
        raise
    except SystemExit as exit_:  # --help
        raise exit_
    explicit = explicit_flags(parser, argv)
    modes = [opts.generate is not None, opts.interpolate, opts.evaluate]
    if sum(modes) > 1:
        raise UserError("choose one of --generate, --interpolate and --evaluate")
    if opts.resume is not None and any(modes):
        raise UserError("--resume trains; use --checkpoint with --generate, --interpolate or --evaluate")
    if opts.label_smoothing and opts.loss != "bce":
        raise UserError("--label-smoothing applies to --loss bce only")
    return opts, explicit


def explicit_flags(parser, argv):
    """Names of the flags the user typed, found by parsing again with no defaults."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


# ---------------------------------------------------------------- device, precision, processes


@dataclass
class Runtime:
    """Where and how the numbers are computed, decided once at start-up."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # None: full fp32
    compile: bool = False
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self):
        # bf16 has fp32's range and needs no loss scaling; fp16 does
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


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


def setup_runtime(opts):
    """Device, precision and compilation; joins the torchrun process group if there is one."""
    rank, world_size, local_rank = start_distributed(opts.device)
    device = choose_device(opts.device, local_rank)
    amp_dtype = None
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # compilation pays on CUDA; on CPU and MPS it costs minutes of start-up for little
    use_compile = device.type == "cuda" and not opts.no_compile and sys.platform != "win32"
    return Runtime(device, amp_dtype, use_compile, rank, world_size)


def start_distributed(requested_device):
    """Join torchrun's process group when its variables are set; else (0, 1, 0)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_nccl = requested_device != "cpu" and torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_nccl else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def stop_distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime):
    if runtime.distributed:
        torch.distributed.barrier()


# ---------------------------------------------------------------- models and optimizers


@dataclass
class Nets:
    """The two networks, their optimizers and the generator's moving average."""

    G: nn.Module
    D: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    scaler_G: torch.amp.GradScaler
    scaler_D: torch.amp.GradScaler
    G_ema: nn.Module | None = None
    # what the steps call: compiled and/or DDP-wrapped views of G and D
    G_train: nn.Module | None = None
    D_train: nn.Module | None = None
    D_no_sync: nn.Module | None = None


def build_nets(opts, runtime):
    flags = vars(opts)
    G, D = build_generator(flags), Discriminator(opts.ndf, opts.image_size, spectral_norm=opts.spectral_norm)
    G.apply(init_weights)
    D.apply(init_weights)
    memory_format = torch.channels_last if runtime.device.type == "cuda" else torch.contiguous_format
    G.to(runtime.device, memory_format=memory_format)
    D.to(runtime.device, memory_format=memory_format)
    lr_G, lr_D = (1e-4, 4e-4) if opts.ttur else (opts.lr, opts.lr)
    # fused Adam: one kernel per step; on CPU PyTorch's default is a per-tensor loop, and the
    # fused kernel made whole steps ~1.2x faster there on a loaded 2-core machine (BENCHMARKS.md)
    fused = True if runtime.device.type in ("cuda", "cpu") else None
    betas = (opts.beta1, opts.beta2)
    nets = Nets(
        G=G,
        D=D,
        opt_G=torch.optim.Adam(G.parameters(), lr=lr_G, betas=betas, fused=fused),
        opt_D=torch.optim.Adam(D.parameters(), lr=lr_D, betas=betas, fused=fused),
        scaler_G=runtime.grad_scaler(),
        scaler_D=runtime.grad_scaler(),
        G_ema=copy.deepcopy(G).eval().requires_grad_(False) if opts.ema > 0 else None,
    )
    wrap_for_training(nets, opts, runtime)
    if nets.G_ema is not None and runtime.distributed:
        # each rank initialised its own G; DDP has just broadcast rank 0's, so the EMA starts from that
        nets.G_ema.load_state_dict(nets.G.state_dict())
    return nets


def wrap_for_training(nets, opts, runtime):
    """DDP and torch.compile views of G and D; the plain modules stay for saving."""
    G_train, D_train, D_no_sync = nets.G, nets.D, nets.D
    if runtime.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if opts.sync_bn:
            if runtime.device.type != "cuda":
                raise UserError(f"--sync-bn needs CUDA GPUs; it does not run on {runtime.device.type}")
            nets.G = nn.SyncBatchNorm.convert_sync_batchnorm(nets.G)
            nets.D = nn.SyncBatchNorm.convert_sync_batchnorm(nets.D)
            D_no_sync = nets.D
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        G_train, D_train = DDP(nets.G, device_ids=ids), DDP(nets.D, device_ids=ids)
    if runtime.compile:
        G_train, D_train, D_no_sync = (torch.compile(m) for m in (G_train, D_train, D_no_sync))
    nets.G_train, nets.D_train, nets.D_no_sync = G_train, D_train, D_no_sync


# ---------------------------------------------------------------- the two update steps


@dataclass
class Recipe:
    """What the steps need from the flags."""

    loss: str = "bce"
    label_smoothing: float = 0.0
    diffaugment: bool = False

    def augment(self, images):
        return utils.diff_augment(images) if self.diffaugment else images


def d_step(nets, real, fake, recipe, runtime):
    """One D update on a real and a (detached) fake batch; returns device statistics."""
    d_loss_fn = LOSSES[recipe.loss][0]
    with runtime.autocast():
        real_logits = nets.D_train(recipe.augment(real))
        fake_logits = nets.D_train(recipe.augment(fake.detach()))
        loss_d = d_loss_fn(real_logits.float(), fake_logits.float(), recipe.label_smoothing)
    nets.opt_D.zero_grad(set_to_none=True)
    nets.scaler_D.scale(loss_d).backward()
    nets.scaler_D.step(nets.opt_D)
    nets.scaler_D.update()
    return {
        "loss_d": loss_d.detach(),
        "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
        "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
    }


def g_step(nets, fake, recipe, runtime):
    """One G update through D; D's weight gradients are never computed."""
    g_loss_fn = LOSSES[recipe.loss][1]
    # Frozen rather than backward(inputs=...): a compiled D's backward is one fused node that
    # would still compute its weight gradients; a frozen D gets a graph without them.
    nets.D.requires_grad_(False)
    try:
        with runtime.autocast():
            # D without DDP: its gradients are not wanted here, so nothing is synchronised
            fake_logits = nets.D_no_sync(recipe.augment(fake))
            loss_g = g_loss_fn(fake_logits.float())
        nets.opt_G.zero_grad(set_to_none=True)
        nets.scaler_G.scale(loss_g).backward()
    finally:
        nets.D.requires_grad_(True)
    nets.scaler_G.step(nets.opt_G)
    nets.scaler_G.update()
    return {"loss_g": loss_g.detach()}


def train_step(nets, real, recipe, runtime, update_g=True, ema_decay=0.0):
    """D step then (if update_g) G step on the same fake batch, as in the DCGAN example."""
    noise = torch.randn(real.shape[0], nets.G.nz, 1, 1, device=real.device)
    with torch.set_grad_enabled(update_g), runtime.autocast():
        fake = nets.G_train(noise)
    stats = d_step(nets, real, fake, recipe, runtime)
    if update_g:
        stats.update(g_step(nets, fake, recipe, runtime))
        if nets.G_ema is not None:
            update_ema(nets.G_ema, nets.G, ema_decay)
    return stats


# ---------------------------------------------------------------- training state and checkpoints


@dataclass
class Progress:
    """Where a run stands: completed epochs, batches done in the current one, total steps."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    seed: int = 0
    best_fid: float = math.inf
    rollbacks: int = 0

    @classmethod
    def from_checkpoint(cls, state, seed, rollbacks):
        return cls(
            epoch=state["epoch"],
            batch=state.get("batch", 0),
            step=state["step"],
            seed=seed,
            best_fid=state.get("best_fid", math.inf),
            rollbacks=rollbacks,
        )


def checkpoint_state(nets, progress, fixed_noise, opts, runtime):
    """A plain dict of tensors and numbers: loadable with weights_only=True."""
    rng = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return {
        "format": "dcgan-checkpoint-1",
        "netG": cpu_state(nets.G),
        "netD": cpu_state(nets.D),
        "netG_ema": cpu_state(nets.G_ema) if nets.G_ema is not None else None,
        "optG": nets.opt_G.state_dict(),
        "optD": nets.opt_D.state_dict(),
        "scalerG": nets.scaler_G.state_dict(),
        "scalerD": nets.scaler_D.state_dict(),
        "epoch": progress.epoch,
        "batch": progress.batch,
        "step": progress.step,
        "seed": progress.seed,
        "best_fid": progress.best_fid,
        "rollbacks": progress.rollbacks,
        "fixed_noise": fixed_noise.cpu(),
        "rng": rng,
        "flags": checkpoint_flags(opts),
    }


def cpu_state(module):
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


def checkpoint_flags(opts):
    return {k: v for k, v in vars(opts).items() if isinstance(v, (int, float, str, bool, type(None)))}


def restore_state(nets, state, runtime, path):
    """Load nets, optimizers and RNG from a checkpoint dict."""
    utils.load_module_state(nets.G, state["netG"], "generator", path)
    utils.load_module_state(nets.D, state.get("netD", {}), "discriminator", path)
    if nets.G_ema is not None:
        ema_state = state.get("netG_ema") or state["netG"]
        utils.load_module_state(nets.G_ema, ema_state, "generator", path)
    # load_state_dict also restores the saved lr and betas; the ones of this run's flags win
    hyper = [[{k: g[k] for k in ("lr", "betas")} for g in opt.param_groups] for opt in (nets.opt_G, nets.opt_D)]
    try:
        nets.opt_G.load_state_dict(state["optG"])
        nets.opt_D.load_state_dict(state["optD"])
        for opt, groups in zip((nets.opt_G, nets.opt_D), hyper):
            for group, values in zip(opt.param_groups, groups):
                group.update(values)
        nets.scaler_G.load_state_dict(state.get("scalerG") or {})
        nets.scaler_D.load_state_dict(state.get("scalerD") or {})
        torch.set_rng_state(state["rng"]["cpu"])
        if runtime.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], runtime.device)
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise UserError(f"checkpoint {path} is incomplete or damaged ({error.__class__.__name__}: {error})") from None


def merge_resume_flags(opts, explicit, saved_flags, path):
    """Flags not typed now come from the checkpoint; typed architecture changes are refused."""
    refused = [
        f"--{name.replace('_', '-')} {getattr(opts, name)} (checkpoint: {saved_flags.get(name)})"
        for name in ARCHITECTURE_FLAGS
        if name in explicit and name in saved_flags and getattr(opts, name) != saved_flags[name]
    ]
    if refused:
        raise UserError(f"cannot resume {path} with a different architecture: {', '.join(refused)}")
    changed, parser = [], build_parser()
    for name, saved in saved_flags.items():
        if not hasattr(opts, name) or name in NOT_RESUMED_FLAGS:
            continue
        if name in explicit:
            if getattr(opts, name) != saved:
                changed.append(f"--{name.replace('_', '-')} {saved} -> {getattr(opts, name)}")
        else:
            if not saved_flag_is_valid(parser, name, saved):
                raise UserError(f"checkpoint {path} is damaged: it says --{name.replace('_', '-')} {saved!r}")
            setattr(opts, name, saved)
    return changed


def saved_flag_is_valid(parser, name, value):
    """Whether a value read from a checkpoint is one the flag's parser could have produced."""
    action = next((a for a in parser._actions if a.dest == name), None)
    if action is None or value is None:
        return action is None or action.default is None
    if action.choices is not None:
        return isinstance(value, str) and value in action.choices
    if action.type is None:  # store_true flags and plain strings
        return type(value) is type(action.default) or isinstance(value, str)
    try:
        return type(value) is not bool and action.type(str(value)) == value
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False


def save_epoch_files(nets, progress, fixed_noise, opts, runtime):
    """The checkpoint and the plain state_dicts, each written atomically."""
    folder = Path(opts.checkpoint_dir)
    utils.save_checkpoint(checkpoint_state(nets, progress, fixed_noise, opts, runtime), folder / utils.CHECKPOINT_NAME)
    utils.save_state_dict(nets.G, folder / "netG.pth")
    utils.save_state_dict(nets.D, folder / "netD.pth")
    if nets.G_ema is not None:
        utils.save_state_dict(nets.G_ema, folder / "netG_ema.pth")
    utils.atomic_write(folder / "flags.json", lambda f: json.dump(checkpoint_flags(opts), f, indent=2), mode="w")


# ---------------------------------------------------------------- interruption and divergence


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop reads between steps; a second one exits at once."""

    def __init__(self):
        self.signal_number = None

    def install(self):
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signal_number, frame):
        if self.signal_number is not None:
            # the checkpoint on disk is only ever replaced atomically, so leaving now is safe
            os._exit(128 + signal_number)
        self.signal_number = signal_number
        print(
            f"\n{signal.Signals(signal_number).name}: stopping after this step (again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def requested(self):
        return self.signal_number is not None


class Diverged(UserError):
    exit_code = EXIT_DIVERGED


class Interrupted(Exception):
    def __init__(self, exit_code, message):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------- the training loop


class Trainer:
    """Runs the epochs: orchestration only; the maths lives in the step functions."""

    def __init__(self, opts, explicit, runtime):
        self.opts, self.runtime = opts, runtime
        self.stop = StopRequest()
        self.image_dir, self.checkpoint_dir = Path(opts.image_dir), Path(opts.checkpoint_dir)
        self.log_path = self.checkpoint_dir / utils.METRICS_LOG_NAME
        state, resume_path = self.find_resume_state(explicit)
        self.progress = Progress(seed=opts.seed)
        torch.manual_seed(opts.seed + runtime.rank)
        self.nets = build_nets(opts, runtime)
        self.fixed_noise = torch.randn(64, opts.nz, 1, 1, generator=torch.Generator().manual_seed(opts.seed))
        if state is not None:
            self.resume_from(state, resume_path)
        self.fixed_noise = self.fixed_noise.to(runtime.device)
        self.recipe = Recipe(opts.loss, opts.label_smoothing, opts.diffaugment)
        self.tensorboard = open_tensorboard(opts, runtime)  # before the data: fail fast when it is missing
        self.batches = self.load_batches()
        self.metrics = None

    def find_resume_state(self, explicit):
        opts = self.opts
        if opts.resume is None:
            earlier = latest_checkpoint(opts.checkpoint_dir)
            if earlier.is_file():
                # a fresh run would overwrite that run's checkpoint and mix its metrics log
                raise UserError(
                    f"{earlier} holds an earlier run: continue it with --resume, "
                    "or train into another --checkpoint-dir (or delete that folder)"
                )
            opts.seed = utils.seed_or_random(opts.seed)
            return None, None
        path = Path(opts.resume) if opts.resume else latest_checkpoint(opts.checkpoint_dir)
        if not opts.resume and not path.is_file():
            raise UserError(f"--resume: no checkpoint in {opts.checkpoint_dir}/ (give its path: --resume PATH)")
        state = utils.load_checkpoint(path)
        for change in merge_resume_flags(opts, explicit, state["flags"], path):
            self.say(f"resume: changed {change}")
        opts.seed = state.get("seed", opts.seed)
        return state, path

    def resume_from(self, state, path):
        self.restore_from(state, path, rollbacks=state.get("rollbacks", 0))
        if self.runtime.distributed:
            # each rank draws its own noise; the saved RNG state is rank 0's
            torch.manual_seed(self.opts.seed + 7919 * state["step"] + self.runtime.rank)
        fixed = state.get("fixed_noise")
        if (
            isinstance(fixed, torch.Tensor)
            and fixed.shape == self.fixed_noise.shape
            and fixed.dtype == self.fixed_noise.dtype
        ):
            self.fixed_noise = fixed
        self.say(f"resuming {path}: {self.progress.epoch} epochs done, step {self.progress.step}")

    def restore_from(self, state, path, rollbacks):
        """Nets, optimizers, RNG and progress from a checkpoint; log rows after it are dropped."""
        restore_state(self.nets, state, self.runtime, path)
        self.progress = Progress.from_checkpoint(state, self.opts.seed, rollbacks)
        if self.runtime.is_main:
            utils.truncate_metrics(self.log_path, self.progress.step)

    def load_batches(self):
        opts, runtime = self.opts, self.runtime
        if runtime.is_main:
            images = utils.load_dataset(opts, runtime.device)
        barrier(runtime)  # rank 0 downloads and extracts first; the others then read its files
        if not runtime.is_main:
            images = utils.load_dataset(opts, runtime.device)
        self.real_uint8 = images
        return utils.DeviceBatches(
            images, opts.batch_size, opts.image_size, opts.seed, runtime.rank, runtime.world_size
        )

    def say(self, message):
        if self.runtime.is_main:
            from tqdm import tqdm

            tqdm.write(message)

    # -- the loop

    def run(self):
        opts = self.opts
        if self.progress.epoch >= opts.epochs:
            self.say(f"already trained {self.progress.epoch} epochs; raise --epochs to train more")
            return
        if self.runtime.is_main:
            self.write_real_samples()
        self.say(self.describe())
        self.stop.install()
        while self.progress.epoch < opts.epochs:
            seconds = self.run_epoch()
            self.end_epoch(seconds)

    def describe(self):
        opts, runtime = self.opts, self.runtime
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[runtime.amp_dtype]
        processes = f", {runtime.world_size} processes" if runtime.distributed else ""
        return (
            f"training on {runtime.device} ({precision}{', compiled' if runtime.compile else ''}{processes}): "
            f"{len(self.real_uint8)} images, {len(self.batches)} steps per epoch, seed {opts.seed}"
        )

    def run_epoch(self):
        """Train the rest of the current epoch; statistics stay on the device between logs."""
        from tqdm import tqdm

        opts, progress = self.opts, self.progress
        started = time.perf_counter()
        bar = tqdm(
            total=len(self.batches),
            initial=progress.batch,
            desc=f"epoch {progress.epoch + 1}/{opts.epochs}",
            disable=not self.runtime.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        totals = torch.zeros(len(STAT_NAMES) + 1, device=self.runtime.device)  # the stats, then G updates
        logged_steps = 0
        self.epoch_totals = torch.zeros_like(totals)
        self.epoch_steps = 0
        first_batch = progress.batch
        for real in self.batches.epoch(progress.epoch, start=progress.batch):
            update_g = (progress.step + 1) % opts.d_steps == 0
            ema_decay = ema_decay_at(opts.ema, progress.step)
            stats = train_step(self.nets, real, self.recipe, self.runtime, update_g, ema_decay)
            totals += accumulable(stats)
            logged_steps += 1
            progress.step += 1
            progress.batch += 1
            bar.update(1)
            if progress.step % opts.log_every == 0:
                self.log_interval(totals, logged_steps, bar)
                totals.zero_()
                logged_steps = 0
            if self.stop_requested():
                self.interrupt(bar)
        if logged_steps:
            self.log_interval(totals, logged_steps, bar)
        bar.close()
        self.epoch_images = (progress.batch - first_batch) * opts.batch_size * self.runtime.world_size
        return time.perf_counter() - started

    def stop_requested(self):
        if not self.runtime.distributed:
            return self.stop.requested
        # every rank must stop at the same step, so they agree only at logging points
        if self.progress.step % self.opts.log_every:
            return False
        return self.ranks_agree_to_stop()

    def ranks_agree_to_stop(self):
        """Whether any rank was signalled; every rank must call this at the same step."""
        flag = torch.tensor([float(self.stop.requested)], device=self.runtime.device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item())

    def interruption(self, what):
        """The exception that ends an interrupted run, with the command that resumes it."""
        code = 128 + (self.stop.signal_number or signal.SIGINT)
        return Interrupted(
            code,
            f"{what}; saved {latest_checkpoint(self.checkpoint_dir)}. "
            f"Resume with: python gan.py --resume --checkpoint-dir {self.checkpoint_dir}",
        )

    def log_interval(self, totals, steps, bar):
        """The one host sync between logs: read the averaged statistics and check them."""
        if self.runtime.distributed:
            torch.distributed.all_reduce(totals)
            totals /= self.runtime.world_size
        means = interval_means(totals, steps)
        row = {"epoch": self.progress.epoch + 1, "step": self.progress.step, **means}
        self.epoch_totals += totals
        self.epoch_steps += steps
        if not all(math.isfinite(v) for v in means.values() if v is not None):
            self.handle_divergence()
            return
        bar.set_postfix({label: format_stat(means[name], 3) for name, label in STAT_NAMES.items()})
        if self.runtime.is_main:
            utils.append_metrics(self.log_path, [row])
            if self.tensorboard is not None:
                for name in STAT_NAMES:
                    if row[name] is not None:
                        self.tensorboard.add_scalar(name, row[name], row["step"])

    def interrupt(self, bar):
        bar.close()
        name = signal.Signals(self.stop.signal_number or signal.SIGINT).name
        if self.runtime.is_main:
            save_epoch_files(self.nets, self.progress, self.fixed_noise, self.opts, self.runtime)
        raise self.interruption(f"{name}: stopped at epoch {self.progress.epoch + 1}, step {self.progress.step}")

    def handle_divergence(self):
        opts, progress = self.opts, self.progress
        path = latest_checkpoint(opts.checkpoint_dir)
        where = f"losses became non-finite at step {progress.step} (epoch {progress.epoch + 1})"
        if opts.on_nan == "rollback" and path.is_file() and progress.rollbacks < MAX_ROLLBACKS:
            self.roll_back(path, where)
            return
        if not path.is_file():
            hint = "no checkpoint was written yet; try a lower --lr"
        elif opts.on_nan == "rollback":
            hint = f"gave up after {MAX_ROLLBACKS} rollbacks; the last good checkpoint is {path}"
        else:
            hint = f"the last good checkpoint is {path}: resume it with --resume (and --on-nan rollback to retry automatically)"
        raise Diverged(f"{where}; {hint}")

    def roll_back(self, path, where):
        state = utils.load_checkpoint(path)
        rollbacks = self.progress.rollbacks + 1
        self.restore_from(state, path, rollbacks)
        new_seed = self.opts.seed + 1_000 * rollbacks
        torch.manual_seed(new_seed + self.runtime.rank)
        self.say(f"{where}; rolled back to {path} (epoch {state['epoch']}) with noise seed {new_seed}")
        raise RolledBack()

    # -- end of an epoch

    def end_epoch(self, seconds):
        opts, progress = self.opts, self.progress
        self.check_weights_finite()
        progress.epoch += 1
        progress.batch = 0
        if self.runtime.is_main:
            self.write_epoch_images()
            self.maybe_evaluate()
            save_epoch_files(self.nets, progress, self.fixed_noise, opts, self.runtime)
            self.say(self.epoch_summary(seconds))
        barrier(self.runtime)
        if self.stop_requested_at_epoch_end():
            raise self.interruption(f"stopped after epoch {self.progress.epoch}")

    def check_weights_finite(self):
        finite = torch.stack([p.isfinite().all() for p in (*self.nets.G.parameters(), *self.nets.D.parameters())]).all()
        if not bool(finite):
            self.handle_divergence()

    def stop_requested_at_epoch_end(self):
        return self.ranks_agree_to_stop() if self.runtime.distributed else self.stop.requested

    def epoch_summary(self, seconds):
        means = interval_means(self.epoch_totals, max(self.epoch_steps, 1))
        images_per_s = self.epoch_images / max(seconds, 1e-9)
        fid = f"  FID {self.last_fid:.2f}" if getattr(self, "last_fid", None) is not None else ""
        stats = "  ".join(f"{label} {format_stat(means[name], 4)}" for name, label in STAT_NAMES.items())
        return f"[{self.progress.epoch}/{self.opts.epochs}] {stats}  {seconds:.1f}s  {images_per_s:.0f} img/s{fid}"

    def write_real_samples(self):
        path = self.image_dir / "real_samples.png"
        if not path.exists():
            utils.save_grid(utils.to_float_images(self.real_uint8[:64], self.opts.image_size), path)

    def sampling_generator(self):
        return self.nets.G_ema if self.nets.G_ema is not None else self.nets.G

    def write_epoch_images(self):
        epoch = self.progress.epoch
        samples = sample(self.sampling_generator(), self.fixed_noise, self.runtime)
        utils.save_grid(samples, self.image_dir / f"epoch_{epoch:03d}.png")
        frames = [self.image_dir / f"epoch_{e:03d}.png" for e in range(1, epoch + 1)]
        utils.save_gif([f for f in frames if f.exists()], self.image_dir / "progress.gif")
        rows = utils.read_metrics_log(self.log_path)
        utils.plot_losses(rows, self.image_dir / "losses.png")
        if self.tensorboard is not None:
            self.tensorboard.add_images("samples", samples.float().add(1).div(2).clamp(0, 1), epoch)
            self.tensorboard.flush()

    def maybe_evaluate(self):
        opts = self.opts
        self.last_fid = None
        if not opts.fid_every or self.progress.epoch % opts.fid_every:
            return
        if self.metrics is None:
            self.metrics = open_metrics(opts, self.runtime, self.real_uint8, during_training=True)
            if self.metrics is None:
                opts.fid_every = 0
                return
        from metrics import score_generator

        scores = score_generator(
            self.metrics, generated_batches(self.sampling_generator(), opts.eval_samples, opts.nz, self.runtime)
        )
        self.last_fid = scores["fid"]
        utils.append_metrics(self.log_path, [{"epoch": self.progress.epoch, "step": self.progress.step, **scores}])
        utils.plot_fid(utils.read_metrics_log(self.log_path), self.image_dir / "fid.png")
        if scores["fid"] < self.progress.best_fid:
            self.progress.best_fid = scores["fid"]
            state = checkpoint_state(self.nets, self.progress, self.fixed_noise, opts, self.runtime)
            utils.save_checkpoint(state, self.checkpoint_dir / "best.pt")


# the statistics every step returns, with the labels the DCGAN example made familiar
STAT_NAMES = {"loss_d": "Loss_D", "loss_g": "Loss_G", "d_real": "D(x)", "d_fake": "D(G(z))"}


def accumulable(stats):
    """One step's statistics as a device vector; Loss_G is 0 on D-only steps, counted apart."""
    g_updates = torch.ones_like(stats["loss_d"]) if "loss_g" in stats else torch.zeros_like(stats["loss_d"])
    values = [stats.get(name, torch.zeros_like(stats["loss_d"])) for name in STAT_NAMES]
    return torch.stack([*values, g_updates])


def interval_means(totals, steps):
    """Means of summed statistics; Loss_G averages over the G updates only (--d-steps)."""
    *sums, g_updates = totals.tolist()
    means = {name: value / steps for name, value in zip(STAT_NAMES, sums)}
    means["loss_g"] = sums[1] / g_updates if g_updates else None  # None: no G update in the interval
    return means


def format_stat(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


class RolledBack(Exception):
    """Raised inside an epoch after a rollback: the loop restarts from the restored state."""


def open_tensorboard(opts, runtime):
    if not opts.tensorboard or not runtime.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(Path(opts.checkpoint_dir) / "tensorboard"))


# ---------------------------------------------------------------- main


def train(opts, explicit, runtime):
    for folder in (opts.image_dir, opts.checkpoint_dir):
        if runtime.is_main:
            utils.check_writable(folder)
    trainer = Trainer(opts, explicit, runtime)
    while True:
        try:
            trainer.run()
            return trainer
        except RolledBack:
            continue


def run(argv=None):
    opts, explicit = parse_options(argv)
    runtime = setup_runtime(opts)
    try:
        if runtime.distributed and (opts.generate or opts.interpolate or opts.evaluate):
            raise UserError("--generate, --interpolate and --evaluate run in one process: start them without torchrun")
        if opts.generate is not None:
            return sampling.generate(opts, explicit, runtime)
        if opts.interpolate:
            return sampling.interpolate(opts, explicit, runtime)
        if opts.evaluate:
            return sampling.evaluate(opts, explicit, runtime)
        return train(opts, explicit, runtime)
    finally:
        stop_distributed()


def main(argv=None):
    try:
        run(argv)
    except UserError as error:
        rank = os.environ.get("RANK")
        prefix = f"gan.py (rank {rank})" if rank not in (None, "0") else "gan.py"
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except Interrupted as interruption:
        print(interruption, file=sys.stderr)
        return interruption.exit_code
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    import warnings

    # a warning is one line for the user ("warning: skipped 3 of 40 files ..."), not two with our source line
    warnings.formatwarning = lambda message, category, *where: f"warning: {message}\n"
    sys.exit(main())
