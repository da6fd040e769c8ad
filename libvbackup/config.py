"""The configuration file: per-VM policies for ``libvbackup run`` (pure, but for reading the file).

The file is ``--config FILE``, else ``$LIBVBACKUP_CONFIG``, else ``/etc/libvbackup.toml``. A
missing default file means no configuration: every setting as without one, and no policy. A
file that was named (option or variable) must exist. TOML (Python's ``tomllib``)::

    [defaults]                     # every key optional
    repo = "/var/lib/libvbackup"   # default: $LIBVBACKUP_REPO, else /var/lib/libvbackup
    scratch_dir = "/var/tmp"       # default: /var/tmp
    uri = "qemu:///system"         # default: $LIBVIRT_DEFAULT_URI, else qemu:///system
    mode = "pull"                  # pull | push
    level = "auto"                 # full | inc | diff | auto
    quiesce = "auto"               # auto | yes | no
    disks = ["vda"]                # only these disks [default: every disk that can be backed up]
    exclude = ["vdb"]              # leave these disks out
    compress = false               # pull --compress
    copy_to = "s3://bucket/site1"  # after each backup (and prune), `libvbackup copy` of the VM there
    key_file = "/root/offsite.key" # the key of copy_to (required with it; there is no clear-text copy here)
    s3_endpoint = "https://rgw.example:8443"  # default: $AWS_ENDPOINT_URL, else AWS
    jobs = 2                       # VMs backed up at once by `libvbackup run` (only here)

    [[policy]]
    match = "web-*"                # fnmatch pattern (* ? [seq]) or exact name, or a list of them
    schedule = "daily"             # a hint shown in the report (the timer decides when)
    keep_last = 7                  # retention applied after each backup, as `prune --keep-*`:
    keep_daily = 7                 #   keep_last, keep_daily, keep_weekly, keep_monthly,
    keep_weekly = 4                #   keep_yearly; none of them: the policy never prunes
    keep_monthly = 6
    level = "full"                 # any key of [defaults] but jobs, for this policy's VMs

- A VM is a libvirt domain, by name (case-sensitive): it takes the first ``[[policy]]``, in
  the order of the file, whose ``match`` names it (``Config.policy_for``) and, when policies
  name several libvirt URIs, whose ``uri`` is the domain's (``runner.choose``). A domain no
  policy names is not backed up.
- Precedence: libvbackup's defaults < ``[defaults]`` < the policy's own keys (and ``--jobs``
  over ``jobs``). Retention keys belong to each ``[[policy]]``; giving them all 0 is an error.
- Paths are absolute. Every unknown table or key, wrong type or bad value is a one-line
  ``UsageError`` naming the file, the table and the key, e.g.
  ``/etc/libvbackup.toml: [[policy]] 2: unknown key 'kep_daily' (did you mean 'keep_daily'?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
import tomllib
from typing import Any, Callable, Mapping

from . import retention
from .errors import UsageError
from .plan import LEVELS

DEFAULT_PATH = "/etc/libvbackup.toml"
ENV = "LIBVBACKUP_CONFIG"

MODES = ("pull", "push")  # backup.TRANSPORTS (tests/unit/test_config.py holds them equal)
QUIESCE = ("auto", "yes", "no")  # quiesce.MODES
RETENTION = {f"keep_{rule}": rule for rule in retention.RULES}


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a VM is backed up. None: libvbackup's own default (``$LIBVBACKUP_REPO`` …)."""

    repo: str | None = None
    scratch_dir: str | None = None
    uri: str | None = None
    mode: str = "pull"
    level: str = "auto"
    quiesce: str = "auto"
    disks: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    compress: bool = False
    copy_to: str | None = None  # s3://BUCKET/PREFIX: copied there after each backup
    key_file: str | None = None
    s3_endpoint: str | None = None


@dataclasses.dataclass(frozen=True)
class Defaults(Settings):
    """``[defaults]``: the settings of every policy, and how many VMs a run backs up at once."""

    jobs: int = 2


@dataclasses.dataclass(frozen=True)
class Policy:
    index: int  # 1 for the first [[policy]] of the file; 0: made from the command line (pull VM VM…)
    match: tuple[str, ...]  # patterns; any one names a VM
    settings: Settings  # [defaults] with this policy's own keys over them
    keep: retention.Policy | None  # None: no pruning
    schedule: str | None = None

    @property
    def label(self) -> str:
        if self.index == 0:
            return "the command line"
        return f"[[policy]] {self.index} ({', '.join(self.match)})"

    def matches(self, vm: str) -> bool:
        return any(fnmatch.fnmatchcase(vm, p) for p in self.match)


@dataclasses.dataclass(frozen=True)
class Config:
    path: str | None  # None: there is no file (the default one is missing)
    defaults: Defaults = Defaults()
    policies: tuple[Policy, ...] = ()

    def policy_for(self, vm: str) -> Policy | None:
        """The first policy, in the order of the file, whose ``match`` names ``vm``."""
        return next((p for p in self.policies if p.matches(vm)), None)


def locate(path: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The file to read, and whether it was named (then it must exist)."""
    if path:
        return path, True
    named = (os.environ if environ is None else environ).get(ENV)
    return (named, True) if named else (DEFAULT_PATH, False)


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and check the configuration (``locate``): a one-line UsageError for any fault."""
    where, named = locate(path, environ)
    try:
        with open(where, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if not named:
            return Config(None)
        source = "" if path else f" (${ENV})"
        raise UsageError(f"configuration file {where}{source} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read configuration file {where}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: not UTF-8 text (byte {e.start})") from None
    return parse(text, where)


def parse(text: str, path: str = "<config>") -> Config:
    """The configuration in ``text``, which came from ``path`` (named in every error)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    for key, value in doc.items():
        if key not in ("defaults", "policy"):
            what = f"table [{key}]" if isinstance(value, dict) else f"key {key!r} at the top level"
            raise UsageError(f"{path}: unknown {what}", _suggest(key, ("defaults", "policy"))
                             or "settings go in [defaults], policies in [[policy]] tables")
    raw_defaults = doc.get("defaults", {})
    if not isinstance(raw_defaults, dict):
        raise UsageError(f"{path}: [defaults] must be a table: write [defaults] once")
    raw_policies = doc.get("policy", [])
    if not isinstance(raw_policies, list) or not all(isinstance(p, dict) for p in raw_policies):
        raise UsageError(f"{path}: policy must be an array of tables: write [[policy]] before each one")

    values = _check(raw_defaults, f"{path}: [defaults]", {**_SETTINGS, "jobs": _jobs}, _ONLY_IN_POLICY)
    defaults = Defaults(**values)
    policies = []
    for n, raw in enumerate(raw_policies, 1):
        where = f"{path}: [[policy]] {n}"
        values = _check(raw, where, {**_SETTINGS, **_POLICY_KEYS}, {"jobs": "jobs is a [defaults] key"})
        if "match" not in values:
            raise UsageError(f"{where}: missing key 'match'", "the VM names or fnmatch patterns it covers")
        keep = None
        if any(k in values for k in RETENTION):
            keep = retention.Policy(**{RETENTION[k]: values.pop(k, 0) for k in RETENTION})
            if not any(getattr(keep, rule) for rule in retention.RULES):
                raise UsageError(f"{where}: every keep_* key is 0, so nothing would be kept",
                                 "leave the keep_* keys out for a policy that never prunes")
        match, schedule = values.pop("match"), values.pop("schedule", None)
        own = {k: v for k, v in values.items() if k in _SETTINGS}
        base = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(Settings)}
        settings = Settings(**{**base, **own})
        if settings.copy_to and not settings.key_file:
            raise UsageError(f"{where}: copy_to {settings.copy_to} needs key_file (off-site copies are encrypted)")
        policies.append(Policy(n, match, settings, keep, schedule))
    return Config(path, defaults, tuple(policies))


# Checkers: a value as written -> the value kept, or ValueError saying what is expected.

def _string(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("must be a non-empty string")
    return v


def _path(v: Any) -> str:
    if not isinstance(v, str) or not v.startswith("/"):
        raise ValueError("must be an absolute path (a string starting with /)")
    return v


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v

    return check


def _names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError('must be a list of disk targets, e.g. ["vda", "vdb"]')
    return tuple(v)


def _patterns(v: Any) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
        raise ValueError('must be a VM name or fnmatch pattern, or a non-empty list of them, e.g. "web-*"')
    return tuple(items)


def _count(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError("must be a whole number, 0 or more")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _s3_url(v: Any) -> str:
    if not isinstance(v, str) or not v.startswith("s3://") or len(v) <= len("s3://"):
        raise ValueError("must be an s3://BUCKET/PREFIX URL")
    return v


def _http_url(v: Any) -> str:
    if not isinstance(v, str) or not v.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return v


def _jobs(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError("must be a whole number, 1 or more")
    return v


_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "repo": _path, "scratch_dir": _path, "uri": _string, "mode": _choice(MODES), "level": _choice(LEVELS),
    "quiesce": _choice(QUIESCE), "disks": _names, "exclude": _names,
    "compress": _bool, "copy_to": _s3_url, "key_file": _path, "s3_endpoint": _http_url,
}
_POLICY_KEYS: dict[str, Callable[[Any], Any]] = {
    "match": _patterns, "schedule": _string, **{k: _count for k in RETENTION},
}
_ONLY_IN_POLICY = {
    **{k: "retention is set in each [[policy]]" for k in RETENTION},
    "match": "match belongs to a [[policy]]", "schedule": "schedule belongs to a [[policy]]",
}


def _check(table: dict, where: str, known: dict[str, Callable[[Any], Any]], elsewhere: dict[str, str]) -> dict:
    out = {}
    for key, value in table.items():
        if key not in known:
            raise UsageError(f"{where}: unknown key {key!r}", elsewhere.get(key) or _suggest(key, known))
        try:
            out[key] = known[key](value)
        except ValueError as e:
            raise UsageError(f"{where}: {key!r} {e} (got {_shown(value)})") from None
    return out


def _suggest(key: str, known) -> str | None:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean {close[0]!r}?" if close else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
