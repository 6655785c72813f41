"""Training checkpoints: one safetensors file (written atomically) holding the weights (with every
parametrization's state: spectral-norm vectors, pruning masks), the optimizer state, torch's global
RNG states, the norm-decay averages and the epoch, so that a resumed run continues to the very same
weights as one never interrupted. `config` is the run's settings dataclass (FinetuneConfig,
PruneConfig): its `resume_key()` names what a resumed run must share with the checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from certify.common.errors import UserError, load_untrusted_json
from certify.common.files import atomic_path
from harden.training.objectives import LayerTerms

CHECKPOINT_FORMAT = "1"


def default_checkpoint(output: str | Path) -> Path:
    """OUT.safetensors -> OUT.ckpt.safetensors, next to the output."""
    output = Path(output)
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(f"{stem}.ckpt.safetensors")


def epoch_checkpoint(folder: str | Path, epoch: int) -> Path:
    return Path(folder) / f"epoch-{epoch:04d}.ckpt.safetensors"


def save_checkpoint(path: Path, *, module: nn.Module, optimizer: torch.optim.Optimizer, terms: LayerTerms,
                    epoch: int, config, epochs_log: list[dict], extra: dict) -> None:
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


CHECKPOINT_HINT = "give the .ckpt.safetensors file that harden finetune or harden prune wrote"


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


def check_resume(path: str | Path, config, module: nn.Module | None = None, *,
                 train_samples: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read the checkpoint `path` and refuse it unless this run can continue it: the same settings
    (only the epochs may grow), the same model (tensor names and shapes), the same amount of data.
    Cheap: the CLI calls it before loading any data."""
    meta, tensors = read_checkpoint(path)
    kind = type(config)
    known = {f.name for f in fields(kind)}
    try:
        saved = kind(**{k: v for k, v in meta["config"].items() if k in known})
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


def restore_checkpoint(meta: dict, tensors: dict[str, torch.Tensor], path: Path, *, module: nn.Module,
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
