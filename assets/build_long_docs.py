"""Writes assets/data/long.jsonl: long documents for the long-context stage.

Each play of the corpus but the held-out one (tempest.txt, the retrieval eval's filler) is one
document of tens of thousands of tokens, so rows of any length are cut from inside a document.

    python assets/build_long_docs.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELD_OUT = {"tempest.txt"}


def main() -> None:
    plays = [p for p in sorted((HERE / "corpus").glob("*.txt")) if p.name not in HELD_OUT]
    out = HERE / "data" / "long.jsonl"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps({"text": p.read_text()}) + "\n" for p in plays))
    print(f"{out}: {len(plays)} documents, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
