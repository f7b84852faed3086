"""The Colab notebooks execute top to bottom in their reduced mode (``CODI_NOTEBOOK_SMOKE=1``) on a
CPU kernel, and are committed without outputs."""

import glob
import json
import os
import shutil
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLAB, "*.ipynb")))


def _kernel_manager(tmp_path):
    """A kernel manager whose only kernel is this interpreter: a fresh virtualenv has no registered
    kernel spec, and a user-wide ``python3`` spec may point at another Python."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(str(kernels / "codi-test"))  # argv: [sys.executable, -m, ipykernel_launcher, ...]
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name="codi-test", kernel_spec_manager=ksm)


def _execute(name, tmp_path, extra_cells=()):
    """Runs colab/<name> (plus ``extra_cells`` appended) in a fresh kernel whose working directory
    is ``tmp_path``; returns the executed notebook and the wall time."""
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    nb.cells.extend(nbformat.v4.new_code_cell(src) for src in extra_cells)
    env = dict(os.environ, CODI_NOTEBOOK_SMOKE="1", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
               # One CPU device, as a Colab CPU runtime has (conftest's 8 virtual devices only
               # slow the kernel's compiles on this small machine).
               XLA_FLAGS="",
               # Found even when the package is not installed (a bare checkout on PYTHONPATH).
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.time()
    client.execute(env=env)
    return nb, time.time() - start


def _outputs(nb):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _text(nb) -> str:
    return "".join(out.get("text", "") for out in _outputs(nb) if out.output_type == "stream")


def test_notebooks_are_committed_stripped():
    assert {os.path.basename(p) for p in NOTEBOOKS} >= {"quickstart.ipynb", "train_tpu.ipynb"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path}: outputs not stripped"


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    nb, seconds = _execute("quickstart.ipynb", tmp_path)
    print(f"quickstart.ipynb: {seconds:.0f} s")
    images = [out for out in _outputs(nb) if "image/png" in out.get("data", {})]
    assert images, "no figure was shown"
    text = _text(nb)
    for steps in (1, 2, 4):
        assert f"{steps} step" in text
    assert "PSNR" in text and "nan" not in text.lower()


@pytest.mark.slow
def test_train_tpu_runs(tmp_path):
    # Reports the notebook's workdir from inside the kernel, so the test can check and remove it.
    probe = "import json; print('WORKDIR_JSON=' + json.dumps(WORKDIR))"
    nb, seconds = _execute("train_tpu.ipynb", tmp_path, extra_cells=[probe])
    print(f"train_tpu.ipynb: {seconds:.0f} s")
    line = next(line for line in _text(nb).splitlines() if line.startswith("WORKDIR_JSON="))
    workdir = json.loads(line.split("=", 1)[1])
    try:
        results = json.load(open(os.path.join(workdir, "eval.json")))
        assert set(results["samplers"]["codi"]) == {"1", "4"}
        assert os.path.exists(os.path.join(workdir, "eval_samples.png"))
        assert os.path.exists(os.path.join(workdir, "export", "codi.json"))
        assert any("image/png" in out.get("data", {}) for out in _outputs(nb))
    finally:
        if workdir.startswith(str(tmp_path)) or os.path.basename(workdir).startswith("codi-colab-smoke-"):
            shutil.rmtree(workdir, ignore_errors=True)
