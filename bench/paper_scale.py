"""The papers' scale: one round of LoRM and of Fed-TaLoRA with a ViT-B/16, timed and weighed.

    .venv/bin/python -m bench.paper_scale --tiny          # this CPU: 2 clients, 4 images, one epoch
    .venv/bin/python -m bench.paper_scale --device cuda   # the presets' 10 clients, 500 images each

Each method runs its paper preset (``experiment=lorm_cifar100``, ``experiment=talora_cifar100``)
with a randomly initialised backbone of the preset's architecture (``model.pretrained=false``)
for one round of the first task, through the code a run uses: the loop's ``train_round``
(validation, merge and, for LoRM, the end-of-task Gram exchange), the in-process clients of
``backend=inprocess`` (``client_app``'s local round) and the strategy's merge. The data are
random images in the CIFAR-100 layout (32 pixels, the first task's classes), held as one site
folder that every client reads (each client trains on ``--images-per-client`` images); the
model resizes them to ``--image-size`` on the fly, as the presets do with CIFAR-100.

Per method, in a fresh process of its own:

- **local epoch**: seconds of a client's ``train_local`` over its images, per epoch (mean of clients);
- **Gram pass**: seconds of one ``input_grams`` call (every adapted layer's Gram over a client's
  images, ``method.gram_passes`` views), mean of the calls; LoRM makes two a client and round
  (the round's summaries and the end-of-task Grams), Fed-TaLoRA none;
- **merge**: seconds of the server's ``aggregate_round``, ``end_task`` and ``base_deltas`` (the
  evaluated model's merged base);
- **bytes up / down per client**: the protobuf sizes of the round's request and reply records,
  end-of-task exchange included, as ``results.json`` counts them (``bytes_up``, ``bytes_down``),
  divided by the clients;
- **peak memory**: the process's peak resident set size, and ``torch.cuda.max_memory_allocated``
  on a GPU.

Results are printed and written as JSON and CSV to ``--out`` (default ``bench/results/``).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import timm
import torch
from omegaconf import DictConfig

from bench import RESULTS_DIR, save_result
from client_app import local_round
from fedcil.cli.inprocess import inprocess_post
from fedcil.config import compose_config
from fedcil.data import write_site
from fedcil.model import model_for, resolve_device
from fedcil.settings import PRECISIONS, check_settings
from fedcil.shapes import FIXED_SHAPES, declared_shape
from fedcil.tasks import split_for
from server_app.loop import checked_sender, train_round
from strategies import build_strategy

PRESETS = {"lorm": "experiment=lorm_cifar100", "talora": "experiment=talora_cifar100"}
DEVICES = ("auto", "cpu", "cuda")
TEST_IMAGES = 2  # the site's test split (nothing is evaluated; a site holds one)
COLUMNS = ("method", "local_epoch_s", "gram_pass_s", "gram_passes", "merge_s", "bytes_up", "bytes_down",
           "peak_rss_mb", "cuda_peak_mb", "round_s")


@dataclass(frozen=True)
class Size:
    """What a run of the benchmark measures: the clients, their images, the model and where it trains.

    ``None`` keeps the preset's value (``batch_size``, ``local_epochs``, ``precision``) or the
    architecture's (``depth``: ViT-B/16's 12 blocks).
    """

    clients: int = 10
    images_per_client: int = 500  # CIFAR-100: 50,000 images over 10 tasks and 10 clients
    image_size: int = 224
    batch_size: int | None = None
    local_epochs: int | None = None
    depth: int | None = None
    device: str = "auto"
    precision: str | None = None
    threads: int = field(default_factory=torch.get_num_threads)  # torch threads a client trains with

    def overrides(self, site: Path) -> list[str]:
        """The preset's overrides that set this size, the random backbone and the site's data."""
        chosen = {"batch_size": self.batch_size, "local_epochs": self.local_epochs, "precision": self.precision}
        return [
            "model.pretrained=false", f"model.img_size={self.image_size}", f"dataset.site_dir={site}",
            f"num_clients={self.clients}", "rounds_per_task=1", f"device={self.device}",
            f"client_resources.num_cpus={self.threads}", "checkpoint=false",
            *([] if self.depth is None else [f"+model.kwargs.depth={self.depth}"]),
            *(f"{key}={value}" for key, value in chosen.items() if value is not None),
        ]


TINY = Size(clients=2, images_per_client=4, local_epochs=1)
TINY_CHANGES = "2 clients, 4 images each, 1 local epoch; ViT-B/16 whole (12 blocks, 224 pixels)"


@contextmanager
def timed(owner: object, name: str, seconds: list[float], sync: Callable[[], None]) -> Iterator[None]:
    """Within the block every call of ``owner.<name>`` (a module's function or an object's method)
    runs as before and appends its seconds (after ``sync``) to ``seconds``."""
    original = getattr(owner, name)

    def timed_call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sync()
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, timed_call)
    try:
        yield
    finally:
        setattr(owner, name, original)


def write_synthetic_site(folder: Path, cfg: DictConfig, images: int) -> None:
    """A CIFAR-100 site folder of random images: ``images`` of the first task's classes in turn (train),
    :data:`TEST_IMAGES` for its test split."""
    shape = FIXED_SHAPES[cfg.dataset.name]
    split = split_for(cfg, shape.num_classes)
    classes = split.class_order[list(split.task_classes(0))]
    rng = np.random.default_rng(cfg.seed)

    def random_split(n: int) -> tuple[np.ndarray, np.ndarray]:
        pixels = rng.integers(0, 256, (n, shape.in_chans, shape.image_size, shape.image_size), dtype=np.uint8)
        return pixels, classes[np.arange(n) % len(classes)].astype(np.int64)

    write_site(folder, cfg.dataset.name, {"train": random_split(images), "test": random_split(TEST_IMAGES)})


def measure_method(method: str, size: Size) -> dict:
    """One round of ``method``'s preset at ``size`` in this process; its figures (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        cfg = compose_config("config", [PRESETS[method], *size.overrides(site)])
        check_settings(cfg)
        write_synthetic_site(site, cfg, size.images_per_client)
        device = resolve_device(cfg.device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        shape = declared_shape(cfg.dataset)
        model = model_for(cfg, shape.num_classes, shape.in_chans, shape.image_size)
        strategy = build_strategy(cfg, split_for(cfg, shape.num_classes), model.initial_state)
        send = checked_sender(inprocess_post(cfg), cfg, strategy)
        times: dict[str, list[float]] = {"train": [], "grams": [], "merge": []}
        with ExitStack() as stack:
            stack.enter_context(timed(local_round, "train_local", times["train"], sync))
            stack.enter_context(timed(local_round, "input_grams", times["grams"], sync))
            for step in ("aggregate_round", "end_task", "base_deltas"):
                stack.enter_context(timed(strategy, step, times["merge"], sync))
            start = time.perf_counter()
            strategy.start_task(0)
            result = train_round(send, cfg, strategy, list(range(cfg.num_clients)), np.random.default_rng(cfg.seed), 0, 0)
            strategy.base_deltas()
            round_s = time.perf_counter() - start
    return {
        "method": method,
        "local_epoch_s": float(np.mean(times["train"])) / cfg.local_epochs,
        "gram_pass_s": float(np.mean(times["grams"])) if times["grams"] else None,
        "gram_passes": len(times["grams"]) // cfg.num_clients,
        "merge_s": sum(times["merge"]),
        "bytes_up": result.bytes_up // cfg.num_clients,
        "bytes_down": result.bytes_down // cfg.num_clients,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "round_s": round_s,
        "replies": len(result.updates),
        "settings": {"local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size, "precision": cfg.precision,
                     "lora_rank": cfg.lora.rank, "device": str(device)},
    }


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """The machine's CPU, cores, GPU (if torch sees one) and library versions."""
    return {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "timm": timm.__version__,
    }


def measure(size: Size, methods: list[str]) -> dict:
    """Every method of ``methods`` at ``size``, each in a fresh process (its own peak memory)."""
    rows = []
    for method in methods:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            rows.append(pool.submit(measure_method, method, size).result())
    return {"hardware": hardware(), "size": asdict(size), "rows": rows}


def cell(value: float | int | None, digits: int) -> str:
    """A table cell: ``value`` with ``digits`` decimals, ``-`` for none."""
    return "-" if value is None else f"{value:,.{digits}f}"


def report(result: dict, note: str = "") -> None:
    """Print the hardware, the size and one row per method."""
    hw, size = result["hardware"], result["size"]
    gpu = f"GPU {hw['gpu']}" if hw["gpu"] else "no GPU"
    print(f"{hw['cpu']} ({hw['cores']} cores), {gpu}; torch {hw['torch']}, timm {hw['timm']}")
    depth = "12 blocks" if size["depth"] is None else f"{size['depth']} blocks"
    print(f"ViT-B/16 ({depth}, random weights) at {size['image_size']} pixels, {size['clients']} clients x "
          f"{size['images_per_client']} images, one round; {size['threads']} torch threads a client{note}")
    for row in result["rows"]:
        settings = row["settings"]
        print(f"  {row['method']}: rank {settings['lora_rank']}, batch {settings['batch_size']}, "
              f"local epochs {settings['local_epochs']}, precision {settings['precision']}, on {settings['device']}")
    print(f"\n{'method':<8}{'epoch s':>10}{'Gram s':>9}{'calls':>6}{'merge s':>10}{'up B/client':>14}"
          f"{'down B/client':>15}{'RSS MB':>9}{'CUDA MB':>9}{'round s':>9}")
    for row in result["rows"]:
        print(f"{row['method']:<8}{cell(row['local_epoch_s'], 2):>10}{cell(row['gram_pass_s'], 2):>9}"
              f"{row['gram_passes']:>6}{cell(row['merge_s'], 3):>10}{row['bytes_up']:>14,}{row['bytes_down']:>15,}"
              f"{cell(row['peak_rss_mb'], 0):>9}{cell(row['cuda_peak_mb'], 0):>9}{cell(row['round_s'], 1):>9}")
    if any(row["settings"]["device"] == "cpu" for row in result["rows"]):
        print("precision is the autocast of training on CUDA: on the CPU every method trained in fp32")


def save(result: dict, folder: Path) -> Path:
    """Write ``paper_scale-<time>.json`` (everything) and, beside it, ``.csv`` (the table) into ``folder``."""
    path = save_result("paper_scale", result, folder)
    with path.with_suffix(".csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
    print(f"and {path.with_suffix('.csv')}")
    return path


def positive(text: str) -> int:
    """An argument that must be a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def parse_size(argv: list[str] | None = None) -> tuple[Size, list[str], Path, str]:
    """The size, methods, output folder and header note the command line asks for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help=f"a size for a CPU: {TINY_CHANGES}")
    parser.add_argument("--clients", type=positive)
    parser.add_argument("--images-per-client", type=positive)
    parser.add_argument("--image-size", type=positive)
    parser.add_argument("--batch-size", type=positive, help="default: the preset's")
    parser.add_argument("--local-epochs", type=positive, help="default: the preset's (5)")
    parser.add_argument("--depth", type=positive, help="transformer blocks (default: ViT-B/16's 12; fewer only for tests)")
    parser.add_argument("--device", choices=DEVICES)
    parser.add_argument("--precision", choices=PRECISIONS, help="default: the preset's (lorm fp16, talora fp32; CUDA only)")
    parser.add_argument("--methods", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and CSV files")
    args = parser.parse_args(argv)
    size = TINY if args.tiny else Size()
    given = {key: getattr(args, key) for key in ("clients", "images_per_client", "image_size", "batch_size",
                                                 "local_epochs", "depth", "device", "precision")}
    size = replace(size, **{k: v for k, v in given.items() if v is not None})
    note = f"\n--tiny: {TINY_CHANGES} (options given override it)" if args.tiny else ""
    return size, args.methods, args.out, note


def main(argv: list[str] | None = None) -> None:
    size, methods, out, note = parse_size(argv)
    result = measure(size, methods)
    report(result, note)
    save(result, out)


if __name__ == "__main__":
    main()
