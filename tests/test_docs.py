"""Every command in README.md and docs/ is one that works: each shell line of a fenced block is
classified and checked against the real thing it names (a script's own argument parser, the
Makefile's targets, Ray's own command-line parser, the repository's files), and a line nobody
knows how to check fails. Inline commands (`python scripts/x.py --opt`) get their script and
options checked; Python blocks must import what they use; JSON blocks must parse; relative links
must lead to a file and a heading that exist. Nothing here starts Ray or trains."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "results" / "README.md"]


def _console() -> dict[str, str]:
    """`detr-ray NAME` -> the SCRIPT of scripts/SCRIPT.py that runs the same program: the console
    command's own table where it exists."""
    try:
        from detr_ray.cli.main import COMMANDS
    except ImportError:
        return {
            "prepare": "prepare_coco",
            "train": "train",
            "tune": "tune",
            "evaluate": "evaluate",
            "serve": "serve",
            "export": "export",
        }
    return {name: module for name, (module, _) in COMMANDS.items()}


CONSOLE = _console()
REPO_PREFIXES = ("scripts/", "benchmarks/", "search_spaces/", "detr_ray/", "tests/", "docs/")
REPO_FILES = ("cluster.yaml", "environment.yml", "requirements.txt", "Makefile", "pyproject.toml")
SHELL_LANGS = ("", "sh", "bash", "shell")
# Placeholders the pages use for what the reader supplies: <run name>, <storage>, BUCKET, ...
PLACEHOLDER = re.compile(r"<[^<>\n]+>")


class DocError(AssertionError):
    pass


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_blocks(page: Path) -> list[tuple[str, str, int]]:
    """(language, body, line number) of every fenced code block, indented ones included."""
    text = page.read_text()
    blocks = []
    for m in re.finditer(r"^( *)```([\w-]*)\n(.*?)^\1```", text, flags=re.S | re.M):
        body = "\n".join(line[len(m.group(1)) :] for line in m.group(3).splitlines())
        blocks.append((m.group(2), body, text.count("\n", 0, m.start()) + 1))
    return blocks


def shell_commands(body: str) -> list[list[str]]:
    """A shell block's commands as argv lists: continuation lines joined, comments dropped, a
    placeholder with spaces kept as one word, `&&` chains split."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        line = PLACEHOLDER.sub(lambda m: m.group(0).replace(" ", "_"), line)
        words = shlex.split(line, comments=True)
        while words:
            if "&&" in words:
                i = words.index("&&")
                commands.append(words[:i])
                words = words[i + 1 :]
            else:
                commands.append(words)
                words = []
    return [c for c in commands if c]


# --- what a command may name --------------------------------------------------------------------


def check_repo_paths(words: list[str]) -> None:
    """A word naming a file of this repository must name one that exists (a prefix such as
    --record's counts when files of that name with an extension exist)."""
    for word in words:
        for part in [word, *word.split("=", 1)[1:]]:
            path = part.removeprefix("./")
            named = path.startswith(REPO_PREFIXES) or path in REPO_FILES
            if named and not ((ROOT / path).exists() or list((ROOT / path).parent.glob(Path(path).name + ".*"))):
                raise DocError(f"{part}: no such file in the repository")


@functools.cache
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([\w.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), flags=re.M))


@functools.cache
def load_script(path: str):
    spec = importlib.util.spec_from_file_location("docs_" + Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def declared_options(path: str) -> frozenset[str]:
    """The option strings a script or benchmark declares: from its parser's --help when it has
    parse_args(argv), else from its add_argument calls, else from running it with --help."""
    if path.startswith("scripts/") and hasattr(load_script(path), "parse_args"):
        out = io.StringIO()
        with redirect_stdout(out), pytest.raises(SystemExit):
            load_script(path).parse_args(["--help"])
        return frozenset(re.findall(r"(?<![\w-])(--?[\w][\w-]*)", out.getvalue()))
    options = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    if not options:  # a thin wrapper: ask the program itself
        run = subprocess.run(
            [sys.executable, str(ROOT / path), "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        options = set(re.findall(r"(?<![\w-])(--?[\w][\w-]*)", run.stdout))
    return frozenset(options | {"-h", "--help"})


def check_options(path: str, args: list[str]) -> None:
    if not (ROOT / path).is_file():
        raise DocError(f"{path}: no such program in the repository")
    known = declared_options(path)
    for word in args:
        option = word.split("=", 1)[0]
        if word.startswith("-") and not re.fullmatch(r"-\d.*", word) and option not in known:
            raise DocError(f"{path}: no option {option} (it has {', '.join(sorted(known))})")


def check_script(path: str, args: list[str]) -> None:
    """scripts/X.py ARGS goes through the script's own parse_args where it has one."""
    if not (ROOT / path).is_file():
        raise DocError(f"{path}: no such script")
    module = load_script(path)
    if not hasattr(module, "parse_args"):
        return check_options(path, args)
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            module.parse_args(args)
    except SystemExit as e:
        if e.code not in (0, None):
            raise DocError(f"python {path} {shlex.join(args)}: refused by its argument parser") from e


def check_ray(args: list[str]) -> None:
    """`ray ARGS` parses with Ray's own click command line; a command Ray runs on a node (exec) or
    as a job (job submit ... -- ENTRYPOINT) is checked as well."""
    import click
    from ray.scripts.scripts import cli

    command, name, rest = cli, "ray", list(args)
    while isinstance(command, click.Group):
        if not rest:
            raise DocError(f"ray {name}: no sub-command")
        name, rest = rest[0], rest[1:]
        command = command.get_command(click.Context(command), name)
        if command is None:
            raise DocError(f"`ray ... {name}` is not a ray sub-command")
    try:
        context = command.make_context(name, list(rest))
    except click.ClickException as e:
        raise DocError(f"ray {shlex.join(args)}: {e.format_message()}") from e
    inner = []
    if "--" in rest:  # ray job submit OPTIONS -- ENTRYPOINT
        inner = [rest[rest.index("--") + 1 :]]
    elif name == "exec":
        inner = shell_commands(context.params["cmd"])
    for words in inner:
        check_command(words)


CURL_OPTIONS = {"-s", "-O", "-F", "-H", "--data-binary"}
ENDPOINTS = ("http://127.0.0.1:8000/", "http://localhost:8000/", "https://dl.fbaipublicfiles.com/detr/")


def check_command(words: list[str]) -> str:
    """Checks one command (argv); returns its kind. Raises DocError for a wrong one or one of a
    kind this test does not know."""
    head, args = words[0], words[1:]
    check_repo_paths(words)
    if head == "make":
        missing = [t for t in args if t not in make_targets()]
        if not args or missing:
            raise DocError(f"make {' '.join(args)}: no such Makefile target {missing}")
        return "make"
    if head == "python" and args and args[0].startswith("scripts/"):
        check_script(args[0], args[1:])
        return "script"
    if head == "python" and args and args[0].startswith("benchmarks/"):
        check_options(args[0], args[1:])
        return "benchmark"
    if head == "detr-ray":
        if not args or args[0] not in CONSOLE:
            raise DocError(f"detr-ray {' '.join(args[:1])}: not one of {', '.join(CONSOLE)}")
        check_script(f"scripts/{CONSOLE[args[0]]}.py", args[1:])
        return "script"
    if head == "bash" and args and args[0].startswith("benchmarks/") and args[0].endswith(".sh"):
        return "benchmark"
    if head == "scripts/local_cluster.sh":
        subcommands = re.findall(r"^\s+([\w-]+)\) cmd_", (ROOT / head).read_text(), flags=re.M)
        if len(args) != 1 or args[0] not in subcommands:
            raise DocError(f"{head} {' '.join(args)}: not one of {subcommands}")
        return "cluster script"
    if head == "scripts/aws_security_group.sh":
        if len(args) != 1 or not re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", args[0]):
            raise DocError(f"{head} takes one CIDR, got {args}")
        return "cluster script"
    if head == "eval" and len(args) == 1 and re.fullmatch(r"\$\((.*)\)", args[0]):
        return check_command(shlex.split(args[0][2:-1]))
    if head == "ray":
        check_ray(args)
        return "ray"
    if head == "optuna-dashboard":
        if not args or any(a.startswith("-") and a not in ("--host", "--port") for a in args):
            raise DocError(f"optuna-dashboard {' '.join(args)}")
        return "viewer"
    if head == "tensorboard":
        if "--logdir" not in args or any(a.startswith("-") and a not in ("--logdir", "--port") for a in args):
            raise DocError(f"tensorboard {' '.join(args)}")
        return "viewer"
    if head == "curl":
        bad = [a for a in args if a.startswith("-") and a not in CURL_OPTIONS]
        urls = [a for a in args if "://" in a]
        if bad or len(urls) != 1 or not urls[0].startswith(ENDPOINTS):
            raise DocError(f"curl {' '.join(args)}: options {bad}, URLs {urls}")
        return "curl"
    if head == "aws" and args[:2] == ["s3", "cp"] and len(args) == 4:
        if not any(a.startswith("s3://") for a in args[2:]):
            raise DocError(f"aws {' '.join(args)}: copies nothing from or to S3")
        return "aws"
    if head == "conda":
        name = re.search(r"^name:\s*(\S+)", (ROOT / "environment.yml").read_text(), flags=re.M).group(1)
        if args[:2] == ["env", "create"] and args[2:] == ["-f", "environment.yml"]:
            return "conda"
        if args == ["activate", name]:
            return "conda"
        raise DocError(
            f"conda {' '.join(args)}: expected `conda env create -f environment.yml` or `conda activate {name}`"
        )
    if head == "pip" and args == ["install", "--no-deps", "-e", "."]:
        return "pip"
    if head == "export" and args and all(re.fullmatch(r"[A-Z_]+=\S+", a) for a in args):
        return "environment"
    if head == "cd" and len(args) == 1:
        return "cd"
    if head == "cat" and len(args) == 1:
        return "cat"
    raise DocError(f"no check for this command: {shlex.join(words)}")


# --- the tests ----------------------------------------------------------------------------------


def _all_fenced():
    return [(page, lang, body, line) for page in PAGES for lang, body, line in fenced_blocks(page)]


def test_the_pages_exist_and_the_readme_is_short():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 3
    lines = (ROOT / "README.md").read_text().count("\n")
    assert 100 <= lines <= 250, f"README.md has {lines} lines: a user guide of one screen plus links"


def test_every_fenced_shell_command_is_checked():
    kinds, failures = {}, []
    for page, lang, body, line in _all_fenced():
        if lang not in SHELL_LANGS:
            continue
        for words in shell_commands(body):
            try:
                kind = check_command(words)
                kinds[kind] = kinds.get(kind, 0) + 1
            except (DocError, ValueError) as e:
                failures.append(f"{_rel(page)}:{line}: {e}")
    assert not failures, "\n".join(failures)
    # the kinds the pages are known to hold were all seen (a broken extraction finds nothing)
    assert {"make", "script", "benchmark", "ray", "curl", "cluster script", "viewer"} <= set(kinds), kinds


def test_inline_commands_name_real_programs_and_options():
    pattern = re.compile(
        r"`((?:python (?:scripts|benchmarks)/\w+\.py|detr-ray [a-z]+|make [a-z]|bash benchmarks/"
        r"|conda |scripts/\w+\.sh )[^`]*)`"
    )
    failures, seen = [], 0
    for page in PAGES:
        for m in pattern.finditer(page.read_text()):
            text = PLACEHOLDER.sub(lambda p: p.group(0).replace(" ", "_"), " ".join(m.group(1).split()))
            text = text.removesuffix("...")  # "`detr-ray train ...`": the program, any arguments
            seen += 1
            try:
                for words in shell_commands(text):
                    if words[0] == "python" and words[1].startswith(("scripts/", "benchmarks/")):
                        check_options(words[1], words[2:])  # a fragment: its options, not all of it
                    elif words[0] == "detr-ray":  # `detr-ray train --epochs 2`, `detr-ray prepare|train|...`
                        for name in words[1].split("|"):
                            if name not in CONSOLE:
                                raise DocError(f"detr-ray {name}: not one of {', '.join(CONSOLE)}")
                            check_options(f"scripts/{CONSOLE[name]}.py", words[2:])
                    else:
                        check_command(words)
            except (DocError, ValueError) as e:
                failures.append(f"{_rel(page)}: `{m.group(1)}`: {e}")
    assert seen > 10
    assert not failures, "\n".join(failures)


def test_code_blocks_are_shell_python_json_or_text():
    for page, lang, body, line in _all_fenced():
        assert lang in (*SHELL_LANGS, "python", "json", "text"), f"{_rel(page)}:{line}: a ```{lang} block"
        if lang == "json":
            json.loads(body)
        elif lang == "python":
            tree = ast.parse(body)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    module = importlib.import_module(node.module)
                    missing = [a.name for a in node.names if not hasattr(module, a.name)]
                    assert not missing, f"{_rel(page)}:{line}: {node.module} has no {missing}"
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        importlib.import_module(alias.name)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_lead_somewhere():
    failures = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                failures.append(f"{_rel(page)}: {target}: no such file")
            elif anchor:
                headings = re.findall(r"^#+ (.*)$", file.read_text(), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    failures.append(f"{_rel(page)}: {target}: no heading #{anchor} in {file.name}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "words",
    [
        ["python", "scripts/tune.py", "--no-such-option"],
        ["python", "scripts/nonexistent.py"],
        ["make", "no-such-target"],
        ["ray", "job", "submit", "--no-such-flag", "--", "python", "scripts/tune.py"],
        ["ray", "exec", "cluster.yaml", "python scripts/train.py --bogus"],
        ["python", "benchmarks/serve.py", "--no-such-option"],
        ["python", "scripts/tune.py", "--space", "search_spaces/missing.yaml"],
        ["detr-ray", "frobnicate"],
        ["rm", "-rf", "runs"],
    ],
)
def test_the_checker_refuses_what_is_wrong(words):
    with pytest.raises(DocError):
        check_command(words)


def test_files_the_pages_name_exist():
    """`detr_ray/data/images.py`, `tests/faults/`, ...: a file or folder of this repository named
    in the text exists, so a rename cannot leave the pages behind."""
    failures = []
    for page in PAGES:
        for name in re.findall(
            r"`((?:detr_ray|scripts|benchmarks|tests|search_spaces|docs)/[\w./-]*)`", page.read_text()
        ):
            if not (ROOT / name).exists():
                failures.append(f"{_rel(page)}: `{name}` does not exist")
    assert not failures, "\n".join(failures)


def test_the_package_layout_is_the_package():
    """docs/architecture.md's tree of detr_ray/ lists modules and folders that exist, and every
    module of the package is in it."""
    block = next(
        body
        for lang, body, _ in fenced_blocks(ROOT / "docs" / "architecture.md")
        if lang == "text" and body.startswith("detr_ray/\n")
    )
    listed, stack = set(), []
    for line in block.splitlines():
        m = re.match(r"^( *)([\w.]+/?)(?:\s{2,}|$)", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth] + [m.group(2).rstrip("/")]
        if depth == 0 and stack[0] != "detr_ray":
            continue
        listed.add("/".join(stack))
    listed = {p for p in listed if p.startswith("detr_ray")}
    missing = sorted(p for p in listed if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md lists what does not exist: {missing}"
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "detr_ray").rglob("*.py") if p.name != "__init__.py"}
    # detr_ray/cli/ is listed as a folder: its modules are the commands
    unlisted = sorted(m for m in modules if m not in listed and not m.startswith("detr_ray/cli/"))
    assert not unlisted, f"modules missing from docs/architecture.md's package layout: {unlisted}"
