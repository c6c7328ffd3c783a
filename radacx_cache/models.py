"""One model factory, ``load_model(spec)``, over open_clip (docs/models.md).

Specs, parsed by ``parse_model_spec``:

- ``biomedclip``: ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` (hub or HF cache).
- a local directory holding a downloaded copy of that hub repo (``open_clip_config.json``, weights,
  tokenizer files): fully offline. The text tower's BERT config is read from ``<dir>/config.json``
  when present, else from the BiomedBERT config shipped with this package, never from the hub.
- ``biomedclip-random``: the BiomedCLIP architecture with seeded random weights (benchmarks).
- ``tiny``: a small timm ViT + open_clip's built-in text tower and tokenizer, seeded random
  weights, offline (the demo and the tests).
- ``openclip:NAME[/PRETRAINED]``: any other open_clip architecture and pretrained tag.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
import torch
from open_clip.tokenizer import HFTokenizer
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from ._io import file_sha256, stable_hash

log = logging.getLogger(__name__)
DATA = Path(__file__).parent / "data"
BIOMEDCLIP_HUB = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")


class ModelError(RuntimeError):
    """A model spec cannot be resolved or its files do not fit together."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    mean: tuple
    std: tuple
    image_size: int
    spec: str
    tag: str  # filesystem-safe name for cache folders
    fingerprint: str  # weights hash + model config
    weights_seed: int | None = None  # the seed of random weights; None for weights read from files

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel, for float (B, 3, H, W) images in [0, 1]."""
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - m) / s

    def to_input(self, pixels: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Shard pixels (uint8, on the device) -> the model's normalised input; no resampling."""
        x = self.normalise(unit_pixels(pixels))
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()

    def preprocess_spec(self) -> dict:
        """What ``to_input`` does, recorded in every feature cache."""
        return {"mean": list(self.mean), "std": list(self.std), "size": self.image_size,
                "input": "uint8 shard pixels / 255, grey repeated to RGB, (x - mean) / std, no resampling"}

    def encode_image_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(projected embedding, pre-projection CLS feature or None) for normalised images."""
        visual = self.model.visual
        if hasattr(visual, "trunk") and hasattr(visual, "head"):  # open_clip TimmModel
            pre = visual.trunk(x)
            return visual.head(pre), pre
        return self.model.encode_image(x), None


class Classifier(torch.nn.Module):
    """An arm's network: the model's vision tower + a linear head on its embedding (randomly
    initialised for fine-tuning; a fitted probe's weights for V1/V2 saliency)."""

    def __init__(self, visual: torch.nn.Module, embed_dim: int, n_classes: int):
        super().__init__()
        self.visual = visual
        self.head = torch.nn.Linear(embed_dim, n_classes)

    def features(self, x):
        """What the head reads."""
        return self.visual(x)

    def forward(self, x):
        return self.head(self.features(x))


def unit_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) grey or (B, H, W, 3) RGB -> float (B, 3, H, W) in [0, 1]."""
    x = pixels.float().div_(255)
    return x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def _private_dir() -> Path:
    """A folder only this process can write (mkdtemp: mode 0700, unpredictable name), removed at exit.

    open_clip reads model configs from files; a fixed name under a shared /tmp could be created
    first by another user (with a symlink inside) and make us overwrite the victim's files.
    """
    global _PRIVATE
    if _PRIVATE is None or not _PRIVATE.is_dir():
        _PRIVATE = Path(tempfile.mkdtemp(prefix="radacx-"))
        atexit.register(shutil.rmtree, _PRIVATE, ignore_errors=True)
    return _PRIVATE


_PRIVATE: Path | None = None


def _register_pico_vit() -> None:
    """A 2-block, 64-wide, patch-32 timm ViT for offline tests and the CPU demo (same TimmModel path)."""
    if "radacx_vit_pico_patch32_224" in timm.list_models("radacx_*"):
        return

    @register_model
    def radacx_vit_pico_patch32_224(pretrained=False, **kwargs):
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        model = VisionTransformer(img_size=224, patch_size=32, embed_dim=64, depth=2, num_heads=2,
                                  mlp_ratio=2.0, **kwargs)
        model.pretrained_cfg = model.default_cfg = {"input_size": (3, 224, 224), "num_classes": 0}
        return model


def parse_model_spec(spec: str) -> tuple[str, str]:
    """Return (kind, identifier); kind is one of hub, dir, tiny, biomedclip-random, openclip."""
    if not spec:
        raise ModelError("empty model spec; expected tiny, biomedclip, biomedclip-random, a local "
                         "directory or openclip:NAME[/PRETRAINED]")
    if spec == "tiny":
        return "tiny", spec
    if spec == "biomedclip":
        return "hub", BIOMEDCLIP_HUB
    if spec == "biomedclip-random":
        return "biomedclip-random", spec
    if spec.startswith("hf-hub:"):
        return "hub", spec
    if spec.startswith("openclip:"):
        return "openclip", spec[len("openclip:"):]
    if spec.startswith("local-dir:"):
        spec = spec[len("local-dir:"):]
    if Path(spec).is_dir():
        return "dir", str(Path(spec).resolve())
    raise ModelError(f"model spec {spec!r}: not tiny, biomedclip, biomedclip-random, hf-hub:..., "
                     f"openclip:NAME[/PRETRAINED], nor an existing directory")


def describe_spec(spec: str) -> str:
    """What a report row should call the model, e.g. ``tiny model (random weights)``."""
    try:
        kind, ident = parse_model_spec(spec)
    except ModelError:
        return spec
    return {"tiny": "tiny model (random weights)", "biomedclip-random": "BiomedCLIP architecture (random weights)",
            "hub": "BiomedCLIP" if ident == BIOMEDCLIP_HUB else ident,
            "dir": f"{Path(ident).name} (local weights)"}.get(kind, ident)


def weights_seed(spec: str, seed: int) -> int | None:
    """The seed that makes ``spec``'s weights (random-weight models), or None (weights from files)."""
    kind, ident = parse_model_spec(spec)
    if kind in ("tiny", "biomedclip-random") or (kind == "openclip" and "/" not in ident):
        return seed
    return None


def model_tag(spec: str) -> str:
    """The feature-cache folder name of a spec (a directory's own name), without loading it."""
    kind, ident = parse_model_spec(spec)
    name = Path(ident).name if kind == "dir" else spec
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.strip("/"))[-60:]


def _register_config(name: str, model_cfg: dict) -> str:
    """Register a model config with open_clip through its public add_model_config (a file)."""
    path = _private_dir() / f"{name}.json"
    path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(path)
    return name


def _text_config_dir(directory: Path | None, hf_model_name: str) -> str:
    """A local folder with the text tower's BERT config.json, so nothing is fetched from the hub."""
    if directory is not None and (directory / "config.json").exists():
        return str(directory)
    if "BiomedBERT" in hf_model_name or "PubMedBERT" in hf_model_name:
        folder = _private_dir() / "biomedbert"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text((DATA / "biomedbert-config.json").read_text())
        return str(folder)
    if Path(hf_model_name).is_dir():
        return hf_model_name
    raise ModelError(f"text tower {hf_model_name!r} has no local config.json; put the model's BERT "
                     f"config.json in the model directory to run offline")


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU generator for the block and restore the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build(name: str, model_cfg: dict, checkpoint: str | None, seed: int):
    _register_pico_vit()
    _register_config(name, model_cfg)
    with _seeded(seed):
        try:
            model = open_clip.create_model(name, pretrained=checkpoint, pretrained_image=False,
                                           pretrained_text=False)
        except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met something not a tensor
            raise ModelError(f"checkpoint {checkpoint} holds objects other than tensors and was not loaded "
                             f"({str(exc).splitlines()[0][:200]}); use the hub's .safetensors weights") from None
        except RuntimeError as exc:
            if checkpoint and ("size mismatch" in str(exc) or "Missing key" in str(exc)
                               or "Unexpected key" in str(exc)):
                raise ModelError(f"checkpoint {checkpoint} does not fit its open_clip_config.json: "
                                 f"{str(exc)[:600]}") from None
            raise
    return model.eval()


def load_model(spec: str, *, seed: int = 0, device: str | torch.device = "cpu") -> LoadedModel:
    """Resolve ``spec`` to a model, its normalisation and its tokenizer (see module docstring)."""
    kind, ident = parse_model_spec(spec)
    if kind == "tiny":
        cfg = json.loads((DATA / "radacx-tiny.json").read_text())
        model = _build("radacx-tiny", cfg, None, seed)
        tokenizer = open_clip.get_tokenizer("radacx-tiny")
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        fp = stable_hash({"kind": kind, "cfg": cfg, "seed": seed})
    elif kind in ("dir", "biomedclip-random"):
        directory = Path(ident) if kind == "dir" else None
        cfg_path = (directory / "open_clip_config.json") if directory else DATA / "biomedclip-open_clip_config.json"
        if not cfg_path.exists():
            raise ModelError(f"model directory {directory}: open_clip_config.json is missing "
                             f"(download it with the weights; see docs/models.md)")
        full = json.loads(cfg_path.read_text())
        if "model_cfg" not in full:
            raise ModelError(f"{cfg_path}: no 'model_cfg' key (expected the hub's open_clip_config.json)")
        model_cfg = json.loads(json.dumps(full["model_cfg"]))
        pre = full.get("preprocess_cfg", {})
        checkpoint = None
        if directory is not None:
            found = [directory / w for w in WEIGHT_FILES if (directory / w).exists()]
            if not found:
                raise ModelError(f"model directory {directory}: no weights file (expected one of "
                                 f"{', '.join(WEIGHT_FILES)})")
            checkpoint = str(found[0])
        text = model_cfg.get("text_cfg", {})
        if "hf_model_name" in text:
            text["hf_model_name"] = _text_config_dir(directory, text["hf_model_name"])
            if directory is not None:
                if not any((directory / t).exists() for t in TOKENIZER_FILES):
                    raise ModelError(f"model directory {directory}: no tokenizer files "
                                     f"({' or '.join(TOKENIZER_FILES)})")
                text["hf_tokenizer_name"] = str(directory)
        name = f"radacx-local-{stable_hash(model_cfg, 10)}"
        model = _build(name, model_cfg, checkpoint, seed)
        ctx = text.get("context_length", 77)
        if "hf_tokenizer_name" in text and directory is not None:
            tokenizer = HFTokenizer(str(directory), context_length=ctx)
        elif "hf_tokenizer_name" in text:
            tokenizer = None  # biomedclip-random: image benchmarks need no tokenizer
        else:
            tokenizer = open_clip.get_tokenizer(name)
        mean = tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))
        weights = file_sha256(checkpoint) if checkpoint else f"random-seed-{seed}"
        fp = stable_hash({"cfg": full["model_cfg"], "weights": weights})
    elif kind == "hub":
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(ident)
            tokenizer = open_clip.get_tokenizer(ident)
        except Exception as exc:
            raise ModelError(f"cannot load {ident} from the Hugging Face hub or its cache ({exc}). "
                             f"Offline, download the repo once and pass its directory instead "
                             f"(docs/models.md).") from None
        model.eval()
        pcfg = getattr(model.visual, "preprocess_cfg", {})
        mean = tuple(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(pcfg.get("std", open_clip.OPENAI_DATASET_STD))
        fp = stable_hash({"hub": ident, "params": _param_digest(model)})
    else:  # openclip:NAME[/PRETRAINED]
        name, _, pretrained = ident.partition("/")
        try:
            with _seeded(seed):
                model = open_clip.create_model(name, pretrained=pretrained or None).eval()
        except RuntimeError as exc:
            raise ModelError(f"open_clip model {ident!r}: {exc}. Known architectures: "
                             f"{', '.join(open_clip.list_models()[:20])}, ...") from None
        tokenizer = open_clip.get_tokenizer(name)
        pcfg = getattr(model.visual, "preprocess_cfg", {})
        mean = tuple(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(pcfg.get("std", open_clip.OPENAI_DATASET_STD))
        fp = stable_hash({"openclip": ident, "seed": seed if not pretrained else None,
                          "params": _param_digest(model) if pretrained else None})
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return LoadedModel(model.to(device), tokenizer, tuple(mean), tuple(std), size, spec, model_tag(spec), fp,
                       weights_seed(spec, seed))


def _param_digest(model: torch.nn.Module) -> str:
    """Cheap weights fingerprint: shapes plus a few sums per tensor."""
    items = [(k, list(v.shape), float(v.float().sum()), float(v.float().abs().sum()))
             for k, v in model.state_dict().items()]
    return stable_hash(items)
