"""Fine-tuning checkpoints: self-contained, safetensors only, written atomically.

Layout of `SAVE/step-00000040/` (one per save):
- `model-00001-of-000NN.safetensors` ... + `model.safetensors.index.json`: the fp32 master weights under
  Hugging Face names, one shard per swap group, so the directory (with the copied config.json and tokenizer
  files) loads as a model with `memfit generate --model SAVE/step-00000040` or transformers;
- `optimizer-000NN.safetensors`: Adam's moments per group;
- `trainer_state.json`: step, Adam step, loss scale, data seed, the losses so far, the model fingerprint.

Atomicity: everything is written into `SAVE/.tmp-step-...`, each file fsynced, then the directory is renamed
into place and `SAVE/latest` (the name of the newest complete checkpoint) is replaced with `os.replace`.
A run killed at any moment leaves either the old or the new checkpoint complete, never a torn one; a stale
`.tmp-*` directory is removed by the next save.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from memfit.llm.models import ModelConfig
from memfit.train.finetune.store import GroupStore
from memfit.train.finetune.units import Group

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                    "special_tokens_map.json")
_SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "qkv_bias",
                 "attention_bias", "mlp_bias")


class CheckpointError(ValueError):
    """A checkpoint that can't be resumed here (missing, torn, or from another model)."""


def fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in _SHAPE_FIELDS}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(root: Path, step: int, store: GroupStore, groups: list[Group], cfg: ModelConfig,
                    source_dir: Path | None, state: dict[str, Any]) -> Path:
    """Write the checkpoint of `step` under `root`; returns its directory."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    n = len(groups)
    weight_map = {}
    for gi, g in enumerate(groups):
        data = store.read_group(gi)  # one group in memory at a time
        shard = f"model-{gi + 1:05d}-of-{n:05d}.safetensors"
        views = {p: t.contiguous() for p, t in g.views(data["master"]).items()}
        save_file(views, str(tmp / shard), metadata={"format": "pt"})
        moments = {}
        for kind in ("exp_avg", "exp_avg_sq"):
            for pname, t in g.views(data[kind]).items():
                moments[f"{kind}.{pname}"] = t.contiguous()
        save_file(moments, str(tmp / f"optimizer-{gi + 1:05d}.safetensors"))
        weight_map.update({p: shard for p, _ in g.params})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = _hf_config(cfg, source_dir)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if source_dir is not None:
        for f in _TOKENIZER_FILES:
            if (source_dir / f).is_file():
                shutil.copyfile(source_dir / f, tmp / f)
    (tmp / "trainer_state.json").write_text(json.dumps(dict(state, step=step, fingerprint=fingerprint(cfg)), indent=1))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync_dir(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    _fsync(latest_tmp)
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    return final


def _hf_config(cfg: ModelConfig, source_dir: Path | None) -> dict[str, Any]:
    """The source config.json (or one built from cfg), saying float32 since the masters are fp32."""
    if source_dir is not None and (source_dir / "config.json").is_file():
        raw = json.loads((source_dir / "config.json").read_text())
    else:
        raw = {k: getattr(cfg, k) for k in _SHAPE_FIELDS if k not in ("architecture", "qkv_bias")}
        raw.update(architectures=[cfg.architecture], max_position_embeddings=cfg.max_position_embeddings,
                   rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, model_type="llama")
    raw["torch_dtype"] = "float32"
    return raw


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a save root whose `latest` names one -> the checkpoint directory."""
    if (path / "trainer_state.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / "trainer_state.json").is_file():
            return target
        raise CheckpointError(f"{latest} names {target.name}, which is not a complete checkpoint")
    raise CheckpointError(f"no checkpoint in {path}: expected trainer_state.json or a 'latest' file (from --save)")


def load_checkpoint(path: Path, store: GroupStore, groups: list[Group], cfg: ModelConfig) -> dict[str, Any]:
    """Load master weights and moments into `store`; returns the trainer state. Refuses another model's."""
    ckpt = find_checkpoint(path)
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except ValueError as exc:  # not JSON (a truncated write by something else than memfit)
        raise CheckpointError(f"{ckpt / 'trainer_state.json'} is not valid JSON ({exc}); resume from an earlier "
                              "checkpoint or start without --resume") from None
    mine, theirs = fingerprint(cfg), state.get("fingerprint", {})
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{ckpt} is a checkpoint of another model ({shown}); resume with the --model it "
                              "was trained from, or start without --resume")
    n = len(groups)
    for gi, g in enumerate(groups):
        shard = ckpt / f"model-{gi + 1:05d}-of-{n:05d}.safetensors"
        opt = ckpt / f"optimizer-{gi + 1:05d}.safetensors"
        if not shard.is_file() or not opt.is_file():
            raise CheckpointError(f"{ckpt} lacks {shard.name} or {opt.name}; the checkpoint is incomplete")
        try:
            with safe_open(str(shard), framework="pt") as f, safe_open(str(opt), framework="pt") as o:
                master = torch.cat([f.get_tensor(p).reshape(-1) for p, _ in g.params])
                m = torch.cat([o.get_tensor(f"exp_avg.{p}").reshape(-1) for p, _ in g.params])
                v = torch.cat([o.get_tensor(f"exp_avg_sq.{p}").reshape(-1) for p, _ in g.params])
        except SafetensorError as exc:  # a corrupt or truncated file, or one without a tensor it should hold
            raise CheckpointError(f"{ckpt}: {shard.name} or {opt.name} is not a readable checkpoint file ({exc}); "
                                  "resume from an earlier checkpoint or start without --resume") from None
        store.write_group(gi, master.float(), m, v)
    return state
