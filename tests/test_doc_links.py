"""Every image the README and docs/ show is a file in git (a clone shows no broken figure)."""
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote


from adamwprune.config.kconfig import ROOT

# ![alt](target "title") and <img src="target">
_MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_IMAGE = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.IGNORECASE)


def image_links(text: str) -> list[str]:
    return _MARKDOWN_IMAGE.findall(text) + _HTML_IMAGE.findall(text)


def tracked_files(root: Path) -> set[Path]:
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True)
    return {(root / name).resolve() for name in out.stdout.decode().split("\0") if name}


def broken_image_links(root: Path, pages: list[Path]) -> list[str]:
    """'<page>: <link>' for every local image link that resolves to no tracked file."""
    tracked = tracked_files(root)
    broken = []
    for page in pages:
        for link in image_links(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE):  # http:, https:, data:
                continue
            target = (page.parent / unquote(link.split("#", 1)[0])).resolve()
            if target not in tracked:
                broken.append(f"{page.relative_to(root)}: {link}")
    return broken


def doc_pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def test_every_readme_and_docs_image_link_points_at_a_tracked_file():
    assert broken_image_links(ROOT, doc_pages(ROOT)) == []


def test_the_check_finds_missing_untracked_and_remote_images(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "docs" / "images").mkdir(parents=True)
    (tmp_path / "docs" / "images" / "tracked.png").write_bytes(b"png")
    (tmp_path / "docs" / "images" / "untracked.png").write_bytes(b"png")
    subprocess.run(["git", "-C", str(tmp_path), "add", "docs/images/tracked.png"], check=True)
    page = tmp_path / "docs" / "page.md"
    page.write_text("![ok](images/tracked.png)\n![gone](images/missing.png)\n"
                    "![not in git](images/untracked.png \"title\")\n<img src=\"../docs/images/tracked.png\">\n"
                    "![remote](https://example.org/x.png)\n")
    (tmp_path / "README.md").write_text("![up](docs/images/missing%20one.png)\n")
    assert broken_image_links(tmp_path, doc_pages(tmp_path)) == [
        "README.md: docs/images/missing%20one.png", "docs/page.md: images/missing.png",
        "docs/page.md: images/untracked.png"]
