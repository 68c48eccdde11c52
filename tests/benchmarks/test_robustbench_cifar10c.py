"""benchmarks/robustbench_cifar10c.py end to end on tiny CIFAR-10-C-format files the test writes:
weights imported through pipeline.model_import, files read through the cifar-c importer, every
default method on one continual stream; and its one-line errors for missing files.

The full-size architecture (wrn28_10) costs seconds per forward on this CPU, so the method
sweep runs a small zoo model through the same code; wrn28_10 itself runs the --smoke path
with the two cheapest methods on one corruption."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rgb_helpers import write_cifar_c, write_cifar_python

from pipeline.errors import TTTPipeError

ROOT = Path(__file__).resolve().parents[2]
N = 4  # images per severity block
NAMES = ("gaussian_noise", "shot_noise")  # the corruptions written


def _script():
    spec = importlib.util.spec_from_file_location("robustbench_cifar10c",
                                                  ROOT / "benchmarks" / "robustbench_cifar10c.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small_weights(path: Path) -> torch.nn.Module:
    from pipeline.datasets import get_dataset
    from pipeline.model_spec import build_model_from_spec, resolve_model_spec

    torch.manual_seed(3)
    model = build_model_from_spec(resolve_model_spec("seed_cnn_bn", get_dataset("cifar10"))).eval()
    torch.save(model.state_dict(), path)
    return model


def test_every_default_method_runs_the_continual_stream(tmp_path, capsys):
    labels, arrays = write_cifar_c(tmp_path / "c10c", N, NAMES)
    labels = labels.astype(np.int64)
    write_cifar_python(tmp_path / "c10", n_train=12, n_test=4)
    model = _small_weights(tmp_path / "w.pt")
    res = _script().main([
        "--weights", str(tmp_path / "w.pt"), "--model", "seed_cnn_bn",
        "--cifar10c-dir", str(tmp_path / "c10c"), "--cifar10-dir", str(tmp_path / "c10"),
        "--corruptions", "gaussian_noise,shot_noise", "--batch-size", "2",
        "--methods", "source,norm,tent,eata,sar,cotta,lame"])
    assert list(res["methods"]) == ["source", "norm", "tent", "eata", "sar", "cotta", "lame"]
    assert res["n_images"] == 2 * N and res["batch_size"] == 2
    for r in res["methods"].values():
        assert list(r["errors"]) == ["gaussian_noise", "shot_noise"]
        assert all(0.0 <= e <= 100.0 and (e * N / 100).is_integer() for e in r["errors"].values())
    # the source row is the imported model on severity 5's rows, in file order
    for name, array in arrays.items():
        x = torch.from_numpy(array[4 * N:].transpose(0, 3, 1, 2).copy()).float() / 255.0
        with torch.no_grad():
            wrong = (model(x).argmax(1) != torch.from_numpy(labels)).double().mean()
        assert res["methods"]["source"]["errors"][name] == pytest.approx(100 * float(wrong))
    out = capsys.readouterr().out
    assert "| source |" in out and "| 43.5 |" in out and "| cotta |" in out and "| 16.5 |" in out


def test_wrn28_10_smoke_runs_random_init(tmp_path):
    write_cifar_c(tmp_path / "c10c", N, names=("gaussian_noise",))
    res = _script().main(["--smoke", "--cifar10c-dir", str(tmp_path / "c10c"),
                          "--corruptions", "gaussian_noise", "--methods", "source,norm"])
    assert res["smoke"] and res["n_images"] == 2 and res["batch_size"] == 2
    assert set(res["methods"]) == {"source", "norm"}


@pytest.mark.parametrize("case, message", [
    ("no_dir", "is not a folder; download CIFAR-10-C"),
    ("no_labels", "has no labels.npy"),
    ("no_corruption", r"has no impulse_noise.npy \(1 file\(s\) missing\)"),
    ("no_weights", "--weights is required"),
    ("weights_gone", "does not exist"),
    ("eata_no_cifar10", "eata needs clean training images"),
    ("joint_method", "ttt needs its joint checkpoint"),
])
def test_missing_files_are_one_line(tmp_path, case, message):
    src = tmp_path / "c10c"
    write_cifar_c(src, N, NAMES)
    (tmp_path / "w.pt").write_bytes(b"")
    argv = ["--cifar10c-dir", str(src), "--weights", str(tmp_path / "w.pt"),
            "--corruptions", "gaussian_noise,shot_noise", "--methods", "source"]
    if case == "no_dir":
        argv[1] = str(tmp_path / "nowhere")
    elif case == "no_labels":
        (src / "labels.npy").unlink()
    elif case == "no_corruption":
        argv[5] = "gaussian_noise,impulse_noise"
    elif case == "no_weights":
        argv = argv[:2] + argv[4:]
    elif case == "weights_gone":
        argv[3] = str(tmp_path / "gone.pt")
    elif case == "eata_no_cifar10":
        argv[-1] = "source,eata"
    elif case == "joint_method":
        argv[-1] = "ttt"
    with pytest.raises(TTTPipeError, match=message) as info:
        _script().main(argv)
    assert "\n" not in str(info.value)


def test_cli_exit_code_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "robustbench_cifar10c.py"),
                           "--cifar10c-dir", str(tmp_path / "nowhere"), "--smoke"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "is not a folder" in proc.stderr
