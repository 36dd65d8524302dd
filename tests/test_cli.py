import csv
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgegan.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--partition", "dirichlet:-1"], "dirichlet"),
        (["--devices", "0"], "--devices"),
        (["--dataset", "svhn"], "--dataset"),
        (["--algo", "gossip"], "--algo"),
        (["--partition", "shards:0"], "shards"),
        (["--device-speeds", "1,fast"], "--device-speeds"),
        (["--device-speeds", "1,1"], "--device-speeds"),
        (["--loss", "l1"], "loss"),
        (["--aggregate", "trimmed:0.9"], "trimmed"),
        (["--codec", "fp8"], "codec"),
        (["--uplink-mbps", "0"], "bandwidth"),
        (["--rounds", "-3"], "--rounds"),
        (["--dataset", "cifar10"], "--data-dir"),
        (["--max-update-norm", "-1"], "--max-update-norm"),
        (["--max-update-norm", "nan"], "--max-update-norm"),
        (["--max-update-norm", "foo"], "--max-update-norm"),
        (["--max-rejected-fraction", "0"], "--max-rejected-fraction"),
        (["--max-rejected-fraction", "1.5"], "--max-rejected-fraction"),
    ],
)
def test_bad_flags_give_a_one_line_error_and_exit_code_2(flags, named, tmp_path):
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "run"), *flags])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]


def test_every_simulate_flag_shows_its_default_in_help():
    result = runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = result.output
    for flag in (
        "--algo",
        "--rounds",
        "--device-lr",
        "--server-opt",
        "--critic-ratio",
        "--loss",
        "--latency-ms",
    ):
        assert flag in text
    assert text.count("default") >= 30


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("edgegan ")


def test_a_short_simulate_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "edgegan", "simulate", "--algo", "parallel", "--dataset", "ring8",
         "--devices", "3", "--partition", "shards:3", "--rounds", "20", "--eval-every", "10",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "device 2:" in result.stderr and "parameters" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("algo", "dataset", "devices", "partition", "seed", "rounds", "wall_time_s", "sim_time_s",
                "bytes_up", "bytes_down", "initial", "final"):  # fmt: skip
        assert key in summary
    assert set(summary["initial"]) == set(summary["final"]) == {"modes", "hq", "dist"}
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(row["round"]) for row in rows] == list(range(21))
    assert rows[10]["modes"] != "" and rows[5]["modes"] == ""
    assert int(rows[-1]["bytes_up"]) == sum(int(row["round_bytes_up"]) for row in rows) > 0
    assert sorted(path.name for path in (out / "samples").iterdir()) == [
        "round_000000.png", "round_000010.png", "round_000020.png"
    ]  # fmt: skip
    assert (out / "generator.pt").is_file()


def test_train_classifier_writes_weights_that_the_fid_loader_reads(tmp_path):
    import torch

    from edgegan.metrics.classifier import read_classifier

    target = tmp_path / "mnist.pt"
    result = runner.invoke(
        app, ["train-classifier", "--dataset", "mnist", "--epochs", "1", "--out", str(target)]
    )
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.stderr
    model = read_classifier(target, "retrain it")
    assert model.metadata["holdout_accuracy"] > 0.9 and model.metadata["epochs"] == 1
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, model.num_features)


def test_train_classifier_without_a_data_dir_for_cifar10_says_what_is_needed(tmp_path):
    result = runner.invoke(app, ["train-classifier", "--dataset", "cifar10"])
    assert result.exit_code == 2 and "--data-dir" in result.stderr


def test_plot_sample_and_evaluate_work_on_the_outputs_of_runs(tmp_path):
    import json

    from PIL import Image

    runs = []
    for algo in ("serial", "parallel"):
        out = tmp_path / algo
        result = runner.invoke(app, ["simulate", "--algo", algo, "--dataset", "ring8", "--rounds", "20",
                                     "--eval-every", "10", "--out", str(out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        runs.append(str(out))
    picture = tmp_path / "compare.png"
    from matplotlib import pyplot

    drawn = []
    closing = pyplot.close
    with pytest.MonkeyPatch.context() as patch:  # keep the figure to look at what it shows
        patch.setattr(pyplot, "close", lambda figure=None: drawn.append(figure) or closing(figure))
        result = runner.invoke(app, ["plot", *runs, "--out", str(picture)])
    assert result.exit_code == 0, result.output
    assert Image.open(picture).size[0] > 500
    by_time, by_bytes = drawn[0].axes
    for axes in (by_time, by_bytes):
        assert len(axes.get_lines()) == 2 and axes.get_xlabel() and axes.get_ylabel()
    assert "bytes" in by_bytes.get_xlabel()
    labels = [text.get_text() for text in by_time.get_legend().get_texts()]
    assert len(labels) == 2 and "serial" in labels[0] and "parallel" in labels[1]
    grid = tmp_path / "grid.png"
    result = runner.invoke(
        app, ["sample", str(tmp_path / "serial" / "generator.pt"), "--n", "100", "--out", str(grid)]
    )
    assert result.exit_code == 0 and grid.is_file()
    result = runner.invoke(app, ["evaluate", str(tmp_path / "serial" / "generator.pt"), "--samples", "500"])
    assert result.exit_code == 0
    assert set(json.loads(result.stdout)) == {"dataset", "samples", "modes", "hq", "dist"}


def test_plot_and_evaluate_refuse_what_is_not_a_run(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "junk.pt")])
    assert result.exit_code == 2 and "not an edgegan generator checkpoint" in result.stderr
    result = runner.invoke(app, ["plot", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "metrics.csv" in result.stderr


@pytest.mark.parametrize("command", [["broker"], ["broker", "start"]])
def test_a_broker_on_an_occupied_port_says_so_in_one_line_and_exits_1(command):
    import socket

    with socket.socket() as occupant:  # as a running Mosquitto would
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "edgegan", *command, "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines == [lines[0]] and lines[0].startswith(f"error: port {port} on 127.0.0.1 is in use")


def test_a_port_taken_after_the_check_is_still_one_error_without_amqtts_traceback(monkeypatch, caplog):
    import asyncio
    import socket

    from edgegan.runtime import broker

    monkeypatch.setattr(broker, "check_port_free", lambda host, port: None)  # lose the race
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        with pytest.raises(broker.PortInUse, match=f"port {port} on 127.0.0.1 is in use"):
            asyncio.run(broker.serve_broker("127.0.0.1", port, asyncio.Event()))
    assert not [record for record in caplog.records if record.exc_info]


def test_sample_names_a_server_checkpoint_too_old_to_say_its_model(tmp_path):
    import torch

    old = tmp_path / "checkpoint.pt"  # what servers wrote before checkpoints recorded the model spec
    torch.save({"rounds_done": 5, "run": "demo", "generator": {}, "discriminator": {}}, old)
    result = runner.invoke(app, ["sample", str(old), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "older edgegan" in result.stderr and "generator.pt" in result.stderr
