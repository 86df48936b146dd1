"""Admin-written Markdown (the annotation guidelines) rendered as a safe subset of HTML.

Two layers, so that one mistake does not open the page to script:
1. Python-Markdown runs without its raw-HTML handling: `<script>` or `<img onerror>` typed into
   the Markdown comes out as visible, escaped text, never as markup.
2. nh3 (ammonia) then keeps only an allowlist of tags and attributes, links only to http(s) and
   mailto, and adds rel="noopener noreferrer" to every link.
The result is the only string in the UI that templates print with |safe.
"""
import markdown as markdown_lib
import nh3

ALLOWED_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "b", "i", "del", "code", "pre", "kbd",
    "blockquote", "ul", "ol", "li", "dl", "dt", "dd", "a", "table", "thead", "tbody", "tr", "th", "td",
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}}
ALLOWED_URL_SCHEMES = {"http", "https", "mailto"}
EXTENSIONS = ["tables", "sane_lists", "fenced_code"]


def render_markdown(text: str) -> str:
    """Markdown -> HTML limited to ALLOWED_TAGS / ALLOWED_ATTRIBUTES (safe to print unescaped)."""
    md = markdown_lib.Markdown(extensions=EXTENSIONS, output_format="html")
    # Raw HTML blocks and inline tags are treated as text (escaped), not passed through.
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    html = md.convert(text or "")
    return nh3.clean(
        html, tags=ALLOWED_TAGS, attributes=ALLOWED_ATTRIBUTES, url_schemes=ALLOWED_URL_SCHEMES,
        link_rel="noopener noreferrer", strip_comments=True,
    )
