"""One duration grammar with one set of messages (issue 14 #7, issue 16 #4): every option,
environment variable and rules value that takes a duration reads it the same way, `off` means
"never" wherever it is accepted, and a refused value gets one message format naming the range."""

from __future__ import annotations

import re

import pytest

from amohook.durations import DurationError, format_duration, parse_duration
from tests.conftest import cli_env, run_cli

SECRET = "durations-secret-0123456789abcdef"
# error: <flag or variable> '<value>' is <problem> — give <low> to <high>[, or off] (written like …)
MESSAGE = re.compile(
    r"^error: (?P<name>--[a-z-]+|AMOHOOK_[A-Z_]+|.*due) '(?P<value>[^']*)' is (?P<problem>[^—]+) — "
    r"give (?P<low>\S+) to (?P<high>\S+?)(?P<off>, or off)? \(written like 90s, 5m, 2h, 1d12h\)$"
)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90s", 90),
        ("5m", 300),
        ("1.5h", 5400),
        ("2h30m", 9000),
        ("1d 12h", 129600),
        ("1d12h", 129600),
        ("1w", 604800),
        ("300", 300),
        ("0.5", 0.5),
        (" 2H ", 7200),
    ],
)
def test_the_grammar(text, seconds):
    assert parse_duration(text, option="--x", low=0.1) == seconds


@pytest.mark.parametrize("text", ["off", "OFF", "never", "none", "no", "0"])
def test_off_means_never_where_it_is_accepted(text):
    assert parse_duration(text, option="--x") is None
    with pytest.raises(DurationError, match="is not accepted here"):
        parse_duration("off", option="--x", off=False)


@pytest.mark.parametrize("text", ["soon", "", "5 minutes", "1h1d", "1m1m", "1e5", "m", "1d2", "-5m", "nan"])
def test_what_is_not_a_duration(text):
    with pytest.raises(DurationError, match="is not a duration"):
        parse_duration(text, option="--x")


def test_a_huge_number_is_too_long_not_unreadable_and_the_message_stays_short():
    with pytest.raises(DurationError) as caught:
        parse_duration("9" * 5000 + "m", option="--x")
    assert "is too long" in caught.value.message and len(caught.value.message) < 200


@pytest.mark.parametrize("seconds", [0.05, 0.25, 1, 45, 60, 61, 90, 3600, 3661, 86400, 90061, 366 * 86400])
def test_what_is_printed_is_read_back(seconds):
    """The formatter drops what is below its second unit; the parser reads every output back."""
    shown = format_duration(seconds)
    back = parse_duration(shown, option="--x", low=0)
    assert back is not None and abs(back - seconds) < max(1.0, seconds / 1000), (seconds, shown, back)


def test_the_formatter_shows_two_units_at_most():
    assert [format_duration(s) for s in (7, 307, 7507, 93784, -300)] == ["7s", "5m 7s", "2h 5m", "1d 2h", "-5m"]
    assert format_duration(None) == "—" and format_duration(None, none="off") == "off"


def refusal(result) -> re.Match:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    match = MESSAGE.match(lines[0])
    assert match, lines[0]
    return match


@pytest.mark.parametrize(
    "args, env, name, low, high, off",
    [
        (["prune", "--older-than", "2h"], {}, "--older-than", "1d", "366d", True),
        (["prune"], {"AMOHOOK_KEEP": "soon"}, "AMOHOOK_KEEP", "1d", "366d", True),
        (["prune", "--older-than", "400d"], {}, "--older-than", "1d", "366d", True),
        (["reconcile", "--since", "off"], {}, "--since", "1s", "366d", False),
        (["reconcile", "--max-lookback", "1y"], {}, "--max-lookback", "1s", "366d", False),
        (["worker", "--handler", "x:y", "--reconcile", "5 minutes"], {}, "--reconcile", "1s", "366d", True),
        (["worker", "--handler", "x:y"], {"AMOHOOK_RECONCILE": "0.5"}, "AMOHOOK_RECONCILE", "1s", "366d", True),
        (["worker", "--handler", "x:y", "--keep", "12h"], {}, "--keep", "1d", "366d", True),
        (["worker", "--handler", "x:y", "--lease", "0.5"], {}, "--lease", "1s", "1d", False),
        (["worker", "--handler", "x:y", "--poll", "2h"], {}, "--poll", "0.05s", "1h", False),
        (["serve", "--port", "0", "--request-timeout", "off"], {}, "--request-timeout", "0.1s", "1h", False),
        (["serve", "--port", "0", "--read-deadline", "1d"], {}, "--read-deadline", "0.1s", "1h", False),
        (["serve", "--port", "0", "--keep", "1h"], {}, "--keep", "1d", "366d", True),
    ],
)
def test_every_duration_option_refuses_in_one_format_naming_its_range(sqlite_url, args, env, name, low, high, off):
    result = run_cli(args, sqlite_url, env=cli_env(sqlite_url, AMOHOOK_WEBHOOK_SECRET=SECRET, **env))
    match = refusal(result)
    assert (match["name"], match["low"], match["high"], bool(match["off"])) == (name, low, high, off)


def test_a_rules_due_date_is_refused_in_the_same_format(sqlite_url, tmp_path):
    from amohook.store import open_store

    open_store(sqlite_url).db.close()  # `rules check` reads the store's reference data
    rules = tmp_path / "rules.toml"
    rules.write_text(
        "[[rule]]\nname = 'a'\nwhen = 'lead.added'\n[rule.create_task]\ntype = 1\ntext = 'x'\ndue = '+3651d'\n"
    )
    result = run_cli(["rules", "check", "--rules", str(rules)], sqlite_url)
    assert result.returncode == 2, result.stderr
    line = next(line for line in result.stderr.splitlines() if "due" in line)
    assert "due '+3651d' is too long — give 0s to 3650d (written like 90s, 5m, 2h, 1d12h)" in line, line


def test_prune_with_keep_off_deletes_nothing_and_says_so(sqlite_url):
    """AMOHOOK_KEEP=off is what `serve`/`worker` accept to keep everything; `prune` under the same
    environment (cron) keeps everything too instead of failing."""
    result = run_cli(["prune"], sqlite_url, env=cli_env(sqlite_url, AMOHOOK_KEEP="off"))
    assert result.returncode == 0, result.stderr
    assert "retention is off" in result.stdout and "nothing deleted" in result.stdout
    as_json = run_cli(["prune", "--older-than", "off", "--json"], sqlite_url)
    assert as_json.returncode == 0 and '"keep_seconds": null' in as_json.stdout, as_json.stderr


def test_options_take_the_grammar_where_they_took_plain_seconds(sqlite_url):
    """--lease, --poll (and serve's timeouts) read durations; a bare number is still seconds."""
    result = run_cli(
        ["worker", "--handler", "os.path:basename", "--once", "--lease", "2m", "--poll", "0.5"], sqlite_url
    )
    assert result.returncode == 0, result.stderr
    assert "processed 0 event(s)" in result.stdout


def test_one_duration_formatter_and_one_parser():
    """Issue 16 #4: durations are formatted and parsed in amohook/durations.py only; no module
    does its own arithmetic on days and hours for people, nor reads units from text."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "amohook"
    own = re.compile(r"// 86400|% 86400|// 3600\b|% 3600\b|\"w\": 7 \* 86400|units\s*=\s*\{")
    offenders = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in package.rglob("*.py")
        if path.name != "durations.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if own.search(line)
    ]
    assert not offenders, "\n".join(offenders)
