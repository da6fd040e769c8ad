"""The configuration file (pure): parsing, precedence, matching, and every fault as one line
naming the file, the table and the key."""

from __future__ import annotations

import re

import pytest

from libvbackup import backup, config, quiesce, retention
from libvbackup.cli import run_cmd
from libvbackup.config import Config, Defaults, Settings, load, parse
from libvbackup.errors import UsageError
from libvbackup.plan import LEVELS

P = "/etc/libvbackup.toml"

EXAMPLE = """
[defaults]
repo = "/backups"
scratch_dir = "/srv/scratch"
uri = "qemu:///system"
mode = "push"
level = "inc"
quiesce = "yes"
jobs = 3

[[policy]]
match = "web-*"
schedule = "daily"
keep_last = 7
keep_daily = 7
keep_weekly = 4
keep_monthly = 6

[[policy]]
match = ["db1", "db[23]"]
level = "full"
mode = "pull"
repo = "/backups/db"
disks = ["vda"]

[[policy]]
match = "*"
exclude = ["vdb"]
keep_yearly = 2
"""


def test_the_example_parses_with_defaults_under_each_policy():
    c = parse(EXAMPLE, P)
    assert c.path == P
    assert c.defaults == Defaults(repo="/backups", scratch_dir="/srv/scratch", uri="qemu:///system", mode="push",
                                  level="inc", quiesce="yes", jobs=3)
    web, db, rest = c.policies
    assert (web.index, web.match, web.schedule, web.label) == (1, ("web-*",), "daily", "[[policy]] 1 (web-*)")
    assert web.settings == Settings("/backups", "/srv/scratch", "qemu:///system", "push", "inc", "yes")
    assert web.keep == retention.Policy(last=7, daily=7, weekly=4, monthly=6)
    assert str(web.keep) == "last 7, daily 7, weekly 4, monthly 6"
    # The policy's own keys over [defaults], key by key; what it does not say comes from [defaults].
    assert db.settings == Settings("/backups/db", "/srv/scratch", "qemu:///system", "pull", "full", "yes",
                                   disks=("vda",))
    assert db.keep is None and db.schedule is None and db.label == "[[policy]] 2 (db1, db[23])"
    assert rest.settings.exclude == ("vdb",) and rest.settings.level == "inc"
    assert rest.keep == retention.Policy(yearly=2)


def test_libvbackup_defaults_when_the_file_says_nothing():
    c = parse('[[policy]]\nmatch = "vm1"\n', P)
    assert c.defaults == Defaults() and c.defaults.jobs == 2
    (p,) = c.policies
    # None: libvbackup's own default ($LIBVBACKUP_REPO, /var/tmp, $LIBVIRT_DEFAULT_URI).
    assert p.settings == Settings(repo=None, scratch_dir=None, uri=None, mode="pull", level="auto", quiesce="auto")
    assert p.keep is None
    assert parse("", P) == Config(P)


def test_the_first_matching_policy_wins_case_sensitively():
    c = parse(EXAMPLE, P)
    assert c.policy_for("web-1").index == 1
    assert c.policy_for("db1").index == 2 and c.policy_for("db3").index == 2
    assert c.policy_for("db4").index == 3  # only "*" names it
    assert c.policy_for("web-1") is c.policies[0]
    c = parse('[[policy]]\nmatch = "Web-?"\n[[policy]]\nmatch = "exact"\n', P)
    assert c.policy_for("Web-1").index == 1
    assert c.policy_for("web-1") is None and c.policy_for("Web-12") is None
    assert c.policy_for("exact").index == 2 and c.policy_for("exactly") is None


def test_the_documented_formats_parse():
    """The module docstring's and ``libvbackup run --help``'s examples are real."""
    lines = config.__doc__.split("::\n\n", 1)[1].splitlines()
    block = lines[:next(i for i, line in enumerate(lines) if line and not line.startswith("    "))]
    c = parse("\n".join(line[4:] for line in block), P)
    assert c.defaults.jobs == 2 and c.policies[0].keep == retention.Policy(last=7, daily=7, weekly=4, monthly=6)
    block = run_cmd.__doc__.split("\b\n", 1)[1].split("\n\n", 1)[0]
    c = parse("\n".join(line[2:] for line in block.splitlines()), P)
    assert c.policies[0].settings.level == "full" and c.policies[0].keep == retention.Policy(last=7)


def test_the_checked_values_are_libvbackup_s():
    assert config.MODES == backup.MODES
    assert config.QUIESCE == quiesce.MODES
    assert set(config.RETENTION.values()) == set(retention.RULES)
    assert parse(f'[defaults]\nlevel = "{LEVELS[-1]}"\n', P).defaults.level == LEVELS[-1]


FAULTS = [
    # (text, the whole message)
    ('[[policy]]\nmatch = "a"\n[[policy]]\nmatch = "b"\nkep_daily = 7\n',
     f"{P}: [[policy]] 2: unknown key 'kep_daily' (did you mean 'keep_daily'?)"),
    ('[defaults]\nrepos = "/b"\n', f"{P}: [defaults]: unknown key 'repos' (did you mean 'repo'?)"),
    ('[defaults]\nkeep_last = 3\n', f"{P}: [defaults]: unknown key 'keep_last' (retention is set in each [[policy]])"),
    ('[defaults]\nmatch = "*"\n', f"{P}: [defaults]: unknown key 'match' (match belongs to a [[policy]])"),
    ('[[policy]]\nmatch = "a"\njobs = 3\n', f"{P}: [[policy]] 1: unknown key 'jobs' (jobs is a [defaults] key)"),
    ('[default]\nrepo = "/b"\n', f"{P}: unknown table [default] (did you mean 'defaults'?)"),
    ('repo = "/b"\n', f"{P}: unknown key 'repo' at the top level "
                      "(settings go in [defaults], policies in [[policy]] tables)"),
    ('[policy]\nmatch = "a"\n', f"{P}: policy must be an array of tables: write [[policy]] before each one"),
    ('[[defaults]]\nrepo = "/b"\n', f"{P}: [defaults] must be a table: write [defaults] once"),
    ('[defaults]\njobs = 0\n', f"{P}: [defaults]: 'jobs' must be a whole number, 1 or more (got 0)"),
    ('[defaults]\njobs = "2"\n', f"{P}: [defaults]: 'jobs' must be a whole number, 1 or more (got '2')"),
    ('[defaults]\njobs = true\n', f"{P}: [defaults]: 'jobs' must be a whole number, 1 or more (got True)"),
    ('[defaults]\nlevel = "nightly"\n', f"{P}: [defaults]: 'level' must be one of full, inc, diff, auto (got 'nightly')"),
    ('[[policy]]\nmatch = "a"\nmode = "pul"\n', f"{P}: [[policy]] 1: 'mode' must be one of pull, push (got 'pul')"),
    ('[defaults]\nquiesce = true\n', f"{P}: [defaults]: 'quiesce' must be one of auto, yes, no (got True)"),
    ('[defaults]\nrepo = "backups"\n',
     f"{P}: [defaults]: 'repo' must be an absolute path (a string starting with /) (got 'backups')"),
    ('[[policy]]\nmatch = "a"\nscratch_dir = 7\n',
     f"{P}: [[policy]] 1: 'scratch_dir' must be an absolute path (a string starting with /) (got 7)"),
    ('[defaults]\nuri = ""\n', f"{P}: [defaults]: 'uri' must be a non-empty string (got '')"),
    ('[[policy]]\nmatch = "a"\ndisks = "vda"\n',
     f"{P}: [[policy]] 1: 'disks' must be a list of disk targets, e.g. [\"vda\", \"vdb\"] (got 'vda')"),
    ('[defaults]\nexclude = [1]\n',
     f"{P}: [defaults]: 'exclude' must be a list of disk targets, e.g. [\"vda\", \"vdb\"] (got [1])"),
    ('[[policy]]\nmatch = "a"\nkeep_last = -1\n', f"{P}: [[policy]] 1: 'keep_last' must be a whole number, 0 or more (got -1)"),
    ('[[policy]]\nmatch = "a"\nkeep_daily = 1.5\n',
     f"{P}: [[policy]] 1: 'keep_daily' must be a whole number, 0 or more (got 1.5)"),
    ('[[policy]]\nmatch = "a"\nkeep_last = 0\nkeep_weekly = 0\n',
     f"{P}: [[policy]] 1: every keep_* key is 0, so nothing would be kept "
     "(leave the keep_* keys out for a policy that never prunes)"),
    ('[[policy]]\nschedule = "daily"\n',
     f"{P}: [[policy]] 1: missing key 'match' (the VM names or fnmatch patterns it covers)"),
    ('[[policy]]\nmatch = []\n', f"{P}: [[policy]] 1: 'match' must be a VM name or fnmatch pattern, or a non-empty "
                                 "list of them, e.g. \"web-*\" (got [])"),
    ('[[policy]]\nmatch = 5\n', f"{P}: [[policy]] 1: 'match' must be a VM name or fnmatch pattern, or a non-empty "
                                "list of them, e.g. \"web-*\" (got 5)"),
    ('[[policy]]\nmatch = "a"\nschedule = ""\n', f"{P}: [[policy]] 1: 'schedule' must be a non-empty string (got '')"),
    ('[[policy]]\nmatch = "a"\nrepo = {path = "/b", really = "a very long table that is cut short"}\n',
     f"{P}: [[policy]] 1: 'repo' must be an absolute path (a string starting with /) "
     "(got {'path': '/b', 'really': 'a very long...)"),
]


@pytest.mark.parametrize("text,message", FAULTS, ids=[m.split(": ", 1)[1][:50] for _, m in FAULTS])
def test_every_fault_is_one_line_naming_file_table_and_key(text, message):
    with pytest.raises(UsageError) as e:
        parse(text, P)
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_bad_toml_names_the_file_and_the_line():
    with pytest.raises(UsageError) as e:
        parse('[defaults]\nrepo "/b"\n', P)
    assert re.fullmatch(rf"{re.escape(P)}: not valid TOML: .*\(at line 2, column \d+\)", str(e.value))
    with pytest.raises(UsageError, match=r"\[defaults\] must be a table|not valid TOML"):
        parse('defaults = 3\n', P)


def test_where_the_file_is_and_when_its_absence_is_an_error(tmp_path, monkeypatch):
    missing = tmp_path / "missing.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", str(missing))
    assert load(environ={}) == Config(None)  # no default file: no configuration
    with pytest.raises(UsageError) as e:
        load(str(missing), environ={})
    assert str(e.value) == f"configuration file {missing} does not exist"
    with pytest.raises(UsageError) as e:
        load(environ={config.ENV: str(missing)})
    assert str(e.value) == f"configuration file {missing} ($LIBVBACKUP_CONFIG) does not exist"
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[[policy]]\nmatch = "a"\n')
    b.write_text('[[policy]]\nmatch = "b"\n')
    assert load(environ={config.ENV: str(a)}).policies[0].match == ("a",)
    assert load(str(b), environ={config.ENV: str(a)}).policies[0].match == ("b",)  # --config first
    assert load(environ={config.ENV: ""}) == Config(None)  # empty: unset
    monkeypatch.setattr(config, "DEFAULT_PATH", str(a))
    assert load(environ={}).path == str(a)
    b.write_text('[[policy]]\nmatch = "b"\nkep_last = 1\n')
    with pytest.raises(UsageError, match=rf"^{re.escape(str(b))}: \[\[policy\]\] 1: unknown key 'kep_last'"):
        load(str(b))
    b.write_bytes(b'[[policy]]\nmatch = "\xff"\n')
    with pytest.raises(UsageError, match=rf"^{re.escape(str(b))}: not UTF-8 text \(byte 20\)$"):
        load(str(b))
    with pytest.raises(UsageError, match=rf"^cannot read configuration file {re.escape(str(tmp_path))}: Is a directory$"):
        load(str(tmp_path))


def test_off_site_keys_are_checked():
    from libvbackup.config import parse

    c = parse('[defaults]\ncopy_to = "s3://b1/x"\nkey_file = "/root/k"\ns3_endpoint = "https://s3.example"\n'
              'compress = true\n[[policy]]\nmatch = "vm*"\n')
    s = c.policies[0].settings
    assert (s.copy_to, s.key_file, s.s3_endpoint, s.compress) == ("s3://b1/x", "/root/k", "https://s3.example", True)
    for text, words in (('[[policy]]\nmatch = "a"\ncopy_to = "s3://b1/x"\n', "needs key_file"),
                        ('[defaults]\ncopy_to = "/backups"\n', "s3://BUCKET/PREFIX"),
                        ('[defaults]\ns3_endpoint = "rgw:8443"\n', "http:// or https://"),
                        ('[defaults]\ncompress = "yes"\n', "true or false"),
                        ('[defaults]\nkey_file = "k"\n', "absolute path")):
        with pytest.raises(UsageError, match=words):
            parse(text)
