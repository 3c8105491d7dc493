"""Checkpoints: `checkpoints/step-N/` holding everything needed to continue a run exactly.

A checkpoint is written into a hidden temporary directory, its files flushed to disk, then completed with a
marker file that records each file's size and SHA-256, then renamed into place: a process killed mid-write
leaves nothing that looks complete, and a file damaged later (a truncated copy, a bad disk) is caught when the
checkpoint is read. Tensors go to safetensors and everything else to JSON: loading a checkpoint never unpickles
anything. Nothing here depends on the model family.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ptmcli import parallel, sharded_checkpoint
from ptmcli.distributed import Dist, broadcast_str
from ptmcli.errors import PtmError
from ptmcli.schema import MODEL_SCHEMAS, architecture_spec

MARKER = "COMPLETE"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step-N` directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MARKER).exists() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict:
    """{file: {bytes, sha256}} of every file in `folder`, each flushed to disk first."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):  # a sharded checkpoint has sub-folders
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return {"files": files}


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path`, or None when every file its marker records is there, whole and
    unchanged. A marker from before manifests (empty) only vouches that the main files exist."""
    try:
        text = (path / MARKER).read_text()
        files = (
            json.loads(text)["files"] if text.strip() else dict.fromkeys(("model.safetensors", "trainer_state.json"))
        )
    except FileNotFoundError:
        return f"it has no {MARKER} marker (it was interrupted while being written)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MARKER} marker is unreadable ({err})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if expected is None:
            continue
        stat = file.stat()
        if stat.st_size != expected["bytes"]:
            return (
                f"{name} is {stat.st_size:,} bytes where {expected['bytes']:,} were written (truncated or overwritten)"
            )
        if _cached_sha256(str(file), stat.st_size, stat.st_mtime_ns) != expected["sha256"]:
            return f"{name} does not have the checksum it was written with (its bytes changed)"
    return None


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, _size: int, _mtime_ns: int) -> str:
    """Per file version: a run reads one checkpoint several times (spec check, weights, optimizer)."""
    return _sha256(Path(path))


def verified(path: Path) -> Path:
    """`path`, after checking it is a complete, undamaged checkpoint."""
    problem = damage(path)
    if problem:
        raise PtmError(
            f"The checkpoint '{path}' is damaged: {problem}. Use another checkpoint of the run (checkpoint=step-N, "
            f"or resume=auto, which falls back to the newest intact one)."
        )
    return path


def newest_intact(root: Path, skipped: list[str]) -> Path | None:
    """The newest complete checkpoint under `root` that verifies; each newer damaged one is noted in `skipped`."""
    for path in reversed(complete_checkpoints(root)):
        problem = damage(path)
        if problem is None:
            return path
        skipped.append(f"{path.name} ({problem})")
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _optimizer_split(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def megabytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """About what a checkpoint of `model` and `optimizer` writes (every weight and optimizer tensor), in MB."""
    tensors = [*unwrap(model).state_dict().values()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    # tied weights are written once; a sharded (DTensor) weight counts whole, as all processes write it together
    unique = {getattr(t, "_local_tensor", t).data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(unique.values()) / 1e6


def _point(root: Path, name: str, target: Path) -> None:
    """Atomically make root/name a symlink to target."""
    tmp_link = root / f".{name}.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(target.name)
    os.replace(tmp_link, root / name)


def save(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    scaler,
    trainer_state: dict,
    dist: Dist,
    keep_last: int,
    best_step: int | None = None,
    keys: set[str] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically; every rank contributes its RNG state. `checkpoints/latest` then points
    at it, `checkpoints/best` at step `best_step`, and pruning keeps the newest `keep_last` plus the best."""
    # a unique temporary name: nothing else may share it, not even a crashed earlier writer's leftovers
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}-{broadcast_str(uuid.uuid4().hex[:12])}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # the run directory is locked: these are from a killed process
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    try:
        save_file(_rng_state(), str(tmp / f"rng-rank{dist.rank}.safetensors"))
        sharded = parallel.is_sharded(unwrap(model))
        if sharded:  # every process writes its shards
            sharded_checkpoint.save(tmp, unwrap(model), optimizer, keys, dist.is_main)
        dist.barrier()
        if dist.is_main:
            _write_files(tmp, step, model, optimizer, scheduler, scaler, trainer_state, dist, keys, extra, sharded)
            _write_json(tmp / MARKER, _manifest(tmp))
            _fsync_dir(tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        before = latest(root)
        kept = f"the newest intact checkpoint is {before.name}" if before else "there is no checkpoint yet"
        raise PtmError(
            f"Writing checkpoint step-{step} into '{root}' failed: {err.strerror or err}. Nothing half-written was "
            f"left behind; {kept}. Free space (or fix the filesystem), then continue with resume=auto."
        ) from err
    if dist.is_main:
        if final.exists():  # a rerun after resume from an earlier step overwrites its own future
            shutil.rmtree(final)
        os.replace(tmp, final)
        _point(root, "latest", final)
        best = root / f"step-{best_step}" if best_step is not None else None
        if best is not None and best.exists():
            _point(root, "best", best)
        _fsync_dir(root)
        if keep_last:
            for old in complete_checkpoints(root)[:-keep_last]:
                if old != best:
                    shutil.rmtree(old)
    dist.barrier()
    return final


def _write_whole(tmp: Path, model, optimizer, keys) -> None:
    """Weights and optimizer state of a model that is whole in this process."""
    if keys is None:
        save_model(unwrap(model), str(tmp / "model.safetensors"))
    else:  # parameter-efficient: only what trains (the base weights are named in trainer_state)
        state = {k: v.detach().contiguous().clone() for k, v in unwrap(model).state_dict().items() if k in keys}
        save_file(state, str(tmp / "model.safetensors"))
    tensors, meta = _optimizer_split(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    _write_json(tmp / "optimizer.json", meta)


def _write_files(tmp: Path, step, model, optimizer, scheduler, scaler, trainer_state, dist, keys, extra, sharded):
    if not sharded:  # else every process has written its shards (sharded_checkpoint.save)
        _write_whole(tmp, model, optimizer, keys)
    if extra:
        save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp / "method_state.safetensors"))
    state = {
        **trainer_state,
        "step": step,
        "world_size": dist.world_size,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
    }
    _write_json(tmp / "trainer_state.json", state)


def read_state(path: Path) -> dict:
    try:
        return json.loads((verified(path) / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:  # a checkpoint from before manifests can still be damaged
        raise PtmError(f"The checkpoint '{path}' is damaged: trainer_state.json is unreadable ({err}).") from err


def _with_defaults(spec: dict) -> dict:
    schema = MODEL_SCHEMAS.get(spec.get("family"))
    return {**architecture_spec(schema()), **spec} if schema else spec


def spec_diffs(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint X vs config Y' for every key where a checkpoint's model spec and the config's differ.
    A key the checkpoint does not record (it predates that field) counts as the field's default."""
    saved, current = _with_defaults(saved), _with_defaults(current)
    return [
        f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]


def check_architecture(path: Path, saved: dict, current: dict) -> None:
    diffs = spec_diffs(saved, current)
    if diffs:
        raise PtmError(
            f"The checkpoint '{path}' was written for another architecture ({'; '.join(diffs)}). Resume it with the "
            f"model settings it was trained with, or start a fresh run without resume=."
        )


def load_weights(path: Path, model: nn.Module, keys: set[str] | None = None) -> None:
    """Model weights of checkpoint `path`: all of them, or exactly `keys` for a parameter-efficient checkpoint."""
    verified(path)
    try:
        missing, unexpected = _load_weights(path, model, keys)
    except (OSError, SafetensorError) as err:
        raise PtmError(f"The checkpoint '{path}' is damaged: model.safetensors is unreadable ({err}).") from err
    if missing or unexpected:
        raise PtmError(
            f"The checkpoint '{path}' does not fit this model (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}). It was probably written with another objective, model or transfer method."
        )


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of checkpoint `path` (whole, in this process), verified."""
    try:
        if sharded_checkpoint.is_sharded(verified(path)):
            return sharded_checkpoint.full_weights(path)
        return load_file(str(verified(path) / "model.safetensors"))
    except (OSError, SafetensorError) as err:
        raise PtmError(f"The checkpoint '{path}' is damaged: model.safetensors is unreadable ({err}).") from err


def _load_weights(path: Path, model: nn.Module, keys: set[str] | None) -> tuple:
    if sharded_checkpoint.is_sharded(path):
        saved = sharded_checkpoint.names(path)
        wanted = (keys if keys is not None else set(unwrap(model).state_dict())) - sharded_checkpoint.tied_names(
            unwrap(model)
        )
        missing, unexpected = wanted - saved, saved - wanted
        if missing or unexpected:
            return missing, unexpected
        sharded_checkpoint.load_model(path, unwrap(model), keys)
        return set(), set()
    if parallel.is_sharded(unwrap(model)):
        return set(), set()  # a whole checkpoint into a sharded model: load() sets weights with the optimizer
    if keys is None:
        missing, unexpected = load_model(unwrap(model), str(path / "model.safetensors"), strict=False)
    else:
        saved = load_file(str(path / "model.safetensors"))
        unexpected = set(saved) - keys
        missing = keys - set(saved)
        if not unexpected:
            unwrap(model).load_state_dict(saved, strict=False)
    return missing, unexpected


def load(
    path: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    scaler,
    dist: Dist,
    model_spec: dict,
    keys: set[str] | None = None,
    global_batch: int | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model, optimizer, schedule, scaler and this rank's RNG from checkpoint `path`, written by any number
    of processes (sharded or whole) as long as the global batch (`global_batch`: batch size x processes) is the
    same. Returns (trainer state, the method's extra tensors)."""
    state = read_state(path)
    check_architecture(path, state.get("model", {}), model_spec)
    if state["world_size"] != dist.world_size and state.get("global_batch", global_batch) != global_batch:
        raise PtmError(
            f"The checkpoint '{path}' was written by {state['world_size']} processes with a global batch of "
            f"{state['global_batch']} sequences; this run has {dist.world_size} x trainer.batch_size = "
            f"{global_batch}. Resume with trainer.batch_size={state['global_batch'] // dist.world_size} (global batch "
            f"{state['global_batch']}), so that each step sees the sequences it would have seen."
        )
    load_weights(path, model, keys)
    plain = unwrap(model)
    if sharded_checkpoint.is_sharded(path):
        sharded_checkpoint.load_optimizer(path, plain, optimizer)
    else:
        meta = json.loads((path / "optimizer.json").read_text())
        saved = _optimizer_join(load_file(str(path / "optimizer.safetensors")), meta)
        if parallel.is_sharded(plain):
            sharded_checkpoint.load_full(load_file(str(path / "model.safetensors")), saved, plain, optimizer, keys)
        else:
            optimizer.load_state_dict(saved)
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng-rank{dist.rank}.safetensors"
    if state["world_size"] == dist.world_size:  # else the loop seeds each process afresh (state["reseed"])
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    state["reseed"] = state["world_size"] != dist.world_size
    extra = path / "method_state.safetensors"
    return state, load_file(str(extra)) if extra.exists() else {}
