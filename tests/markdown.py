"""Markdown helpers for the tests that check the docs: the anchors GitHub gives headings, and relative links."""

from __future__ import annotations

import re

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation but ``-`` and ``_`` dropped, spaces
    to ``-``, and ``-1``, ``-2`` … on repeats; headings inside code fences are not headings. Explicit
    ``<a id="...">`` anchors count too."""
    anchors: set[str] = set(re.findall(r'<a id="([^"]+)"', markdown))
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            base = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchor, n = base, 0
            while anchor in anchors:
                n += 1
                anchor = f"{base}-{n}"
            anchors.add(anchor)
    return anchors


def relative_links(markdown: str) -> list[str]:
    """Link targets that are neither absolute URLs nor mail addresses, outside code fences and inline code."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
