"""The training maths: losses, the networks with their optimizers, the D and G updates (plain
functions of (nets, batch, recipe) that return device tensors) and the sums of their statistics
between two logs; what D sees of the images comes from augment.py. No I/O.
"""

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from augment import AugmentStrength, adaptive_augment, diff_augment, x_flipped
from models import build_discriminator, build_generator, init_weights, update_ema

# ---------------------------------------------------------------- losses


def bce_d_loss(real_logits, fake_logits, recipe):
    real_target = torch.full_like(real_logits, 1.0 - recipe.label_smoothing)
    fake_target = torch.zeros_like(fake_logits)
    if recipe.label_noise:
        # each target moves a random amount towards the other class (Salimans et al., 2016)
        real_target = real_target - recipe.label_noise * torch.rand_like(real_target)
        fake_target = fake_target + recipe.label_noise * torch.rand_like(fake_target)
    loss_real = F.binary_cross_entropy_with_logits(real_logits, real_target)
    loss_fake = F.binary_cross_entropy_with_logits(fake_logits, fake_target)
    return loss_real + loss_fake


def bce_g_loss(fake_logits):
    # the non-saturating loss of Goodfellow et al.: maximise log D(G(z))
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def hinge_d_loss(real_logits, fake_logits, recipe):
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits):
    return -fake_logits.mean()


LOSSES = {"bce": (bce_d_loss, bce_g_loss), "hinge": (hinge_d_loss, hinge_g_loss)}


# ---------------------------------------------------------------- the spectral loss

# as the benchmarks' spectral score: ITU-R BT.601 luma, and a floor that keeps log10 finite
LUMA = (0.299, 0.587, 0.114)
LOG_FLOOR = 1e-10


def mean_log_spectrum(images):
    """The batch's mean log10 power at every 2-D frequency but DC, of the greyscale with its
    mean removed and normalised to unit power: the shape of the spectrum, not its brightness."""
    if images.shape[1] == 1:
        grey = images[:, 0].float()
    else:  # weighed by Python numbers: a tensor of them would be copied to the device at every call
        red, green, blue = LUMA
        colours = images.float()
        grey = colours[:, 0] * red + colours[:, 1] * green + colours[:, 2] * blue
    grey = grey - grey.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(grey).abs().square().flatten(1)
    power = power / (power.sum(dim=1, keepdim=True) + LOG_FLOOR)
    return torch.log10(power[:, 1:] + LOG_FLOOR).mean(dim=0)


def spectral_loss(fake, real):
    """How far G's mean log power spectrum is from the real batch's, in decades (Durall et al.,
    2020, "Watch your up-convolution"). Per 2-D frequency rather than per ring: matched per ring,
    G met the loss with one fixed plaid added to every sample (BENCHMARKS.md)."""
    return (mean_log_spectrum(fake) - mean_log_spectrum(real).detach()).abs().mean()


@dataclass(frozen=True)
class Recipe:
    """What the steps need from the flags."""

    loss: str = "bce"
    label_smoothing: float = 0.0
    label_noise: float = 0.0
    diffaugment: bool = False
    spectral_loss: float = 0.0
    class_loss: float = 0.0
    r1: float = 0.0
    r1_every: int = 16
    mirror: bool = False

    @classmethod
    def from_options(cls, opts):
        class_loss = opts.class_loss if opts.num_classes else 0.0
        return cls(
            opts.loss,
            opts.label_smoothing,
            opts.label_noise,
            opts.diffaugment,
            opts.spectral_loss,
            class_loss,
            opts.r1,
            opts.r1_every,
            opts.mirror,
        )

    def r1_due(self, step):
        """Whether D step `step` (counted over the whole run: a resume goes on as it would have)
        takes the R1 penalty: every r1_every-th one, from the first (StyleGAN2's lazy regularisation)."""
        return self.r1 > 0 and step % self.r1_every == 0

    def augment(self, images, strength=None):
        """What D sees of images: at ADA's strength p under --ada (strength, with or without
        --diffaugment), DiffAugment's full strength under --diffaugment alone, else the images."""
        if strength is not None:
            return adaptive_augment(images, strength.p)
        return diff_augment(images) if self.diffaugment else images


# ---------------------------------------------------------------- the networks


@dataclass
class Nets:
    """The two networks, their optimizers, the generator's moving average and ADA's strength."""

    G: nn.Module
    D: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    scaler_G: torch.amp.GradScaler
    scaler_D: torch.amp.GradScaler
    G_ema: nn.Module | None = None
    augment_strength: AugmentStrength | None = None  # --ada's p, D's training state like its optimizer's
    # what the steps call: compiled and/or DDP-wrapped views of G and D, and the forward halves
    # of the two updates (compiled as whole graphs on a single device)
    G_train: nn.Module | None = None
    D_train: nn.Module | None = None
    D_no_sync: nn.Module | None = None
    D_r1: nn.Module | None = None  # D as the R1 steps call it: never compiled (no double backward)
    d_forward: Callable = None
    g_forward: Callable = None

    @property
    def for_samples(self):
        """The generator pictures and scores draw with: the moving average where there is one."""
        return self.G_ema if self.G_ema is not None else self.G


def build_nets(opts, runtime):
    G = build_generator(opts.arch, opts.nz, opts.ngf, opts.image_size, opts.nc, opts.num_classes, opts.g_output)
    D = build_discriminator(opts.arch, opts.ndf, opts.image_size, opts.spectral_norm, opts.nc, opts.num_classes)
    G.apply(init_weights)
    D.apply(init_weights)
    G.to(runtime.device, memory_format=runtime.memory_format)
    D.to(runtime.device, memory_format=runtime.memory_format)
    lr_G, lr_D = (1e-4, 4e-4) if opts.ttur else (opts.lr, opts.lr)
    # fused Adam on CUDA: one kernel per step; on the CPU the foreach kernels are as fast
    cuda = runtime.device.type == "cuda"
    adam = {"betas": (opts.beta1, opts.beta2), "fused": True if cuda else None, "foreach": None if cuda else True}
    if runtime.whole_step:  # its step counts on the GPU, so that CUDA graphs can capture the update
        adam["capturable"] = True
    Adam = torch.optim.Adam if runtime.compile else EagerAdam
    nets = Nets(
        G=G,
        D=D,
        opt_G=Adam(G.parameters(), lr=lr_G, **adam),
        opt_D=Adam(D.parameters(), lr=lr_D, **adam),
        scaler_G=runtime.grad_scaler(),
        scaler_D=runtime.grad_scaler(),
        G_ema=copy.deepcopy(G).eval().requires_grad_(False) if opts.ema > 0 else None,
        augment_strength=AugmentStrength.start(runtime.device, opts.ada_target) if opts.ada else None,
    )
    wrap_for_training(nets, opts, runtime)
    if nets.G_ema is not None and runtime.distributed:
        # each rank initialised its own G; DDP has just broadcast rank 0's, so the EMA starts from that
        nets.G_ema.load_state_dict(nets.G.state_dict())
    return nets


def without_compiler_hooks(method):
    """method as written, without the wrapper torch.optim puts around it for torch.compile."""
    return getattr(method, "__wrapped__", method)


class EagerAdam(torch.optim.Adam):
    """torch.optim.Adam, the same update and state, for runs that compile nothing. Adam's methods
    are wrapped to tell torch.compile where its graphs break, and the wrappers import torch._dynamo
    at their first call: 1.1 s of a one-epoch run's 6.5 s on a 2-core CPU (BENCHMARKS.md), spent
    before the first step. These are the methods without their wrappers."""

    add_param_group = without_compiler_hooks(torch.optim.Optimizer.add_param_group)
    zero_grad = without_compiler_hooks(torch.optim.Optimizer.zero_grad)
    state_dict = without_compiler_hooks(torch.optim.Optimizer.state_dict)
    load_state_dict = without_compiler_hooks(torch.optim.Optimizer.load_state_dict)

    @torch.no_grad()  # what the wrapper sets (a differentiable Adam is never built here)
    def step(self, closure=None):
        return without_compiler_hooks(torch.optim.Adam.step)(self, closure)


def ddp_without_buffer_sync(module, device_ids):
    """DDP that leaves the module's buffers alone in forward; torch 2.14 renamed broadcast_buffers
    to forward_sync_buffers (the old name warns once per process at every start)."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(module, device_ids=device_ids, forward_sync_buffers=False)
    return DDP(module, device_ids=device_ids, broadcast_buffers=False)


def wrap_for_training(nets, opts, runtime):
    """DDP and torch.compile views of G and D; the plain modules stay for saving."""
    G_train, D_train, D_no_sync = nets.G, nets.D, nets.D
    d_step_forward, g_step_forward = d_forward, g_forward
    if runtime.distributed:
        if opts.sync_bn:  # on CUDA: startup.refuse_what_torchrun_cannot_train
            nets.G = nn.SyncBatchNorm.convert_sync_batchnorm(nets.G)
            nets.D = nn.SyncBatchNorm.convert_sync_batchnorm(nets.D)
            D_no_sync = nets.D
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # D's running statistics are never used (D only ever runs in training mode), and broadcasting
        # them in place between D's two forwards of one update breaks autograd on torch 2.11
        G_train, D_train = DDP(nets.G, device_ids=ids), ddp_without_buffer_sync(nets.D, ids)
    # torch.compile does not take the double backward of --r1: the D steps that take the penalty
    # (one in --r1-every) run d_forward eager, with D_r1; the others, the compiled update
    D_r1 = D_train
    if runtime.compile and runtime.distributed:
        # dynamo splits a compiled DDP module at its gradient buckets, so that the all-reduces
        # overlap the backward; it does that only for the DDP module itself, not inside a bigger graph
        G_train, D_train, D_no_sync = (compiled(module, runtime) for module in (G_train, D_train, D_no_sync))
    elif runtime.compile and not runtime.whole_step:  # --compile max compiles train_step whole instead
        # each update's augment + forward + loss + statistics as one graph (its backward is compiled
        # with it), static shapes: the last incomplete batch of an epoch is dropped
        G_train = compiled(G_train, runtime)
        d_step_forward = compiled(d_forward, runtime)
        g_step_forward = compiled(g_forward, runtime)
    nets.G_train, nets.D_train, nets.D_no_sync, nets.D_r1 = G_train, D_train, D_no_sync, D_r1
    nets.d_forward, nets.g_forward = d_step_forward, g_step_forward


def compiled(function, runtime):
    return torch.compile(function, dynamic=False, mode=runtime.compile_mode)


# ---------------------------------------------------------------- the two update steps


def judge(D, images, labels):
    """D's logits for images, of the classes in labels (None: an unconditional D)."""
    return D(images) if labels is None else D(images, labels)


def judge_with_class_loss(D, images, labels, recipe):
    """D's logits for images, and the weighted class loss of its class scores against labels
    (Dual Projection GAN, Han et al., 2021): 0 without --conditional or with --class-loss 0."""
    if labels is None or not recipe.class_loss:
        return judge(D, images, labels), 0.0
    logits, class_scores = D(images, labels, class_scores=True)
    return logits, recipe.class_loss * F.cross_entropy(class_scores.float(), labels)


def r1_penalty(real_logits, real_input, scaler=None):
    """The batch's mean squared norm of the gradient of D's logits with respect to its real input
    images; kept in the graph (create_graph), so that D's update descends it too.

    With fp16's loss scaling (scaler enabled) the gradient is taken at the loss scale and divided
    by it in fp32, as GradScaler's recipe for gradient penalties does: unscaled, fp16's small
    gradients inside D flush to zero. Each logit's gradient starts at the scale over the batch
    size, as in the backward of the loss (a mean); the scale itself would overflow fp16 at
    GradScaler's first scale. Where the scaled gradient overflows, the penalty reads 0 but its
    backward carries the overflow to D's gradients: the scaler skips the update and lowers its
    scale, as for any overflow, and the logged loss stays finite.
    """
    logits_sum = real_logits.float().sum()
    if scaler is None or not scaler.is_enabled():
        (gradient,) = torch.autograd.grad(logits_sum, real_input, create_graph=True)
        return gradient.float().square().flatten(1).sum(dim=1).mean()
    # on the device, as the scaler keeps it: no host sync
    start = scaler.scale(torch.ones((), device=logits_sum.device)) / real_logits.shape[0]
    (scaled,) = torch.autograd.grad(logits_sum * start, real_input, create_graph=True)
    penalty = (scaled.float() / start).square().flatten(1).sum(dim=1).mean()
    return OverflowReadsZero.apply(penalty)


class OverflowReadsZero(torch.autograd.Function):
    """A value that reads 0 where it is not finite, while its gradient flows back unchanged."""

    @staticmethod
    def forward(ctx, value):
        return torch.where(torch.isfinite(value), value, torch.zeros_like(value))

    @staticmethod
    def backward(ctx, gradient):
        return gradient


def d_forward(D, real, fake, recipe, labels=None, strength=None, r1_weight=0.0, scaler=None):
    """D's loss on a real and a fake batch (with the class loss of the real one's classes), and
    its mean outputs as probabilities.

    labels: the classes of both batches (fakes are drawn as the real batch's classes), or None.
    strength: --ada's AugmentStrength, which is told the signs of D's logits on the real batch.
    r1_weight: gamma of the R1 penalty added at this step (0: none); scaler: D's loss scaler.
    """
    real_input = recipe.augment(real, strength)
    if r1_weight:
        real_input = real_input.detach().requires_grad_(True)
    real_logits, class_loss = judge_with_class_loss(D, real_input, labels, recipe)
    if strength is not None:
        strength.observe(real_logits)
    fake_logits = judge(D, recipe.augment(fake, strength), labels)
    loss = LOSSES[recipe.loss][0](real_logits.float(), fake_logits.float(), recipe) + class_loss
    if r1_weight:
        loss = loss + r1_weight / 2 * r1_penalty(real_logits, real_input, scaler)
    d_real = torch.sigmoid(real_logits.detach().float()).mean()
    return loss, d_real, torch.sigmoid(fake_logits.detach().float()).mean()


def g_forward(D, real, fake, recipe, labels=None, strength=None):
    """G's loss: what D makes of its (augmented) images, plus the weighted spectral loss and the
    class loss of the classes they were drawn as."""
    fake_logits, class_loss = judge_with_class_loss(D, recipe.augment(fake, strength), labels, recipe)
    loss = LOSSES[recipe.loss][1](fake_logits.float()) + class_loss
    if recipe.spectral_loss:
        loss = loss + recipe.spectral_loss * spectral_loss(fake, real)
    return loss


def d_step(nets, real, fake, recipe, runtime, labels=None, step=0):
    """One D update on a real and a (detached) fake batch; returns device statistics.

    step: the run's D step count, which decides whether R1 is due; weighted by the interval, the
    penalty keeps its average weight (StyleGAN2's lazy regularisation).
    """
    with runtime.autocast():
        if recipe.r1_due(step):
            r1_weight = recipe.r1 * recipe.r1_every
            loss_d, d_real, d_fake = d_forward(
                nets.D_r1, real, fake.detach(), recipe, labels, nets.augment_strength, r1_weight, nets.scaler_D
            )
        else:
            loss_d, d_real, d_fake = nets.d_forward(
                nets.D_train, real, fake.detach(), recipe, labels, nets.augment_strength
            )
    nets.opt_D.zero_grad(set_to_none=True)
    nets.scaler_D.scale(loss_d).backward()
    nets.scaler_D.step(nets.opt_D)
    nets.scaler_D.update()
    return {"loss_d": loss_d.detach(), "d_real": d_real, "d_fake": d_fake}


def g_step(nets, real, fake, recipe, runtime, labels=None):
    """One G update through D; D's weight gradients are never computed."""
    # Frozen rather than backward(inputs=...): a compiled D's backward is one fused node that
    # would still compute its weight gradients; a frozen D gets a graph without them.
    nets.D.requires_grad_(False)
    try:
        with runtime.autocast():
            # D outside DDP: it has no gradients to all-reduce here (with --sync-bn its
            # BatchNorm layers still synchronise their statistics, on every rank alike)
            loss_g = nets.g_forward(nets.D_no_sync, real, fake, recipe, labels, nets.augment_strength)
        nets.opt_G.zero_grad(set_to_none=True)
        nets.scaler_G.scale(loss_g).backward()
    finally:
        nets.D.requires_grad_(True)
    nets.scaler_G.step(nets.opt_G)
    nets.scaler_G.update()
    return {"loss_g": loss_g.detach()}


def ema_decay_at(decay, step):
    """The decay to use at a step: ramps up from 0.1 so early averages forget the random init.

    Without the ramp a 0.999 average still holds 0.999**700 = 50% of the initial weights after
    700 steps, and its samples are grey noise in short runs (seen on the digits benchmark).
    Same schedule as TensorFlow's ExponentialMovingAverage with num_updates.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def train_step(nets, real, recipe, runtime, update_g=True, ema_decay=0.0, labels=None, step=0):
    """D step then (if update_g) G step on the same fake batch, as in the DCGAN example.

    labels: the real batch's classes for a class-conditional pair; G draws its fakes as the same
    classes, so D sees real and fake batches of one class mix (the data's own balance).
    step: the steps the run has made before this one (--r1-every counts them).
    """
    real = x_flipped(real) if recipe.mirror else real  # --mirror: the images' mirror images as more data
    noise = torch.randn(real.shape[0], nets.G.nz, 1, 1, device=real.device)
    with torch.set_grad_enabled(update_g), runtime.autocast():
        fake = nets.G_train(noise) if labels is None else nets.G_train(noise, labels)
    stats = d_step(nets, real, fake, recipe, runtime, labels, step)
    if update_g:
        stats.update(g_step(nets, real, fake, recipe, runtime, labels))
        if nets.G_ema is not None:
            update_ema(nets.G_ema, nets.G, ema_decay)
    if nets.augment_strength is not None:
        nets.augment_strength.after_step(runtime)
    return stats


# ---------------------------------------------------------------- their statistics

# the statistics every step returns, with the labels the DCGAN example made familiar
STAT_NAMES = {"loss_d": "Loss_D", "loss_g": "Loss_G", "d_real": "D(x)", "d_fake": "D(G(z))"}


class Meter:
    """Sums of the step statistics on the device, read (one host sync) only when logging."""

    def __init__(self, device):
        self.interval = torch.zeros(len(STAT_NAMES) + 1, device=device)  # the stats, then G updates
        self.epoch = torch.zeros_like(self.interval)
        self.steps = self.epoch_steps = 0

    def add(self, stats):
        g_updates = torch.ones_like(stats["loss_d"]) if "loss_g" in stats else torch.zeros_like(stats["loss_d"])
        values = [stats.get(name, torch.zeros_like(stats["loss_d"])) for name in STAT_NAMES]
        self.interval += torch.stack([*values, g_updates])
        self.steps += 1

    def read_interval(self, runtime):
        """Means over the steps since the last read (every rank's under torchrun); then starts afresh."""
        if runtime.distributed:
            torch.distributed.all_reduce(self.interval)
            self.interval /= runtime.world_size
        means = interval_means(self.interval, self.steps)
        self.epoch += self.interval
        self.epoch_steps += self.steps
        self.interval.zero_()
        self.steps = 0
        return means

    def epoch_means(self):
        """The epoch's means, or None when it made no step (resumed after its last batch)."""
        return interval_means(self.epoch, self.epoch_steps) if self.epoch_steps else None


def interval_means(totals, steps):
    """Means of summed statistics; Loss_G averages over the G updates only (--d-steps)."""
    *sums, g_updates = totals.tolist()
    means = {name: value / steps for name, value in zip(STAT_NAMES, sums)}
    means["loss_g"] = sums[1] / g_updates if g_updates else None  # None: no G update in the interval
    return means


def epoch_summary(means, epoch, epochs, seconds, images_done, fid):
    if means is None:
        return f"[{epoch}/{epochs}] no steps left in this epoch (resumed after its last batch)"
    stats = "  ".join(f"{label} {format_stat(means[name], 4)}" for name, label in STAT_NAMES.items())
    fid_text = f"  FID {fid:.2f}" if fid is not None else ""
    return f"[{epoch}/{epochs}] {stats}  {seconds:.1f}s  {images_done / max(seconds, 1e-9):.0f} img/s{fid_text}"


def format_stat(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"
