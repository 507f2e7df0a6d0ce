"""README.md works when pasted: its code blocks run in order, as written (see tests/readme_blocks.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.readme_blocks import ROOT, RUNNABLE, parse

README = (ROOT / "README.md").read_text()
BLOCKS = parse(README)


def test_every_code_block_is_run_or_says_why_not():
    for block in BLOCKS:
        assert block.lang, f"{block.label}: say the block's language (sh, python, toml, text)"
        if block.lang in RUNNABLE and block.directive("skip") is not None:
            assert block.directive("skip"), f"{block.label}: a skipped block says why"
    runnable = [b for b in BLOCKS if b.lang in RUNNABLE and b.directive("skip") is None]
    assert {b.lang for b in runnable} == set(RUNNABLE)
    assert len(runnable) >= 10, "most of the README's blocks are run"
    for block in runnable:
        block.script()  # every `replace` still matches its block


def test_directives_bind_to_the_block_below():
    text = "<!-- readme-test: skip no -->\n\ntext\n```sh\nls\n```\n<!-- readme-test: timeout 5 -->\n```sh\nls\n```\n"
    blocks = parse(text)
    assert blocks[0].directives == [] and blocks[1].directive("timeout") == "5"


@pytest.mark.slow
@pytest.mark.timeout(900)  # the whole walkthrough, main job included: ~4.5 min here, more on a loaded machine
def test_readme_blocks_run_as_pasted(tmp_path):
    """The whole README, top to bottom, in a copy of the checkout and a private network namespace."""
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    assert not missing, f"the README test needs {missing} (util-linux, iproute2) and root for a network namespace"
    workdir = tmp_path / "checkout"
    done = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-m", "tests.readme_blocks", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    ran = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    expected = [b for b in BLOCKS if (b.lang in RUNNABLE or b.directive("config") is not None)]
    assert len(ran) == len([b for b in expected if b.directive("skip") is None]), report
    # What the walkthrough promises exists, with the rounds it asked for.
    assert (workdir / "build/mnist_cnn.tflite").is_file() and (workdir / "build/mnist_cnn.json").is_file()
    for run, rounds in (("runs/demo", 5), ("runs/mnist", 3), ("runs/sim", 5), ("runs/noniid", 1)):
        lines = (workdir / run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["round"] for line in lines] == list(range(1, rounds + 1)), run
    assert (workdir / "compare.png").stat().st_size > 10_000
