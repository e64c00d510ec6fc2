"""The ``riemfip`` command, driven as a user drives it: the real console script in a
subprocess (``python -m riemfip`` from the repository root), at tiny sizes.

One small demo run (``SMALL``, through ``--config``) is shared: the other tests read its
record, feed its networks to ``connect`` and compare resumed runs against it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from riemfip.cli.command import COMMANDS

ROOT = Path(__file__).resolve().parents[1]

# A demo that takes a few seconds; the geodesic's 20 rounds of 10 iterations leave time
# to interrupt it with a real SIGINT.
SMALL = """\
hidden = [32]
epochs = 1
anchors = 64
points = 9
maxiter = 200
round = 10
bezier-epochs = 1
continual-epochs = 1
memory-per-class = 5
"""


def start(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "riemfip", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # One thread: on a shared 2-core machine, idle OpenMP threads spin and multiply the
        # CPU time of these small networks.
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        # Ctrl-C as a terminal would deliver it, even when the suite itself runs as a
        # background job (whose children inherit SIGINT ignored, and Python then keeps it so)
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def riemfip(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = start(*args, env=env)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def figures(record: dict) -> dict:
    """The record's results and key numbers without timings (which differ run to run)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "second" not in k}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip({"results": record["results"], "summary": record["summary"]})


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    (folder / "small.toml").write_text(SMALL)
    return folder


@pytest.fixture(scope="module")
def demo(work) -> Path:
    """An uninterrupted small demo; its --out folder."""
    out = work / "demo"
    done = riemfip("demo", "--config", work / "small.toml", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""  # --quiet
    return out


@pytest.fixture(scope="module")
def other_network(work) -> Path:
    """A network of another architecture (and dataset), by ``riemfip train``."""
    out = work / "other"
    args = ("--data", "digits", "--hidden", "8", "--epochs", "1", "--out", out, "--quiet")
    done = riemfip("train", *args)
    assert done.returncode == 0, done.stderr
    return out / "model.pt"


def test_every_subcommand_has_help_with_an_example():
    procs = {name: start(*([name] if name else []), "--help") for name in [None, *COMMANDS]}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, err)
        assert out.startswith(f"usage: riemfip {name or ''}".rstrip()), out[:80]
        assert "example" in out, name
        if name:
            assert "--out" in out and "--resume" in out and "--config" in out, name


def test_demo_writes_record_plots_and_one_self_contained_page(demo):
    record = json.loads((demo / "record.json").read_text())
    assert {"command", "options", "seed", "device", "versions", "timings", "results"} <= set(record)
    assert record["command"] == "demo" and record["seed"] == 0 and record["device"] == "cpu"
    assert record["versions"]["torch"] and record["timings"]["total"]["cpu_s"] > 0
    assert record["options"]["hidden"] == [32]  # from --config
    summary = record["summary"]
    assert set(summary["paths between net_a and net_b (test set)"]) == {
        "geodesic",
        "line",
        "bezier",
    }
    assert summary["geodesic"]["L-BFGS iterations"] == 200
    continual = summary["continual learning (class-incremental, test set)"]
    assert set(continual) == {"fip", "finetune", "replay"}
    for numbers in continual.values():
        assert 0 <= numbers["average (%)"] <= 100
    pngs = sorted(p.name for p in demo.glob("*.png"))
    assert {"paths.png", "continual.png", "continual_fip.png"} <= set(pngs)
    assert set(record["files"]) >= {*pngs, "record.json", "report.html", "net_a.pt", "net_b.pt"}
    page = (demo / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(pngs)
    assert "http" not in page.lower().replace("http-equiv", "")  # nothing to fetch
    first = page.split("data:image/png;base64,", 1)[1].split("'", 1)[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"


def test_connect_two_networks_written_by_the_demo(demo, work):
    out = work / "connect"
    args = ("--anchors", "16", "--points", "5", "--maxiter", "5", "--bezier-epochs", "0")
    done = riemfip("connect", demo / "net_a.pt", demo / "net_b.pt", *args, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "report:" in done.stdout and "geodesic" in done.stderr  # a stage line
    record = json.loads((out / "record.json").read_text())
    assert set(record["results"]["connectivity"]["paths"]) == {"geodesic", "line"}
    assert (out / "paths.png").is_file() and (out / "checkpoints" / "geodesic.pt").is_file()


# The minibatch route on the demo's networks: batches of 100 of the 3,800 training inputs
# left after 200 held out, 38 Adam steps an epoch (a held-out check every 25).
MINIBATCH = (
    *("--method", "minibatch", "--batch-size", "100", "--epochs", "2", "--held-out", "200"),
    *("--points", "5", "--anchors", "16", "--bezier-epochs", "0", "--quiet"),
)


def test_connect_by_minibatches_records_its_route_and_resumes_per_epoch(demo, work):
    from riemfip.checkpoint import load_checkpoint

    nets = (demo / "net_a.pt", demo / "net_b.pt")
    whole, out = work / "minibatch", work / "minibatch-stopped"
    args = ("connect", *nets, *MINIBATCH, "--out")

    def stop_after_one(*more) -> int:  # as Ctrl-C would, after the next checkpoint written
        return riemfip(*args, out, *more, env={"RIEMFIP_STOP_AFTER": "1"}).returncode

    uninterrupted = start(*args, whole)  # alongside the stopped runs
    assert stop_after_one() == 130
    first = load_checkpoint(out / "checkpoints" / "geodesic.pt")
    assert first.step == 1 and first.state["minibatch"]["steps"] == 38
    # the resumed run goes on from epoch 1: its first checkpoint is epoch 2's, not epoch 1's
    assert stop_after_one("--resume") == 130
    second = load_checkpoint(out / "checkpoints" / "geodesic.pt")
    assert second.step == 2 and second.state["minibatch"]["steps"] == 76
    resumed = riemfip(*args, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err
    record = json.loads((whole / "record.json").read_text())
    assert figures(json.loads((out / "record.json").read_text())) == figures(record)
    geo = record["results"]["geodesic"]
    assert geo["route"] == "minibatch" and record["summary"]["geodesic"]["route"] == "minibatch"
    assert geo["policy"]["batch_size"] == 100 and geo["policy"]["epochs"] == 2
    assert geo["training_inputs"] == 3800 and geo["held_out_inputs"] == 200
    assert geo["status"] in ("CONVERGED", "MAX_ITERATIONS") and geo["iterations"] > 25
    assert geo["objective"] < 0.9 * geo["objective_line"]  # the path left the line


def _bad_inputs(demo: Path, other: Path, work: Path) -> dict[str, tuple]:
    text = work / "notes.pt"
    text.write_text("not a checkpoint\n")
    truncated = work / "truncated.pt"
    data = (demo / "net_a.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    config = work / "bad.toml"
    config.write_text("epochs = 1\nepoch = 2\n")
    return {
        "not a checkpoint": (("connect", text, demo / "net_b.pt"), "not a riemfip checkpoint"),
        "truncated": (("connect", demo / "net_a.pt", truncated), "truncated or corrupted"),
        "architectures differ": (("connect", demo / "net_a.pt", other), "one architecture"),
        "no network inside": (
            ("sparsify", demo / "checkpoints" / "geodesic.pt"),
            "holds no network",
        ),
        "missing dataset folder": (
            ("train", "--data", "cifar10", "--data-root", work / "nowhere"),
            "nowhere",
        ),
        "unknown config key": (("train", "--config", config), "'epoch' is not an option"),
        "out of range": (("demo", "--maxiter", "-1"), "--maxiter must be >= 0"),
        "minibatch option without the route": (
            ("connect", demo / "net_a.pt", demo / "net_b.pt", "--batch-size", "64"),
            "--batch-size is an option of --method minibatch",
        ),
        "held out all the training set": (
            ("connect", demo / "net_a.pt", demo / "net_b.pt", "--method", "minibatch")
            + ("--held-out", "4000"),
            "at least one must be left",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not a checkpoint",
        "truncated",
        "architectures differ",
        "no network inside",
        "missing dataset folder",
        "unknown config key",
        "out of range",
        "minibatch option without the route",
        "held out all the training set",
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(case, demo, other_network, work):
    args, expected = _bad_inputs(demo, other_network, work)[case]
    out = work / f"failed-{case.replace(' ', '-')}"
    done = riemfip(*args, "--out", out)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"riemfip {args[0]}: error: "), lines
    assert expected in lines[0]
    assert not out.exists()  # nothing written


def test_a_non_empty_out_is_refused_and_left_alone(work):
    out = work / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    before = snapshot(out)
    done = riemfip("train", "--data", "digits", "--out", out)
    assert done.returncode == 2 and "--resume" in done.stderr and "--force" in done.stderr
    assert snapshot(out) == before


def test_a_failed_forced_run_leaves_the_previous_run_as_it_was(other_network, work):
    out = other_network.parent
    before = snapshot(out)
    done = riemfip("connect", work / "missing.pt", other_network, "--out", out, "--force")
    assert done.returncode == 2 and "no checkpoint at" in done.stderr
    assert snapshot(out) == before


def test_resume_with_other_options_is_refused(demo, work):
    args = ("--config", work / "small.toml", "--epochs", "2", "--out", demo, "--resume")
    done = riemfip("demo", *args)
    assert done.returncode == 2
    assert "--epochs is 2 here but 1 in the run being resumed" in done.stderr


def test_a_stopped_run_resumes_to_the_uninterrupted_result(demo, work):
    out = work / "stopped"
    args = ("demo", "--config", work / "small.toml", "--out", out, "--quiet")
    # Stop after the 4th checkpoint (net_a, net_b, two geodesic rounds), as Ctrl-C would.
    stopped = riemfip(*args, env={"RIEMFIP_STOP_AFTER": "4"})
    assert stopped.returncode == 130
    assert "interrupted" in stopped.stderr and "--resume" in stopped.stderr
    assert not (out / "record.json").exists()
    assert json.loads((out / "checkpoints" / "run.json").read_text())["command"] == "demo"
    resumed = riemfip(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((out / "record.json").read_text())
    assert record["resumed"] is True
    assert figures(record) == figures(json.loads((demo / "record.json").read_text()))


def test_sigint_saves_and_exits_then_resume_ends_as_uninterrupted(demo, work):
    out = work / "interrupted"
    args = ("demo", "--config", work / "small.toml", "--out", out)
    proc = start(*args, env={"RIEMFIP_WAIT_AFTER": "2"})  # waits after its 2nd checkpoint
    waiting = out / "checkpoints" / "waiting"
    deadline = time.monotonic() + 120
    while not waiting.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert waiting.exists(), "the run never reached its second checkpoint"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; the finished steps are saved in" in err
    assert not list(out.rglob("*.tmp"))  # no half-written checkpoint left behind
    resumed = riemfip(*args, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((out / "record.json").read_text())
    assert figures(record) == figures(json.loads((demo / "record.json").read_text()))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_the_page_renders_its_plots_in_headless_chromium(demo, work):
    from PIL import Image

    shot = work / "report.png"
    profile = work / "chromium-profile"
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={profile}", f"--screenshot={shot}",
        "--window-size=1100,2600", (demo / "report.html").as_uri(),
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = Image.open(shot).convert("RGB")
    colours = {rgb for _, rgb in pixels.getcolors(maxcolors=1 << 20)}

    def near(rgb) -> bool:
        return any(sum(abs(a - b) for a, b in zip(c, rgb, strict=True)) < 30 for c in colours)

    # matplotlib's tab:blue, tab:red, tab:green (the paths) and the bar chart's tab:orange:
    # colours only the embedded plots have.
    for rgb in [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14)]:
        assert near(rgb), f"no pixel near {rgb}: the plots did not render"


def test_config_values_go_through_the_options_own_checks():
    from riemfip.cli.command import build_parser
    from riemfip.cli.config import UsageError, config_defaults

    demo = build_parser()[1]["demo"]
    table = {"hidden": [8, 4], "bezier-epochs": 2, "damping": 1e-3, "quiet": True}
    with pytest.raises(UsageError, match="'quiet' is not an option"):
        config_defaults(demo, table, "f.toml")  # run control stays on the command line
    del table["quiet"]
    assert config_defaults(demo, table, "f.toml") == {
        "hidden": [8, 4],
        "bezier_epochs": 2,
        "damping": 1e-3,
    }
    for bad, message in [
        ({"hidden": 8}, "takes an array"),
        ({"epochs": 1.5}, "invalid value"),
        ({"epochs": True}, "invalid value"),
        ({"metric": "kl"}, "is not one of"),
        ({"tasks": ["0-4", "x"]}, "invalid value"),
    ]:
        with pytest.raises(UsageError, match=message):
            config_defaults(demo, bad, "f.toml")
    assert config_defaults(demo, {"tasks": ["0-2", "3,5"]}, "f.toml") == {
        "tasks": [[0, 1, 2], [3, 5]]
    }
