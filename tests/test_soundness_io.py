"""Soundness and safety of model loading and of the CLI (files, security, exit codes).

Crafted ``torch.export`` archives are built here from a real one: each plants a payload that,
if torch ever ran it, would create a marker file. Each test asserts that the marker does NOT
exist and that the CLI says why in ONE line with exit code 1. Loaded archives are checked end
to end THROUGH THE CLI against a realised truth (the dense float64 Jacobian norm).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lipbound.cli import main

FAST = ["--restarts", "2", "--steps", "10", "--quiet"]
NORMS = {"1": 1.0, "2": 2.0, "inf": float("inf")}


def _mlp() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def _linear() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).eval()


def _export(model: nn.Module, path: Path, n_in: int, dynamic: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamic:
            ep = torch.export.export(model, (torch.zeros(2, n_in),),
                                     dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            ep = torch.export.export(model, (torch.zeros(1, n_in),))
        torch.export.save(ep, str(path))
    return path


def _run(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lipbound: error: ") and "Traceback" not in err
    return lines[0]


def _op_norm(a: torch.Tensor, norm: str) -> float:
    """Operator norm of a float64 matrix in l1 / l2 / l-inf (true value, no bound)."""
    if norm == "2":
        return float(torch.linalg.matrix_norm(a, ord=2))
    if norm == "1":
        return float(a.abs().sum(0).max())
    return float(a.abs().sum(1).max())


# ------------------------------------------------------------------------------------------
# crafted archives
# ------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (open, (self.marker, "w"))


def _pickled(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    return buf.getvalue()


def _rezip(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy the archive ``src`` to ``dst`` after ``edit`` changed its {relative name: bytes}."""
    with zipfile.ZipFile(src) as zf:
        names = zf.namelist()
        root = names[0].split("/", 1)[0] + "/"
        entries = {n[len(root):]: zf.read(n) for n in names}
    edit(entries)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for rel, data in entries.items():
            zf.writestr(root + rel, data)
    return dst


def _edit_json(entries: dict[str, bytes], rel: str, change: Callable[[Any], None]) -> None:
    obj = json.loads(entries[rel])
    change(obj)
    entries[rel] = json.dumps(obj).encode()


def _pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(e: dict[str, bytes]) -> None:
        def change(cfg: Any) -> None:
            meta = cfg["config"]["0.weight"]
            meta["use_pickle"] = True
            e["data/weights/" + meta["path_name"]] = _pickled(marker)
        _edit_json(e, "data/weights/model_weights_config.json", change)
    return edit


def _legacy_weights(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(e: dict[str, bytes]) -> None:
        e["data/weights/model.pt"] = _pickled(marker)
    return edit


def _sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(e: dict[str, bytes]) -> None:
        e["data/sample_inputs/model.pt"] = _pickled(marker)
    return edit


def _opaque_constant(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(e: dict[str, bytes]) -> None:
        def change(cfg: Any) -> None:
            cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False,
                                     "use_pickle": True, "tensor_meta": None}
        _edit_json(e, "data/constants/model_constants_config.json", change)
        e["data/constants/opaque_obj_0"] = pickle.dumps(_Payload(marker))
    return edit


def _sympy_eval(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(e: dict[str, bytes]) -> None:
        text = e["models/model.json"].decode()
        old = "Symbol('s"
        assert old in text  # the dynamic batch symbol
        code = f"__import__('builtins').open({str(marker)!r}, 'w') and Symbol('s"
        e["models/model.json"] = text.replace(old, json.dumps(code)[1:-1], 1).encode()
    return edit


def _guard_code(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(e: dict[str, bytes]) -> None:
        def change(prog: Any) -> None:
            prog["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]
        _edit_json(e, "models/model.json", change)
    return edit


def _os_system_node(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(e: dict[str, bytes]) -> None:
        def change(prog: Any) -> None:
            node = prog["graph_module"]["graph"]["nodes"][1]  # the ReLU
            node["target"] = "torch.os.system"
            node["inputs"] = [{"name": "command", "kind": 1,
                               "arg": {"as_string": f"touch {marker}"}}]
        _edit_json(e, "models/model.json", change)
    return edit


CRAFTED = {
    "pickled_weight": (_pickled_weight, "use_pickle"),
    "legacy_weights": (_legacy_weights, "data/weights/model.pt"),
    "sample_inputs": (_sample_inputs, "sample inputs"),
    "opaque_constant": (_opaque_constant, "use_pickle"),
    "sympy_eval": (_sympy_eval, "eval"),
    "guard_code": (_guard_code, "guards_code"),
    # torch's own verifier refuses this one too (after lipbound's check, a second layer)
    "os_system_node": (_os_system_node, "system"),
}


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(_mlp(), tmp_path_factory.mktemp("pt2") / "mlp.pt2", 2)


def test_rezipped_archive_still_loads(good_pt2: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The crafting helper alone changes nothing: a re-zipped copy loads and runs."""
    copy = _rezip(good_pt2, tmp_path / "copy.pt2", lambda e: None)
    rc, out, err = _run(["estimate", copy, "-m", "lower", "--json", *FAST], capsys)
    assert rc == 0, err
    assert json.loads(out)["lower"] > 0


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_regression_pt2_archive_runs_no_code(kind: str, good_pt2: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """torch.export.load would run the payload (unpickling with weights_only=False, eval of a
    sympy string, exec of guard code, a graph node calling torch.os.system); lipbound refuses
    the archive before any of it runs."""
    marker = tmp_path / "PWNED"
    make, words = CRAFTED[kind]
    bad = _rezip(good_pt2, tmp_path / f"{kind}.pt2", make(marker))
    rc, _, err = _run(["estimate", bad, "-m", "lower", *FAST], capsys)
    assert not marker.exists(), f"the {kind} payload ran"
    assert rc == 1, err
    line = _one_line(err)
    assert words in line, line
    assert "refusing torch.export archive" in line or kind == "os_system_node", line


def test_regression_pt2_aotinductor_and_legacy_refused(good_pt2: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Shared libraries (AOTInductor) are loaded by torch; pre-2.8 archives are all pickle."""
    def aoti(e: dict[str, bytes]) -> None:
        e["data/aotinductor/model/model.so"] = b"\x7fELF"
    bad = _rezip(good_pt2, tmp_path / "aoti.pt2", aoti)
    rc, _, err = _run(["estimate", bad, "-m", "lower", *FAST], capsys)
    assert rc == 1 and "data/aotinductor/model/model.so" in _one_line(err)
    legacy = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(legacy, "w") as zf:
        zf.writestr("version", "8.0")
        zf.writestr("serialized_state_dict.pt", _pickled(tmp_path / "PWNED"))
    rc, _, err = _run(["estimate", legacy, "-m", "lower", *FAST], capsys)
    assert rc == 1 and "refusing" in _one_line(err)
    assert not (tmp_path / "PWNED").exists()
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    rc, _, err = _run(["estimate", junk, "-m", "lower", *FAST], capsys)
    assert rc == 1 and "not a zip archive" in _one_line(err)


# ------------------------------------------------------------------------------------------
# .pt2 end to end through the CLI
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_regression_pt2_capture_train_eval(norm: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Every .pt2 failed in capture (the exported module's train()/eval() raise
    NotImplementedError). Now autolip + seqlip run on it, and the certified bound of a linear
    net is >= its true operator norm (= its Lipschitz constant) in every norm."""
    model = _linear()
    path = _export(model, tmp_path / "lin.pt2", 3)
    rc, out, err = _run(["estimate", path, "--input-shape", "3", "-m", "lower,autolip,seqlip",
                         "--norm", norm, "--json", *FAST], capsys)
    assert rc == 0, err
    d = json.loads(out)
    x = torch.zeros(3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(model.double(), x)
    truth = _op_norm(jac, norm)
    assert d["upper"] is not None and d["upper"] >= truth * (1 - 1e-12)
    assert d["upper"] <= truth * 1.01  # linear chain: AutoLip/SeqLip are tight
    assert d["lower"] <= truth * (1 + 1e-9)


def test_regression_pt2_static_batch_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    """An archive exported with a batch of 1 runs sample by sample: the lower bound works (and
    is below the truth); capture-based methods fail with one line saying how to re-export."""
    model = _mlp()
    path = _export(model, tmp_path / "b1.pt2", 2, dynamic=False)
    rc, out, err = _run(["estimate", path, "-m", "lower", "--json", *FAST], capsys)
    assert rc == 0, err
    d = json.loads(out)
    assert d["input_shape"] == [2]
    assert 0 < d["lower"] <= _upper_mlp(_mlp().double()) * (1 + 1e-9)
    rc, _, err = _run(["estimate", path, "-m", "autolip", *FAST], capsys)
    assert rc == 1 and "dynamic batch" in _one_line(err)


def _upper_mlp(m: nn.Module) -> float:
    """||W2|| ||W1||: a true upper bound of the 2-layer ReLU net's Lipschitz constant."""
    return float(torch.linalg.matrix_norm(m[2].weight, ord=2)
                 * torch.linalg.matrix_norm(m[0].weight, ord=2))


# ------------------------------------------------------------------------------------------
# CLI: one line per bad input, documented exit codes, outputs checked before computing
# ------------------------------------------------------------------------------------------
FACTORIES = '''
import sys
from pathlib import Path
import torch
from torch import nn

MARKER = Path(__file__).with_name("CALLED")


class DD(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(2, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.l(x)
        return x


class Exits(nn.Module):
    def forward(self, x):
        sys.exit(0)


def dd():
    return DD()


def bye():
    raise SystemExit(0)


def exits_in_forward():
    return Exits()


def interrupt():
    raise KeyboardInterrupt


def lin():
    MARKER.write_text("called")
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
'''


@pytest.fixture
def fac(tmp_path: Path) -> Path:
    path = tmp_path / "userfac.py"
    path.write_text(FACTORIES)
    return path


def _sub(args: list[Any]) -> subprocess.CompletedProcess[str]:
    """The real process: torch's own stderr writes and warnings are not captured by pytest."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lipbound.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_regression_cli_data_dependent_flow_one_line(fac: Path) -> None:
    """torch.fx printed the 20-line generated graph to stderr before the error line."""
    p = _sub(["estimate", f"{fac}:dd", "-s", "2", "-m", "autolip", "-q"])
    assert p.returncode == 1
    assert "control flow" in _one_line(p.stderr)


def test_regression_cli_protocol4_pickle_one_line(tmp_path: Path, fac: Path) -> None:
    """torch's 'Detected pickle protocol 4' warning came before the error line."""
    w = tmp_path / "p4.pt"
    with open(w, "wb") as f:
        pickle.dump(dict(_linear().state_dict()), f, protocol=4)
    p = _sub(["estimate", f"{fac}:lin", "-w", w, "-s", "3", "-q"])
    assert p.returncode == 1
    assert "cannot read" in _one_line(p.stderr)


@pytest.mark.parametrize("protocol", [2, 4])
def test_regression_cli_whole_model_named_at_every_protocol(tmp_path: Path, fac: Path,
                                                             protocol: int) -> None:
    """A whole model saved with pickle protocol 4 was refused with torch's "Unsupported operand
    149" (the weights-only unpickler stops at the FRAME opcode before the class): the error now
    names the pickled class (read by disassembly, nothing run) at every protocol."""
    w = tmp_path / "whole.pt"
    torch.save(_linear(), w, pickle_protocol=protocol)
    p = _sub(["estimate", str(w), "-s", "3", "-q"])
    assert p.returncode == 1
    line = _one_line(p.stderr)
    assert "torch.nn.modules.container.Sequential" in line and "pickled whole model" in line, line


@pytest.mark.parametrize("where", ["missing_dir", "is_dir", "read_only", "bad_suffix"])
def test_regression_cli_output_checked_first(where: str, tmp_path: Path, fac: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """An unwritable --plot path failed only after the whole run; now exit 2 before the model
    is even built (the factory writes a marker when called)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "x.png").write_bytes(b"")
    (ro / "x.png").chmod(0o400)
    plot = {"missing_dir": tmp_path / "nope" / "x.png", "is_dir": tmp_path,
            "read_only": ro / "x.png", "bad_suffix": tmp_path / "x.nope"}[where]
    if where == "read_only" and os.access(ro / "x.png", os.W_OK):
        pytest.skip("running as root: a read-only file is still writable")
    rc, _, err = _run(["estimate", f"{fac}:lin", "-s", "3", "-m", "autolip", "--plot", plot,
                       "-q"], capsys)
    assert rc == 2, err
    assert "--plot" in _one_line(err)
    assert not (tmp_path / "CALLED").exists()


@pytest.mark.parametrize("factory", ["bye", "exits_in_forward"])
def test_regression_cli_systemexit_is_an_error(factory: str, fac: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A factory (or forward) calling SystemExit(0) made `lipbound estimate` exit 0 silently."""
    rc, out, err = _run(["estimate", f"{fac}:{factory}", "-s", "2", "-m", "lower", *FAST],
                        capsys)
    assert rc == 1 and out == ""
    assert "SystemExit" in _one_line(err) or "sys.exit" in _one_line(err)


def test_cli_interrupt_exit_130(fac: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(["estimate", f"{fac}:interrupt", "-s", "2"], capsys)
    assert rc == 130 and err.strip() == "lipbound: interrupted"


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_regression_cli_float16_weights_noted(norm: str, tmp_path: Path, fac: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """float16 weights were cast silently: now one note line; the certified bound holds for
    the cast model (its true operator norm, float64 Jacobian) in every norm."""
    from safetensors.torch import save_file

    torch.manual_seed(11)
    sd = {k: v.half() for k, v in nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
          .state_dict().items()}
    w = tmp_path / "h.safetensors"
    save_file(sd, str(w))
    rc, out, err = _run(["estimate", f"{fac}:lin", "-w", w, "-s", "3", "-m", "autolip",
                         "--norm", norm, "--json", "-q"], capsys)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lipbound: note: ")
    assert "float16 -> torch.float32" in lines[0]
    cast = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    cast.load_state_dict({k: v.double() for k, v in sd.items()})
    jac = torch.autograd.functional.jacobian(cast, torch.zeros(3, dtype=torch.float64))
    assert json.loads(out)["upper"] >= _op_norm(jac, norm) * (1 - 1e-12)


def test_regression_cli_integer_weights_refused(tmp_path: Path, fac: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """int32 weights were cast silently into the float parameters: now refused (exit 1)."""
    from safetensors.torch import save_file

    w = tmp_path / "i.safetensors"
    save_file({k: (v * 10).int() for k, v in _linear().state_dict().items()}, str(w))
    rc, _, err = _run(["estimate", f"{fac}:lin", "-w", w, "-s", "3", "-m", "autolip", "-q"],
                      capsys)
    assert rc == 1 and "not floating point" in _one_line(err)
