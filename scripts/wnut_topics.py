"""A real multi-label corpus from the packaged WNUT-2016 tweets: each tweet's text (its words joined by spaces) and
the set of entity types it mentions (person, geo-loc, company, ...; none for most tweets). Written as JSON lines.

Usage: python scripts/wnut_topics.py [cache/data/wnut16_topics.jsonl]   (make data fetches the tweets first)
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(dest: str) -> None:
    from pipeline import make_config
    from pipeline.data import load_source

    cfg = make_config("ner")
    ds = load_source(cfg)
    with open(dest + ".tmp", "w", encoding="utf-8") as fh:
        for words, tags in zip(ds[cfg.text_column], ds[cfg.label_column]):
            types = sorted({t[2:] for t in tags if t != "O"})
            fh.write(json.dumps({"text": " ".join(words), "labels": types}, ensure_ascii=False) + "\n")
    os.replace(dest + ".tmp", dest)
    print(f"wrote {dest} ({len(ds)} tweets)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "cache", "data", "wnut16_topics.jsonl"))
