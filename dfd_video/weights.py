"""Reading network weights: DMD2 checkpoints (--dmd2-ckpt) in every layout we know, base-model folders, and
student weights for `sample` / `export`; copying them into a network with clear mismatch errors.

describe_dmd2(path, ...) says, without loading any weights, what a DMD2 checkpoint is and where the student, the fake
score and the EMA come from (the lines `train` logs); docs/checkpoints.md describes the layouts it knows."""
from __future__ import annotations

import glob
import os
import re
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from dfd_video.files import first_line, read_error
from dfd_video.runs import latest_checkpoint, load_checkpoint


WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
LEADING = ("module.", "model.", "net.", "transformer.", "diffusion_model.")
NOT_WEIGHTS = {"optimizer", "optimizers", "optim", "optimizer_state", "scheduler", "lr_scheduler", "scaler",
               "grad_scaler"}
ROLES = {  # names a training checkpoint uses for each network
    "generator_ema": ("generator_ema", "ema", "net_ema", "student_ema", "ema_model"),
    "generator": ("generator", "net", "student", "model_student"),
    "critic": ("critic", "fake_score", "fake_score_net", "fake", "fake_net"),
    "discriminator": ("discriminator",),  # DMD2's GAN head (FastGen's .pth; --gan-weight)
}


def _flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if torch.is_tensor(obj):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    return out  # ints, strings, optimizer lists... are not weights


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes wrapper parts anywhere in a key (FSDP1, activation checkpointing, torch.compile) and leading
    `module.` (DDP) / `model.` repeatedly, while every key shares them."""
    out = {}
    for k, v in sd.items():
        for w in WRAPPER_PARTS:
            k = k.replace(w, "")
        out[k] = v
    changed = True
    while changed and out:
        changed = False
        for lead in ("module.", "model."):
            if all(k.startswith(lead) for k in out):
                out = {k[len(lead):]: v for k, v in out.items()}
                changed = True
    return out


def _is_dcp(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, ".metadata"))


def read_raw(path: str) -> dict[str, torch.Tensor]:
    """Every tensor in the file or folder, flattened to dotted keys, on CPU."""
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or folder")
    try:
        if os.path.isdir(path):
            if _is_dcp(path):
                return _read_dcp(path)
            for sub in ("", "transformer"):  # a transformer folder, or a whole pipeline folder
                folder = os.path.join(path, sub)
                files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
                if files:
                    sd = {}
                    for f in files:
                        sd.update(read_raw(os.path.join(folder, f)))
                    return sd
            raise ValueError(f"{path}: folder holds neither *.safetensors weights, transformer/*.safetensors, "
                             "nor a torch.distributed.checkpoint (.metadata)")
        if path.endswith(".safetensors"):
            return load_file(path)
        if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
            return _flatten(obj)
    except ValueError:
        raise
    except Exception as e:  # truncated / corrupt file: one line, no traceback
        raise ValueError(f"{path}: cannot read weights: {read_error(path, e)}") from None
    raise ValueError(f"{path}: expected a .safetensors / .pt / .pth file, a diffusers folder or a DCP folder")


def _read_dcp(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a torch.distributed.checkpoint folder: allocate them from its metadata, then load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = dcp.FileSystemReader(path)
    meta = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if isinstance(m, TensorStorageMetadata)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
            dcp.load(sd, storage_reader=reader, no_dist=True)
    except BaseException as e:  # CheckpointException is a BaseException whose text is every rank's traceback
        if not type(e).__name__ == "CheckpointException":
            raise
        raise ValueError(f"{path}: cannot read weights: {_dcp_damage(reader, path, e)}") from None
    return sd


def _dcp_damage(reader, path: str, e: BaseException) -> str:
    """What is wrong with a DCP folder that failed to load: the data file shorter than its .metadata says, or the
    first underlying error."""
    ends: dict[str, int] = {}
    try:
        storage = reader.read_metadata().storage_data or {}
    except Exception:
        storage = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.exists(file) else None
        if size is None or size < end:
            return (f"{name} is missing" if size is None else
                    f"{name} is truncated: {size} bytes, its .metadata needs {end}") + "; copy the folder again"
    failures = getattr(e, "failures", {}) or {}
    inner = next((getattr(f, "exc", f) for f in failures.values()), e)
    return first_line(inner)


def _by_role(sd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A flattened checkpoint split by network role (ROLES), wrapper prefixes stripped; a checkpoint without role
    names is all generator. Optimizer states are skipped, and so is FastGen's optional `logvar_linear` head (not
    part of the base model). Works on names alone (values None) too."""
    groups: dict[str, dict[str, Any]] = {}
    plain: dict[str, Any] = {}
    for k, v in strip_prefixes(sd).items():
        parts = k.split(".")
        if parts[0] in NOT_WEIGHTS or "logvar_linear" in parts:  # optimizer moments etc. also carry network names
            continue
        # the role name may sit under a wrapper level or two ({"model": {"net": ...}} in FastGen's .pth)
        at = next((i for i, part in enumerate(parts[:3]) if any(part in names for names in ROLES.values())), None)
        if at is not None and at + 1 < len(parts):
            owner = next(r for r, names in ROLES.items() if parts[at] in names)
            groups.setdefault(owner, {})[".".join(parts[at + 1:])] = v
        else:
            plain[k] = v
    if not groups:
        groups["generator"] = plain
    return {r: strip_prefixes(g) for r, g in groups.items()}


def read_checkpoint(path: str, role: str = "generator") -> dict[str, torch.Tensor] | None:
    """The state dict of one network from a DMD2 checkpoint file or folder, wrapper prefixes stripped.

    role: "generator", "generator_ema" or "critic". A checkpoint without role names (a diffusers folder, a plain
    .safetensors, one of FastGen's per-network DCP folders) is the generator; asking it for the critic returns None.
    "generator_ema" falls back to "generator" when the checkpoint holds no EMA. describe_dmd2 says which file or
    folder holds which network of a multi-folder FastGen checkpoint."""
    groups = _by_role(read_raw(path))
    if role == "generator_ema" and "generator_ema" not in groups:
        role = "generator"
    return groups.get(role)


def match_state_dict(want: dict[str, tuple], sd: dict[str, torch.Tensor],
                     convert: Callable[[dict], dict] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(`sd` under the network's key names, what still does not fit) for a network whose state dict has the shapes
    `want`: leading wrapper names (net., model., ...) are dropped when that makes the keys match, and `convert`
    (original-repo names -> the network's) is applied when the keys look foreign. The report lists "missing",
    "unexpected" and "shape_mismatches" keys, and whether names were "converted"."""
    best, converted = sd, False
    for _ in range(4):  # peel leading names one at a time while it improves the overlap
        overlap = len(want.keys() & best.keys())
        if overlap == len(want):
            break
        heads = {k.partition(".")[0] + "." for k in best}
        if len(heads) == 1 and next(iter(heads)) in LEADING:
            best = {k.partition(".")[2]: v for k, v in best.items()}
            continue
        if convert is not None:
            conv = convert(dict(best))
            if len(want.keys() & conv.keys()) > overlap:
                best, converted = conv, True
                continue
        break
    shapes = [f"{k}: file {tuple(best[k].shape)} vs model {tuple(want[k])}" for k in sorted(want.keys() & best.keys())
              if tuple(best[k].shape) != tuple(want[k])]
    return best, {"missing": sorted(want.keys() - best.keys()), "unexpected": sorted(best.keys() - want.keys()),
                  "shape_mismatches": shapes, "converted": converted}


def fit_state_dict(net: nn.Module, sd: dict[str, torch.Tensor], source: str,
                   convert: Callable[[dict], dict] | None = None) -> dict[str, torch.Tensor]:
    """`sd` under `net`'s key names (match_state_dict), or a ValueError that lists every missing / unexpected key
    and shape mismatch. `net` may sit on the meta device: only its key names and shapes are read."""
    best, bad = match_state_dict({k: tuple(v.shape) for k, v in net.state_dict().items()}, sd, convert)
    missing, unexpected, shapes = bad["missing"], bad["unexpected"], bad["shape_mismatches"]
    if missing or unexpected or shapes:
        show = lambda xs: ", ".join(xs[:6]) + (f" ... (+{len(xs) - 6})" if len(xs) > 6 else "")
        parts = [f"{len(missing)} missing [{show(missing)}]" if missing else "",
                 f"{len(unexpected)} unexpected [{show(unexpected)}]" if unexpected else "",
                 f"{len(shapes)} shape mismatches [{show(shapes)}]" if shapes else ""]
        raise ValueError(f"{source}: weights do not fit {type(net).__name__}: " + "; ".join(p for p in parts if p))
    return best


def load_weights(net: nn.Module, sd: dict[str, torch.Tensor], source: str,
                 convert: Callable[[dict], dict] | None = None) -> None:
    """Copies `sd` into `net` exactly (fit_state_dict: a clear ValueError when it does not fit)."""
    best = fit_state_dict(net, sd, source, convert)
    with torch.no_grad():
        for k, t in net.state_dict().items():
            t.copy_(best[k].to(t.dtype))


def load_student_weights(path: str, weights: str = "auto", bidirectional: bool = False,
                         rectified_flow: bool = False) -> dict[str, torch.Tensor]:
    """Student weights from a training checkpoint (its EMA when it has one and weights is auto/ema) or from
    anything --dmd2-ckpt accepts (its generator, or generator_ema with weights=ema), refused as describe_dmd2
    refuses it unless bidirectional / rectified_flow say otherwise."""
    try:
        folder = latest_checkpoint(path)
    except ValueError:
        folder = None
    if folder is not None:
        w, _ = load_checkpoint(folder, state=False)
        name = "ema" if weights in ("auto", "ema") and "ema" in w else "student"
        if weights == "ema" and "ema" not in w:
            raise ValueError(f"{path}: the checkpoint has no EMA (trained with --ema 0)")
        return w[name]
    desc = describe_dmd2(path, "generator_ema" if weights == "ema" else "generator", "teacher", bidirectional,
                         rectified_flow)
    if desc["refusals"]:
        raise ValueError(desc["refusals"][0])
    s = desc["networks"]["student"]
    return read_checkpoint(s["source"], s["role"])


# ---------------------------------------------------------------------------------------------------
# What a DMD2 checkpoint is, and where each network of a DFD run comes from (docs/checkpoints.md).

# FastGen's FSDPCheckpointer writes <save_dir>/<iteration:07d>.<name>_model/ (one DCP folder per network: net,
# fake_score, ema or ema_<beta>, discriminator), <iteration>.<name>_optim/ and <iteration>.pth (scheduler state only);
# its auto-resume save (fastgen/trainer.py, auto_resume_exit) uses the prefix latest_ar instead of the iteration.
AUTO_RESUME = "latest_ar"
_FASTGEN_ENTRY = re.compile(r"^(?P<iter>\d+|latest_ar)\.(?P<net>\w+?)_(?P<kind>model|optim)(?P<zip>\.zip)?$")
# NVIDIA's distilled Cosmos-Predict2.5-2B (experiment dmd2_trigflow_distill_cosmos_predict2_2B_bidirectional_TnI2V):
# nvidia/Cosmos-Predict2.5-2B, base/distilled/575edf0f-d973-4c74-b52c-69929a08d0a5_ema_bf16.pt. Its keys are the
# same `net.*` names as the rectified-flow checkpoints; only the path tells them apart.
TRIGFLOW_PATH = re.compile(r"(^|/)base/distilled(/|$)|575edf0f-d973-4c74-b52c-69929a08d0a5")
SELF_FORCING_ROLES = {"generator", "critic", "generator_ema"}  # top-level keys of Self-Forcing / CausVid model.pt


def _fastgen_siblings(prefix: str) -> dict[str, str]:
    """{network name: folder, or .zip when only the archive is there} of the FastGen prefix <dir>/<iteration>."""
    out: dict[str, str] = {}
    for f in sorted(glob.glob(glob.escape(prefix) + ".*_model*")):
        m = _FASTGEN_ENTRY.match(os.path.basename(f))
        if m and m["kind"] == "model" and m["iter"] == os.path.basename(prefix) and not (m["zip"] and m["net"] in out):
            out[m["net"]] = f  # sorted: the unzipped folder comes before its .zip and wins
    return out


def _fastgen_prefix(path: str) -> tuple[str, str | None] | None:
    """(prefix <dir>/<iteration>, note) when `path` names a FastGen FSDP checkpoint: one of its per-network folders
    (or their .zip), its <iteration>.pth next to them, the prefix itself (as FastGen's loader takes it), or the
    checkpoints folder (then its latest iteration, with a note). None otherwise."""
    p = path.rstrip("/") or path
    m = _FASTGEN_ENTRY.match(os.path.basename(p))
    if m:
        return os.path.join(os.path.dirname(p), m["iter"]), None
    if p.endswith(".pth") and _fastgen_siblings(p[:-4]):
        return p[:-4], None
    if not os.path.exists(p) and _fastgen_siblings(p):
        return p, None
    if os.path.isdir(p) and not _is_dcp(p):
        found = {m["iter"] for n in os.listdir(p) if (m := _FASTGEN_ENTRY.match(n)) and m["kind"] == "model"}
        iters = sorted(found - {AUTO_RESUME}, key=int)
        notes = [f"{p} holds FastGen iterations {', '.join(iters)}; using the latest, {iters[-1]} (pass "
                 f"{os.path.join(p, iters[0])} for another)"] if len(iters) > 1 else []
        if AUTO_RESUME in found and iters:  # FastGen's own latest_checkpoint skips it too
            notes.append(f"{p} also holds an auto-resume save, {AUTO_RESUME}.* ({_fastgen_iteration(os.path.join(p, AUTO_RESUME))});"
                         f" pass {os.path.join(p, AUTO_RESUME)} for it")
        if iters or AUTO_RESUME in found:
            return os.path.join(p, iters[-1] if iters else AUTO_RESUME), "; ".join(notes) or None
    return None


def _fastgen_iteration(prefix: str) -> str:
    """"iteration N" of a FastGen prefix: its name, or for latest_ar the iteration its .pth records (if readable)."""
    name = os.path.basename(prefix)
    if name != AUTO_RESUME:
        return f"iteration {int(name)}"
    try:
        it = torch.load(prefix + ".pth", map_location="cpu", weights_only=True).get("iteration")
    except Exception:
        it = None
    return f"auto-resume save, iteration {it}" if isinstance(it, int) else "auto-resume save, iteration unknown"


def fastgen_prefix_exists(path: str) -> bool:
    """True for a FastGen checkpoint prefix <dir>/<iteration> that is no file itself (its folders are <prefix>.*)."""
    return bool(_fastgen_siblings(path.rstrip("/")))


def unzip_command(archive: str) -> str:
    """The shell line that unpacks a zipped DCP folder (DFD's released `0000040.net_model.zip`) into the folder
    next to it that --dmd2-ckpt reads: the archive's own top folder decides the -d target."""
    import shlex
    import zipfile
    target = archive[:-len(".zip")]
    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        names = []
    top = os.path.basename(target) + "/"
    dest = (os.path.dirname(archive) or ".") if names and all(n.startswith(top) for n in names) else target
    return f"unzip {shlex.quote(archive)} -d {shlex.quote(dest)}"


def _zip_refusal(archive: str, what: str) -> str:
    return (f"{archive}: {what} is a zipped torch.distributed.checkpoint folder, which cannot be read in place; "
            f"unpack it next to the archive, then pass the same --dmd2-ckpt again:  {unzip_command(archive)}")


def _tensor_names(path: str) -> tuple[list[str], set[str]]:
    """(flattened tensor names, top-level keys) of a checkpoint file or folder, from its index or metadata where it
    has one (safetensors headers, DCP .metadata); a .pt / .pth is memory-mapped, not read."""
    from safetensors import safe_open
    if os.path.isdir(path):
        if _is_dcp(path):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata
            meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
            names = [k for k, m in meta.items() if isinstance(m, TensorStorageMetadata)]
            return names, {k.partition(".")[0] for k in names}
        for sub in ("", "transformer"):
            folder = os.path.join(path, sub)
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
            if files:
                names = []
                for f in files:
                    with safe_open(os.path.join(folder, f), "pt") as h:
                        names += list(h.keys())
                return names, set()
        read_raw(path)  # raises the one-line error for a folder that holds no weights
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, "pt") as h:
                return list(h.keys()), set()
        except Exception:
            read_raw(path)  # the one-line error
    obj = None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return list(read_raw(path)), set()  # legacy format or the one-line error
    return list(_flatten(obj)), set(obj) if isinstance(obj, dict) else set()


def _causal_wan(names: list[str], top: set[str]) -> bool:
    """Self-Forcing / CausVid model.pt: {"generator", "critic"[, "generator_ema"]} over WanDiffusionWrapper's
    `model.`-prefixed original Wan names (blocks.N.self_attn.q, head.head, ...)."""
    inner = []
    for n in names:
        head, _, k = n.partition(".")
        if head in ("generator", "critic"):  # (an EMA shadow may carry other wrapper names)
            for w in WRAPPER_PARTS:
                k = k.replace(w, "")
            inner.append(k.removeprefix("module."))
    return (bool(top & SELF_FORCING_ROLES) and bool(inner) and all(k.startswith("model.") for k in inner)
            and any(".self_attn." in k or k.startswith("model.head.head") for k in inner))


def describe_dmd2(path: str, init_from: str = "generator", fake_init: str | None = None,
                  bidirectional: bool = False, rectified_flow: bool = False) -> dict[str, Any]:
    """What the DMD2 checkpoint at `path` is and where each network of a DFD run would come from, from names and
    metadata alone: no weights are loaded, nothing is written or printed (the `check` command and `train` call it).

    init_from: "generator" (FastGen's net_model, Self-Forcing's generator) or "generator_ema" (the checkpoint's EMA;
      its generator when it has none, with a warning). fake_init: None (its critic when it has one, else the teacher,
      with a warning), "critic" (refused without one) or "teacher". bidirectional / rectified_flow: the user's word
      (--bidirectional-ckpt, --rectified-flow-ckpt) that a checkpoint whose layout or path says block-causal
      Self-Forcing / CausVid student or TrigFlow-distilled Cosmos is not one.

    Returns {"path", "format", "summary", "networks", "warnings", "refusals"}. networks["student" | "fake_score" |
    "ema"] is None or {"source": what read_checkpoint(source, role) loads, "role", "tensors": count}; fake_score None
    means the teacher; ema is the checkpoint's own EMA. refusals: why `train` would stop before loading anything,
    each naming the flag or command that resolves it."""
    out: dict[str, Any] = {"path": path, "format": None, "summary": "", "warnings": [], "refusals": [],
                           "networks": {"student": None, "fake_score": None, "ema": None, "discriminator": None}}
    if any(TRIGFLOW_PATH.search(p.replace(os.sep, "/")) for p in (path, os.path.realpath(path))):
        (out["warnings"] if rectified_flow else out["refusals"]).append(
            f"{path}: the path of NVIDIA's distilled Cosmos-Predict2.5-2B (base/distilled, 575edf0f-...): a 4-step "
            "student distilled with TrigFlow (experiment dmd2_trigflow_distill_cosmos_predict2_2B_bidirectional_TnI2V), "
            "whose output is not the rectified-flow velocity this code turns into x0, so training or sampling it "
            "would be silently wrong. Its keys are the same as the rectified-flow checkpoints'; only the path marks "
            "it. Pass --rectified-flow-ckpt if this file is a rectified-flow student (e.g. a FastGen DMD2 one)")
    fg = _fastgen_prefix(path)
    if fg is not None:
        found = _describe_fastgen(fg, path, init_from, fake_init, out)
    elif path.endswith(".zip"):
        out["format"] = "zip"
        out["refusals"].append(_zip_refusal(path, "the checkpoint"))
        found = {}
    elif not os.path.exists(path):
        out["refusals"].append(f"{path}: no such file or folder")
        found = {}
    else:
        found = _describe_file(path, bidirectional, out)
        if found is None:
            return out
    _assign_networks(out, found, init_from, fake_init)
    return out


def _describe_fastgen(fg: tuple[str, str | None], path: str, init_from: str, fake_init: str | None,
                      out: dict) -> dict[str, tuple[str, str, int]]:
    """describe_dmd2 for a FastGen FSDP checkpoint (one DCP folder per network): {role: (source, role, tensors)}."""
    prefix, note = fg
    if note:
        out["warnings"].append(note)
    sib = _fastgen_siblings(prefix)
    emas = sorted(n for n in sib if n.startswith("ema"))
    out["format"] = "fastgen-fsdp"
    out["summary"] = (f"FastGen FSDP checkpoint, {_fastgen_iteration(prefix)}: one DCP folder per "
                      f"network ({', '.join(os.path.basename(f) for f in sib.values()) or 'none found'})")
    if len(emas) > 1:
        out["warnings"].append(f"{prefix}: several EMA networks ({', '.join(emas)}); --init-from generator_ema uses "
                               f"{emas[0]}")
    need = {"generator": True, "critic": fake_init != "teacher", "generator_ema": init_from == "generator_ema",
            "discriminator": False}
    what = {"generator": "the student", "critic": "the critic (fake score; or pass --fake-init teacher)",
            "generator_ema": "the EMA", "discriminator": "the discriminator"}
    found = {}
    for role, name in (("generator", "net"), ("critic", "fake_score"), ("generator_ema", emas[0] if emas else ""),
                       ("discriminator", "discriminator")):
        f = sib.get(name)
        if f is None:
            continue
        if f.endswith(".zip"):
            if need[role]:
                out["refusals"].append(_zip_refusal(f, what[role]))
            continue
        found[role] = (f, "generator", len(_by_role(dict.fromkeys(_tensor_names(f)[0])).get("generator", {})))
    if "net" not in sib:
        out["refusals"].append(
            f"{path}: no {os.path.basename(prefix)}.net_model/ folder next to {prefix}.* (the student); found "
            f"{', '.join(os.path.basename(f) for f in glob.glob(glob.escape(prefix) + '.*')) or 'nothing'}")
    return found


SUMMARIES = {
    "dcp": "a torch.distributed.checkpoint folder (networks under net.* / fake_score.* keys)",
    "diffusers": "a diffusers transformer (or pipeline) folder: the student alone",
    "safetensors": "a .safetensors state dict: the student alone",
    "self-forcing": "a Self-Forcing / CausVid model.pt ({generator, critic[, generator_ema]}, original Wan names)",
    "fastgen-pth": "a FastGen .pth from its non-FSDP checkpointer ({model: {net, fake_score[, ema]}})",
    "pt": "a .pt / .pth state dict",
}


def _describe_file(path: str, bidirectional: bool, out: dict) -> dict[str, tuple[str, str, int]] | None:
    """describe_dmd2 for one file or folder that holds every network: {role: (source, role, tensors)}, or None when it
    cannot be read at all (the refusal says why)."""
    try:
        names, top = _tensor_names(path)
    except ValueError as e:
        if not path.endswith(".pth") or "pickled Python object" not in str(e):
            out["refusals"].append(str(e))
            return None
        # a FastGen <iteration>.pth whose callback state is not plain data, or any file with a pickled object
        out["refusals"].append(f"{e}. A FastGen <iteration>.pth holds no weights: its networks are the folders "
                               f"{path[:-4]}.net_model/ and {path[:-4]}.fake_score_model/ next to it, not found here")
        return None
    groups = _by_role(dict.fromkeys(names))
    found = {role: (path, role, len(keys)) for role, keys in groups.items() if keys}
    if os.path.isdir(path):
        fmt = "dcp" if _is_dcp(path) else "diffusers"
    elif path.endswith(".safetensors"):
        fmt = "safetensors"
    elif _causal_wan(names, top):
        fmt = "self-forcing"
    elif "model" in top and set(groups) - {"generator"}:
        fmt = "fastgen-pth"
    else:
        fmt = "pt"
    out["format"] = fmt
    out["summary"] = SUMMARIES[fmt] + (f" (networks: {', '.join(sorted(groups))})" if fmt == "pt" and
                                       set(groups) - {"generator"} else "")
    if not names and path.endswith(".pth"):
        prefix = path[:-4]
        out["refusals"].append(
            f"{path}: holds no readable weights. FastGen's FSDP checkpointer keeps only the scheduler state in "
            f"<iteration>.pth and writes each network to a folder next to it: {prefix}.net_model/, "
            f"{prefix}.fake_score_model/ (and {prefix}.ema_model/ with an EMA). None is there; copy them next "
            f"to it, or pass the {os.path.basename(prefix)}.net_model folder")
    if fmt == "self-forcing" and bidirectional:  # read as causal otherwise (wan_dfd.py's causal path, docs/causal.md)
        out["warnings"].append(
            f"{path}: a Self-Forcing / CausVid checkpoint read as a bidirectional (full-sequence) student "
            "(--bidirectional-ckpt). Their released students are block-causal, and the file cannot tell: the causal "
            "and bidirectional Wan share every key name; run as a full-sequence student, a causal one is "
            "meaningless and nothing fails. Right for e.g. CausVid's bidirectional_checkpoint1/2")
    return found


def _assign_networks(out: dict, found: dict[str, tuple[str, str, int]], init_from: str,
                     fake_init: str | None) -> None:
    """Where the student, the fake score and the checkpoint's EMA come from, given what the checkpoint holds."""
    nets, warn, refuse = out["networks"], out["warnings"].append, out["refusals"].append
    entry = lambda role: dict(zip(("source", "role", "tensors"), found[role]))
    role = init_from
    if role == "generator_ema" and "generator_ema" not in found and "generator" in found:
        warn("--init-from generator_ema: the checkpoint holds no EMA; the student starts from its generator")
        role = "generator"
    if role in found:
        nets["student"] = entry(role)
    elif not out["refusals"]:
        refuse(f"{out['path']}: holds no student ({role}) weights")
    if "generator_ema" in found:
        nets["ema"] = entry("generator_ema")
    if "discriminator" in found:
        nets["discriminator"] = entry("discriminator")
    if fake_init != "teacher" and "critic" in found:
        nets["fake_score"] = entry("critic")
    elif fake_init == "critic" and not out["refusals"]:
        refuse(f"--fake-init critic: {out['path']} holds no critic (fake score); pass --fake-init teacher to start it "
               "from the teacher")
    elif fake_init is None and nets["student"] is not None:
        warn("the checkpoint holds no critic: the fake score starts from the teacher, as in a fresh DMD2 run, not "
             "from the critic the DMD2 student was trained against")


def describe_lines(desc: dict[str, Any], gan: bool = False) -> list[str]:
    """describe_dmd2's answer as the lines `train` logs: the format, one line per network, the warnings. gan: the run
    trains a GAN head (--gan-weight > 0), so where its discriminator starts is said too."""
    def where(net: dict | None, none: str) -> str:
        if net is None:
            return none
        single = desc["format"] in ("fastgen-fsdp", "diffusers", "safetensors")  # one network per folder or file
        inside = "" if single else f" [{net['role']}]"
        return f"{net['source']}{inside} ({net['tensors']} tensors)"
    n = desc["networks"]
    ema, student = n["ema"], n["student"]
    unused = ema is not None and (student is None or (ema["source"], ema["role"]) != (student["source"], student["role"]))
    return [f"--dmd2-ckpt {desc['path']}: {desc['summary']}",
            f"  student    <- {where(student, 'nothing')}",
            f"  fake score <- {where(n['fake_score'], 'the teacher (--model-dir)')}",
            *([f"  its EMA is not used ({where(ema, '')}; --init-from generator_ema starts the student from it)"]
              if unused else []),
            *([f"  discriminator <- {where(n.get('discriminator'), 'a fresh one (the checkpoint holds none)')}"] if gan
              else [f"  its discriminator is not used ({where(n['discriminator'], '')}; --gan-weight > 0 trains it)"]
              if n.get("discriminator") else []),
            *[f"  warning: {w}" for w in desc["warnings"]]]
