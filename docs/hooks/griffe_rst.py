"""A griffe extension that renders the reST inline markup of the docstrings as Markdown.

The docstrings of madness_ppl are numpy style with Sphinx markup (``:math:`x```,
``.. math::`` blocks, ``:func:`~madness_ppl.infer.fit_map```); mkdocstrings renders docstrings as
Markdown, so this extension (listed under ``extensions`` of the mkdocstrings handler in
mkdocs.yml) rewrites them when the API is loaded:

* ``:math:`x``` -> ``\\(x\\)`` and ``.. math::`` blocks -> ``\\[ ... \\]`` (MathJax via arithmatex);
* ``:func:`~a.b.c``` (and ``class``, ``meth``, ``mod``, ``data``, ``attr``, ``obj``, ``exc``) ->
  a cross-reference shown as ``c`` to where ``a.b.c`` is defined (re-exports resolved) when it
  is a known ``madness_ppl`` object, inline code otherwise;
* a paragraph ending in ``::`` (a reST literal block) -> ending in ``:``;
* ``>>>`` doctest blocks outside an ``Examples`` section -> fenced ``pycon`` code blocks
  (inside ``Examples`` mkdocstrings already shows them as code).
"""

from __future__ import annotations

import re
import textwrap

from griffe import Extension

_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_LITERAL = re.compile(r"(\S)::$", re.M)
_UNDERLINE = re.compile(r"\s*-{3,}\s*")


def _canonical(target: str, loader) -> str | None:
    """The path where ``target`` is defined (re-exports resolved), or None if unknown."""
    try:
        obj = loader.modules_collection[target]
    except Exception:  # not a known object: no link
        return None
    return getattr(obj, "target_path", None) or obj.canonical_path


def _role(match: re.Match, loader) -> str:
    kind, tilde, target = match.groups()
    target = target.strip()
    shown = target.rsplit(".", 1)[-1] if tilde else target
    if kind in ("func", "meth"):
        shown += "()"
    if target.startswith("madness_ppl.") and kind not in ("data", "attr", "obj"):
        canonical = _canonical(target, loader)
        if canonical is not None:
            return f"[`{shown}`][{canonical}]"
    return f"`{shown}`"


def _math_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(".. math::"):
            indent = line[: len(line) - len(stripped)]
            body = [stripped[len(".. math::") :].strip()]
            i += 1
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
            ):
                body.append(lines[i])
                i += 1
            maths = textwrap.dedent("\n".join(body)).strip("\n")
            out += [
                "",
                f"{indent}\\[",
                *(indent + m for m in maths.splitlines()),
                f"{indent}\\]",
                "",
            ]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _fence_doctests(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() and i + 1 < len(lines) and _UNDERLINE.fullmatch(lines[i + 1]):
            section = line.strip().lower()
        if line.lstrip().startswith(">>>") and section not in ("examples", "example"):
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += [f"{indent}```pycon", *block, f"{indent}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def rst_to_markdown(text: str, loader=None) -> str:
    """Rewrite the reST markup of one docstring (see the module docstring)."""
    text = _fence_doctests(_math_blocks(text))
    text = _MATH_ROLE.sub(lambda m: f"\\({m.group(1)}\\)", text)
    text = _ROLE.sub(lambda m: _role(m, loader), text)
    return _LITERAL.sub(r"\1:", text)


class RstToMarkdown(Extension):
    """Convert every docstring once the API tree is loaded."""

    def on_object(self, *, obj, loader, **kwargs) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        obj.docstring.value = rst_to_markdown(obj.docstring.value, loader)
