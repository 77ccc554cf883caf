"""Hugging Face model directory -> memfit model, without a second copy of the weights.

The model is built on the meta device (shapes only, no storage), then every tensor is read with
`safetensors.safe_open`, which memory-maps the file: a tensor whose dtype already matches is a view of the
mapping, and `load_state_dict(assign=True)` makes it the parameter itself. So loading costs address space,
not RAM; pages are read from disk the first time a forward touches them. Converting dtype (or moving to a
GPU) needs one copy per tensor, made tensor by tensor, so the peak is still one copy of the weights.

Only safetensors is read: pickle checkpoints (pytorch_model.bin, *.pt, ...) can run arbitrary code when
loaded, so they are refused with a message on how to convert them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from memfit.llm.models import (
    LlamaForCausalLM,
    ModelConfig,
    ModelFormatError,
    build_model,
    parse_dtype,
)

BUNDLED_MODELS = ("memfit-tiny", "memfit-tiny-draft")
ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets" / "models"  # memfit/assets/models

_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Tensors some checkpoints carry that are not weights: memfit recomputes them (RoPE tables) or never needs them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached", "attn.masked_bias", "attn.bias")


class ModelNotFoundError(ModelFormatError, FileNotFoundError):
    """The model name or path does not point at a local model directory."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A bundled model name ("memfit-tiny", "memfit-tiny-draft") or a local directory -> its path.

    memfit never downloads: anything else must be an existing local directory.
    """
    name = str(name_or_path)
    if name in BUNDLED_MODELS:
        path = ASSETS_DIR / name
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"the bundled model {name!r} is missing from this installation (expected {path}); "
                "reinstall memfit, or pass the path of a local model directory"
            )
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name!r} not found: memfit loads local model directories only and never downloads. "
            f"Pass a directory holding config.json and *.safetensors (e.g. fetched with "
            f"`huggingface-cli download <repo> --local-dir <dir>`), or a bundled model: {', '.join(BUNDLED_MODELS)}"
        )
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is a file; pass the model directory that holds config.json and the weights")
    return path.resolve()


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model dir: the shards named by the index, else model.safetensors, else
    every *.safetensors (Mistral's `consolidated.safetensors` uses other tensor names and is skipped)."""
    index = path / _INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{index} is malformed (needs a 'weight_map' object): {exc}") from exc
        shards = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelFormatError(f"{index} names shard(s) that are not in the directory: {', '.join(missing)}")
        return shards
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if files:
        return files
    pickles = sorted({p.name for pat in _PICKLE_PATTERNS for p in path.glob(pat)})
    if pickles:
        raise ModelFormatError(
            f"{path} holds only pickle checkpoint(s) ({', '.join(pickles[:4])}); memfit loads only safetensors, "
            "because unpickling can run arbitrary code. Convert once, in an environment you trust: "
            "`python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}', safe_serialization=True)\"`"
        )
    raise ModelFormatError(f"{path} has no *.safetensors weights (and no {_INDEX_NAME})")


def _open_safetensors(file: Path):
    """A safe_open handle on `file`; a corrupt or truncated file (its header promises more bytes than the file
    holds) is a ModelFormatError naming it."""
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt header
        raise ModelFormatError(f"{file} is not a readable safetensors file: {exc}") from exc


def has_weight_files(path: Path) -> bool:
    """Whether `path` holds any weight file, loadable or not (safetensors, an index, a pickle checkpoint)."""
    return ((path / _INDEX_NAME).is_file() or any(path.glob("*.safetensors"))
            or any(p for pat in _PICKLE_PATTERNS for p in path.glob(pat)))


def check_weight_files(path: Path) -> list[Path]:
    """The weight files `load_model` would read, refused as it refuses them (pickle only, none, an index naming
    missing shards, a corrupt or truncated file), from their headers alone: no tensor is read. For commands that
    predict from the config (`memfit fit`) and must not accept a directory every loading command refuses."""
    files = weight_files(path)
    for file in files:
        with _open_safetensors(file):
            pass
    return files


def load_state_dict(
    files: list[Path],
    expected: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    ignore: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Read the tensors named in `expected` (name -> meta tensor of the right shape) from `files`; names in
    `ignore` (and known non-weight buffers) are skipped, any other unknown name is an error.

    Same dtype on CPU: the returned tensors are views of the files' private memory maps (no copy).
    """
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if name not in expected:
                    if name not in ignore and not name.endswith(_IGNORED_SUFFIXES):
                        unexpected.append(name)
                    continue
                want = expected[name]
                # Check the shape from the header before touching any data.
                found = tuple(f.get_slice(name).get_shape())
                if found != tuple(want.shape):
                    raise ModelFormatError(
                        f"tensor {name!r} in {file.name} has shape {list(found)}, but the config "
                        f"(config.json) implies {list(want.shape)}; the weights do not match the config"
                    )
                tensor = f.get_tensor(name)
                if tensor.dtype != dtype or tensor.device != device:
                    tensor = tensor.to(device=device, dtype=dtype)  # one copy per tensor, never the whole model
                state[name] = tensor
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        raise ModelFormatError(
            f"checkpoint has tensor(s) memfit's model does not know: {shown}; the weights do not match "
            "the architecture in config.json"
        )
    return state


class _SkipWeightInit(TorchFunctionMode):
    """Build a module skeleton without running nn.init's initialisers (their numbers are about to be replaced
    by the checkpoint's). Not just for speed: on the meta device an initialiser such as `normal_` goes through
    torch._refs, whose first call imports torch._dynamo and sympy, about 150 MiB of resident memory (measured
    with a 0.1B Llama: RSS +161 MiB, anonymous +80 MiB) that no budget could account to the model.
    A torch-function mode is per thread, so nothing outside this `with` block is affected."""

    _SKIPPED = frozenset(getattr(torch.nn.init, name) for name in (
        "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
        "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
    ) if hasattr(torch.nn.init, name))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in self._SKIPPED:
            return args[0] if args else kwargs["tensor"]  # type: ignore[index]
        return func(*args, **(kwargs or {}))


def load_model(
    path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Load a Hugging Face model directory (config.json + safetensors) onto `device` in `dtype`.

    dtype None means the checkpoint's own `torch_dtype`. Returns (model in eval mode with requires_grad
    off, its config, whose torch_dtype is the dtype actually loaded). On CPU in the file's dtype the
    parameters are copy-on-write views of the mapped files: keep the files in place while the model lives.
    """
    path = resolve_model_path(path)
    cfg = ModelConfig.from_dir(path)
    files = weight_files(path)
    if dtype is None:
        try:
            target = parse_dtype(cfg.torch_dtype)
        except ValueError:
            raise ModelFormatError(
                f"config.json says torch_dtype {cfg.torch_dtype!r}, which memfit does not run; "
                "pass dtype='float32', 'bfloat16' or 'float16'"
            ) from None
    else:
        target = parse_dtype(dtype)
    cfg = dataclasses.replace(cfg, torch_dtype=str(target).removeprefix("torch."))
    device = torch.device(device)

    with torch.device("meta"), _SkipWeightInit():
        model = build_model(cfg)
    expected = model.state_dict()  # name -> meta tensor; a tied lm_head appears under both names
    ignore: frozenset[str] = frozenset()
    if cfg.tie_word_embeddings:
        # The head *is* the embedding: skip a stored lm_head.weight (some Qwen2 files keep a copy).
        expected.pop("lm_head.weight", None)
        ignore = frozenset({"lm_head.weight"})
    state = load_state_dict(files, expected, target, device, ignore)

    missing = [name for name in expected if name not in state]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ModelFormatError(f"checkpoint in {path} lacks weight(s): {shown}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        # assign=True replaced embed_tokens.weight; point the head at the new parameter again.
        model.lm_head.weight = model.model.embed_tokens.weight
    left_on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left_on_meta:  # a module built with parameters the state dict does not name: a bug, not bad input
        raise RuntimeError(f"parameters not loaded: {', '.join(left_on_meta[:5])}")
    model.requires_grad_(False)
    return model.eval(), cfg
