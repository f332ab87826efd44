"""The distribution: a wheel and an editable install both import as `hyloom`, never as bare folders."""

import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# prints the folders that the bare names core, plugins and kernels import from. Another project may own one of those
# names (Hugging Face's `kernels`, which transformers 5.25+ requires), so the check is that none of them is ours.
BARE_ORIGINS = ("import importlib.util, json\n"
                "specs = [importlib.util.find_spec(m) for m in ('core', 'plugins', 'kernels')]\n"
                "print(json.dumps([p for s in specs if s for p in (s.submodule_search_locations or [s.origin])]))\n")


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([package, *rel.parts]))
    assert on_disk == listed


def test_wheel_installs_only_hyloom(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("hyloom-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"hyloom", next(t for t in top if re.match(r"hyloom-.*\.dist-info", t))}
    assert "hyloom/blueprints/tiny.yaml" in names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    assert not any((site / bare).exists() for bare in ("core", "plugins", "kernels"))
    probe = (
        "import hyloom, hyloom.plugins, hyloom.kernels\n"
        f"assert hyloom.__file__.startswith({str(site)!r}), hyloom.__file__\n"
        "bp = hyloom.load_blueprint('builtin:tiny')\n"
        "print(hyloom.build_model(bp, device='meta').num_parameters())\n"
    ) + BARE_ORIGINS
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    n_params, origins = out.stdout.splitlines()
    assert int(n_params) > 0
    assert not [p for p in json.loads(origins) if p.startswith(str(site))]


def test_editable_install_has_no_bare_modules(tmp_path):
    probe = "import hyloom, hyloom.plugins.transformer, hyloom.kernels\n" + BARE_ORIGINS
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ours = [str(ROOT / folder) for folder in ("core", "plugins", "kernels")]
    assert not [p for p in json.loads(out.stdout) if p.startswith(tuple(ours))]
