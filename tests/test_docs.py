"""The documentation holds together: links resolve, the mkdocs nav lists every page, the README
stays a front door, and every `sdb` command shown in a bash block parses. No mkdocs needed."""
from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from sdb_cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 200


def markdown_files() -> list[Path]:
    return [README, ROOT / "benchmarks" / "README.md", *sorted(DOCS.rglob("*.md"))]


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


# --------------------------------------------------------------------------- links
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)


def link_targets(text: str) -> list[str]:
    """Link and image targets of a Markdown text, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(text) + REF_DEF.findall(text)


def broken_links(md: Path) -> list[str]:
    """Relative targets of ``md`` that name no existing file; a page under docs/ must also link
    inside docs/ (mkdocs --strict refuses anything else). Anchors are not checked."""
    bad = []
    for target in link_targets(md.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith(("#", "/")):
            continue  # http:, mailto:, an anchor on the same page, a site-absolute URL
        path = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (md.parent / path).resolve()
        if not resolved.exists():
            bad.append(f"{_rel(md)}: {target} (no such file)")
        elif md.is_relative_to(DOCS) and not resolved.is_relative_to(DOCS):
            bad.append(f"{_rel(md)}: {target} (outside docs/: mkdocs cannot follow it)")
    return bad


@pytest.mark.parametrize("md", markdown_files(), ids=_rel)
def test_relative_links_resolve(md):
    assert broken_links(md) == []


def test_a_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# there\n")
    page.write_text("[ok](there.md#top) [bad](missing.md) ![img](pics/none.png) `[code](nope.md)`\n"
                    "```\n[fenced](nope.md)\n```\n[ref]: gone.md\n")
    assert [b.split(": ", 1)[1] for b in broken_links(page)] == [
        "missing.md (no such file)", "pics/none.png (no such file)", "gone.md (no such file)"]


# --------------------------------------------------------------------------- mkdocs nav
def nav_pages(nav) -> list[str]:
    """Every page path in an mkdocs nav (nested lists of ``title: page``, bare pages, sections)."""
    if isinstance(nav, str):
        return [] if re.match(r"^[a-z]+://", nav) else [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    raise TypeError(f"unexpected nav entry {nav!r}")


def nav_problems(config: dict, docs_dir: Path) -> list[str]:
    listed = nav_pages(config.get("nav") or [])
    pages = {str(p.relative_to(docs_dir)) for p in docs_dir.rglob("*.md")}
    problems = [f"in nav, no such page: {p}" for p in listed if p not in pages]
    problems += [f"not in nav: {p}" for p in sorted(pages - set(listed))]
    problems += [f"twice in nav: {p}" for p in sorted({p for p in listed if listed.count(p) > 1})]
    return problems


def test_mkdocs_config():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["name"] == "material"
    assert config.get("strict") is True
    assert (ROOT / config.get("docs_dir", "docs")).resolve() == DOCS
    assert nav_problems(config, DOCS) == []


def test_a_nav_mismatch_is_caught(tmp_path):
    (tmp_path / "a.md").write_text("# a\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.md").write_text("# b\n")
    config = {"nav": [{"Home": "a.md"}, {"Section": ["c.md", {"A again": "a.md"}]}]}
    assert nav_problems(config, tmp_path) == [
        "in nav, no such page: c.md", "not in nav: notes/b.md", "twice in nav: a.md"]


# --------------------------------------------------------------------------- README
def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    first_screen = "\n".join(text.splitlines()[:25])
    assert "make run" in first_screen and "make test" in first_screen


# --------------------------------------------------------------------------- sdb commands
BASH_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SDB_CALL = re.compile(r"(?:^|(?<=[\s(;&|`]))(?:\.venv/bin/)?sdb(?=\s|$)")


def shell_lines(block: str) -> list[str]:
    """Logical lines of a bash block: ``\\`` continuations joined, and a line whose quotes are still
    open (a JSON ``--params`` spread over lines) joined with the next."""
    out, cur = [], ""
    for line in block.splitlines():
        cur = f"{cur} {line.strip()}" if cur else line.strip()
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip()
            continue
        try:
            shlex.split(cur, comments=True)
        except ValueError:  # no closing quotation: the command goes on
            continue
        out.append(cur)
        cur = ""
    if cur:
        out.append(cur)
    return out


def sdb_invocations(line: str) -> list[list[str]]:
    """The argument lists of every ``sdb`` (or ``.venv/bin/sdb``) call on one shell line, up to the
    end of its command (a pipe, ``;``, ``&&``, ``)``) and without the comment."""
    try:
        words = shlex.split(line, comments=True, posix=True)
    except ValueError:
        return []
    calls, i = [], 0
    # shlex keeps "$(sdb" or "KEY=$(sdb" glued: split such words at the call.
    flat = []
    for w in words:
        m = re.search(r"(?:^|[(=`])((?:\.venv/bin/)?sdb)$", w)
        flat.append(m.group(1) if m and m.start(1) > 0 else w)
    while i < len(flat):
        if SDB_CALL.fullmatch(flat[i]):
            args = []
            i += 1
            while i < len(flat) and flat[i] not in ("|", "||", "&&", ";", ")", "&"):
                if flat[i].endswith(")") and not flat[i].startswith(("{", "[")):
                    args.append(flat[i][:-1])
                    break
                args.append(flat[i])
                i += 1
            calls.append(args)
        i += 1
    return calls


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def command_problems(args: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Whether ``sdb ARGS`` names real subcommands and only flags its (sub)command knows; values and
    placeholders (``ID``, ``PATH``, ``[--flag VALUE]``) are not checked."""
    problems, path = [], ["sdb"]
    tokens = [t.strip("[]") for t in args]
    tokens = [t for t in tokens if t]
    i = 0
    while True:
        subs = _subparsers(parser)
        if not subs:
            break
        if i >= len(tokens) or tokens[i].startswith("-"):
            problems.append(f"{' '.join(path)}: a subcommand is missing (one of {', '.join(subs)})")
            return problems
        if tokens[i] not in subs:
            problems.append(f"{' '.join(path)}: unknown subcommand {tokens[i]!r} (one of {', '.join(subs)})")
            return problems
        path.append(tokens[i])
        parser = subs[tokens[i]]
        i += 1
    known = parser._option_string_actions
    for t in tokens[i:]:
        for alt in t.split("|") if t.startswith("-") else ():
            flag = alt.split("=", 1)[0]
            if flag.startswith("-") and flag not in known:
                problems.append(f"{' '.join(path)}: unknown flag {flag}")
    return problems


def documented_sdb_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for md in markdown_files():
        for block in BASH_BLOCK.findall(md.read_text()):
            for line in shell_lines(block):
                for args in sdb_invocations(line):
                    found.append((_rel(md), line, args))
    return found


def test_documented_sdb_commands_parse():
    parser = build_parser()
    commands = documented_sdb_commands()
    assert len(commands) >= 30, "the bash blocks' sdb commands were not found"
    problems = [f"{md}: {p}\n    {line}" for md, line, args in commands for p in command_problems(args, parser)]
    assert problems == [], "\n".join(problems)


def test_a_bad_sdb_command_is_caught():
    parser = build_parser()
    block = ("export SDB_API_KEY=$(.venv/bin/sdb keys create --scopes jobs | tail -1)   # sdb nothing --x\n"
             "sdb jobs submit wrap --wait --params '{\"data\": \"digits\",\n  \"arch\": \"cnn\"}'\n"
             "sdb wrap --train-teacher --arch cnn \\\n    --data mnist-5k --out b --no-such-flag\n"
             "sdb audit --bundle PATH [--policy probs|top_k|label] --polcy x\n"
             "sdb frobnicate --data x\nsdb keys --scopes jobs\n"
             "curl -s localhost:8000/v1/models | jq .  # not an sdb line: .sdb/bundles\n")
    calls = [args for line in shell_lines(block) for args in sdb_invocations(line)]
    assert calls[0] == ["keys", "create", "--scopes", "jobs"]
    assert calls[1][:4] == ["jobs", "submit", "wrap", "--wait"]
    assert [command_problems(c, parser) for c in calls] == [
        [], [], ["sdb wrap: unknown flag --no-such-flag"], ["sdb audit: unknown flag --polcy"],
        ["sdb: unknown subcommand 'frobnicate' (one of " + ", ".join(_subparsers(parser)) + ")"],
        ["sdb keys: a subcommand is missing (one of create, list, revoke)"]]


def documented_job_params() -> list[tuple[str, str, dict]]:
    """(page, kind, params) of every ``sdb jobs submit KIND --params '{...}'`` in the docs' bash blocks."""
    found = []
    for md, _, args in documented_sdb_commands():
        if args[:2] == ["jobs", "submit"] and "--params" in args:
            value = args[args.index("--params") + 1]
            if value.startswith("{"):
                found.append((md, args[2], json.loads(value)))
    return found


def test_documented_job_params_validate():
    """The params the docs show are the job API's (one model reference, file ids, no paths)."""
    from pydantic import ValidationError

    from service.jobs.kinds import get_kind

    examples = documented_job_params()
    assert len(examples) >= 10, "the docs' job examples were not found"
    problems = []
    for md, kind, params in examples:
        try:
            get_kind(kind).params.model_validate(params)
        except (ValidationError, ValueError) as e:
            problems.append(f"{md}: {kind} {json.dumps(params)[:120]}\n    {str(e).splitlines()[0:3]}")
    assert problems == [], "\n".join(problems)


# --------------------------------------------------------------------------- settings
def documented_settings(text: str) -> set[str]:
    """The ``SDB_*`` variables a page's ``## Settings`` section names in code spans (a row may name several)."""
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(SDB_[A-Z0-9_]+)`", section))


def test_every_setting_is_in_the_settings_table():
    # An operator reads the table to learn what can be set: SDB_REGISTER_DEMO, SDB_ORT_INTER_OP_THREADS and
    # SDB_JOB_REAP_S were set nowhere a reader would find them.
    from service.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    named = documented_settings((DOCS / "api.md").read_text())
    assert sorted({f"{prefix}{field.upper()}" for field in Settings.model_fields} - named) == []


def test_an_undocumented_setting_is_caught():
    page = "# API\n\n## Settings\n\n| `SDB_HOST`, `SDB_PORT` | x |\n\n## Next\n\n`SDB_LATER`\n"
    assert documented_settings(page) == {"SDB_HOST", "SDB_PORT"}
