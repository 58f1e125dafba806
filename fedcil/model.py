"""A frozen timm ViT with PEFT LoRA adapters and a linear class-incremental head.

What travels between server and clients is the *trainable state*: a dict of named tensors
``<module>.lora_A`` (r x d_in), ``<module>.lora_B`` (d_out x r) with timm's module names
(e.g. ``blocks.0.attn.qkv.lora_A``), plus ``head.weight`` and ``head.bias``.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from torch import nn

from fedcil.errors import ConfigError, choices_error
from fedcil.settings import HEAD_INITS

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
_PEFT_NAME = re.compile(r"^backbone\.(?P<module>.+)\.(?P<factor>lora_[AB])\.default\.weight$")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; valid choices: auto, cpu, cuda, cuda:N") from None


def auto_patch_size(image_size: int, max_grid: int = 7) -> int:
    """The patch size giving the largest grid of at most ``max_grid`` patches per side."""
    for grid in range(max_grid, 0, -1):
        if image_size % grid == 0:
            return image_size // grid
    return image_size


def lora_target_regex(targets: list[str], blocks: list[int] | None) -> str:
    """PEFT ``target_modules`` regex for the given module kinds in the given blocks."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ConfigError(f"unknown lora.targets {unknown or targets}; valid choices: {', '.join(LORA_TARGETS)}")
    block = r"\d+" if blocks is None else "|".join(str(int(b)) for b in blocks)
    kinds = "|".join({"qkv": r"attn\.qkv", "proj": r"attn\.proj", "fc1": r"mlp\.fc1", "fc2": r"mlp\.fc2"}[t] for t in targets)
    return rf".*blocks\.({block})\.({kinds})$"


def check_feature_blocks(blocks: list[int], depth: int) -> tuple[int, ...]:
    """``blocks`` as a tuple, refused with one line unless distinct block indices of a ``depth``-block backbone."""
    chosen = tuple(int(b) for b in blocks)
    if not chosen or len(set(chosen)) != len(chosen) or any(not 0 <= b < depth for b in chosen):
        raise ConfigError(f"method.blocks={list(blocks)} is not a non-empty list of distinct block indices; "
                          f"valid choices: {list(range(depth))} (or null: the backbone's pooled features)")
    return chosen


class Standardiser(nn.Module):
    """``(h - shift) * scale`` per feature; ``shift`` and ``scale`` are exchanged (``standardise.shift``,
    ``standardise.scale``) but never trained. Built as the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(width), requires_grad=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.shift) * self.scale


class FCILModel(nn.Module):
    """Resize + normalise, frozen backbone (with LoRA), optional random feature map, linear head.

    With ``projection_dim = M > 0`` the head sees ``ReLU(R h)`` instead of the backbone's
    features ``h``, for a fixed random ``R`` (``M x d``, drawn from torch's global RNG:
    callers seed it), as RanPAC does before its analytic classifier. With ``feature_blocks``
    ``h`` is instead the standardised CLS and mean patch tokens of those blocks (see
    :meth:`block_features`); the standardiser's shift and scale travel with the trainable state.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, img_size: int, projection_dim: int = 0,
        feature_blocks: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        width = backbone.num_features
        self.feature_blocks = None if feature_blocks is None else check_feature_blocks(feature_blocks, len(backbone.blocks))
        if self.feature_blocks is not None:
            width = 2 * width * len(self.feature_blocks)
            self.standardise = Standardiser(width)
        self.raw_width = width  # of raw_features
        if projection_dim > 0:
            self.register_buffer("projection", torch.randn(projection_dim, width))
            width = projection_dim
        else:
            self.projection = None
        self.head = nn.Linear(width, num_classes)
        cfg = backbone.pretrained_cfg
        chans = backbone.patch_embed.proj.in_channels
        mean = torch.tensor(cfg.get("mean", (0.5,) * 3))[:chans] if chans <= 3 else torch.full((chans,), 0.5)
        std = torch.tensor(cfg.get("std", (0.5,) * 3))[:chans] if chans <= 3 else torch.full((chans,), 0.5)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.img_size = img_size
        self.original_weights: dict[str, torch.Tensor] = {}  # W0 of layers whose base was changed
        self.initial_state: dict[str, torch.Tensor] = {}  # the trainable state as built (set by build_model)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] at any resolution, resized and normalised for the backbone."""
        if images.shape[-1] != self.img_size or images.shape[-2] != self.img_size:
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return (images - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of images in [0, 1] at any resolution."""
        return self.backbone(self.prepare(images))

    def block_features(self, images: torch.Tensor) -> torch.Tensor:
        """Per block of ``feature_blocks`` (in order), its output's CLS token and mean patch token, concatenated
        (``2 x width x len(feature_blocks)`` features, before the standardiser)."""
        tokens = self.backbone.forward_intermediates(
            self.prepare(images), indices=list(self.feature_blocks), return_prefix_tokens=True, norm=False,
            output_fmt="NLC", intermediates_only=True,
        )
        return torch.cat([torch.cat([prefix[:, 0], patches.mean(dim=1)], dim=1) for patches, prefix in tokens], dim=1)

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """The features before the standardiser and random feature map: the block features, or the backbone's."""
        return self.features(images) if self.feature_blocks is None else self.block_features(images)

    def head_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the head sees: the features (standardised block features), through ``ReLU(R .)`` with a random feature map."""
        features = self.raw_features(images)
        if self.feature_blocks is not None:
            features = self.standardise(features)
        return features if self.projection is None else F.relu(features @ self.projection.T)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits over every class; callers slice the classes they predict over."""
        return self.head(self.head_inputs(images))


def _checkpoint_filter(backbone: nn.Module, source: dict) -> Callable:
    """The architecture's own checkpoint filter (timm's convention: ``checkpoint_filter_fn`` in its module),
    after which ``source`` declares the file's input channels as those of its first convolution, so that
    timm adapts them only where they differ from the backbone's (a grey-scale SimCLR file loads as it is),
    and ``source["read"]`` says that the file was read."""
    arch_filter = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)

    def apply(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        source["read"] = True
        state = arch_filter(state, model) if arch_filter is not None else state
        conv = state.get(f"{source.get('first_conv')}.weight")
        if conv is not None and conv.ndim == 4:
            source["input_size"] = (conv.shape[1], *source.get("input_size", (3, 224, 224))[1:])
        return state

    return apply


def _load_error_reason(exc: BaseException) -> str:
    """One line out of a loading error: its first size mismatch (and how many more), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    mismatches = [line for line in lines if line.startswith("size mismatch")]
    if mismatches:
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        return mismatches[0] + more
    return lines[0]


def load_pretrained_weights(backbone: nn.Module, model_cfg: DictConfig, in_chans: int) -> None:
    """Load the backbone's weights through timm's own pretrained loader (``timm.models.load_pretrained``).

    The weights are ``model.pretrained_path`` (safetensors or a torch state dict: our SimCLR
    checkpoints, or a timm / hub checkpoint with or without its classifier), else timm's hub
    weights of ``model.name`` (or its hub cache, offline). As for any timm pretrained model the
    classifier is dropped, the input convolution adapted to ``in_chans`` and the position
    embeddings resized to the backbone's grid; every other tensor must match: a missing,
    unexpected or mis-shaped key is a one-line error naming the file.
    """
    path = model_cfg.pretrained_path
    source = dict(backbone.pretrained_cfg)
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"model.pretrained_path {path} does not exist")
        source.update(file=str(file), source="file", custom_load=False)  # custom_load: timm's .npz reader
    keys: dict[str, list[str]] = {}
    hook = backbone.register_load_state_dict_post_hook(
        lambda _module, found: keys.update(missing=list(found.missing_keys), unexpected=list(found.unexpected_keys))
    )
    mismatches = []
    try:
        timm.models.load_pretrained(backbone, source, num_classes=0, in_chans=in_chans,
                                    filter_fn=_checkpoint_filter(backbone, source), strict=False)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError, SafetensorError) as exc:
        reason = _load_error_reason(exc)
        if source.get("read"):  # read, then refused by the architecture's filter or the backbone
            mismatches.append(reason)
        elif path:
            raise ConfigError(f"model.pretrained_path {path} could not be read as a checkpoint: {reason}") from None
        else:
            raise ConfigError(
                f"model.pretrained=true: timm's weights for {model_cfg.name!r} could not be fetched ({reason}); "
                "offline, pass the downloaded model.safetensors (or any local checkpoint) as "
                "model.pretrained_path=/abs/path/model.safetensors"
            ) from None
    finally:
        hook.remove()
    mismatches += [f"{len(names)} {kind} keys (e.g. {names[:3]})" for kind, names in keys.items() if names]
    if mismatches:
        where = f"checkpoint {path}" if path else f"timm's hub weights for {model_cfg.name!r}"
        raise ConfigError(f"{where} does not match model {model_cfg.name!r}: {', '.join(mismatches)}")


def model_img_size(model_cfg: DictConfig, image_size: int) -> int:
    """The backbone's input size: the data's (``auto``) or the configured one."""
    return image_size if model_cfg.img_size == "auto" else int(model_cfg.img_size)


def create_backbone(model_cfg: DictConfig, in_chans: int, image_size: int) -> nn.Module:
    """The timm backbone (no classifier), initialised from torch's global RNG (callers seed it).

    ``model.pretrained_path`` names a local checkpoint, else ``model.pretrained`` takes timm's hub
    weights; either replaces the initial weights (:func:`load_pretrained_weights`). ``model.ssl``
    needs a path (``fcil-run`` fills it in).
    """
    img_size = model_img_size(model_cfg, image_size)
    patch = auto_patch_size(img_size) if model_cfg.patch_size == "auto" else int(model_cfg.patch_size)
    kwargs = dict(OmegaConf.to_container(model_cfg.kwargs, resolve=True))
    try:
        backbone = timm.create_model(
            model_cfg.name, pretrained=False, num_classes=0,
            img_size=img_size, patch_size=patch, in_chans=in_chans, **kwargs,
        )
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"unknown timm model {model_cfg.name!r}; see timm.list_models('vit_*')") from None
        raise
    if model_cfg.ssl and not model_cfg.pretrained_path:
        raise ConfigError(
            "model.ssl=true needs model.pretrained_path: run through fcil-run or fcil-sweep (they pretrain "
            "or reuse the cached checkpoint), or run fcil-pretrain and pass the path it prints"
        )
    if model_cfg.pretrained_path or model_cfg.pretrained:
        load_pretrained_weights(backbone, model_cfg, in_chans)
    return backbone


def init_head(head: nn.Linear, scheme: str) -> None:
    """``torch``: ``nn.Linear``'s own initialisation (kept); ``timm``: truncated normal (std 0.02), zero bias."""
    if scheme not in HEAD_INITS:
        raise choices_error("model.head_init", scheme, list(HEAD_INITS))
    if scheme == "timm":
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)


def build_model(
    model_cfg: DictConfig, lora_cfg: DictConfig, num_classes: int, in_chans: int, image_size: int, seed: int,
    feature_blocks: list[int] | None = None,
) -> FCILModel:
    """Create the backbone, freeze it, add LoRA and a head: all deterministic from ``seed``.

    ``feature_blocks``: the head sees those blocks' standardised tokens (``method.blocks`` of ``analytic``)."""
    blocks = None if lora_cfg.blocks is None else list(lora_cfg.blocks)
    lora = LoraConfig(
        r=int(lora_cfg.rank), lora_alpha=float(lora_cfg.alpha), lora_dropout=float(lora_cfg.dropout),
        target_modules=lora_target_regex(list(lora_cfg.targets), blocks),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = create_backbone(model_cfg, in_chans, image_size)
        backbone.requires_grad_(False)
        try:
            backbone = inject_adapter_in_model(lora, backbone)
        except ValueError as exc:
            raise ConfigError(f"no LoRA target matched (lora.blocks={blocks}): {str(exc).splitlines()[0]}") from None
        model = FCILModel(backbone, num_classes, model_img_size(model_cfg, image_size), int(model_cfg.projection_dim),
                          feature_blocks)
        init_head(model.head, str(model_cfg.head_init))
    model.initial_state = get_trainable_state(model)
    model.eval()
    return model


def trainable_parameters(model: FCILModel) -> dict[str, nn.Parameter]:
    """The adapter factors, head parameters (and the standardiser's, if any) under their exchange names."""
    params: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        match = _PEFT_NAME.match(name)
        if match:
            params[f"{match['module']}.{match['factor']}"] = param
        elif name.startswith(("head.", "standardise.")):
            params[name] = param
    return params


def adapted_layers(model: FCILModel) -> dict[str, LoraLayer]:
    """The PEFT LoRA layers under their exchange names (e.g. ``blocks.0.attn.qkv``)."""
    return {
        name.removeprefix("backbone."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def set_base_deltas(model: FCILModel, deltas: dict[str, torch.Tensor]) -> None:
    """Set every adapted layer's frozen weight to ``W0 + delta`` (``W0`` where no delta is given).

    ``W0`` is kept the first time a layer's base changes, so calls never accumulate.
    """
    layers = adapted_layers(model)
    unknown = sorted(set(deltas) - set(layers))
    if unknown:
        raise ValueError(f"base deltas for layers the model does not adapt: {unknown[:3]}")
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.base_layer.weight
            if name not in deltas and name not in model.original_weights:
                continue
            original = model.original_weights.setdefault(name, weight.detach().clone())
            delta = deltas.get(name)
            if delta is not None and delta.shape != weight.shape:
                raise ValueError(f"{name}: base delta shape {tuple(delta.shape)} != {tuple(weight.shape)}")
            weight.copy_(original if delta is None else original + delta.to(weight))


@contextmanager
def scaled_adapters(model: FCILModel, scale: float) -> Iterator[None]:
    """Within the block every adapted layer computes ``W x + scale * s B A x``; its scaling ``s`` is restored after."""
    layers = adapted_layers(model).values()
    saved = [dict(layer.scaling) for layer in layers]
    try:
        for layer in layers:
            layer.scaling.update({name: scale * value for name, value in layer.scaling.items()})
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


def get_trainable_state(model: FCILModel) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the trainable state."""
    return {k: v.detach().cpu().clone() for k, v in trainable_parameters(model).items()}


def set_sent_state(model: FCILModel, state: dict[str, torch.Tensor]) -> None:
    """Load the trainable tensors a message names; every other one takes its initial value.

    A method that never moves some tensors (e.g. ``head_only``'s adapters) need not send them.
    """
    set_trainable_state(model, {**model.initial_state, **state})


def set_trainable_state(model: FCILModel, state: dict[str, torch.Tensor]) -> None:
    """Load a complete trainable state (every key, matching shapes) into the model."""
    params = trainable_parameters(model)
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"trainable state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            if value.shape != params[name].shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(params[name].shape)}")
            params[name].copy_(value)


def feature_blocks_of(cfg: DictConfig) -> list[int] | None:
    """The blocks whose tokens the head sees: ``method.blocks`` where the method has it (``analytic``), else None."""
    blocks = OmegaConf.select(cfg, "method.blocks")
    return None if blocks is None else [int(b) for b in blocks]


@lru_cache(maxsize=2)
def _cached_model(key: str) -> FCILModel:
    spec = json.loads(key)
    return build_model(OmegaConf.create(spec["model"]), OmegaConf.create(spec["lora"]), **spec["shape"],
                       feature_blocks=spec["feature_blocks"])


def model_for(cfg: DictConfig, num_classes: int, in_chans: int, image_size: int) -> FCILModel:
    """The experiment's model, built once per process (callers load the state they need;
    ``model.initial_state`` is the state it was built with)."""
    key = json.dumps(
        {
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "lora": OmegaConf.to_container(cfg.lora, resolve=True),
            "shape": {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size, "seed": cfg.seed},
            "feature_blocks": feature_blocks_of(cfg),
        },
        sort_keys=True,
    )
    return _cached_model(key)
