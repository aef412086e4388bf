"""Text from a config (names, sources, paths) inside the report's reStructuredText, shown as it
was written: no link, reference, emphasis or role made of it."""

from __future__ import annotations

import re

# what reStructuredText reads as markup inline: backslash escapes, emphasis, literals,
# references and targets, substitutions, roles, and a bare URL's "scheme:"
MARKUP = re.compile(r"([\\`*_|\[\]<>:])")


def literal(text: str) -> str:
    """``text`` with every character reStructuredText would read as markup escaped."""
    return MARKUP.sub(r"\\\1", str(text))
