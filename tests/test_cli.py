"""Tests of the ``lipbound`` command-line tool.

Most cases call ``lipbound.cli.main([...])`` in-process (fast); a few run the INSTALLED console
script in a subprocess (``shutil.which("lipbound")`` next to this Python) to check the real entry
point, exit codes and stderr.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from lipbound.cli import main
from lipbound.methods.lower import lower_bound
from lipbound.report import REPORT_SCHEMA

TESTS = Path(__file__).resolve().parent
FAST = ["--restarts", "2", "--steps", "10", "--quiet"]


def _factories() -> Any:
    spec = importlib.util.spec_from_file_location("test_cli_factories",
                                                  TESTS / "test_cli_factories.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Weights in every supported (and refused) form, written once."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("cli")
    fac = _factories()
    torch.manual_seed(123)
    model = fac.tiny_mlp().eval()
    sd = model.state_dict()
    out = {
        "pt": d / "w.pt",
        "st": d / "w.safetensors",
        "nan": d / "nan.pt",
        "pickled": d / "full.pt",
        "bad": d / "garbage.pt",
    }
    torch.save(sd, out["pt"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out["st"]))
    nan = {k: v.clone() for k, v in sd.items()}
    nan["0.weight"][0, 0] = float("nan")
    torch.save(nan, out["nan"])
    torch.save(model, out["pickled"])  # a pickled whole model: must be refused
    out["bad"].write_bytes(b"not a torch file")
    return out


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch.export archive (dynamic batch) of the tiny MLP with the saved weights."""
    d = tmp_path_factory.mktemp("pt2")
    torch.manual_seed(123)
    model = _factories().tiny_mlp().eval()
    path = d / "tiny.pt2"
    with warnings.catch_warnings():  # torch.export's own deprecation chatter
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (torch.zeros(2, 2),),
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, str(path))
    return path


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _json(out: str) -> dict[str, Any]:
    d = json.loads(out)
    jsonschema.validate(d, REPORT_SCHEMA)
    return d


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lipbound: error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------
# model forms (in-process)
# ------------------------------------------------------------------------------------------
def test_zoo_lists_models(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["zoo"], capsys)
    assert rc == 0
    for name in ("mlp4", "mnist_cnn4", "alexnet", "resnet18", "digits_mlp"):
        assert name in out
    rc, out, _ = run(["zoo", "--json"], capsys)
    assert rc == 0 and json.loads(out)["mnist_cnn4"]["input_shape"] == [1, 28, 28]


def test_zoo_model_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["estimate", "mlp4", "--method", "lower", "--json", *FAST], capsys)
    assert rc == 0, err
    d = _json(out)
    assert d["model"] == "mlp4" and d["input_shape"] == [2]
    assert d["lower"] > 0 and d["methods"][0]["name"] == "lower"


@pytest.mark.parametrize("kind", ["pt", "st"])
def test_factory_with_weights(kind: str, files: dict[str, Path], on_path: None,
                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", "test_cli_factories:tiny_mlp", "--weights", files[kind],
            "--input-shape", "2", "--method", "lower", "--json", "--seed", "4", *FAST]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    d = _json(out)
    # the weights were really loaded: same result as the library on the same weights
    model = _factories().tiny_mlp()
    model.load_state_dict(torch.load(files["pt"], weights_only=True))
    ref = lower_bound(model.eval(), (2,), restarts=2, steps=10, seed=4)
    assert d["lower"] == pytest.approx(ref.value, rel=1e-12)


def test_factory_from_py_file(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", f"{TESTS / 'test_cli_factories.py'}:tiny_mlp", "--weights", files["pt"],
            "-s", "2", "-m", "lower", *FAST]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert "witnessed lower bound" in out


def test_export_archive(pt2: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
                        ) -> None:
    rc, out, err = run(["estimate", pt2, "--method", "lower", "--json", "--seed", "4", *FAST],
                       capsys)
    assert rc == 0, err
    d = _json(out)
    assert d["input_shape"] == [2]  # read from the archive
    model = _factories().tiny_mlp()
    model.load_state_dict(torch.load(files["pt"], weights_only=True))
    ref = lower_bound(model.eval(), (2,), restarts=2, steps=10, seed=4)
    assert d["lower"] == pytest.approx(ref.value, rel=1e-6)


def test_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((20, 2)).astype(np.float32))
    rc, out, err = run(["estimate", "mlp4", "-m", "lower", "--data", path, "--json", *FAST],
                       capsys)
    assert rc == 0, err
    per_method = _json(out)["methods"][0]["extra"]["per_method"]
    assert per_method["data"] > 0
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((5, 3), dtype=np.float32))
    rc, _, err = run(["estimate", "mlp4", "-m", "lower", "--data", bad, *FAST], capsys)
    assert rc == 1 and "expected (N, 2)" in _one_line_error(err)


def test_markdown_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "bounds.png"
    methods = "lower,autolip"
    rc, out, err = run(["estimate", "mlp4", "-m", methods, "--markdown", "--plot", png, *FAST],
                       capsys)
    assert rc == 0, err
    assert out.startswith("## Lipschitz report of mlp4")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["estimate", "--help"], capsys)
    assert rc == 0 and "--input-shape" in out and "pickled" in out.lower()
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.startswith("lipbound ")
    rc, _, err = run([], capsys)
    assert rc == 2 and "estimate" in err


# ------------------------------------------------------------------------------------------
# errors: exit code + one line, never a traceback
# ------------------------------------------------------------------------------------------
ERROR_CASES = [
    # (argv with {placeholders}, exit code, words expected in the message)
    (["estimate", "tcf:tiny_mlp", "--weights", "{missing}", "-s", "2"], 2, "not found"),
    (["estimate", "{missing_pt2}"], 2, "not found"),
    (["estimate", "tcf:tiny_mlp", "--weights", "{pt}", "-s", "3", "-m", "lower"], 1,
     "input of shape (3,)"),
    (["estimate", "mlp4", "-s", "2,x"], 2, "--input-shape"),
    (["estimate", "mlp4", "-s", "1,2,3,x"], 2, "--input-shape"),
    (["estimate", "tcf:wide_mlp", "--weights", "{pt}", "-s", "2"], 1, "do not match"),
    (["estimate", "tcf:tiny_mlp", "--weights", "{nan}", "-s", "2"], 1, "NaN"),
    (["estimate", "{pickled}"], 1, "arbitrary code"),
    (["estimate", "tcf:tiny_mlp", "--weights", "{pickled}", "-s", "2"], 1, "arbitrary code"),
    (["estimate", "tcf:tiny_mlp", "--weights", "{bad}", "-s", "2"], 1, "cannot read"),
    (["estimate", "{pt}"], 2, "architecture"),
    (["estimate", "no_such_model"], 2, "unknown model"),
    (["estimate", "mlp4", "-m", "lower,magic"], 2, "unknown method"),
    (["estimate", "mlp4", "--frobnicate"], 2, "unrecognized"),
    (["estimate", "mlp4", "--norm", "3"], 2, "invalid choice"),
    (["estimate", "tcf:tiny_mlp"], 2, "--input-shape is required"),
    (["estimate", "tcf:not_a_module", "-s", "2"], 1, "not an nn.Module"),
    (["estimate", "no_such_pkg_xyz:f", "-s", "2"], 2, "cannot import"),
    (["estimate", "tcf:no_such_factory", "-s", "2"], 2, "no attribute"),
]


@pytest.mark.parametrize(("argv", "code", "words"), ERROR_CASES)
def test_errors_are_one_line(argv: list[str], code: int, words: str, files: dict[str, Path],
                             on_path: None, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    subst = {f"{{{k}}}": str(v) for k, v in files.items()}
    subst["{missing}"] = str(tmp_path / "missing.pt")
    subst["{missing_pt2}"] = str(tmp_path / "missing.pt2")
    args = [subst.get(a, a).replace("tcf:", "test_cli_factories:") for a in argv]
    rc, _, err = run([*args, "--quiet"], capsys)
    assert rc == code, err
    line = _one_line_error(err)
    assert words in line
    if words == "arbitrary code":  # says what to do instead
        assert "state_dict" in line and "torch.export" in line


def test_unsupported_op(on_path: None, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["estimate", "test_cli_factories:square", "-s", "2", "-m", "autolip", "-q"],
                     capsys)
    assert rc == 1
    line = _one_line_error(err)
    assert "rule" in line.lower() or "unsupported" in line.lower()
    # the lower bound needs no rules and still works on it
    rc, _, err = run(["estimate", "test_cli_factories:square", "-s", "2", "-m", "lower",
                        *FAST], capsys)
    assert rc == 0, err


# ------------------------------------------------------------------------------------------
# the installed console script (subprocess)
# ------------------------------------------------------------------------------------------
def _script() -> str:
    exe = shutil.which("lipbound", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("the 'lipbound' console script is not installed next to this Python")
    return exe


def _sub(args: list[Any], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1")
    return subprocess.run([_script(), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_script_factory_safetensors_json(files: dict[str, Path]) -> None:
    p = _sub(["estimate", "test_cli_factories:tiny_mlp", "--weights", files["st"],
              "--input-shape", "2", "--method", "lower", "--json", *FAST])
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # --quiet: no progress output
    d = _json(p.stdout)
    assert d["lower"] > 0


def test_script_refuses_pickled_model(files: dict[str, Path]) -> None:
    p = _sub(["estimate", files["pickled"]])
    assert p.returncode == 1
    line = _one_line_error(p.stderr)
    assert "arbitrary code" in line and "torch.nn.modules.container.Sequential" in line


def test_demo(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's main-job command (in-process: same code as the script, no start-up cost)."""
    rc, out, err = run(["demo", "--quiet"], capsys)
    assert rc == 0, err
    for words in ("certified upper bound", "witnessed lower bound", "gap (upper / lower)",
                  "paper_mlp(4)"):
        assert words in out
