"""The dates task: every format parses back to its date (checked by an independent parser built
on datetime.strptime), weekdays are true, the split is by date, and encoding pads correctly."""

import datetime
import re
import zlib

import numpy as np
import pytest

from jaxdec.data import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, dates

TOK = ByteTokenizer()
ONE_DAY = datetime.timedelta(days=1)

# An independent reading of every written form: strptime patterns (month and weekday names,
# case-insensitive, from the C locale) after stripping ordinal suffixes and Korean weekdays.
_PATTERNS = (
    "%B %d, %Y", "%A, %B %d, %Y", "%b. %d, %Y", "%d %B %Y", "%d %b %Y", "%a, %d %b %Y",
    "the %d of %B %Y", "%m/%d/%Y", "%m-%d-%Y", "%d.%m.%Y", "%Y/%m/%d", "%Y%m%d",
    "%Y년 %m월 %d일", "%Y. %m. %d.", "%y. %m. %d.",
)
_ORDINAL_SUFFIX = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}
_KO_WEEKDAY = dict(zip("월화수목금토일", range(7)))


def parse_all(source: str) -> set[datetime.date]:
    """Every date that any pattern reads from `source`, after checking weekdays and ordinals."""
    text, weekday = source, None
    if m := re.fullmatch(r"(.*) (.)요일", text) or re.fullmatch(r"(.*) \((.)\)", text):
        text, weekday = m.group(1), _KO_WEEKDAY[m.group(2)]
    if m := re.search(r"\b(\d{1,2})(st|nd|rd|th)\b", text, flags=re.IGNORECASE):
        day = int(m.group(1))
        assert m.group(2).lower() == _ORDINAL_SUFFIX.get(day, "th"), source
        text = text[:m.end(1)] + text[m.end():]
    found = set()
    for pattern in _PATTERNS:
        try:
            date = datetime.datetime.strptime(text, pattern).date()
        except ValueError:
            continue
        if "%A" in pattern or "%a" in pattern:
            name = text.split(",")[0].lower()
            assert name == date.strftime("%A" if "%A" in pattern else "%a").lower(), source
        if weekday is not None:
            assert weekday == date.weekday(), source
        found.add(date)
    return found


def some_dates(n: int, seed: int) -> list[datetime.date]:
    lo, hi = dates.MIN_DATE.toordinal(), dates.MAX_DATE.toordinal()
    picks = np.random.default_rng(seed).integers(lo, hi + 1, size=n)
    edges = [
        dates.MIN_DATE, dates.MAX_DATE, datetime.date(2000, 2, 29), datetime.date(1968, 12, 31),
        datetime.date(1969, 1, 1), datetime.date(2068, 12, 31), datetime.date(2069, 1, 1),
    ]
    return edges + [datetime.date.fromordinal(int(o)) for o in picks]


def test_format_count_and_examples():
    assert len(dates.DATE_FORMATS) >= 12
    d = datetime.date(2026, 11, 23)
    expected = {
        "month_day_year": "November 23, 2026",
        "day_abbr_year": "23 Nov 2026",
        "abbr_dot_day_year": "Nov. 23, 2026",
        "us_slash": "11/23/2026",
        "eu_dot": "23.11.2026",
        "ymd_slash": "2026/11/23",
        "weekday_month_day_year": "Monday, November 23, 2026",
        "ordinal_of_month_year": "the 23rd of November 2026",
        "korean": "2026년 11월 23일",
        "korean_weekday": "2026년 11월 23일 월요일",
        "korean_short_dot": "26. 11. 23.",
    }
    for fmt, text in expected.items():
        assert dates.format_date(d, fmt) == text
    upper = dates.format_date(d, "weekday_month_day_year", case="upper")
    assert upper == "MONDAY, NOVEMBER 23, 2026"
    lower = dates.format_date(d, "ordinal_of_month_year", case="lower")
    assert lower == "the 23rd of november 2026"
    assert dates.format_date(datetime.date(2026, 5, 1), "abbr_dot_day_year") == "May 1, 2026"


def test_every_format_parses_back_to_its_date():
    for date in some_dates(150, seed=0):
        for fmt in dates.formats_for(date):
            for case in dates.CASES:
                source = dates.format_date(date, fmt, case=case)
                assert parse_all(source) == {date}, (fmt, source)


def test_mapping_is_a_function_over_all_dates():
    # Exhaustive: no written form (case-folded) belongs to two dates, over all 73,049 dates.
    owner = {}
    date = dates.MIN_DATE
    while date <= dates.MAX_DATE:
        for fmt in dates.formats_for(date):
            source = dates.format_date(date, fmt, case="lower")
            assert owner.setdefault(source, date) == date, (source, date, owner[source])
        date += ONE_DAY


def test_weekdays_are_true():
    # Anchors checked against a calendar: 2000-01-01 was a Saturday, 1900-01-01 a Monday,
    # 2099-12-31 is a Thursday.
    fmt = dates.format_date
    assert fmt(datetime.date(2000, 1, 1), "korean_weekday") == "2000년 1월 1일 토요일"
    assert fmt(datetime.date(1900, 1, 1), "weekday_day_abbr_year") == "Mon, 1 Jan 1900"
    assert fmt(datetime.date(2099, 12, 31), "korean_dot_weekday") == "2099. 12. 31. (목)"
    for date in some_dates(300, seed=1):
        english = dates.format_date(date, "weekday_month_day_year").split(",")[0]
        assert english == date.strftime("%A")
        korean = dates.format_date(date, "korean_weekday").split()[-1]
        assert korean == "월화수목금토일"[date.isoweekday() - 1] + "요일"


def test_short_year_window():
    assert "korean_short_dot" in dates.formats_for(datetime.date(1969, 1, 1))
    assert "korean_short_dot" in dates.formats_for(datetime.date(2068, 12, 31))
    assert "korean_short_dot" not in dates.formats_for(datetime.date(1968, 12, 31))
    assert "korean_short_dot" not in dates.formats_for(datetime.date(2069, 1, 1))
    with pytest.raises(ValueError, match="1969..2068"):
        dates.format_date(datetime.date(1950, 6, 1), "korean_short_dot")


def test_format_date_bad_input():
    d = datetime.date(2026, 11, 23)
    with pytest.raises(ValueError, match="fmt"):
        dates.format_date(d, "iso")
    with pytest.raises(ValueError, match="case"):
        dates.format_date(d, "korean", case="title")
    with pytest.raises(ValueError, match="1900-01-01..2099-12-31"):
        dates.format_date(datetime.date(1899, 12, 31), "korean")
    with pytest.raises(ValueError, match="datetime.date"):
        dates.format_date(datetime.datetime(2026, 11, 23), "korean")
    with pytest.raises(ValueError, match="datetime.date"):
        dates.is_held_out("2026-11-23")


def test_held_out_split_is_by_date():
    assert dates.is_held_out(datetime.date(2026, 11, 23)) == (
        zlib.crc32(b"2026-11-23") % 10 == 0
    )
    train = dates.sample_pairs(3000, split="train", seed=0)
    held = dates.sample_pairs(1000, split="held_out", seed=0)
    train_dates = {datetime.date.fromisoformat(t) for _, t in train}
    held_dates = {datetime.date.fromisoformat(t) for _, t in held}
    assert not any(dates.is_held_out(d) for d in train_dates)
    assert all(dates.is_held_out(d) for d in held_dates)
    assert not train_dates & held_dates
    for source, target in held:  # held-out sources really are the held-out dates
        assert parse_all(source) == {datetime.date.fromisoformat(target)}
    total = dates.MAX_DATE.toordinal() - dates.MIN_DATE.toordinal() + 1
    n_held = sum(dates.is_held_out(datetime.date.fromordinal(dates.MIN_DATE.toordinal() + i))
                 for i in range(0, total, 7))
    assert 0.08 < n_held / len(range(0, total, 7)) < 0.12


def test_sample_pairs_targets_match_sources_and_cover_formats():
    pairs = dates.sample_pairs(2000, split="train", seed=5, step=3)
    seen_formats, seen_cases = set(), set()
    for source, target in pairs:
        date = datetime.date.fromisoformat(target)
        assert target == date.isoformat() and len(target) == dates.TARGET_BYTES
        assert parse_all(source) == {date}, source
        for fmt in dates.formats_for(date):
            for case in dates.CASES:
                if dates.format_date(date, fmt, case=case) == source:
                    seen_formats.add(fmt)
                    seen_cases.add(case)
    assert seen_formats == set(dates.DATE_FORMATS)
    assert seen_cases == set(dates.CASES)


def test_sample_pairs_deterministic():
    a = dates.sample_pairs(64, split="train", seed=1)
    assert a == dates.sample_pairs(64, split="train", seed=1)
    assert a != dates.sample_pairs(64, split="train", seed=2)
    assert a != dates.sample_pairs(64, split="train", seed=1, step=1)
    assert a != dates.sample_pairs(64, split="held_out", seed=1)
    with pytest.raises(ValueError, match="split"):
        dates.sample_pairs(4, split="test", seed=0)
    with pytest.raises(ValueError, match="n must be"):
        dates.sample_pairs(0, split="train", seed=0)
    with pytest.raises(ValueError, match="seed"):
        dates.sample_pairs(4, split="train", seed=-1)


def test_encode_pairs_shapes_padding_lengths():
    pairs = [("2026년 11월 23일", "2026-11-23"), ("1/2/1903", "1903-01-02")]
    out = dates.encode_pairs(pairs, source_len=24, target_len=12)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "source": ((2, 24), np.int32),
        "source_lengths": ((2,), np.int32),
        "tokens": ((2, 14), np.int32),
        "lengths": ((2,), np.int32),
    }
    assert out["source_lengths"].tolist() == [len("2026년 11월 23일".encode()), 8]
    assert out["lengths"].tolist() == [12, 12]
    for row, (source, target) in enumerate(pairs):
        n = out["source_lengths"][row]
        assert TOK.decode(out["source"][row]) == source
        assert (out["source"][row, n:] == PAD_ID).all() and (out["source"][row, :n] < 256).all()
        tokens, m = out["tokens"][row], out["lengths"][row]
        assert tokens[0] == BOS_ID and tokens[m - 1] == EOS_ID
        assert (tokens[m:] == PAD_ID).all()
        assert TOK.decode(tokens) == target


def test_encode_pairs_too_long_raises():
    with pytest.raises(ValueError, match=r"source of pair .*November.* 17 bytes.*source_len=10"):
        dates.encode_pairs([("November 23, 2026", "2026-11-23")], source_len=10, target_len=10)
    with pytest.raises(ValueError, match=r"target of pair .*2026-11-23.*target_len=8"):
        dates.encode_pairs([("23.11.2026", "2026-11-23")], source_len=29, target_len=8)
    with pytest.raises(ValueError, match="non-empty"):
        dates.encode_pairs([], source_len=29, target_len=10)
    with pytest.raises(ValueError, match="pair must be"):
        dates.encode_pairs([("a", 1)], source_len=29, target_len=10)
    # Exact fit is fine.
    out = dates.encode_pairs([("23.11.2026", "2026-11-23")], source_len=10, target_len=10)
    assert out["source_lengths"].tolist() == [10] and out["lengths"].tolist() == [12]


def test_sample_batch_and_max_source_bytes():
    longest = dates.max_source_bytes()
    assert longest == len("Wednesday, September 27, 2023") == 29
    kwargs = dict(batch_size=512, split="train", seed=0, step=4, source_len=longest)
    batch = dates.sample_batch(**kwargs, target_len=10)
    assert batch["source"].shape == (512, longest) and batch["tokens"].shape == (512, 12)
    assert batch["source_lengths"].max() <= longest
    expected = dates.encode_pairs(
        dates.sample_pairs(512, split="train", seed=0, step=4), source_len=longest, target_len=10
    )
    for key in expected:
        np.testing.assert_array_equal(batch[key], expected[key])
    other = dates.sample_batch(**{**kwargs, "step": 5})
    assert not np.array_equal(batch["source"], other["source"])
