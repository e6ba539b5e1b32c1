"""Names from users (a model, a merge, a path) written into Markdown cards and reports: shown as the text
they are, never as markup. Markdown passes raw HTML through, so `<script>` in a merge's name would run
wherever the card is rendered; these keep it text (HTML pages use html.escape)."""
import re

_MARKUP = re.compile(r"([\\`*_\[\]|~#!])")


def _flat(text) -> str:
    return " ".join(str(text).split("\n")).replace("\r", " ")


def no_html(text) -> str:
    """Text with its HTML made inert (entities), for prose that may carry its own Markdown."""
    return _flat(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def md(text) -> str:
    """A name as literal Markdown text: HTML as entities, Markdown's inline markup backslash-escaped, one line."""
    return _MARKUP.sub(r"\\\1", no_html(text))


def md_code(text, table: bool = False) -> str:
    """A name as a Markdown code span fenced by more backticks than it holds; `table`: inside a table cell,
    where even a code span's `|` ends the cell unless escaped. A name with HTML characters is escaped text
    instead: CommonMark shows a code span's `<` as is, but not every renderer of a card follows it, and an
    entity inside a code span would show as the entity."""
    text = _flat(text)
    if re.search(r"[<>&]", text):
        return md(text)
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    body = text.replace("|", "\\|") if table else text
    return f"{fence}{pad}{body}{pad}{fence}"
