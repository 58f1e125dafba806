"""The shapes of the data sets, known without loading them (and without torch): what a server
that holds no data, and the settings check, need."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from fedcil.errors import ConfigError


@dataclass(frozen=True)
class DataShape:
    """What a model needs to know of a data set: classes, channels, image side."""

    num_classes: int
    in_chans: int
    image_size: int


FIXED_SHAPES = {
    "digits": DataShape(10, 1, 8),
    "fashion_mnist": DataShape(10, 1, 28),
    "cifar100": DataShape(100, 3, 32),
}


def declared_shape(cfg: DictConfig) -> DataShape:
    """The shape of the data set ``cfg`` names, without loading it (a server that holds no data).

    Fixed for the built-in arrays; for image folders ``num_classes`` must be set in the config.
    """
    if cfg.name in FIXED_SHAPES:
        return FIXED_SHAPES[cfg.name]
    if OmegaConf.select(cfg, "num_classes") is None:
        raise ConfigError(
            f"dataset.num_classes is null for dataset={cfg.name}: a server that loads no data "
            "(evaluation=clients) needs it set, e.g. dataset.num_classes=200"
        )
    return DataShape(int(cfg.num_classes), 3, int(cfg.image_size))
