#!/usr/bin/env python3
"""Extract data/calib.txt and data/heldout.txt from Debian's r-cran-janeaustenr.

Source: Debian package r-cran-janeaustenr 1.0.0-1 (all), i.e. the CRAN package
janeaustenr 1.0.0 by Julia Silge (MIT), which ships the full texts of Jane
Austen's six novels (public domain; texts from Project Gutenberg) as an R
lazy-load data base: usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}.

Standard library only; no R needed.  Usage:

    apt-get download r-cran-janeaustenr        # r-cran-janeaustenr_1.0.0-1_all.deb
    python3 data/extract_text.py r-cran-janeaustenr_1.0.0-1_all.deb data/

The first argument may also be the directory holding Rdata.rdx/Rdata.rdb.

Output: calib.txt   = Persuasion, chapters 1.. (whole chapters, ~60-80 KB)
        heldout.txt = Northanger Abbey, chapters 1.. (whole chapters, ~100-150 KB)
Cleaning: title pages, prefaces, chapter/volume headings and end notes are
dropped; hard-wrapped lines are joined into one line per paragraph (indented
verse quotations keep their line breaks); runs of spaces become one space;
paragraphs are separated by one blank line.  Text is otherwise unchanged.
"""

import gzip
import io
import lzma
import os
import re
import struct
import sys
import tarfile
import zlib


class _Reader:
    def __init__(self, buf):
        self.b = buf
        self.p = 0
        self.refs = []

    def int(self):
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def length(self):
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self):
        assert self.b[:2] == b"X\n", self.b[:2]
        self.p = 2
        version = self.int()
        self.int()  # writer version
        self.int()  # min reader version
        if version == 3:
            n = self.int()
            self.p += n  # native encoding
        return self

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == 254:  # NILVALUE_SXP
            return None
        if t in (253, 252, 251, 250, 242, 241):  # special environments/values
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            name = self.item()
            self.refs.append(("sym", name))
            return ("sym", name)
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.p : self.p + n]
            self.p += n
            levels = flags >> 12
            enc = "latin-1" if levels & 4 else "utf-8"  # LATIN1_MASK = 4
            return s.decode(enc)
        if t in (2, 6, 17, 3, 5):  # pairlist-like
            if has_attr:
                self.item()  # attributes of a pairlist node: unused
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            out = [(tag[1] if tag else None, car)]
            if isinstance(cdr, list):
                out += cdr
            return out
        if t in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self.length()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            n = self.length()
            v = [self.item() for _ in range(n)]
        else:
            raise NotImplementedError(f"SEXP type {t}")
        attrs = self.item() if has_attr else None
        if attrs:
            names = dict(attrs).get("names")
            if names is not None:
                return dict(zip(names, v))
        return v


def unserialize(buf):
    return _Reader(buf).header().item()


def load_lazy(rdx, rdb):
    """Return {name: object} from the bytes of an R lazy-load DB (.rdx, .rdb)."""
    index = unserialize(gzip.decompress(rdx))
    assert index["compressed"] == [1], "only zlib-compressed DBs supported"
    out = {}
    for name, (off, ln) in index["variables"].items():
        chunk = rdb[off : off + ln]
        raw = zlib.decompress(chunk[4:])
        assert len(raw) == struct.unpack(">I", chunk[:4])[0]
        out[name] = unserialize(raw)
    return out


RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"


def _deb_members(path):
    """Yield (name, bytes) of a Debian .deb (an 'ar' archive)."""
    with open(path, "rb") as f:
        b = f.read()
    assert b[:8] == b"!<arch>\n", "not a .deb"
    p = 8
    while p < len(b):
        hdr = b[p : p + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        yield name, b[p + 60 : p + 60 + size]
        p += 60 + size + (size & 1)


def load_novels(src):
    """{variable: list of lines} from the .deb, or a dir with Rdata.rdx/.rdb."""
    if os.path.isdir(src):
        parts = []
        for ext in ("rdx", "rdb"):
            with open(os.path.join(src, "Rdata." + ext), "rb") as f:
                parts.append(f.read())
        return load_lazy(*parts)
    for name, data in _deb_members(src):
        if name.startswith("data.tar"):
            raw = lzma.decompress(data) if name.endswith(".xz") else data
            with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
                parts = [
                    tf.extractfile(f"./{RDATA}.{ext}").read() for ext in ("rdx", "rdb")
                ]
            return load_lazy(*parts)
    raise SystemExit("no data.tar in " + src)


HEADING = re.compile(r"^\s*(chapter|volume)\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)


def chapters(lines):
    """Split a novel (list of lines) into chapters -> list of paragraph lists.

    Everything before the first chapter heading (title, preface) is dropped.
    """
    chaps, cur = [], None
    for line in lines + [""]:
        if HEADING.match(line or ""):
            cur = []
            chaps.append(cur)
            continue
        if cur is not None:
            cur.append(line or "")
    return [paragraphs(c) for c in chaps]


def paragraphs(lines):
    paras, block = [], []
    for line in lines + [""]:
        if line.strip():
            block.append(line)
        elif block:
            if all(l.startswith(" ") for l in block) and len(block) > 1:
                text = "\n".join(" ".join(l.split()) for l in block)  # verse
            else:
                text = " ".join(" ".join(l.split()) for l in block)
            paras.append(text)
            block = []
    return paras


def take(chaps, lo, hi):
    """Whole chapters from the start until at least lo bytes (never above hi)."""
    out, size = [], 0
    for c in chaps:
        text = "\n\n".join(c)
        n = len(text.encode("utf-8")) + 2
        if size >= lo or size + n > hi:
            break
        out.append(text)
        size += n
    return "\n\n".join(out) + "\n", len(out)


def main():
    src = sys.argv[1]
    dst = sys.argv[2] if len(sys.argv) > 2 else "data"
    novels = load_novels(src)
    for fname, novel, lo, hi in (
        ("calib.txt", "persuasion", 60000, 80000),
        ("heldout.txt", "northangerabbey", 110000, 150000),
    ):
        text, n = take(chapters(novels[novel]), lo, hi)
        with open(os.path.join(dst, fname), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        print(f"{fname}: {novel} chapters 1-{n}, {len(text.encode())} bytes")
    # train.txt: the four other novels, whole, for fine-tuning on in-domain real prose
    whole = [take(chapters(novels[name]), 10**9, 10**10)[0]
             for name in ("prideprejudice", "sensesensibility", "mansfieldpark", "emma")]
    with open(os.path.join(dst, "train.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n\n".join(whole))
    print(f"train.txt: 4 novels, {len(open(os.path.join(dst, 'train.txt'), 'rb').read())} bytes")


if __name__ == "__main__":
    main()
