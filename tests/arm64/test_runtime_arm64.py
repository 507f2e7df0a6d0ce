"""The edge client's runtime on aarch64 (issue 9), under qemu-user in a cached arm64 userland.

ai-edge-litert's aarch64 build crashed (segfault) in every ``train`` call of
models with rank-0 signature inputs, which x86 CI never sees. This test
converts a small CNN on the host, then runs one board session
(``arm64_session.py``: load, set_weights, train steps, evaluate, get_weights,
train_local, LiteRT's own SignatureRunner, and refusing pre-fix models) with
Debian's arm64 python3.11 and the aarch64 wheels, and compares it with the same
session on the host. qemu is ~600x slower than a board: this proves
correctness, not speed.

Needs root, util-linux's unshare, qemu-user-static and the userland of
scripts/arm64_userland.sh; ``scripts/setup.sh --dev`` installs all of it.
When something is missing the test fails and says what, it never skips.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.arm64.legacy import convert_legacy, save_legacy
from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.arm64]

SESSION = Path(__file__).with_name("arm64_session.py")
INSTALL = "run scripts/setup.sh --dev (it installs qemu-user-static with apt-get and runs scripts/arm64_userland.sh)"
RECONVERT = "re-convert the model with the current litefed-convert"
BATCH, EXAMPLES, CLASSES, SIDE = 8, 64, 3, 8


def _userland_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "litefed" / "arm64-bookworm"
    return Path(os.environ.get("LITEFED_ARM64_ROOT") or default)


def _missing() -> list[str]:
    """What this machine lacks to run the arm64 session, each with how to get it."""
    missing = []
    if not sys.platform.startswith("linux"):
        return [f"a Linux host (this is {sys.platform})"]
    if os.geteuid() != 0:
        missing.append("root (unshare -m, mount and chroot need it); run the tests as root")
    tools = {"unshare": "util-linux", "chroot": "coreutils", "qemu-aarch64-static": "qemu-user-static"}
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            missing.append(f"{tool} (apt-get install {package})")
    check = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "arm64_userland.sh"), "--check"], capture_output=True, text=True
    )
    if check.returncode != 0:
        missing.append(f"the arm64 userland at {_userland_root()} (bash scripts/arm64_userland.sh)")
    return missing


@pytest.fixture(scope="module")
def arm64_root() -> Path:
    missing = _missing()
    if missing:
        pytest.fail(f"the arm64 test cannot run here: missing {'; '.join(missing)}. To fix: {INSTALL}", pytrace=False)
    return _userland_root()


def _small_cnn():
    """Conv2D -> MaxPool -> Dense on 8x8x1 inputs, Adam (whose step counter is a scalar state tensor)."""
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((SIDE, SIDE, 1)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(CLASSES, activation="softmax", name="out"),
        ],
        name="arm64_cnn",
    )
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.Adam(0.01))
    return model


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c lights up quadrant c of a noisy image: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, EXAMPLES).astype(np.int32)
    x = rng.uniform(0.0, 0.2, (EXAMPLES, SIDE, SIDE, 1)).astype(np.float32)
    half = SIDE // 2
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, r * half : (r + 1) * half, col * half : (col + 1) * half, 0] += 0.8
    return x, y


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The converted model, its data and start weights, two pre-fix models, and the session script."""
    from converter import ConvertConfig, convert_model
    from edge_client.runtime import TrainableModel
    from tests.helpers import build_small_cnn

    work = tmp_path_factory.mktemp("arm64")
    converted = convert_model(_small_cnn(), ConvertConfig(batch_size=BATCH, verify=False))
    converted.save(work / "model.tflite")
    start = TrainableModel(converted.tflite, converted.manifest).get_weights()
    x, y = _data()
    arrays = {f"w{i}": a for i, (_, a) in enumerate(start)}
    np.savez(work / "data.npz", x=x, y=y, names=json.dumps([n for n, _ in start]), **arrays)

    tflite, manifest = convert_legacy(build_small_cnn(seed=3, name="legacy_cnn"), batch_size=4)
    save_legacy(tflite, manifest, work / "legacy_rank0.tflite")
    save_legacy(tflite, manifest, work / "legacy_v1.tflite", format_version=1)
    shutil.copy(SESSION, work / SESSION.name)
    return work


@pytest.fixture(scope="module")
def arm64_result(arm64_root, workdir) -> dict:
    """The session under qemu-aarch64, in the arm64 userland (one run for both tests)."""
    run = REPO_ROOT / "scripts" / "arm64_run.sh"
    cmd = ["bash", str(run), str(arm64_root), str(workdir), f"/work/{SESSION.name}", "/work", "aarch64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the aarch64 session failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads((workdir / "result-aarch64.json").read_text())


def _host_session(run_without_tensorflow, work: Path) -> dict:
    """The same session on the host's own interpreter, with TensorFlow blocked."""
    machine = platform.machine()
    argv = ["arm64_session.py", str(work), machine]
    code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path({str(SESSION)!r}, run_name='__main__')"
    proc = run_without_tensorflow(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / f"result-{machine}.json").read_text())


def test_edge_runtime_trains_on_aarch64_as_on_the_host(arm64_result, workdir, run_without_tensorflow):
    arm = arm64_result
    host = _host_session(run_without_tensorflow, workdir)

    assert arm["machine"] == "aarch64" and host["machine"] != "aarch64"
    assert not arm["tensorflow_importable"]
    # It learns on aarch64: the train loss falls, and so does the evaluated loss.
    losses = arm["losses"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert arm["after"][0] < arm["before"][0], (arm["before"], arm["after"])
    assert arm["train_local"]["num_examples"] == 64 and arm["train_local"]["epochs"] == 1
    # And it computes what the x86 build computes (different kernels: float round-off only).
    np.testing.assert_allclose(losses, host["losses"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arm["before"] + arm["after"], host["before"] + host["after"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arm["train_local"]["loss"], host["train_local"]["loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arm["plain_runner_loss"], host["plain_runner_loss"], rtol=1e-4, atol=1e-5)
    # Signature checks (the cryptography wheel's Ed25519) work on aarch64 as on the host.
    assert arm["signing"] == host["signing"] == {"opens": True, "tampered": "bad_signature"}
    with np.load(workdir / "weights-aarch64.npz") as a, np.load(workdir / f"weights-{platform.machine()}.npz") as h:
        assert sorted(a.files) == sorted(h.files) and "optimizer/iterations" in a.files
        assert a["optimizer/iterations"].tolist() == [8.0]
        for name in h.files:
            np.testing.assert_allclose(a[name], h[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_prefix_models_are_refused_on_aarch64_not_crashed(arm64_result):
    """The regression itself: a rank-0 train input segfaulted here; now it is a re-convert message."""
    legacy = arm64_result["legacy"]
    assert set(legacy) == {"legacy_rank0.tflite", "legacy_v1.tflite"}
    assert "rank-0 inputs ['lr', 'mu']" in legacy["legacy_rank0.tflite"], legacy
    assert "format_version 1" in legacy["legacy_v1.tflite"], legacy
    assert all(RECONVERT in message for message in legacy.values()), legacy
