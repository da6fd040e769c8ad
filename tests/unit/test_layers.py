"""The layer list in libvbackup/__init__.py is true: each module imports only modules listed
above it, only ``nbdio`` imports libnbd and only ``virt`` imports libvirt, and the pure
manifest parser loads no C extension it does not need."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import libvbackup

PKG = pathlib.Path(libvbackup.__file__).parent


def layers() -> list[list[str]]:
    doc = libvbackup.__doc__
    out = []
    for line in doc[doc.index("Layers"):].splitlines():
        m = re.match(r"- ((?:``\w+``,? ?)+)", line)
        if m:
            out.append(re.findall(r"``(\w+)``", m.group(1)))
    return out


def imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(libvbackup modules, top-level outside modules) imported by a file."""
    ours, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                ours.add(node.module.split(".")[0])
            elif node.level == 1:
                ours.update(a.name for a in node.names)
            elif node.level == 2:
                ours.add(node.module.split(".")[0] if node.module else "")
            elif node.module:
                outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outside.update(a.name.split(".")[0] for a in node.names)
    return ours, outside


def test_every_module_is_listed_once():
    listed = [m for group in layers() for m in group]
    assert len(listed) == len(set(listed))
    present = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"} | {"cli"}
    assert set(listed) == present


# Names a module hands on from a later one, imported when first asked for (PEP 562).
FORWARDS = {"results": {"outcomes"}}


def test_modules_import_only_what_is_listed_above_them():
    seen: set[str] = set()
    wrong = []
    for group in layers():
        for name in group:
            files = sorted((PKG / "cli").glob("*.py")) if name == "cli" else [PKG / f"{name}.py"]
            for f in files:
                ours, _ = imports(f)
                if name == "cli":
                    ours -= {p.stem for p in (PKG / "cli").glob("*.py")} | {""}
                bad = ours - seen - FORWARDS.get(name, set())
                if bad:
                    wrong.append(f"{f.relative_to(PKG)} imports {sorted(bad)} (not above it)")
        seen.update(group)
    assert wrong == []


def test_only_nbdio_imports_nbd_and_only_virt_imports_libvirt():
    for f in PKG.rglob("*.py"):
        _, outside = imports(f)
        if "nbd" in outside:
            assert f.stem == "nbdio", f
        if outside & {"libvirt", "libvirt_qemu"}:
            assert f.stem == "virt", f
        if "guestfs" in outside:
            assert f.stem == "guestfiles", f


def test_reading_a_manifest_loads_no_digest_extension():
    code = ("import sys; from libvbackup import manifest; manifest.loads('{\"format\": 2, \"vm\": \"v\", "
            "\"points\": []}'); print(sorted(m for m in ('xxhash', 'nbd', 'libvirt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_backup_loads_neither_the_other_operations_results_nor_their_modules():
    """An empty incremental costs mostly imports: the backup path loads only what it uses."""
    code = ("import sys; import libvbackup.cli.main, libvbackup.cli.pull, libvbackup.api, libvbackup.backup, "
            "libvbackup.pull; print(sorted(m.split('.')[-1] for m in sys.modules if m.split('.')[-1] in "
            "('outcomes', 'restore', 'verify', 'push', 'imagefile', 'offsite', 'guestfiles', 'instant')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_results_hands_on_the_outcome_classes():
    from libvbackup import outcomes, results

    assert results.VerifyResult is outcomes.VerifyResult
    try:
        results.NoSuchResult
    except AttributeError as e:
        assert "NoSuchResult" in str(e)
    else:
        raise AssertionError("results.NoSuchResult resolved")


def test_every_module_that_logs_imports_errors_which_quiets_the_package_logger():
    """The package logger's NullHandler lives in ``errors`` (``libvbackup/__init__`` imports no
    logging, so that a command handed to ``libvbackup serve`` starts without it): each module
    that makes a logger must import ``errors`` itself, and importing one attaches the handler."""
    loggers = []
    for f in PKG.rglob("*.py"):
        if "getLogger(" in f.read_text() and f.stem != "errors":
            ours, _ = imports(f)
            assert "errors" in ours, f
            loggers.append(f)
    assert len(loggers) >= 15
    code = ("import logging, sys; import libvbackup.repo; "
            "print([type(h).__name__ for h in logging.getLogger('libvbackup').handlers], 'logging' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['NullHandler'] True"
    out = subprocess.run([sys.executable, "-c", "import sys, libvbackup; print('logging' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def loaded(modules: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a fresh interpreter holds after importing ``modules``."""
    code = f"import sys; import {modules}; print(sorted(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return ast.literal_eval(out.strip())


def test_the_transports_leave_the_copy_modules_to_their_preload():
    """``pull`` imports libnbd's bindings, the engine and the qcow2 writer only while backupBegin
    runs, ``push`` its digest pass's modules while the job runs (``preload``): imported before,
    they would add to the command's start again."""
    from libvbackup import pull, push

    assert loaded("libvbackup.backup, libvbackup.pull", ("nbd", "libvbackup.nbdio", "libvbackup.engine",
                  "libvbackup.parallel", "libvbackup.target", "libvbackup.qcow2", "hashlib", "xxhash")) == []
    assert set(pull.COPY_MODULES) >= {"libvbackup.nbdio", "libvbackup.parallel", "libvbackup.target"}
    assert loaded("libvbackup.backup, libvbackup.push", ("libvbackup.engine", "libvbackup.imagefile",
                  "libvbackup.parallel", "hashlib", "xxhash")) == []
    assert set(push.DIGEST_MODULES) >= {"libvbackup.engine", "libvbackup.imagefile", "libvbackup.parallel"}


def test_preload_imports_in_a_thread_and_leaves_a_failure_to_the_callers_import():
    code = ("import sys, threading; from libvbackup.preload import Preload; "
            "p = Preload(('libvbackup.qcow2', 'libvbackup.no_such_module', 'libvbackup.extents')); p.join(); "
            "print('libvbackup.qcow2' in sys.modules, 'libvbackup.extents' in sys.modules, "
            "threading.active_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # the failed import ends the thread's list (the caller's own import raises it again)
    assert out.split() == ["True", "False", "1"]
