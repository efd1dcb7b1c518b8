"""Loaders: three formats into one representation, and errors that name file, line and problem."""

import math

import pandas as pd
import pytest

from training.data import DataError, load_dataset, load_movielens, load_recbole, load_table

ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _atomic(tmp_path, items, inters):
    return (_write(tmp_path / "d.inter", INTER_HEADER + inters), _write(tmp_path / "d.item", ITEM_HEADER + items))


def test_movielens_100k_shape(ml100k):
    assert ml100k.num_users == 943 and len(ml100k.catalog) == 1682 and len(ml100k.interactions) == 100_000
    toy = ml100k.catalog[ml100k.catalog.index_of("1")]
    assert toy.title == "Toy Story" and toy.year == 1995 and "Animation" in toy.genres


def test_recbole_atomic(tmp_path):
    inter, item = _atomic(tmp_path, "1\tA\t1999\tDrama Comedy\n2\tB\t2001\tHorror\n", "u1\t2\t4\t100\nu1\t1\t5\t50\n")
    ds = load_recbole(inter, item)
    assert ds.catalog[1].genres == ("Drama", "Comedy")
    assert ds.interactions["item"].tolist() == [2, 1]  # file order kept
    assert ds.interactions["timestamp"].tolist() == [100, 50]


@pytest.mark.parametrize(
    ("items", "inters", "line", "problem"),
    [
        ("1\tA\t1999\tDrama\n", "u1\t1\t4\n", 2, "expected 4 tab-separated fields, got 3"),
        ("1\tA\t1999\tDrama\n", "u1\t1\tfive\t7\n", 2, "'five' is not a number"),
        ("1\tA\t1999\tDrama\n", "u1\t1\t4\t7\nu2\t42\t3\t8\n", 3, "item id '42' is not in d.item"),
        ("1\tA\t1999\tDrama\n1\tB\t2000\tDrama\n", "u1\t1\t4\t7\n", 3, "duplicate item id '1'"),
    ],
)
def test_recbole_bad_rows_name_file_and_line(tmp_path, items, inters, line, problem):
    inter, item = _atomic(tmp_path, items, inters)
    with pytest.raises(DataError) as err:
        load_recbole(inter, item)
    bad_file = item if "duplicate" in problem else inter
    assert f"{bad_file}:{line}" in str(err.value) and problem in str(err.value)


def test_empty_data_set(tmp_path):
    inter, item = _atomic(tmp_path, "1\tA\t1999\tDrama\n", "")
    with pytest.raises(DataError, match="no interactions"):
        load_recbole(inter, item)


def test_movielens_grouplens_100k_format(tmp_path):
    flags = "|".join(["0"] * 19)
    drama = "|".join("1" if i == 8 else "0" for i in range(19))
    _write(
        tmp_path / "u.item", f"1|Toy Story (1995)|01-Jan-1995||url|{flags}\n2|Heat (1995)|01-Jan-1995||url|{drama}\n"
    )
    _write(tmp_path / "u.data", "196\t2\t3\t881250949\n186\t1\t3\t891717742\n")
    ds = load_movielens(tmp_path)
    assert ds.catalog[2].title == "Heat" and ds.catalog[2].genres == ("Drama",) and ds.catalog[1].year == 1995
    _write(tmp_path / "u.data", "196\t2\t3\n")
    with pytest.raises(DataError, match=r"u.data:1: expected 4 fields"):
        load_movielens(tmp_path)


def test_movielens_1m_format(tmp_path):
    _write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation|Children's\n")
    _write(tmp_path / "ratings.dat", "1::1::5::978300760\n")
    ds = load_movielens(tmp_path)
    assert ds.catalog[1].genres == ("Animation", "Children's") and ds.interactions["rating"].tolist() == [5.0]


def test_csv_and_parquet_pairs(tmp_path):
    items = pd.DataFrame(
        {"item_id": ["a", "b"], "title": ["Alpha", "Beta"], "genres": ["x|y", "z"], "year": [2000, 2001]}
    )
    inters = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["b", "a"], "timestamp": [1, 2]})
    items.to_csv(tmp_path / "items.csv", index=False)
    inters.to_csv(tmp_path / "inter.csv", index=False)
    ds = load_table(tmp_path / "inter.csv", tmp_path / "items.csv")
    assert ds.catalog[1].genres == ("x", "y") and ds.catalog[2].year == 2001
    assert math.isnan(ds.interactions["rating"].iloc[0])  # implicit feedback
    items.to_parquet(tmp_path / "items.parquet")
    inters.assign(item_id=["b", "zz"]).to_parquet(tmp_path / "inter.parquet")
    with pytest.raises(DataError, match=r"inter.parquet:2: item id 'zz'"):
        load_table(tmp_path / "inter.parquet", tmp_path / "items.parquet")
    (tmp_path / "bad.csv").write_text("user_id,item_id,timestamp\nu,a,1,extra\n")
    with pytest.raises(DataError, match=r"bad.csv:2: expected 3 comma-separated fields"):
        load_table(tmp_path / "bad.csv", tmp_path / "items.csv")


def test_unknown_name(tmp_path):
    with pytest.raises(DataError, match="not a known data set"):
        load_dataset(str(tmp_path / "nope"), tmp_path)
