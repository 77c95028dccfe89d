"""--export DIR: the trained generator as a folder other programs use without this one, laid out as
a Hugging Face model repository: model.safetensors and config.json (the weights, and the sizes that
rebuild G), a README.md model card with samples.png, and two graphs that need no Python class at
all: generator.onnx (onnxruntime, any language) and generator.pt2 (torch.export.load(...).module()).

Both graphs are G in eval mode and fp32, from noise (N, nz) float32 (and labels (N,) int64 for a
class-conditional G) to images (N, C, H, W) in [-1, 1], for any N. Each is checked against the
generator before the folder is handed over.
"""

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

import artifacts
from checkpoint import EXPORT_CONFIG_NAME, EXPORT_FORMAT
from errors import UserError, count_text
from files import atomic_write, atomic_write_bytes, check_writable, current_umask
from generator import TrainedGenerator
from metricslog import METRICS_LOG_NAME, parse_metrics
from options import build_parser
from runtime import Runtime
from sampling import GRID_COLUMNS, MAX_GRID_ROWS
from savedflags import DATA_TRAITS, NOT_RESUMED_FLAGS, refuse_damaged_flag

EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
GRAPH_TOLERANCE = 1e-3  # the largest difference allowed between a graph's images and G's, in [-1, 1]
SAMPLE_SEED = 0  # samples.png without --seed: --generate 64 --seed 0
MAX_BATCH = 1 << 16


def export(G, flags, state, path, folder, runtime, sample_seed=SAMPLE_SEED):
    """Write the export of G (loaded from path, with its flags and the loaded state; drawing on
    runtime) into folder, a new or empty one; returns how far each graph's images are from G's."""
    missing_packages()  # before anything is written
    folder = Path(folder)
    if folder.is_symlink():
        raise UserError(f"--export {folder} is a symbolic link: give a new or empty folder")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--export {folder} is a file: give a new or empty folder")
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"--export {folder} holds files: give a new or empty folder (an export never replaces one)")
    check_writable(folder.parent)  # made if missing (gan.py removes it again on a failure), one line if it cannot be
    flags = checked_flags(flags, path)
    cpu = TrainedGenerator(cpu_copy(G), Runtime(torch.device("cpu")), flags).eval()
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))  # beside it: renamed in place
    try:
        config = config_of(cpu, flags, state)
        write_weights(cpu, config, staging)
        write_samples(G, flags, runtime, staging, sample_seed)
        write_model_card(cpu, config, state, path, staging)
        onnx_difference = write_onnx(cpu, staging / "generator.onnx")
        pt2_difference = write_pt2(cpu, staging / "generator.pt2")
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private; give a folder's usual mode
        if folder.exists():
            folder.rmdir()  # empty: replaced by the finished export in one rename
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return onnx_difference, pt2_difference


def missing_packages():
    """One line naming the pip command when the ONNX exporter or its check is not installed."""
    import importlib.util

    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--export needs {', '.join(missing)}: pip install {' '.join(EXPORT_PACKAGES)}")


def cpu_copy(G):
    """G as the exported graphs hold it: fp32, on the CPU, in the contiguous layout, eval mode."""
    copied = copy.deepcopy(G).float().cpu().to(memory_format=torch.contiguous_format).eval()
    copied.class_names = G.class_names
    return copied


# ---------------------------------------------------------------- the weights and the card


def config_of(generator, flags, state):
    """config.json: what rebuilds G (its sizes, output and classes), how it was trained, and where it stood."""
    return {
        "format": EXPORT_FORMAT,
        "arch": flags["arch"],
        "nz": flags["nz"],
        "ngf": flags["ngf"],
        "image_size": flags["image_size"],
        "channels": flags["nc"],
        "g_output": flags["g_output"],
        "class_names": list(generator.class_names),
        "generator": "ema" if generator.G.uses_ema else "trained",
        "epoch": state.get("epoch"),
        "step": state.get("step"),
        # the flags a run resumes: neither this machine's folders and settings nor the mode
        "flags": {name: value for name, value in flags.items() if name not in NOT_RESUMED_FLAGS},
    }


def checked_flags(flags, path):
    """The run's flags as an export copies them into config.json and the model card: a value its
    flag could not take (Markdown in --loss, an infinite --lr) is refused, as --resume refuses it,
    and a name this program does not know is left out."""
    parser = build_parser()
    known = {action.dest for action in parser._actions} | set(DATA_TRAITS)
    for name, value in flags.items():
        if name in known and name not in DATA_TRAITS:
            refuse_damaged_flag(parser, name, value, path)
    return {name: value for name, value in flags.items() if name in known}


def write_weights(generator, config, folder):
    from safetensors.torch import save

    weights = {name: tensor.contiguous() for name, tensor in generator.G.state_dict().items()}
    atomic_write_bytes(folder / "model.safetensors", save(weights, metadata={"format": "pt"}))
    atomic_write(folder / EXPORT_CONFIG_NAME, lambda file: json.dump(config, file, indent=2), mode="w")


def write_samples(G, flags, runtime, folder, seed):
    """samples.png: 64 images of seed, or a labelled row for each class (as many as an epoch's grid
    shows), as --generate draws them."""
    generator = TrainedGenerator(G, runtime, flags)
    if not generator.class_names:
        images = generator.sample(64, seed=seed)
        artifacts.save_pil(artifacts.grid_image(images.float().div(127.5).sub(1)), folder / "samples.png")
        return
    shown = generator.class_names[:MAX_GRID_ROWS]
    rows = [generator.sample(GRID_COLUMNS, seed=seed, label=name) for name in shown]
    images = torch.cat(rows).float().div(127.5).sub(1)
    artifacts.save_pil(artifacts.labelled_grid_image(images, list(shown)), folder / "samples.png")


def write_model_card(generator, config, state, path, folder):
    card = model_card(generator, config["flags"], state, last_fid(path))
    atomic_write(folder / "README.md", lambda file: file.write(card), mode="w")


def last_fid(path):
    """(FID, epoch) of the last evaluation while training, from the metrics log beside the checkpoint, or None."""
    log = Path(path).parent / METRICS_LOG_NAME
    if not log.is_file():
        return None
    rows, _ = parse_metrics(log.read_bytes().decode("utf-8", errors="replace"))
    scored = [row for row in rows if isinstance(row.get("fid"), (int, float)) and "evaluate" not in row]
    return (scored[-1]["fid"], scored[-1].get("epoch")) if scored else None


def model_card(generator, flags, state, fid):
    nz, classes = generator.nz, generator.class_names
    width, height, channels = generator.width, generator.height, generator.channels
    kind = "A class-conditional" if classes else "An unconditional"
    labels = ", torch.zeros(16, dtype=torch.long)" if classes else ""
    trained = (
        f"{count_text(state['epoch'], 'epoch')}, {count_text(state['step'], 'step')}"
        if isinstance(state.get("epoch"), int) and isinstance(state.get("step"), int)
        else "the flags below"
    )
    maps = f"noise of {nz} numbers and a class index" if classes else f"noise of {nz} numbers"
    pipeline = "" if classes else "pipeline_tag: unconditional-image-generation\n"
    score = f" Its last FID while training was {fid[0]:.2f} (epoch {fid[1]})." if fid else ""
    which = "moving average (EMA)" if generator.G.uses_ema else "trained weights (no EMA)"
    class_line = (
        f"\nClasses, by index: {', '.join(f'{i}: {name}' for i, name in enumerate(classes))}.\n" if classes else ""
    )
    flag_rows = "\n".join(f"| `--{name.replace('_', '-')}` | `{value}` |" for name, value in sorted(flags.items()))
    return f"""---
library_name: pytorch
{pipeline}tags:
- gan
- dcgan
---

# {kind} DCGAN generator, {width}x{height} px, {channels} channel{"s" if channels > 1 else ""}

The generator's {which}, trained with gan.py for {trained}.{score}
It maps {maps} to an image in [-1, 1].
{class_line}
![samples](samples.png)

## Load it in three lines (torch alone)

```python
import torch
G = torch.export.load("generator.pt2").module()
images = G(torch.randn(16, {nz}){labels})  # (16, {channels}, {height}, {width}) in [-1, 1]
```

Other languages: `generator.onnx` (ONNX Runtime), inputs `noise` (N, {nz}) float32{" and `labels` (N,) int64" if classes else ""}, output `images`.
The weights alone: `model.safetensors`, with the sizes in `config.json`.

## How it was trained

| flag | value |
| --- | --- |
{flag_rows}
"""


# ---------------------------------------------------------------- the graphs


def example_inputs(generator, batch=2):
    generator_seed = torch.Generator().manual_seed(SAMPLE_SEED)
    noise = torch.randn(batch, generator.nz, generator=generator_seed)
    if not generator.class_names:
        return (noise,)
    return noise, torch.arange(batch) % len(generator.class_names)


def dynamic_batch(generator):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return ({0: batch},) if not generator.class_names else ({0: batch}, {0: batch})


def write_onnx(generator, path):
    """generator.onnx, checked with ONNX Runtime at another batch size; returns the largest difference."""
    names = ["noise", "labels"][: len(example_inputs(generator))]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # it reports each stage on stdout
        # the noise and the labels share the batch axis, whose one name the exporter warns it keeps once
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        torch.onnx.export(
            generator,
            example_inputs(generator),
            str(path),
            input_names=names,
            output_names=["images"],
            dynamic_shapes=dynamic_batch(generator),
            dynamo=True,
            external_data=False,
        )
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = example_inputs(generator, batch=5)
    got = session.run(None, {name: value.numpy() for name, value in zip(names, inputs)})[0]
    return largest_difference(torch.from_numpy(got), generator, inputs, "generator.onnx", GRAPH_TOLERANCE)


def write_pt2(generator, path):
    """generator.pt2, loaded back and checked at another batch size; returns the largest difference."""
    program = torch.export.export(generator, example_inputs(generator), dynamic_shapes=dynamic_batch(generator))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    inputs = example_inputs(generator, batch=5)
    with torch.no_grad():
        got = torch.export.load(path).module()(*inputs)
    return largest_difference(got, generator, inputs, "generator.pt2", GRAPH_TOLERANCE)


def largest_difference(got, generator, inputs, name, tolerance):
    with torch.no_grad():
        expected = generator(*inputs)
    if got.shape != expected.shape:
        raise RuntimeError(f"{name} gives images of shape {tuple(got.shape)}, the generator {tuple(expected.shape)}")
    difference = (got.float() - expected).abs().max().item()
    if not difference <= tolerance:
        raise RuntimeError(f"{name}'s images differ from the generator's by {difference:.3g} (allowed {tolerance})")
    return difference
