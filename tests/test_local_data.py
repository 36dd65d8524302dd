"""A device's own data (edgegan/data/local.py, `edgegan device --data`): real PNG, .npy and .pt files written
from the shipped MNIST, read back as the run's samples, and a fleet over a real Mosquitto that trains on
them."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import torch
from PIL import Image
from small_runs import finish
from torchvision.utils import save_image
from typer.testing import CliRunner

from edgegan import topics, wire
from edgegan.cli import app
from edgegan.data import Dataset, DatasetError, load_dataset, load_local, native_shape, sample_shape

MNIST_SHAPE = (1, 28, 28)
PIXEL = 2 / 255  # one step of a uint8 pixel in [-1, 1]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_dataset("mnist").x[:40]


def write_pngs(folder: Path, images: torch.Tensor, classes: int = 0) -> list[Path]:
    """`images` in [-1, 1] as PNG files, flat or (classes > 0) in ImageFolder's class subfolders;
    torchvision's save_image writes 3-channel PNGs even for one channel."""
    paths = []
    for number, image in enumerate(images):
        where = folder / str(number % classes) if classes else folder
        where.mkdir(parents=True, exist_ok=True)
        paths.append(where / f"digit-{number:03d}.png")
        save_image(image, paths[-1], normalize=True, value_range=(-1, 1))
    return paths


def as_pil(image: torch.Tensor, mode: str = "L") -> Image.Image:
    pixels = ((image[0] + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="L").convert(mode)


def test_a_flat_folder_of_pngs_written_from_shipped_digits_loads_back_equal_to_them(tmp_path, digits):
    write_pngs(tmp_path / "own", digits[:10])
    loaded = load_local(tmp_path / "own", sample_shape=MNIST_SHAPE)
    assert loaded.x.dtype == torch.float32 and loaded.x.shape == (10, *MNIST_SHAPE) and len(loaded) == 10
    assert torch.allclose(loaded.x, digits[:10], atol=PIXEL / 2, rtol=0)
    assert loaded.describe() == f"10 samples of shape (1, 28, 28) from {tmp_path / 'own'} (image folder)"


def test_an_image_folder_layout_counts_every_class_subfolder_and_ignores_the_labels(tmp_path, digits):
    paths = write_pngs(tmp_path / "own", digits[:12], classes=3)
    (tmp_path / "own" / "README.txt").write_text("not an image, not counted")
    (tmp_path / "own" / ".thumbnails").mkdir()
    as_pil(digits[20]).save(tmp_path / "own" / ".thumbnails" / "hidden.png")
    loaded = load_local(tmp_path / "own", sample_shape=MNIST_SHAPE)
    order = sorted(range(12), key=lambda number: paths[number])  # sorted path order: 0/..., 1/..., 2/...
    assert torch.allclose(loaded.x, digits[order], atol=PIXEL / 2, rtol=0)


def test_an_rgb_folder_is_made_grayscale_for_a_one_channel_run_and_grayscale_rgb_for_three(tmp_path, digits):
    write_pngs(tmp_path / "rgb", digits[:4])
    assert Image.open(next((tmp_path / "rgb").iterdir())).mode == "RGB"
    assert torch.allclose(
        load_local(tmp_path / "rgb", sample_shape=MNIST_SHAPE).x, digits[:4], atol=PIXEL / 2
    )
    (tmp_path / "gray").mkdir()
    for number in range(4):
        as_pil(digits[number]).save(tmp_path / "gray" / f"{number}.png")
    colour = load_local(tmp_path / "gray", sample_shape=(3, 28, 28)).x
    assert colour.shape == (4, 3, 28, 28)
    assert torch.allclose(colour, digits[:4].expand(-1, 3, -1, -1), atol=PIXEL / 2, rtol=0)


def test_images_of_another_size_are_fitted_by_a_centre_crop_then_a_resize(tmp_path, digits):
    (tmp_path / "sizes").mkdir()
    # 32 x 32, as CIFAR-10's or a padded MNIST's: resized to 28 x 28; a flat grey stays that grey.
    Image.new("L", (32, 32), color=191).save(tmp_path / "sizes" / "a-grey-32.png")
    # 40 wide, 28 high: the centred 28 x 28 is cut out unchanged (6 columns of white dropped on each side).
    wide = Image.new("L", (40, 28), color=255)
    wide.paste(as_pil(digits[0]), (6, 0))
    wide.save(tmp_path / "sizes" / "b-wide.png")
    as_pil(digits[1]).resize((56, 56), Image.Resampling.NEAREST).save(tmp_path / "sizes" / "c-double.jpg")
    loaded = load_local(tmp_path / "sizes", sample_shape=MNIST_SHAPE).x
    assert loaded.shape == (3, *MNIST_SHAPE)
    assert torch.allclose(loaded[0], torch.full(MNIST_SHAPE, 191 / 127.5 - 1))
    assert torch.allclose(loaded[1], digits[0], atol=PIXEL / 2, rtol=0)
    assert (loaded[2] - digits[1]).abs().mean() < 0.1  # a JPEG at twice the size, scaled back down


def test_tensor_files_give_the_same_samples_from_uint8_pixels_or_floats_in_the_runs_range(tmp_path, digits):
    pixels = ((digits[:6] + 1) * 127.5).round().to(torch.uint8)
    np.save(tmp_path / "pixels.npy", pixels[:, 0].numpy())  # (N, H, W): one channel
    np.save(tmp_path / "wide-ints.npy", pixels.numpy().astype(np.int64))  # (N, C, H, W) of int64 0..255
    torch.save(digits[:6].clone(), tmp_path / "floats.pt")
    np.save(tmp_path / "floats64.npy", digits[:6].double().numpy())
    for name in ("pixels.npy", "wide-ints.npy", "floats.pt", "floats64.npy"):
        loaded = load_local(tmp_path / name, sample_shape=MNIST_SHAPE)
        assert loaded.x.dtype == torch.float32 and loaded.x.shape == (6, *MNIST_SHAPE), name
        assert torch.allclose(loaded.x, digits[:6], atol=1e-6, rtol=0), name
    assert load_local(tmp_path / "floats.pt", sample_shape=MNIST_SHAPE).form == ".pt file"


def test_a_point_run_takes_an_n_by_2_file(tmp_path):
    points = load_dataset("ring8").x[:50]
    np.save(tmp_path / "points.npy", points.numpy())
    torch.save(points.double(), tmp_path / "points.pt")
    for name in ("points.npy", "points.pt"):
        loaded = load_local(tmp_path / name, sample_shape=sample_shape("ring8"))
        assert loaded.x.dtype == torch.float32 and torch.equal(loaded.x, points), name


def test_the_sample_shape_table_matches_the_shipped_data_sets():
    for name in ("mnist", "ring8", "grid25"):
        assert sample_shape(name) == load_dataset(name).sample_shape
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'"):
        sample_shape("svhn")


def write_error_case(tmp_path: Path, case: str, digits: torch.Tensor) -> tuple[Path, tuple[int, ...]]:
    """Writes the bad input of `case` and returns (path, sample_shape of the run)."""
    pixels = ((digits[:3] + 1) * 127.5).round().to(torch.uint8)
    if case == "missing":
        return tmp_path / "nowhere", MNIST_SHAPE
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        return tmp_path / "empty", MNIST_SHAPE
    if case == "corrupt image":
        write_pngs(tmp_path / "own", digits[:2])
        (tmp_path / "own" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        return tmp_path / "own", MNIST_SHAPE
    if case == "truncated image":
        (path,) = write_pngs(tmp_path / "own", digits[:1])
        path.write_bytes(path.read_bytes()[:-60])
        return tmp_path / "own", MNIST_SHAPE
    if case == "wrong channels":
        np.save(tmp_path / "rgb.npy", pixels.expand(-1, 3, -1, -1).numpy())
        return tmp_path / "rgb.npy", MNIST_SHAPE
    if case == "wrong size":
        torch.save(torch.zeros(3, 1, 32, 32), tmp_path / "big.pt")
        return tmp_path / "big.pt", MNIST_SHAPE
    if case == "images for points":
        torch.save(digits[:3].clone(), tmp_path / "digits.pt")
        return tmp_path / "digits.pt", (2,)
    if case == "folder for points":
        write_pngs(tmp_path / "own", digits[:2])
        return tmp_path / "own", (2,)
    if case == "NaN":
        values = digits[:3].clone()
        values[1, 0, 5, 5] = float("nan")
        torch.save(values, tmp_path / "nan.pt")
        return tmp_path / "nan.pt", MNIST_SHAPE
    if case == "zero samples":
        np.save(tmp_path / "none.npy", np.empty((0, 28, 28), dtype=np.uint8))
        return tmp_path / "none.npy", MNIST_SHAPE
    if case == "floats outside [-1, 1]":
        torch.save(pixels.float(), tmp_path / "unscaled.pt")
        return tmp_path / "unscaled.pt", MNIST_SHAPE
    if case == "integers outside 0..255":
        np.save(tmp_path / "ints.npy", pixels.numpy().astype(np.int32) * 2)
        return tmp_path / "ints.npy", MNIST_SHAPE
    if case == "not a tensor":
        torch.save({"x": digits[:3].clone()}, tmp_path / "dict.pt")
        return tmp_path / "dict.pt", MNIST_SHAPE
    if case == "corrupt tensor file":
        (tmp_path / "garbage.npy").write_bytes(b"not numpy at all")
        return tmp_path / "garbage.npy", MNIST_SHAPE
    if case == "unknown form":
        (tmp_path / "digits.csv").write_text("1,2,3\n")
        return tmp_path / "digits.csv", MNIST_SHAPE
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case,named",
    [
        ("missing", ["nowhere does not exist"]),
        ("empty folder", ["empty holds no image files", ".png"]),
        ("corrupt image", ["broken.png is not a readable image"]),
        ("truncated image", ["digit-000.png is not a readable image"]),
        ("wrong channels", ["rgb.npy holds shape (3, 3, 28, 28)", "needs (N, 1, 28, 28) or (N, 28, 28)"]),
        ("wrong size", ["big.pt holds shape (3, 1, 32, 32)", "needs (N, 1, 28, 28)"]),
        ("images for points", ["holds shape (3, 1, 28, 28)", "needs (N, 2)"]),
        ("folder for points", ["is a folder of images", "points of shape (2,)", "(N, 2)"]),
        ("NaN", ["nan.pt holds NaN"]),
        ("zero samples", ["none.npy holds zero samples"]),
        ("floats outside [-1, 1]", ["floats in [0, 255]", "must lie in [-1, 1]"]),
        ("integers outside 0..255", ["integers in [0, 510]", "0..255"]),
        ("not a tensor", ["dict.pt holds a dict, not one tensor"]),
        ("corrupt tensor file", ["garbage.npy is not a readable .npy tensor file"]),
        ("unknown form", ["digits.csv is neither a folder of images nor a .npy or .pt"]),
    ],
)
def test_bad_local_data_is_refused_with_one_line_naming_the_problem(tmp_path, digits, case, named):
    path, shape = write_error_case(tmp_path, case, digits)
    with pytest.raises(DatasetError) as raised:
        load_local(path, sample_shape=shape)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("--data"), message
    for part in named:
        assert part in message, message


def test_the_device_command_needs_index_and_of_only_without_data(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["device", "--id", "pi-0", "--dataset", "ring8"])
    assert result.exit_code == 2 and "Missing option '--index'" in result.output
    assert "Without --data PATH" in result.output
    result = runner.invoke(app, ["device", "--id", "pi-0", "--data", str(tmp_path / "nowhere")])
    assert (
        result.exit_code == 2
        and result.stderr.strip() == f"error: --data {tmp_path / 'nowhere'} does not exist"
    )


def edgegan(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgegan", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        text=True,
    )


def test_two_devices_train_over_mosquitto_on_their_own_png_folders_and_report_their_sizes(
    broker, tmp_path, digits
):
    url, port = broker
    run, rounds, tiny = "own-data", 3, ["--dataset", "mnist", "--width", "8", "--latent-dim", "8"]
    folders = {"device-0": (tmp_path / "pi-0", digits[:12]), "device-1": (tmp_path / "pi-1", digits[12:32])}
    for folder, images in folders.values():
        write_pngs(folder, images, classes=2)
    # The server records no per-device sample count, so a watcher reads `samples` off every update sent.
    samples: dict[str, set[int]] = {}
    subscribed = threading.Event()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher")
    watcher.on_subscribe = lambda *args: subscribed.set()
    watcher.on_message = lambda client, userdata, message: samples.setdefault(
        message.topic.rsplit("/", 1)[-1], set()
    ).add(wire.decode(message.payload).samples)
    watcher.connect("127.0.0.1", port)
    watcher.loop_start()
    watcher.subscribe(topics.all_updates(run), qos=1)
    try:
        assert subscribed.wait(10), "the watcher never subscribed"
        server = edgegan(
            "server", "--broker", url, "--run", run, "--devices", "2", "--rounds", str(rounds),
            "--eval-every", str(rounds), "--deadline-s", "60", "--out", str(tmp_path / "server"), *tiny,
        )  # fmt: skip
        agents = {
            name: edgegan("device", "--broker", url, "--run", run, "--id", name, "--data", str(folder), *tiny)
            for name, (folder, _) in folders.items()
        }
        finish(server)
        outputs = {name: finish(agent) for name, agent in agents.items()}
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    for name, (folder, images) in folders.items():
        assert (
            f"loaded {len(images)} samples of shape (1, 28, 28) from {folder} (image folder)" in outputs[name]
        )
        assert f"updates_sent={rounds}" in outputs[name]
        assert samples[name] == {len(images)}, samples
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["rounds"] == rounds and summary["updates_accepted"] == 2 * rounds
    assert {name: tally.get("accepted") for name, tally in summary["updates_by_device"].items()} == {
        "device-0": rounds,
        "device-1": rounds,
    }


def test_four_boards_with_their_own_png_folders_train_and_are_scored_against_their_data_not_the_servers(
    broker, tmp_path
):
    """docs/deployment.md, "Four boards, each with a folder of images", as a test: each device is given
    only its own folder (disjoint digits), the server scores fid against the devices' feature statistics,
    and that fid equals fid against the union of the four folders computed directly."""
    from test_runtime_mqtt import edgegan, finish

    from edgegan.metrics import ImageQuality, load_classifier
    from edgegan.models import ModelSpec, build_generator
    from edgegan.runsetup import QualityProbe

    url, _ = broker
    run, out = "boards", tmp_path / "server"
    tiny = ["--dataset", "mnist", "--width", "8", "--latent-dim", "8"]
    folders = [tmp_path / f"pi-{index}" for index in range(4)]
    own = load_dataset("mnist").x[1000:1120]  # 30 disjoint digits a board
    for index, folder in enumerate(folders):
        write_pngs(folder, own[30 * index : 30 * (index + 1)])
    server = edgegan(
        "server", "--broker", url, "--run", run, "--devices", "4", "--rounds", "3", "--eval-every", "3",
        "--deadline-s", "30", "--out", str(out), "--quality-from", "devices", *tiny,
    )  # fmt: skip
    boards = [
        edgegan("device", "--broker", url, "--run", run, "--id", f"pi-{index}", "--data", str(folder))
        for index, folder in enumerate(folders)
    ]  # fmt: skip
    assert "mnist: this process holds none of the data" in finish(server, timeout_s=240)
    for board in boards:
        assert "joined run boards: 30 examples" in finish(board)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["updates_accepted"] == 12
    assert summary["quality_from"] == "devices" and summary["quality_images"] == 120

    union = torch.cat([load_local(folder, sample_shape=(1, 28, 28)).x for folder in folders])
    generator = build_generator(ModelSpec((1, 28, 28), 8, 8))
    generator.load_state_dict(torch.load(out / "generator.pt", weights_only=True)["state_dict"])
    probe = QualityProbe(dataset=Dataset.shape_only("mnist", (1, 28, 28)), latent_dim=8, samples=2500, seed=0,
                         data_dir=None)  # fmt: skip
    direct = ImageQuality(load_classifier("mnist"), union, num_real=len(union))(probe.samples(generator))
    assert summary["final"]["fid"] == pytest.approx(direct["fid"], abs=1e-3)


def test_a_device_told_no_data_set_checks_its_data_in_the_shape_the_data_has_of_itself(tmp_path, digits):
    write_pngs(tmp_path / "own", digits[:3])
    as_pil(digits[0]).save(tmp_path / "grey.png")
    (tmp_path / "grey").mkdir()
    as_pil(digits[0]).save(tmp_path / "grey" / "0.png")
    np.save(tmp_path / "pixels.npy", np.zeros((5, 28, 28), dtype=np.uint8))
    np.save(tmp_path / "points.npy", np.zeros((5, 2), dtype=np.float32))
    assert native_shape(tmp_path / "own") == (3, 28, 28)  # save_image writes RGB files
    assert native_shape(tmp_path / "grey") == (1, 28, 28)
    assert native_shape(tmp_path / "pixels.npy") == (1, 28, 28)
    assert native_shape(tmp_path / "points.npy") == (2,)
