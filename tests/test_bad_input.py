"""Bad input fails in seconds with one line (file or option, key, value, what is allowed) and a non-zero exit code,
never a traceback (``--debug`` shows one): ``csl train``, ``csl-search run|resume|compare`` and the studies.

Most cases call the commands' ``main`` in this process (the same code a shell runs); one of each command runs as a
real process to show that nothing else reaches the terminal.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, search_env
from tests.drivers import space_text

# label_free_samples 0: else csl train says on stderr that 64 images are too few to hold any out
TINY = ["--method", "simclr", "--width", "0.0625", "--train_limit", "64", "--test_limit", "32", "--batch_size", "16",
        "--epochs", "1", "--device", "cpu", "--proj_dim", "16", "--proj_hidden", "32",
        "--label_free_samples", "0"]  # fmt: skip


def one_line(main, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1, err.getvalue()
    assert "Traceback" not in err.getvalue()
    return code, lines[0]


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad-data")
    (folder / "empty").mkdir()
    corrupt = folder / "corrupt" / "cat"
    corrupt.mkdir(parents=True)
    for i in range(4):
        (corrupt / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg " * (i + 1))
    pq.write_table(pa.table({"pixels": [1, 2]}), folder / "columns.parquet")
    pq.write_table(pa.table({"image": [b"\xff\xd8\xffgarbage", b"nope"], "label": [0, 1]}), folder / "garbage.parquet")
    for name, content in (("ck-empty", b""), ("ck-cut", b"PK\x03\x04 cut short")):
        (folder / name).mkdir()
        (folder / name / "state.pt").write_bytes(content)
    return folder


@pytest.mark.parametrize(("extra", "expected"), [
    (["--batch_size", "100000"], "batch_size 100000 is larger than the training set (64 images)"),
    (["--epochs", "1000000000000"], "epochs must be at most 100,000"),
    (["--data", "parquet:/nonexistent/csl"], "no parquet file or folder at /nonexistent/csl"),
    (["--data", "imagefolder:{data}/empty"], "no images in {data}/empty"),
    (["--data", "parquet:{data}/columns.parquet"], "columns.parquet: no image column"),
    (["--data", "parquet:{data}/garbage.parquet"], "garbage.parquet: row 0: not a decodable image"),
    (["--data", "imagefolder:{data}/corrupt", "--batch_size", "2", "--train_limit", "4"], ".jpg: not a readable image"),
    (["--data", "cifar10", "--data_root", "{data}/nowhere"], "CIFAR-10 not found in {data}/nowhere"),
    (["--resume", "{data}/ck-empty"], "ck-empty/state.pt: damaged checkpoint"),
    (["--resume", "{data}/ck-cut"], "ck-cut/state.pt: damaged checkpoint"),
    (["--resume", "{data}/nowhere"], "nowhere/state.pt: no checkpoint there"),
    (["--loss", "nope"], "unknown loss 'nope'; choose one of"),
], ids=["batch", "epochs", "parquet-missing", "folder-empty", "parquet-columns", "parquet-garbage", "jpeg-corrupt",
        "cifar-offline", "checkpoint-empty", "checkpoint-cut", "checkpoint-missing", "unknown-choice"])  # fmt: skip
def test_csl_train_bad_input_is_one_line_and_exit_2(bad_data: Path, extra: list[str], expected: str) -> None:
    from csl.cli import main

    argv = ["train", *TINY, *(a.replace("{data}", str(bad_data)) for a in extra)]
    code, line = one_line(main, argv)
    assert code == 2 and line.startswith("csl: error: "), line
    assert expected.replace("{data}", str(bad_data)) in line, line


def test_csl_debug_shows_the_traceback(bad_data: Path) -> None:
    from csl.cli import main

    with pytest.raises(FileNotFoundError):
        main(["train", *TINY, "--data", "parquet:/nonexistent/csl", "--debug"])


def test_csl_train_in_a_real_process_prints_only_the_line(bad_data: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "csl.cli", "train", *TINY, "--resume", str(bad_data / "ck-cut")],
                         cwd=REPO, env=search_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "damaged checkpoint" in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------------- csl-search


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


GOOD = space_text("bad", epochs=1, samples=1)


@pytest.mark.parametrize(("change", "key", "allowed"), [
    (("batch_size: 16", "batch_size: -64"), "fixed.batch_size", "at least 1"),
    (("batch_size: 16", "batch_size: 128"), "fixed.batch_size", "a batch_size from 1 to 64"),
    (("epochs: 1,", "epochs: 1000000000000,"), "budget.epochs", "an int from 1 to 100,000"),
    (("metric: ssl_loss", "metric: accuracy"), "metric", "knn_acc"),
    (("mode: min", "mode: max"), "mode", "min"),
    (("mode: min", "mode: lowest"), "mode", "max, min"),
    (("batch_size: 16", "batch_size: 16\n  workers_per_trial: 3"), "fixed.batch_size", "a multiple of 3"),
], ids=["negative-batch", "batch-above-limit", "epochs", "metric", "mode-against-metric", "mode",
        "batch-not-divisible-by-workers"])  # fmt: skip
def test_the_validator_refuses_what_cannot_run(tmp_path: Path, change: tuple[str, str], key: str,
                                               allowed: str) -> None:  # fmt: skip
    from search.cli import main

    space = write(tmp_path, "bad", GOOD.replace(*change))
    code, line = one_line(main, ["run", str(space), "--storage", str(tmp_path / "runs")])
    assert code == 2 and line.startswith(f"csl-search: error: {space}: {key}: "), line
    tail = line.split("allowed:")[-1] if "allowed:" in line else line.split("choose one of:")[-1]
    assert allowed in tail, line
    assert not (tmp_path / "runs").exists()  # nothing was made


def test_storage_that_cannot_be_written_fails_at_once(tmp_path: Path, mlflow_server: str) -> None:
    """Under a regular file, under /proc: one line naming --storage, before any MLflow run is made."""
    from mlflow import MlflowClient

    from search.cli import main

    space = write(tmp_path, "bad", GOOD)
    (tmp_path / "file").write_text("")
    client = MlflowClient(mlflow_server)
    before = len(client.search_experiments())
    for storage in (tmp_path / "file" / "runs", Path("/proc/csl-search-test")):
        code, line = one_line(main, ["run", str(space), "--storage", str(storage), "--mlflow-uri", mlflow_server,
                                     "--experiment", "csl-test-storage"])  # fmt: skip
        assert code == 2 and line.startswith(f"csl-search: error: --storage {storage}: cannot write there"), line
    assert len(client.search_experiments()) == before  # no experiment, no parent run left RUNNING


def test_an_existing_experiment_folder_is_refused(tmp_path: Path) -> None:
    from search.cli import main

    space = write(tmp_path, "bad", GOOD)
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    code, line = one_line(main, ["run", str(space), "--storage", str(tmp_path / "runs"), "--name", "taken"])
    assert code == 2 and "taken: the experiment folder exists; allowed: a new --name, or csl-search resume" in line


def test_resume_and_compare_of_the_wrong_folder_say_so(tmp_path: Path) -> None:
    from search.cli import main

    code, line = one_line(main, ["resume", str(tmp_path)])
    assert code == 1 and f"{tmp_path}: not a csl-search experiment folder (no csl_search.json)" in line
    (tmp_path / "csl_search.json").write_text('{"name": "cut sh')
    code, line = one_line(main, ["resume", str(tmp_path)])
    assert code == 1 and "csl_search.json: damaged" in line
    code, line = one_line(main, ["compare", "--experiment", "x", "--storage", str(tmp_path / "nowhere")])
    assert code == 2 and "no MLflow store there" in line
    assert not (tmp_path / "nowhere").exists()  # reading never creates a store


def test_csl_search_in_a_real_process_prints_only_the_line(tmp_path: Path) -> None:
    space = write(tmp_path, "bad", GOOD.replace("batch_size: 16", "batch_size: -64"))
    out = subprocess.run([sys.executable, "-m", "search", "run", str(space), "--storage", str(tmp_path)],
                         cwd=REPO, env=search_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "fixed.batch_size" in out.stderr, out.stderr


def test_a_study_with_bad_input_is_one_line(tmp_path: Path) -> None:
    from experiments.encoder_robustness import main

    (tmp_path / "file").write_text("")
    code, line = one_line(main, ["--scale", "smoke", "--storage", str(tmp_path / "file" / "runs")])
    assert code == 2 and line.startswith("python -m experiments.encoder_robustness: error: --storage"), line
