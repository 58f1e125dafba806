"""Sites that hold only their own samples: the site format, the node's ``data="local"`` mode and
``fcil-export-sites``, whose folders replay a simulation's partition exactly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from client_app.node import NodeJob, node_overrides
from fedcil.cli.export_sites import main as export_main
from fedcil.cli.inprocess import inprocess_post, run_inprocess
from fedcil.config import compose_config
from fedcil.data import load_dataset
from fedcil.errors import ConfigError
from fedcil.experiment import experiment_for
from fedcil.protocol import decode_reply
from server_app.federation import RoundExchange
from server_app.loop import run_rounds

# Fashion-MNIST (its files are there, so the sites can be shown to do without them), 3 clients, 2 tasks
# of 3 classes, tiny caps; a skewed partition (min_samples=0) leaves some site without a sample of some task
RUN = [
    "dataset=fashion_mnist", "num_clients=3", "num_tasks=2", "classes_per_task=3", "train_per_class=12", "test_per_class=8",
    "rounds_per_task=1", "local_epochs=1", "partition.beta=0.01", "partition.min_samples=0",
    "backend=inprocess", "checkpoint=false",
]


def site_post(cfg_for_node, replies: list | None = None):
    """A Post whose node ``k`` is an in-process client built from ``cfg_for_node(k)`` (its own site);
    every ``(node, reply)`` is appended to ``replies`` if given."""
    posts = {}

    def post(contents, kind):
        exchanges = [
            posts.setdefault(node, inprocess_post(cfg_for_node(node)))({node: content}, kind)
            for node, content in contents.items()
        ]
        if replies is not None:
            replies.extend(r for e in exchanges for r in e.replies)
        return RoundExchange(
            replies=[r for e in exchanges for r in e.replies],
            bytes_up=sum(e.bytes_up for e in exchanges),
            bytes_down=sum(e.bytes_down for e in exchanges),
            sampled=[n for e in exchanges for n in e.sampled],
        )

    return post


def test_exported_sites_replay_the_simulation_exactly(tmp_path, capsys):
    """Each client reading only its exported folder (source data set absent: root an empty folder)
    gives the simulation's accuracy matrix, with evaluation on the clients and on the server."""
    assert export_main(["--out", str(tmp_path / "sites"), *RUN]) == 0
    assert "site-2" in capsys.readouterr().out
    plain = compose_config("config", RUN)
    held = [[len(experiment_for(plain).client_indices(t, k)) for t in range(2)] for k in range(3)]
    assert min(min(h) for h in held) == 0  # some site has nothing of some task: it trains on nothing

    empty = tmp_path / "no-data"
    empty.mkdir()
    for evaluation in ("clients", "server"):
        run = [*RUN, f"evaluation={evaluation}"]
        simulated = run_inprocess(compose_config("config", [*run, f"output_dir={tmp_path / evaluation}"]))

        def cfg_for_node(k: int):
            """Node k's config as its SuperNode composes it: data="local", data-dir its own folder."""
            job = NodeJob.from_context(context(
                {"partition-id": k, "data": "local", "data-dir": str(tmp_path / "sites" / f"site-{k}")},
                " ".join([*run, f"dataset.root={empty}"]),
            ))
            return compose_config(job.config_name, list(job.overrides))

        server_cfg = compose_config("config", [*run, f"output_dir={tmp_path / (evaluation + '-sites')}"])
        replayed = run_rounds(site_post(cfg_for_node), [0, 1, 2], server_cfg, time.monotonic())
        assert replayed["accuracy_matrix"] == simulated["accuracy_matrix"]
        for k in range(3):
            site = experiment_for(cfg_for_node(k))
            assert [len(site.client_indices(t, k)) for t in range(2)] == held[k]


def test_an_empty_site_takes_part_with_zero_examples(tmp_path):
    """A site with no training and no test sample trains on nothing, says 0 examples, and the run completes."""
    run = [o for o in RUN if not o.startswith("dataset=")] + ["evaluation=clients"]
    assert export_main(["--out", str(tmp_path), *run]) == 0
    empty = np.zeros((0, 8, 8), np.uint8), np.zeros(0, np.int64)
    write_digits_site(tmp_path / "site-2", *empty)
    replies: list = []
    cfg = compose_config("config", [*run, f"output_dir={tmp_path / 'out'}"])
    results = run_rounds(
        site_post(lambda k: compose_config("config", [*run, f"dataset.site_dir={tmp_path / f'site-{k}'}"]), replies),
        [0, 1, 2], cfg, time.monotonic(),
    )
    examples = {(node, decode_reply(node, reply).num_examples) for node, reply in replies}
    assert {n for node, n in examples if node == 2} == {0}
    assert any(n > 0 for node, n in examples if node != 2)
    assert all(a is not None for a in results["accuracy_matrix"][-1])


def test_an_exported_image_folder_site_holds_the_loaders_pixels_exactly(tmp_path):
    """imagenet_r from image files of other sizes (resized and cropped on load): a site folder holds
    the same tensors, bit for bit, as the loader gives for the client's share."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in "abcd":
        (tmp_path / "src" / cls).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(rng.integers(0, 256, (11, 14, 3), dtype=np.uint8)).save(tmp_path / "src" / cls / f"{k}.png")
    run = ["dataset=imagenet_r", f"dataset.root={tmp_path / 'src'}", "dataset.image_size=8", "dataset.num_classes=4",
           "num_tasks=2", "num_clients=2", "partition=iid"]
    assert export_main(["--out", str(tmp_path / "sites"), *run]) == 0
    source = experiment_for(compose_config("config", run))
    for k in range(2):
        site = experiment_for(compose_config("config", [*run, f"dataset.site_dir={tmp_path / 'sites' / f'site-{k}'}"]))
        for split, indices in zip(("train", "test"), source.site_share(k, 2)):
            assert len(getattr(site.data, split)) == len(indices) > 0
            for mine, theirs in zip(range(len(indices)), indices):
                image, label = getattr(site.data, split)[mine]
                original, original_label = getattr(source.data, split)[int(theirs)]
                assert torch.equal(image, original) and label == original_label


def test_a_site_needs_no_source_data_and_trains_on_its_tasks_classes(tmp_path):
    """A site written with numpy alone (N x H x W, the data set's own labels) for fashion_mnist,
    whose source files are nowhere: its share of a task is its samples of that task's classes."""
    rng = np.random.default_rng(0)
    train_labels = np.array([0, 5, 1, 9, 2, 3, 0], dtype=np.int64)
    test_labels = np.array([4, 1, 8], dtype=np.int64)
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), labels=train_labels)
    np.savez(tmp_path / "test.npz", images=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), labels=test_labels)
    (tmp_path / "site.json").write_text(json.dumps({"dataset": "fashion_mnist"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_config("config", [
        "dataset=fashion_mnist", f"dataset.root={empty}", f"dataset.site_dir={tmp_path}", "num_tasks=5",
    ])
    experiment = experiment_for(cfg)
    for task in range(5):
        classes = {2 * task, 2 * task + 1}
        expected = [i for i, label in enumerate(train_labels) if label in classes]
        assert experiment.client_indices(task, 4).tolist() == expected
    assert experiment.test_shard(1, 5).tolist() == [0, 1, 2]
    image, label = experiment.data.test[2]
    assert tuple(image.shape) == (1, 28, 28) and label == 8 and float(image.max()) <= 1.0
    with pytest.raises(ConfigError, match="not found in"):  # the whole data set is indeed absent
        load_dataset(compose_config("config", ["dataset=fashion_mnist", f"dataset.root={empty}"]).dataset)


def write_digits_site(folder: Path, images: np.ndarray, labels: np.ndarray, name: str = "digits") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", images=images, labels=labels)
    np.savez(folder / "test.npz", images=images, labels=labels)
    (folder / "site.json").write_text(json.dumps({"dataset": name}))


GOOD_IMAGES = np.zeros((4, 1, 8, 8), np.uint8)
GOOD_LABELS = np.array([0, 1, 2, 9], np.int64)


@pytest.mark.parametrize("images, labels, name, message", [
    (np.zeros((4, 1, 28, 28), np.uint8), GOOD_LABELS, "digits", r"shape \(4, 1, 28, 28\), but dataset=digits needs N x 1 x 8 x 8"),
    (np.zeros((4, 3, 8, 8), np.uint8), GOOD_LABELS, "digits", "needs N x 1 x 8 x 8"),
    (np.full((4, 1, 8, 8), 17, np.uint8), GOOD_LABELS, "digits", "uint8 in 0..16 for dataset=digits, found uint8 up to 17"),
    (GOOD_IMAGES.astype(np.float32), GOOD_LABELS, "digits", "must be uint8 in 0..16"),
    (GOOD_IMAGES, np.array([0, 1, 10, 2]), "digits", r"label 10 outside dataset=digits's classes 0\.\.9"),
    (GOOD_IMAGES, np.array([0, -1, 2, 3]), "digits", "label -1 outside"),
    (GOOD_IMAGES, GOOD_LABELS[:3], "digits", "labels must be 4 integers"),
    (GOOD_IMAGES, GOOD_LABELS.astype(np.float64), "digits", "labels must be 4 integers"),
    (GOOD_IMAGES, GOOD_LABELS, "fashion_mnist", "holds dataset='fashion_mnist', but the run uses dataset=digits"),
])
def test_a_malformed_site_fails_with_one_line_naming_the_file(tmp_path, images, labels, name, message):
    write_digits_site(tmp_path / "site", images, labels, name)
    with pytest.raises(ConfigError, match=message) as info:
        experiment_for(compose_config("config", [f"dataset.site_dir={tmp_path / 'site'}"]))
    assert str(tmp_path / "site") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("missing", ["train.npz", "test.npz", "site.json"])
def test_a_missing_site_file_is_named(tmp_path, missing):
    write_digits_site(tmp_path, GOOD_IMAGES, GOOD_LABELS)
    (tmp_path / missing).unlink()
    with pytest.raises(ConfigError, match=f"site file {tmp_path / missing} is missing"):
        load_dataset(compose_config("config", [f"dataset.site_dir={tmp_path}"]).dataset)


def test_a_site_file_without_its_arrays_is_named(tmp_path):
    write_digits_site(tmp_path, GOOD_IMAGES, GOOD_LABELS)
    np.savez(tmp_path / "test.npz", pictures=GOOD_IMAGES, labels=GOOD_LABELS)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'test.npz'} has no array 'images'"):
        load_dataset(compose_config("config", [f"dataset.site_dir={tmp_path}"]).dataset)


def context(node_config: dict, overrides: str = "seed=1") -> Context:
    """What a SuperNode's ClientApp is given: its node config and the run config."""
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3, **node_config},
                   state=RecordDict(), run_config={"config-name": "config", "overrides": overrides})


def test_node_config_data_local_reads_the_site_folder():
    assert node_overrides(context({"data-dir": "/d/site 0", "data": "local"}))[-1] == "dataset.site_dir='/d/site 0'"
    assert node_overrides(context({"data-dir": "/d", "data": "full"}))[-1] == "dataset.root='/d'"
    assert node_overrides(context({"data-dir": "/d"}))[-1] == "dataset.root='/d'"
    with pytest.raises(ConfigError, match="unknown node config data 'mine'; valid choices: full, local"):
        node_overrides(context({"data-dir": "/d", "data": "mine"}))
    with pytest.raises(ConfigError, match='data="local" needs data-dir'):
        node_overrides(context({"data": "local"}))


def test_export_refuses_a_site_as_its_source(tmp_path, capsys):
    assert export_main(["--out", str(tmp_path), f"dataset.site_dir={tmp_path}"]) == 2
    assert "export from the whole data set" in capsys.readouterr().err


def test_a_site_file_that_is_not_npz_is_named(tmp_path):
    write_digits_site(tmp_path, GOOD_IMAGES, GOOD_LABELS)
    (tmp_path / "train.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'train.npz'} is not a readable .npz file"):
        load_dataset(compose_config("config", [f"dataset.site_dir={tmp_path}"]).dataset)
