"""The atheris harnesses of fuzz/: always replayed on their seeds (cheap: the harness code
cannot rot), and fuzzed for ``DEVICEGATE_FUZZ_SECONDS`` each when that is set (CI sets
20; ``make fuzz`` runs them longer through fuzz/run.sh)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("atheris", reason="pip install atheris")

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
HARNESSES = sorted(path.stem for path in FUZZ.glob("fuzz_*.py"))
SECONDS = os.environ.get("DEVICEGATE_FUZZ_SECONDS")


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fuzz_harness_{name}", FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("seeds")
    seeds = load("seeds")
    seeds.main(str(directory))
    return directory


def test_there_are_harnesses() -> None:
    assert {"fuzz_codec", "fuzz_event_codec", "fuzz_proxy"} <= set(HARNESSES)


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_passes_its_seeds(name: str, seeds: Path) -> None:
    harness = load(name)
    corpus = sorted((seeds / name.removeprefix("fuzz_")).iterdir())
    assert corpus
    for seed in corpus:
        data = seed.read_bytes()
        for cut in range(0, len(data), 7):  # and prefixes: NEED_DATA paths
            harness.TestOneInput(data[:cut])
        harness.TestOneInput(data)


@pytest.mark.skipif(not SECONDS, reason="set DEVICEGATE_FUZZ_SECONDS to fuzz in the suite")
@pytest.mark.parametrize("name", HARNESSES)
def test_harness_fuzzes_clean(name: str, seeds: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in (seeds / name.removeprefix("fuzz_")).iterdir():
        (corpus / seed.name).write_bytes(seed.read_bytes())
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ / f"{name}.py"),
            str(corpus),
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=1024",
            "-timeout=10",
            "-max_len=8192",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=int(SECONDS or 0) + 60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
