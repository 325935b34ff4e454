"""mkdocs hooks of the madness_ppl documentation (loaded by ``hooks:`` in mkdocs.yml).

* ``mkdocs build`` starts from a clean ``docs/generated/`` so that every tutorial in ``examples/``
  is executed by mkdocs-gallery (set ``MADNESS_PPL_DOCS_CACHE=1`` to reuse the outputs of
  unchanged examples while editing prose; ``mkdocs serve`` always reuses them).
* Examples run with ``__file__`` defined (mkdocs-gallery leaves it out; ``python x.py`` and
  sphinx-gallery set it).
* Navigation entries of gallery pages whose script is not in ``examples/`` (yet) are dropped.
* ``<!-- run NAME: madness-ppl ARGS -->`` in a page runs the command during the build (in
  ``docs/generated/run/NAME/``, so the page can show the files it writes) and is replaced by the
  command and its output; a non-zero exit status fails the build.
* Figures that live outside ``docs/`` (``benchmarks/results/*.png``, the validation figures of
  the shipped priors in ``madness_ppl/weights/<name>/``) are copied to ``docs/generated/``.
* ``<!-- if-exists: PATH -->...<!-- end-if -->`` keeps its content only when ``PATH`` (relative to
  the repository root) exists: benchmark result tables that have not been produced yet are left
  out instead of breaking ``pymdownx.snippets``. ``<!-- other-benchmark-results -->`` lists the
  ``benchmarks/results/*.md`` tables that the page does not mention otherwise.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mkdocs.exceptions import PluginError

log = logging.getLogger("mkdocs.hooks.madness_docs")

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GENERATED = DOCS / "generated"
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "benchmarks" / "results"
GALLERY_PREFIX = "generated/gallery/"

RUN_RE = re.compile(r"<!--\s*run\s+(?P<name>[\w-]+)\s*:\s*(?P<cmd>.+?)\s*-->")
IF_EXISTS_RE = re.compile(
    r"<!--\s*if-exists:\s*(?P<path>\S+)\s*-->(?P<body>.*?)<!--\s*end-if\s*-->", re.S
)
OTHER_RESULTS = "<!-- other-benchmark-results -->"
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

_state: dict = {"command": None, "outputs": {}}


def _define_file_in_examples() -> None:
    """Run examples with ``__file__`` set, as ``python examples/x.py`` and sphinx-gallery do.

    mkdocs-gallery deliberately leaves ``__file__`` undefined in the example namespace; examples
    that locate files next to themselves (``Path(__file__).parent``) would fail only in the docs.
    """
    try:
        from mkdocs_gallery import gen_single
    except ImportError:
        return
    original = gen_single._exec_and_get_memory
    if getattr(original, "madness_docs", False):
        return

    def exec_with_file(compiler, ast_module, code_ast, script):
        script.run_vars.example_globals.setdefault("__file__", str(script.src_py_file))
        return original(compiler, ast_module, code_ast, script)

    exec_with_file.madness_docs = True
    gen_single._exec_and_get_memory = exec_with_file


def on_startup(command, dirty, **kwargs):
    _state["command"] = command
    _define_file_in_examples()
    # rich (progress and log lines of the library) wraps at 80 columns when not on a terminal
    os.environ.setdefault("COLUMNS", "100")
    try:  # bind absl's log handler to the real stderr before mkdocs-gallery tees the streams
        import absl.logging  # noqa: F401
    except ImportError:
        pass
    if command == "build" and not os.environ.get("MADNESS_PPL_DOCS_CACHE"):
        shutil.rmtree(GENERATED, ignore_errors=True)


def _prune(nav):
    """Drop gallery pages whose example script does not exist."""
    if isinstance(nav, list):
        items = [_prune(item) for item in nav]
        return [item for item in items if item is not None]
    if isinstance(nav, dict):
        ((title, value),) = nav.items()
        value = _prune(value)
        return None if value is None else {title: value}
    if (
        isinstance(nav, str)
        and nav.startswith(GALLERY_PREFIX)
        and nav != GALLERY_PREFIX + "index.md"
    ):
        script = EXAMPLES / (Path(nav).stem + ".py")
        if not script.is_file():
            log.info("examples/%s does not exist: %s left out of the navigation", script.name, nav)
            return None
    return nav


def on_config(config, **kwargs):
    if config.get("nav"):
        config["nav"] = _prune(config["nav"])
    return config


def _run(name: str, command: str) -> str:
    argv = shlex.split(command)
    if argv[0] == "madness-ppl":  # the console script, run with this interpreter
        argv = [sys.executable, "-m", "madness_ppl", *argv[1:]]
    cwd = GENERATED / "run" / name
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
        check=False,
    )
    elapsed = time.perf_counter() - start
    output = ANSI_RE.sub("", proc.stdout).rstrip()
    output = output.replace(f"{Path(sys.executable).name} -m madness_ppl", "madness-ppl")
    output = output.replace("python -m madness_ppl", "madness-ppl")
    if proc.returncode != 0:
        raise PluginError(
            f"documentation command `{command}` exited with status {proc.returncode}:\n"
            + "\n".join(output.splitlines()[-40:])
        )
    log.info("ran `%s` in %.1f s", command, elapsed)
    return output


def on_pre_build(config, **kwargs):
    # Commands shown with their output.
    outputs = _state["outputs"]
    for page in sorted(Path(config["docs_dir"]).rglob("*.md")):
        if GENERATED in page.parents:
            continue
        for match in RUN_RE.finditer(page.read_text()):
            key = (match["name"], match["cmd"])
            if key not in outputs:
                outputs[key] = _run(*key)
    # Figures kept outside docs/: benchmark results and the shipped priors' validation figures.
    for source, target in [(RESULTS, GENERATED / "benchmarks"), *_prior_figures()]:
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            for figure in source.glob("*.png"):
                shutil.copy2(figure, target / figure.name)


def _prior_figures():
    weights = ROOT / "madness_ppl" / "weights"
    if not weights.is_dir():
        return []
    return [(d, GENERATED / "prior" / d.name) for d in weights.iterdir() if d.is_dir()]


def _show_run(match: re.Match) -> str:
    output = _state["outputs"][(match["name"], match["cmd"])]
    return f"```console\n$ {match['cmd']}\n{output}\n```"


def _other_results(markdown: str) -> str:
    if not RESULTS.is_dir():
        return ""
    sections = []
    for table in sorted(RESULTS.glob("*.md")):
        relative = table.relative_to(ROOT).as_posix()
        if relative in markdown:
            continue
        script = ROOT / "benchmarks" / f"{table.stem}.py"
        how = f"`python benchmarks/{script.name}`" if script.is_file() else ""
        sections.append(
            f'## {table.stem.replace("_", " ").capitalize()}\n\n{how}\n\n--8<-- "{relative}"\n'
        )
    return "\n".join(sections)


def on_page_markdown(markdown, page, config, files, **kwargs):
    def keep_if_exists(match: re.Match) -> str:
        if (ROOT / match["path"]).exists():
            return match["body"]
        log.info("%s: %s does not exist, section left out", page.file.src_uri, match["path"])
        return ""

    markdown = IF_EXISTS_RE.sub(keep_if_exists, markdown)
    if OTHER_RESULTS in markdown:
        markdown = markdown.replace(OTHER_RESULTS, _other_results(markdown))
    return RUN_RE.sub(_show_run, markdown)
