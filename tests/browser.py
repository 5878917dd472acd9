"""A real headless Chromium (Debian `chromium`) for the HTML report's tests: DOM dumps and screenshots.

No skip when Chromium is missing: the tests fail with the install hint (`.ci/setup --tests`
installs it), so a CI without a browser cannot pass by skipping. Screenshots are kept in
`test-artifacts/` at the repository root (ignored by git) as well as in the test's tmp_path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "test-artifacts"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-proxy-server", "--hide-scrollbars",
)  # fmt: skip


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise AssertionError("no chromium: apt-get install -y --no-install-recommends chromium (.ci/setup --tests)")
    return found


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        res = subprocess.run(
            [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def dump_dom(url: str) -> str:
    """The DOM after the page loaded and its scripts ran (`--dump-dom`)."""
    out = _run("--dump-dom", url).stdout
    assert "<html" in out, out[:500]
    return out


def screenshot(url: str, png: Path, name: str, size: tuple[int, int] = (1200, 1600)) -> Path:
    """A PNG of the page at `png`, also copied to test-artifacts/<name>.png; returns the copy."""
    _run(f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", url)
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / f"{name}.png"
    shutil.copyfile(png, kept)
    return kept


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    parents: tuple[str, ...]  # ids of the enclosing elements that have one
    text: str = ""

    def num(self, key: str) -> float:
        return float(self.attrs[f"data-{key}"])


@dataclass
class Dom(HTMLParser):
    """The elements of a DOM dump, with their enclosing ids, for checks by id, class and data-*."""

    elements: list[Element] = field(default_factory=list)
    _stack: list[Element] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(convert_charrefs=True)

    @classmethod
    def parse(cls, html: str) -> Dom:
        dom = cls()
        dom.feed(html)
        dom.close()
        return dom

    _VOID = frozenset("meta link br img input hr col area base wbr source track".split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        parents = tuple(e.attrs["id"] for e in self._stack if "id" in e.attrs)
        el = Element(tag, {k: v or "" for k, v in attrs}, parents)
        self.elements.append(el)
        if tag not in self._VOID:
            self._stack.append(el)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        parents = tuple(e.attrs["id"] for e in self._stack if "id" in e.attrs)
        self.elements.append(Element(tag, {k: v or "" for k, v in attrs}, parents))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i].tag == tag:
                del self._stack[i:]
                return

    def handle_data(self, data: str) -> None:
        for el in self._stack:
            el.text += data

    def by_id(self, ident: str) -> Element:
        found = [e for e in self.elements if e.attrs.get("id") == ident]
        assert len(found) == 1, f"{len(found)} elements with id {ident!r}"
        return found[0]

    def select(self, within: str, tag: str, cls: str | None = None) -> list[Element]:
        """Elements `tag` (with class `cls`) inside the element whose id is `within`."""
        return [
            e for e in self.elements
            if e.tag == tag and within in e.parents and (cls is None or cls in e.attrs.get("class", "").split())
        ]  # fmt: skip

    def rendered(self) -> dict[str, dict[str, int]]:
        """What the page's own script recorded after layout (proof that it ran in the browser)."""
        body = next(e for e in self.elements if e.tag == "body")
        assert "data-rendered" in body.attrs, "the page's script did not run"
        return json.loads(body.attrs["data-rendered"])
