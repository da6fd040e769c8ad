"""A non-editable ``pip install`` into a fresh virtual environment gives a working libvbackup.

The source tree is copied (without caches, build/ or *.egg-info, so a stale build in the checkout
can neither leak into the wheel nor be disturbed) and installed with pip's defaults: build
isolation fetches setuptools from the package index, and typer comes from there too, as on a fresh
Debian 12 machine with network access to PyPI. libvirt, libnbd, lxml and xxhash come from Debian
(system site-packages). Everything then runs from a directory outside the source tree with
PYTHONPATH unset: what works has to come from the installed files alone.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import subprocess

import pytest

from .helpers import KiB, MiB, first_difference, random_writes, read_image

pytestmark = pytest.mark.integration

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: python3-libvirt and python3-libnbd are built for it
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".hypothesis")


def _env() -> dict[str, str]:
    """The caller's environment without anything that could point Python at the source tree."""
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE"):
        env.pop(var, None)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(args, cwd, timeout=120) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, (f"{' '.join(map(str, args))} exited {res.returncode}\n"
                                 f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}")
    return res


def _inside(path, top) -> bool:
    return pathlib.Path(path).resolve().is_relative_to(pathlib.Path(top).resolve())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with libvbackup installed from a copy of this checkout: (venv, scratch dir)."""
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import venv, ensurepip"], capture_output=True, text=True)
    if probe.returncode != 0:
        problem = f"{SYSTEM_PYTHON} cannot make virtual environments (python3-venv): {probe.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    top = tmp_path_factory.mktemp("install")
    src, venv = top / "src", top / "venv"
    shutil.copytree(REPO_ROOT, src, ignore=NOT_SOURCES, symlinks=True)
    _run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv], cwd=top)
    _run([venv / "bin/python", "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
          str(src)], cwd=top, timeout=600)
    shutil.rmtree(src)  # nothing may come from the sources any more
    yield venv, top
    shutil.rmtree(top, ignore_errors=True)


def test_installed_package_is_self_contained(installed):
    venv, top = installed
    assert not _inside(venv, REPO_ROOT)
    script = r"""
import importlib.metadata, json, sys
import libvbackup, libvbackup.cli.main, libvbackup.xmlgen as xmlgen
dist = importlib.metadata.distribution("libvbackup")
print(json.dumps({
    "file": libvbackup.__file__,
    "cli": libvbackup.cli.main.__file__,
    "templates": str(xmlgen.TEMPLATES),
    "template_files": sorted(p.name for p in xmlgen.TEMPLATES.iterdir()),
    "record": [str(dist.locate_file(f)) for f in dist.files],
    "record_names": [f.as_posix() for f in dist.files],
    "direct_url": json.loads(dist.read_text("direct_url.json") or "{}"),
    "sys_path": sys.path,
    "checkpoint_xml": xmlgen.checkpoint_xml(xmlgen.CheckpointSpec(
        "c1", [xmlgen.CheckpointDisk("vda", True)])),
}))
"""
    info = json.loads(_run([venv / "bin/python", "-c", script], cwd=top).stdout)
    assert _inside(info["file"], venv), info["file"]
    assert _inside(info["cli"], venv), info["cli"]
    # The templates ship inside the installed package, not looked up in the checkout.
    assert _inside(info["templates"], venv), info["templates"]
    expected = sorted(p.name for p in (REPO_ROOT / "xml_templates").glob("*.xml"))
    assert expected and info["template_files"] == expected
    assert "<domaincheckpoint>" in info["checkpoint_xml"] and "c1" in info["checkpoint_xml"]
    # Every file pip recorded lies in the venv; none is an editable hook (.pth, finder) into the tree.
    assert info["record"] and all(_inside(f, venv) for f in info["record"]), info["record"]
    assert not any(f.endswith(".pth") or "__editable__" in f for f in info["record"]), info["record"]
    assert {f"libvbackup/xml_templates/{n}" for n in expected} <= set(info["record_names"])
    # Every module of the source tree was installed (a new subpackage must be listed in pyproject.toml).
    sources = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "libvbackup").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources and not sources - set(info["record_names"]), sorted(sources - set(info["record_names"]))
    # So was the JSON contract (libvbackup/schemas/*.json, package data).
    schemas = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "libvbackup/schemas").glob("*.json")}
    assert schemas and not schemas - set(info["record_names"]), sorted(schemas - set(info["record_names"]))
    assert not info["direct_url"].get("dir_info", {}).get("editable", False)
    assert not [p for p in info["sys_path"] if p and _inside(p, REPO_ROOT)], info["sys_path"]
    site = venv / "lib"
    for pth in site.rglob("*.pth"):
        assert str(REPO_ROOT) not in pth.read_text(errors="replace"), pth
    # The console script runs the venv's interpreter.
    assert (venv / "bin/libvbackup").read_text().splitlines()[0] == f"#!{venv}/bin/python"


def test_installed_command_backs_up_and_restores(installed, make_vm, repo, workdir):
    venv, _ = installed
    lvb = venv / "bin/libvbackup"
    assert not _inside(workdir, REPO_ROOT) and not _inside(repo, REPO_ROOT)
    vm = make_vm((64 * MiB, "qcow2"))
    disk = vm["vda"]
    rng = random.Random(20261201)
    disk.write(0, rng.randbytes(300 * KiB + 17))
    disk.fill(5 * MiB + 123, 2 * MiB, 0x5A)
    random_writes(disk, rng, n=6)
    res = _run([lvb, "pull", vm.name, "--repo", repo, "--checkpoint", "full1", "--progress", "none",
                "--json"], cwd=workdir)
    r = json.loads(res.stdout)
    assert r["level"] == "full" and r["parent"] is None
    models = {"full1": disk.snapshot()}

    disk.write(disk.size - 4097, rng.randbytes(4097))
    disk.fill(33 * MiB + 1, 700 * KiB, 0xC3)
    random_writes(disk, rng, n=4)
    res = _run([lvb, "pull", vm.name, "--repo", repo, "--incremental", "full1", "--checkpoint", "inc1",
                "--progress", "none", "--json"], cwd=workdir)
    r = json.loads(res.stdout)
    assert (r["level"], r["parent"]) == ("incremental", "full1")
    assert 0 < r["disks"]["vda"]["bytes_copied"] < disk.size // 2
    models["inc1"] = disk.snapshot()

    for chk, fmt in (("full1", "raw"), ("inc1", "qcow2"), ("inc1", "raw")):
        out = workdir / f"restore-{chk}-{fmt}"
        _run([lvb, "restore", vm.name, "--repo", repo, "--checkpoint", chk, "--output", out,
              "--format", fmt, "--progress", "none"], cwd=workdir)
        assert sorted(p.name for p in out.iterdir()) == [f"vda.{fmt}"]
        got = read_image(out / f"vda.{fmt}", fmt)
        assert got == models[chk], f"{chk}/{fmt}: {first_difference(got, models[chk])}"
        shutil.rmtree(out)
