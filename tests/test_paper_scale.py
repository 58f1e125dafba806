"""``python -m bench.paper_scale`` runs LoRM's and Fed-TaLoRA's presets for a round and prints,
and writes, figures that hold: positive times and memory, and bytes a client sends and receives
equal to the sizes of what the methods exchange, counted here from ViT-B/16's shapes.

The run is the CLI's (each method in a fresh process) at a test's size: 2 blocks, 32 pixels.
"""

from __future__ import annotations

import csv
import json

import pytest

from bench.paper_scale import main

DEPTH, DIM, MLP, CLASSES, TASKS = 2, 768, 3072, 100, 10
LAYERS = {"qkv": (3 * DIM, DIM), "proj": (DIM, DIM), "fc1": (MLP, DIM), "fc2": (DIM, MLP)}  # (d_out, d_in)
OVERHEAD_PER_TENSOR = 400  # protobuf framing, the tensor's name, dtype and shape, the record's own fields


def lora_state(rank: int, blocks: int) -> list[int]:
    """Entries of each tensor of a trainable state: ``A`` (r x d_in) and ``B`` (d_out x r) per adapted layer, the head."""
    factors = [n for d_out, d_in in LAYERS.values() for n in (rank * d_in, d_out * rank)] * blocks
    return [*factors, CLASSES * DIM, CLASSES]


def packed(d: int) -> int:
    return d * (d + 1) // 2


def lorm_upload(rank: int) -> list[int]:
    """A B-round's summaries (``B A G A^T``: d_out x r, ``A G A^T`` packed, per layer; the head's rows of the
    task times its dense Gram, the Gram packed, ``n b``) and the end-of-task diagonal Grams (d_in per layer)."""
    per_task = CLASSES // TASKS
    summaries = [n for d_out, _ in LAYERS.values() for n in (d_out * rank, packed(rank))] * DEPTH
    grams = [d_in for _, d_in in LAYERS.values()] * DEPTH
    return [*summaries, per_task * DIM, packed(DIM), per_task, *grams]


def within_overhead(measured: int, entries: list[int], messages: int) -> bool:
    """``measured`` bytes are the float32 entries plus at most the framing of their tensors and messages."""
    raw = 4 * sum(entries)
    return raw < measured <= raw + OVERHEAD_PER_TENSOR * (len(entries) + messages)


def test_paper_scale_prints_and_writes_a_row_per_method_with_true_byte_counts(tmp_path, capsys):
    main(["--tiny", "--depth", str(DEPTH), "--image-size", "32", "--images-per-client", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    [json_file] = tmp_path.glob("paper_scale-*.json")
    result = json.loads(json_file.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["lorm", "talora"]
    with json_file.with_suffix(".csv").open() as table:
        assert [r["method"] for r in csv.DictReader(table)] == ["lorm", "talora"]
    assert result["hardware"]["cpu"] in printed and result["hardware"]["torch"] in printed
    assert "--tiny:" in printed and "2 clients x 2 images" in printed
    for method, row in rows.items():
        line = next(line for line in printed.splitlines() if line.startswith(f"{method} "))
        assert f"{row['bytes_up']:,}" in line and f"{row['bytes_down']:,}" in line
        assert row["replies"] == 2 and row["settings"]["local_epochs"] == 1 and row["settings"]["device"] == "cpu"
        assert row["local_epoch_s"] > 0 and row["merge_s"] > 0 and row["round_s"] > row["local_epoch_s"]
        assert row["peak_rss_mb"] > 100 and row["cuda_peak_mb"] is None
    lorm, talora = rows["lorm"], rows["talora"]
    assert lorm["gram_passes"] == 2 and lorm["gram_pass_s"] > 0  # the round's summaries and the end of the task
    assert talora["gram_passes"] == 0 and talora["gram_pass_s"] is None
    # LoRM (rank 1): up, the B-round's summaries and the task's Grams; down, the state twice (round, task end).
    assert within_overhead(lorm["bytes_up"], lorm_upload(lorm["settings"]["lora_rank"]), messages=2)
    assert within_overhead(lorm["bytes_down"], 2 * lora_state(lorm["settings"]["lora_rank"], DEPTH), messages=2)
    # Fed-TaLoRA (rank 8, blocks 0 and 1): the factors and the head, each way (no residual yet).
    factors = lora_state(talora["settings"]["lora_rank"], blocks=2)
    assert within_overhead(talora["bytes_up"], factors, messages=1)
    assert within_overhead(talora["bytes_down"], factors, messages=1)


@pytest.mark.parametrize("argv", [["--clients", "0"], ["--device", "tpu"], ["--precision", "fp8"], ["--methods", "fedavg"]])
def test_bad_options_are_refused_with_the_value_and_the_choices(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert argv[1] in error and ("choose from" in error or ">= 1" in error)
