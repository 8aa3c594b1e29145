"""mkdocs hook: README.md is the site's front page, and repository files the docs link to are served too.

The markdown sources keep the relative links that work when the repository is browsed
(GitHub, an editor): README.md links `docs/ddpm.md`, a page under docs/ links
`../benchmarks/results/grid.png`. mkdocs only knows files under docs/, so `mkdocs build
--strict` would call those links broken. This hook makes them real on the site instead of
silencing the check:

- README.md becomes the site's `index.md`;
- every file outside docs/ that a page links to (an image, prompts/README.md, a config) is
  added to the site under `repo/` with its path in the repository, and the link is rewritten
  to it.

A link to a file that does not exist is left alone, so strict mode still reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

# [text](target) and ![alt](target); the target has no spaces in these docs.
LINK = re.compile(r"(!?\[[^\]\n]*\]\()([^)\s]+)(\))")
PREFIX = "repo/"  # where files from outside docs/ live on the site


def _roots(config) -> tuple[Path, Path]:
    return Path(config.config_file_path).resolve().parent, Path(config.docs_dir).resolve()


def _source(src_uri: str, config) -> Path:
    """The file in the repository that the site page `src_uri` is made from."""
    repo, docs = _roots(config)
    if src_uri == "index.md":
        return repo / "README.md"
    if src_uri.startswith(PREFIX):
        return repo / src_uri[len(PREFIX) :]
    return docs / src_uri


def _site_uri(path: Path, config) -> str | None:
    """Where a repository file lives on the site, or None when it is not part of the repository."""
    repo, docs = _roots(config)
    if path == repo / "README.md":
        return "index.md"
    if path.is_relative_to(docs):
        return path.relative_to(docs).as_posix()
    if path.is_relative_to(repo):
        return PREFIX + path.relative_to(repo).as_posix()
    return None


def _local_targets(markdown: str, source: Path):
    """(match, resolved file, anchor) for every relative link of a page that points at an existing file."""
    for m in LINK.finditer(markdown):
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            continue  # external, an anchor on the same page, or site-absolute
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve()
        if resolved.is_file():
            yield m, resolved, anchor


def on_files(files: Files, config) -> Files:
    """Add README.md as index.md, then every repository file outside docs/ that a page links to."""
    repo, _ = _roots(config)
    files.append(File.generated(config, "index.md", abs_src_path=str(repo / "README.md")))
    pending = [f.src_uri for f in files if f.src_uri.endswith(".md")]
    while pending:  # added markdown pages (prompts/README.md) may link further files
        source = _source(pending.pop(), config)
        for _, resolved, _ in _local_targets(source.read_text(encoding="utf-8"), source):
            uri = _site_uri(resolved, config)
            if uri is None or files.get_file_from_path(uri) is not None:
                continue
            files.append(File.generated(config, uri, abs_src_path=str(resolved)))
            if uri.endswith(".md"):
                pending.append(uri)
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Rewrite each link to a repository file into the relative link to its copy on the site."""
    source = _source(page.file.src_uri, config)
    here = posixpath.dirname(page.file.src_uri)
    out, last = [], 0
    for m, resolved, anchor in _local_targets(markdown, source):
        uri = _site_uri(resolved, config)
        if uri is None:
            continue
        link = posixpath.relpath(uri, here or ".") + (f"#{anchor}" if anchor else "")
        out += [markdown[last : m.start(2)], link]
        last = m.end(2)
    return "".join(out) + markdown[last:]
