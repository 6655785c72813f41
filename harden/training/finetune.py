"""`harden finetune`: adversarial and certified fine-tuning, on one process or many.

The loop: epochs of global batches drawn in a seeded order; each step computes one objective
(harden.training.objectives) plus the terms the model's layers call for, then Adam. The eps of a step
follows a ramp from 0 over `eps_ramp_epochs` (linear or smooth); kappa and the CROWN-IBP beta
follow the same ramp.

Repeatability. The data order of an epoch and the attacks' random starts are functions of
(seed, epoch) alone, and every epoch ends with a checkpoint (safetensors, written atomically) of
the weights (with any spectral-norm state), the optimizer state, torch's global RNG states, the
norm-decay averages and the epoch. `resume=` therefore continues to the very same weights as a run
that was never interrupted.

Distributed. Under `torchrun` (WORLD_SIZE > 1) the step runs inside DistributedDataParallel
(NCCL on GPUs, gloo on CPUs). Every process draws the same global batch and takes its contiguous
share; its summed loss is scaled by world_size / global_batch, so the averaged gradient is exactly
the gradient of the global batch's mean loss, as in one process. Only rank 0 writes files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from certify.attacks.gradient import FGM, FGSM, PGD
from certify.data.datasets import Dataset
from certify.common.errors import UserError, load_untrusted_json
from certify.common.files import atomic_path
from certify.common.progress import progress_bar, say
from harden.io.bundle import Bundle
from harden.training.objectives import (ATTACK_LABELS, CERTIFIED, OBJECTIVES, SCHEDULES, BoundGraph, LayerTerms,
                               Objective, Step, draw_start, eps_at, make_objective, ramp_fraction)
from harden.training.train import accuracy, check_common_options, is_finite_number as _finite, pick_device

LR_SCHEDULES = ("constant", "cosine")
CHECKPOINT_FORMAT = "1"


@dataclass
class FinetuneConfig:
    train: str = "pgd"
    eps: float = 0.0
    norm: str = "inf"
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    steps: int = 10                     # PGD / TRADES attack steps (and the PGD of the final evaluation)
    step_size: float | None = None      # default 2.5 * eps / steps
    eps_ramp_epochs: float | None = None  # default: half the epochs for ibp/crown-ibp, none otherwise
    eps_schedule: str = "linear"
    kappa_end: float = 0.5
    attack_labels: str = "predicted"
    trades_beta: float = 6.0
    lr_schedule: str = "constant"
    norm_decay: float | None = None
    norm_decay_p: str = "inf"
    eval_limit: int | None = None

    def ramp_epochs(self) -> float:
        if self.eps_ramp_epochs is not None:
            return self.eps_ramp_epochs
        return max(1, self.epochs // 2) if self.train in CERTIFIED else 0.0

    def validate(self, input_shape: tuple[int, ...] | None = None,
                 input_range: tuple[float, float] | None = None) -> None:
        """Refuse any setting that cannot work, with a one-line UserError. Without the model's
        input shape and range (e.g. before the model is loaded) every check but eps's upper bound
        is made; call it again with them."""
        def bad(what: str, hint: str) -> None:
            raise UserError(what, hint)

        if self.train not in OBJECTIVES:
            bad(f"unknown --train {self.train!r}", f"use one of: {', '.join(OBJECTIVES)}")
        if self.norm not in ("inf", "2"):
            bad(f"unknown --norm {self.norm!r}", "use inf or 2")
        if not (_finite(self.eps) and self.eps >= 0):
            bad(f"--eps {self.eps} is not a finite number >= 0", "give the radius in pixel units, e.g. --eps 0.1")
        if self.train != "clean" and self.eps == 0:
            bad(f"--train {self.train} needs --eps > 0", "give the radius to train for, e.g. --eps 0.1")
        if input_shape is not None:
            input_range = tuple(input_range) if input_range is not None else (0.0, 1.0)
            width = float(input_range[1]) - float(input_range[0])
            largest = width if self.norm == "inf" else width * math.sqrt(math.prod(input_shape))
            if self.eps > largest:
                bad(f"--eps {self.eps} is larger than the whole input range in the l{self.norm} norm ({largest:g})",
                    f"give 0 < eps <= {largest:g} (pixel units, inputs in [{input_range[0]:g}, {input_range[1]:g}])")
        check_common_options(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                             steps=self.steps, eval_limit=self.eval_limit)
        if self.step_size is not None and not (_finite(self.step_size) and self.step_size > 0):
            bad(f"attack step size {self.step_size} is not positive", "leave it unset for 2.5 * eps / steps")
        if self.eps_ramp_epochs is not None:
            if not (_finite(self.eps_ramp_epochs) and self.eps_ramp_epochs >= 0):
                bad(f"--eps-ramp-epochs {self.eps_ramp_epochs} is not a number >= 0", "give 0 (no ramp) or more epochs")
            if self.eps_ramp_epochs > self.epochs:
                bad(f"--eps-ramp-epochs {self.eps_ramp_epochs:g} is more than --epochs {self.epochs} "
                    f"(eps would never reach {self.eps:g})", f"give at most {self.epochs} ramp epochs, or more --epochs")
        if self.eps_schedule not in SCHEDULES:
            bad(f"unknown --eps-schedule {self.eps_schedule!r}", f"use one of: {', '.join(SCHEDULES)}")
        if self.attack_labels not in ATTACK_LABELS:
            bad(f"unknown attack labels {self.attack_labels!r}", f"use one of: {', '.join(ATTACK_LABELS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            bad(f"unknown --lr-schedule {self.lr_schedule!r}", f"use one of: {', '.join(LR_SCHEDULES)}")
        if not (_finite(self.kappa_end) and 0.0 <= self.kappa_end <= 1.0):
            bad(f"kappa {self.kappa_end} is outside [0, 1]", "give a final clean-loss weight such as 0.5")
        if not (_finite(self.trades_beta) and self.trades_beta >= 0):
            bad(f"TRADES beta {self.trades_beta} is not a number >= 0", "use the reference value 6")
        if self.norm_decay is not None and not (_finite(self.norm_decay) and self.norm_decay >= 0):
            bad(f"--norm-decay {self.norm_decay} is not a number >= 0", "use a value in 1e-5..0.1")
        if self.norm_decay_p not in ("inf", "1"):
            bad(f"unknown --norm-decay-p {self.norm_decay_p!r}", "use inf or 1")

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the checkpoint (epochs may grow)."""
        key = {k: v for k, v in asdict(self).items() if k not in ("epochs", "eval_limit", "eps_ramp_epochs")}
        # The default ramp depends on the epochs: compare the ramp actually used.
        return {**key, "eps_ramp_epochs": self.ramp_epochs()}


# --- distributed --------------------------------------------------------------------------------

@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.started_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main_process() -> bool:
    """True outside torchrun and on rank 0 under it: the one process that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def start_processes(device: torch.device) -> Processes:
    """Join the process group that torchrun describes in the environment (none without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    started = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        started = True
    return Processes(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", "0")), started)


def _device_for(name: str | None, processes_hint_local_rank: int) -> torch.device:
    device = pick_device(name)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", processes_hint_local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


class _TrainStep(nn.Module):
    """One step's loss as a module, so DistributedDataParallel can wrap it: all attack and bound
    passes happen inside one forward, and one backward all-reduces the gradients."""

    def __init__(self, model: nn.Module, objective: Objective, terms: LayerTerms, touch_all: bool):
        super().__init__()
        self.model = model
        self.objective = objective
        self.terms = terms
        # Under DDP every parameter must receive a gradient each step; a zero-valued term makes sure
        # (a layer that a step leaves out, or a shard with no samples).
        self.touch_all = touch_all

    def forward(self, x: torch.Tensor, y: torch.Tensor, step: Step, scale: float):
        zero = sum(p.sum() for p in self.model.parameters()) * 0.0 if self.touch_all else 0.0
        if x.shape[0] == 0:
            none = torch.zeros((), device=x.device)
            return zero + none, none, none, none
        result = self.objective(self.model, x, y, step)
        loss = result.losses.sum() * scale + zero
        extra = self.terms.loss(self.model)
        if extra is not None:
            loss = loss + extra
        robust = result.robust_correct.sum() if result.robust_correct is not None else torch.zeros((), device=x.device)
        return loss, result.losses.detach().sum(), result.clean_correct.sum(), robust


# --- checkpoints ---------------------------------------------------------------------------------

def default_checkpoint(output: str | Path) -> Path:
    """OUT.safetensors -> OUT.ckpt.safetensors, next to the output."""
    output = Path(output)
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(f"{stem}.ckpt.safetensors")


def epoch_checkpoint(folder: str | Path, epoch: int) -> Path:
    return Path(folder) / f"epoch-{epoch:04d}.ckpt.safetensors"


def save_checkpoint(path: Path, *, module: nn.Module, optimizer: torch.optim.Optimizer, terms: LayerTerms,
                    epoch: int, config: FinetuneConfig, epochs_log: list[dict], extra: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        tensors[f"model.{name}"] = value.detach().cpu().contiguous()
    state = optimizer.state_dict()
    plain_state: dict[str, dict] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    for name, value in terms.state().items():
        tensors[f"norm_decay.{name}"] = value.contiguous()
    metadata = {"harden.checkpoint": json.dumps({
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "config": asdict(config), "epochs": epochs_log,
        "param_groups": state["param_groups"], "optimizer_plain_state": plain_state, **extra})}
    # safetensors refuses tensors sharing memory; a state dict can hold tied views.
    seen: set[int] = set()
    for name, tensor in tensors.items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            tensors[name] = tensor.clone()
        seen.add(key)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


CHECKPOINT_HINT = "give the .ckpt.safetensors file that harden finetune wrote"


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint written by `save_checkpoint`; a UserError for a missing,
    damaged or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise UserError(f"--resume {path} is a folder", CHECKPOINT_HINT)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist", CHECKPOINT_HINT)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("harden.checkpoint")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint ({first})",
                        "the file is damaged or truncated; " + CHECKPOINT_HINT) from None
    if raw is None:
        raise UserError(f"{path} is a safetensors file but not a harden checkpoint", CHECKPOINT_HINT)
    try:
        meta = load_untrusted_json(raw, "checkpoint metadata")
    except UserError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{path} has damaged checkpoint metadata", CHECKPOINT_HINT)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {meta.get('format')}", "resume with the harden version that wrote it")
    wanted = {"epoch": int, "config": dict, "epochs": list, "param_groups": list}
    damaged = [key for key, kind in wanted.items() if not isinstance(meta.get(key), kind)]
    if damaged or "rng.torch" not in tensors:
        raise UserError(f"{path} has damaged checkpoint metadata (missing {', '.join(damaged or ['rng.torch'])})",
                        CHECKPOINT_HINT)
    return meta, tensors


def check_resume(path: str | Path, config: FinetuneConfig, module: nn.Module | None = None, *,
                 train_samples: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read the checkpoint `path` and refuse it unless this run can continue it: the same settings
    (only the epochs may grow), the same model (tensor names and shapes), the same amount of data.
    Cheap: the CLI calls it before loading any data."""
    meta, tensors = read_checkpoint(path)
    known = {f.name for f in fields(FinetuneConfig)}
    try:
        saved = FinetuneConfig(**{k: v for k, v in meta["config"].items() if k in known})
        saved_key = saved.resume_key()
    except (TypeError, ValueError):
        raise UserError(f"{path} has damaged checkpoint metadata (its settings)", CHECKPOINT_HINT) from None
    key = config.resume_key()
    if saved_key != key:
        diff = [k for k, v in key.items() if saved_key.get(k) != v]
        shown = ", ".join(f"{k} {saved_key.get(k)!r} there, {key[k]!r} here" for k in diff[:3])
        raise UserError(f"the checkpoint {path} was made with other settings ({shown})",
                        "resume with the options of the interrupted run (only --epochs may change; "
                        "give --eps-ramp-epochs explicitly when the default ramp moved with them)")
    if meta["epoch"] > config.epochs:
        raise UserError(f"the checkpoint {path} is after epoch {meta['epoch']}, beyond --epochs {config.epochs}",
                        f"give --epochs {meta['epoch']} or more to continue it")
    if module is not None:
        expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        stored = {k[len("model."):]: tuple(v.shape) for k, v in tensors.items() if k.startswith("model.")}
        if stored != expected:
            missing = sorted(set(expected) - set(stored))
            extra = sorted(set(stored) - set(expected))
            shapes = sorted(k for k in set(stored) & set(expected) if stored[k] != expected[k])
            detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
                      else f"{shapes[0]} has shape {stored[shapes[0]]}, the model {expected[shapes[0]]}")
            raise UserError(f"the checkpoint {path} does not fit this model ({detail})",
                            "resume with the same MODEL file the checkpoint was made from")
    if train_samples is not None and meta.get("train_samples") != train_samples:
        raise UserError(f"the checkpoint {path} was made on {meta.get('train_samples')} training samples, "
                        f"this run has {train_samples}", "resume with the same --data and --limit")
    return meta, tensors


def _restore(meta: dict, tensors: dict[str, torch.Tensor], path: Path, *, module: nn.Module,
             optimizer: torch.optim.Optimizer, terms: LayerTerms, device: torch.device) -> None:
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        module.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"the checkpoint {path} does not fit this model ({str(exc).splitlines()[0]})",
                        "resume with the same MODEL file the checkpoint was made from") from None
    try:
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = value
        for index, entries in meta.get("optimizer_plain_state", {}).items():
            opt_state.setdefault(int(index), {}).update(entries)
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"the checkpoint {path} has a damaged optimizer or random state ({first})",
                        CHECKPOINT_HINT) from None
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    terms.load_state({k[len("norm_decay."):]: v for k, v in tensors.items() if k.startswith("norm_decay.")}, device)


# --- the loop ------------------------------------------------------------------------------------

def _stream_seed(seed: int, epoch: int, stream: int) -> int:
    # Independent, reproducible streams per (seed, epoch): data order (0) and attack starts (1).
    return (seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2 ** 62)


def _lr_at(config: FinetuneConfig, step: int, total: int) -> float:
    if config.lr_schedule == "constant" or total <= 1:
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _training_module(bundle: Bundle) -> nn.Module:
    """The bundle's module, behind its input normalization when the model expects one (attacks and
    bounds stay in pixel space). Parameters are shared: training it trains the bundle's module."""
    from certify.specs.input_spec import InputSpec, with_normalization

    spec = InputSpec(mean=bundle.data.get("mean"), std=bundle.data.get("std"))
    return with_normalization(bundle.module, spec, tuple(bundle.input_shape))


def check_data(bundle: Bundle, train: Dataset, test: Dataset | None = None) -> None:
    """Refuse data the model cannot be trained or evaluated on, before any training step: another
    sample shape, no samples, labels the model has no output for (cross-entropy would fail), or a
    model with another number of outputs than the data has classes (a 100-output model on 10-class
    data is almost surely the wrong model or the wrong data)."""
    hint = "fine-tune the model on the data it was made for"
    for role, data in (("training", train), ("test", test)):
        if data is None:
            continue
        if tuple(data.x.shape[1:]) != tuple(bundle.input_shape):
            raise UserError(f"the {role} data has samples of shape {tuple(data.x.shape[1:])}, the model expects "
                            f"{tuple(bundle.input_shape)}", hint)
        if len(data) == 0:
            if role == "training":
                raise UserError("the training data is empty", "give a dataset with samples (or a larger --limit)")
            continue
        low, high = int(data.y.min()), int(data.y.max())
        if low < 0 or high >= bundle.num_classes:
            label = low if low < 0 else high
            raise UserError(f"the {role} data has label {label} but the model has {bundle.num_classes} outputs "
                            f"(labels 0..{bundle.num_classes - 1})", hint)
    classes = len(train.classes)
    if classes and classes != bundle.num_classes:
        raise UserError(f"the model has {bundle.num_classes} outputs but the data has {classes} classes",
                        hint + " (a .npz without a `classes` array has max(y) + 1 classes; add one naming every class)")


def finetune(bundle: Bundle, train: Dataset, test: Dataset | None, config: FinetuneConfig, *,
             device: str | None = None, checkpoint: str | Path | None = None,
             checkpoint_dir: str | Path | None = None, resume: str | Path | None = None,
             quiet: bool = False) -> dict:
    """Fine-tune `bundle.module` in place; returns the history record it appends to `bundle.history`.

    `checkpoint`: file rewritten after every epoch; `checkpoint_dir`: one file per epoch there.
    `resume`: a checkpoint to continue from (same model file, data and settings; epochs may grow).
    """
    input_range = tuple(bundle.data.get("input_range", (0.0, 1.0)))
    config.validate(tuple(bundle.input_shape), input_range)
    pick_device(device)  # the one device check, before anything else is read
    check_data(bundle, train, test)
    resume_meta = resume_tensors = None
    if resume is not None:
        resume_meta, resume_tensors = check_resume(resume, config, bundle.module, train_samples=len(train))

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device_for(device, local_rank)
    processes = start_processes(dev)
    quiet = quiet or not processes.main
    try:
        record = _run(bundle, train, test, config, dev, processes, input_range, checkpoint, checkpoint_dir,
                      resume, resume_meta, resume_tensors, quiet)
    finally:
        processes.close()
    bundle.module.to("cpu").eval()
    bundle.history.append(record)
    return record


def _run(bundle, train, test, config, dev, processes, input_range, checkpoint, checkpoint_dir, resume,
         resume_meta, resume_tensors, quiet) -> dict:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    bundle.module.to(dev)
    module = _training_module(bundle).to(dev)
    objective = make_objective(config.train, norm=config.norm, input_shape=tuple(bundle.input_shape),
                               input_range=input_range, steps=config.steps, step_size=config.step_size,
                               attack_labels=config.attack_labels, trades_beta=config.trades_beta,
                               kappa_end=config.kappa_end)
    terms = LayerTerms(config.norm_decay, config.norm_decay_p)
    optimizer = torch.optim.Adam(bundle.module.parameters(), lr=config.lr)
    start_epoch, epochs_log = 0, []
    if resume_meta is not None:
        _restore(resume_meta, resume_tensors, Path(resume), module=bundle.module, optimizer=optimizer,
                 terms=terms, device=dev)
        start_epoch, epochs_log = int(resume_meta["epoch"]), list(resume_meta["epochs"])

    step_module: nn.Module = _TrainStep(module, objective, terms, touch_all=processes.world > 1)
    if processes.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[dev.index] if dev.type == "cuda" else None)

    n, batch = len(train), config.batch_size
    steps_per_epoch = (n + batch - 1) // batch
    ramp_steps = round(config.ramp_epochs() * steps_per_epoch)
    total_steps = config.epochs * steps_per_epoch
    sample_shape = tuple(train.x.shape[1:])
    say(f"finetune {config.train} eps {config.eps:g} (l{config.norm}) on {n} samples, {config.epochs} epochs, "
        f"batch {batch}, {processes.world} process(es) on {dev}"
        + (f"; resuming after epoch {start_epoch}" if start_epoch else ""), quiet=quiet)

    with progress_bar(quiet=quiet) as bar:
        task = bar.add_task("finetune", total=max(0, (config.epochs - start_epoch) * steps_per_epoch), status="")
        for epoch in range(start_epoch, config.epochs):
            epoch_started = time.perf_counter()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_stream_seed(config.seed, epoch, 0)))
            noise = torch.Generator().manual_seed(_stream_seed(config.seed, epoch, 1))
            totals = torch.zeros(4, dtype=torch.float64)  # loss sum, clean correct, robust correct, samples
            eps = 0.0
            for s in range(steps_per_epoch):
                global_step = epoch * steps_per_epoch + s
                fraction = ramp_fraction(global_step, ramp_steps)
                eps = eps_at(fraction, config.eps, config.eps_schedule)
                rows = order[s * batch:(s + 1) * batch]
                mine = rows.tensor_split(processes.world)[processes.rank]
                start_noise = None
                if objective.uses_start_noise and eps > 0:
                    start_noise = draw_start(noise, (len(rows), *sample_shape), config.norm, eps)
                    start_noise = start_noise.tensor_split(processes.world)[processes.rank]
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(config, global_step, total_steps)
                x, y = train.x[mine].to(dev), train.y[mine].to(dev)
                module.train()
                loss, loss_sum, clean, robust = step_module(x, y, Step(eps, fraction, start_noise),
                                                            processes.world / len(rows))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                terms.after_backward(bundle.module)
                optimizer.step()
                totals += torch.tensor([loss_sum.item(), clean.item(), robust.item(), len(mine)], dtype=torch.float64)
                seen = max(totals[3].item(), 1)
                bar.update(task, advance=1, status=(
                    f"epoch {epoch + 1}/{config.epochs} eps {eps:.3g} loss {totals[0].item() / seen:.3f} "
                    f"clean {100 * totals[1].item() / seen:.1f}% {_robust_name(config)} {100 * totals[2].item() / seen:.1f}%"))
            totals = processes.all_sum(totals)
            seen = max(totals[3].item(), 1)
            epochs_log.append({"epoch": epoch + 1, "eps": eps, "loss": totals[0].item() / seen,
                               "train_clean_accuracy": totals[1].item() / seen,
                               "train_robust_accuracy": totals[2].item() / seen,
                               "seconds": round(time.perf_counter() - epoch_started, 2)})
            if processes.main and (checkpoint is not None or checkpoint_dir is not None):
                path = epoch_checkpoint(checkpoint_dir, epoch + 1) if checkpoint_dir is not None else Path(checkpoint)
                save_checkpoint(path, module=bundle.module, optimizer=optimizer, terms=terms, epoch=epoch + 1,
                                config=config, epochs_log=epochs_log,
                                extra={"train_samples": n, "dataset": train.name, "world_size": processes.world})
    _converge_spectral_norms(bundle.module)
    processes.barrier()

    record = {"run": "finetune", **asdict(config), "eps_ramp_epochs": config.ramp_epochs(),
              "objective": objective.describe(), "dataset": train.name, "train_samples": n,
              "world_size": processes.world, "device": str(dev), "epochs_log": epochs_log,
              "resumed_from": str(resume) if resume is not None else None,
              "layer_terms": [type(m).__name__ for m in LayerTerms.regularizers(bundle.module)]}
    if test is not None and processes.main:
        record.update(evaluate(module, test.subset(config.eval_limit), config, input_range,
                               tuple(bundle.input_shape), device=dev))
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _converge_spectral_norms(module: nn.Module) -> None:
    """Converge every spectral-norm state once training is done. One power iteration per step
    (the method's default) lags behind the weights when Adam turns the top singular direction:
    measured on the small CNN's 1568x100 layer at lr 1e-3, sigma 3.2 estimated vs 3.7 true after
    20 steps, i.e. an operator norm of 1.74 for beta 1.5. Converged, the clip is exact again and
    the output holds sigma <= beta. Done after the last checkpoint (it can take seconds), so a
    resumed run follows the uninterrupted one exactly."""
    from harden.layers.spectral import _parametrization_input, spectral_layers

    # One sample per iteration: thread hand-offs cost more than the math (10x measured on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _, layer, sn in spectral_layers(module):
            sn.converge(_parametrization_input(layer, sn))
    finally:
        torch.set_num_threads(threads)


def _robust_name(config: FinetuneConfig) -> str:
    return {"ibp": "verified", "crown-ibp": "verified", "clean": "-"}.get(config.train, "adv")


def evaluate(module: nn.Module, test: Dataset, config: FinetuneConfig, input_range, input_shape, *,
             device: torch.device, batch_size: int = 500) -> dict:
    """Clean accuracy and the accuracy that the training mode is about, at the full eps: under the
    training attack (fgm), under PGD with the training steps (pgd, trades, clean), or verified by
    IBP (ibp, crown-ibp; `certify` runs the full cascade)."""
    out = {"test_samples": len(test), "test_clean_accuracy": accuracy(module, test, device=device)}
    if config.eps <= 0 or len(test) == 0:
        return out
    lower, upper = input_range
    correct = 0
    if config.train in CERTIFIED:
        graph = BoundGraph(copy.deepcopy(module).eval(), tuple(input_shape), device)
        metric = "ibp-verified"
    elif config.train == "fgm":
        cls = FGM if config.norm == "2" else FGSM
        attack = cls(module, config.eps, lower=lower, upper=upper)
        metric = "fgm" if config.norm == "2" else "fgsm"
    else:
        attack = PGD(module, config.eps, norm=config.norm, steps=config.steps, step_size=config.step_size,
                     lower=lower, upper=upper, generator=torch.Generator().manual_seed(config.seed))
        metric = f"pgd-{config.steps}"
    module.eval()
    for start in range(0, len(test), batch_size):
        x = test.x[start:start + batch_size].to(device)
        y = test.y[start:start + batch_size].to(device)
        if config.train in CERTIFIED:
            with torch.no_grad():
                graph.refresh()
                bound, _ = graph.lower_margins(x, y, config.eps, config.norm, lower, upper, "IBP")
            correct += int((bound > 0).all(dim=1).sum())
            continue
        with torch.no_grad():
            predictions = module(x).argmax(1)
        labels = predictions if config.attack_labels == "predicted" and config.train == "fgm" else y
        x_adv = attack(x, labels)
        with torch.no_grad():
            correct += int((module(x_adv).argmax(1) == y).sum())
    return {**out, "robust_metric": metric, "test_robust_accuracy": correct / len(test)}
