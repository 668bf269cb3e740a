"""A seq2seq task generated on the fly: dates written many ways (English, Korean) -> ISO 8601.

"Monday, November 23, 2026", "23.11.2026", "2026년 11월 23일 월요일" -> "2026-11-23".

The mapping is a function by construction: each separator has one field order (slashes with the
year last are always M/D/Y, dots with the year last always D.M.Y, year-first forms always Y M D),
and the one two-digit-year form uses Python's strptime %y window (69..99 -> 19xx, 00..68 -> 20xx),
so it is only produced for years 1969..2068. Weekdays, when written, are always the true ones.

Held-out dates are chosen by date, not by string, so no held-out date appears in training in
any format: the model must generalise to unseen dates, not recall strings.
"""

from __future__ import annotations

import datetime
import functools
import zlib
from typing import Callable, Literal

import numpy as np

from jaxdec.data.tokenizer import PAD_ID, ByteTokenizer

Split = Literal["train", "held_out"]
Case = Literal["as_is", "lower", "upper"]

MIN_DATE = datetime.date(1900, 1, 1)
MAX_DATE = datetime.date(2099, 12, 31)
SHORT_YEAR_RANGE = (1969, 2068)  # years the two-digit-year form covers (strptime's %y window)
TARGET_BYTES = 10  # "YYYY-MM-DD"
SPLITS = ("train", "held_out")
CASES = ("as_is", "lower", "upper")
_CASE_PROBS = (0.6, 0.2, 0.2)

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
_MONTH_ABBRS = tuple(m[:3] for m in _MONTHS)
# AP-style abbreviations: months of up to 5 letters are not shortened, so "May" takes no dot.
_MONTH_DOTTED = tuple(a if a == m else a + "." for a, m in zip(_MONTH_ABBRS, _MONTHS))
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_WEEKDAY_ABBRS = tuple(w[:3] for w in _WEEKDAYS)
_KO_WEEKDAYS = "월화수목금토일"  # indexed by date.weekday(): Monday == 0


def _ordinal(day: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th", 23 -> "23rd"."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _month(d: datetime.date) -> str:
    return _MONTHS[d.month - 1]


def _weekday(d: datetime.date) -> str:
    return _WEEKDAYS[d.weekday()]


_FORMATTERS: dict[str, Callable[[datetime.date], str]] = {
    "month_day_year": lambda d: f"{_month(d)} {d.day}, {d.year}",
    "month_ordinal_year": lambda d: f"{_month(d)} {_ordinal(d.day)}, {d.year}",
    "weekday_month_day_year": lambda d: f"{_weekday(d)}, {_month(d)} {d.day}, {d.year}",
    "abbr_dot_day_year": lambda d: f"{_MONTH_DOTTED[d.month - 1]} {d.day}, {d.year}",
    "day_month_year": lambda d: f"{d.day} {_month(d)} {d.year}",
    "day_abbr_year": lambda d: f"{d.day} {_MONTH_ABBRS[d.month - 1]} {d.year}",
    "weekday_day_abbr_year": (
        lambda d: f"{_WEEKDAY_ABBRS[d.weekday()]}, {d.day} {_MONTH_ABBRS[d.month - 1]} {d.year}"
    ),
    "ordinal_of_month_year": lambda d: f"the {_ordinal(d.day)} of {_month(d)} {d.year}",
    "us_slash": lambda d: f"{d.month}/{d.day}/{d.year}",  # M/D/YYYY, unpadded
    "us_dash": lambda d: f"{d.month:02d}-{d.day:02d}-{d.year}",  # MM-DD-YYYY
    "eu_dot": lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",  # DD.MM.YYYY
    "ymd_slash": lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",  # YYYY/MM/DD
    "compact": lambda d: f"{d.year}{d.month:02d}{d.day:02d}",  # YYYYMMDD
    "korean": lambda d: f"{d.year}년 {d.month}월 {d.day}일",
    "korean_weekday": (
        lambda d: f"{d.year}년 {d.month}월 {d.day}일 {_KO_WEEKDAYS[d.weekday()]}요일"
    ),
    "korean_dot": lambda d: f"{d.year}. {d.month}. {d.day}.",
    "korean_dot_weekday": lambda d: f"{d.year}. {d.month}. {d.day}. ({_KO_WEEKDAYS[d.weekday()]})",
    "korean_short_dot": lambda d: f"{d.year % 100:02d}. {d.month}. {d.day}.",  # YY. M. D.
}
DATE_FORMATS: tuple[str, ...] = tuple(_FORMATTERS)
_SHORT_YEAR_FORMATS = frozenset({"korean_short_dot"})


def _check_date(date: datetime.date) -> None:
    # datetime.datetime is a date subclass, but its isoformat() carries a time: refuse it.
    if not isinstance(date, datetime.date) or isinstance(date, datetime.datetime):
        raise ValueError(f"date must be a datetime.date, got {type(date).__name__}: {date!r}")
    if not MIN_DATE <= date <= MAX_DATE:
        raise ValueError(f"date must be in {MIN_DATE}..{MAX_DATE}, got {date}")


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def formats_for(date: datetime.date) -> tuple[str, ...]:
    """The names in DATE_FORMATS that can write `date` (the two-digit year needs 1969..2068)."""
    _check_date(date)
    if SHORT_YEAR_RANGE[0] <= date.year <= SHORT_YEAR_RANGE[1]:
        return DATE_FORMATS
    return tuple(f for f in DATE_FORMATS if f not in _SHORT_YEAR_FORMATS)


def format_date(date: datetime.date, fmt: str, *, case: Case = "as_is") -> str:
    """Writes `date` in format `fmt`: (2026-11-23, "korean") -> "2026년 11월 23일".

    Uses fixed English tables, not strftime, so the output never depends on the locale.

    Args:
      date: a datetime.date in 1900-01-01..2099-12-31.
      fmt: a name in DATE_FORMATS; "korean_short_dot" needs a year in 1969..2068.
      case: "as_is", "lower" or "upper" (changes only Latin letters; Korean is caseless).

    Returns:
      the written date.
    """
    _check_date(date)
    if fmt not in _FORMATTERS:
        raise ValueError(f"fmt must be one of {DATE_FORMATS}, got {fmt!r}")
    if fmt in _SHORT_YEAR_FORMATS and not SHORT_YEAR_RANGE[0] <= date.year <= SHORT_YEAR_RANGE[1]:
        raise ValueError(
            f"format {fmt!r} writes a two-digit year and covers years {SHORT_YEAR_RANGE[0]}.."
            f"{SHORT_YEAR_RANGE[1]} only, got {date}"
        )
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    text = _FORMATTERS[fmt](date)
    return {"as_is": text, "lower": text.lower(), "upper": text.upper()}[case]


def is_held_out(date: datetime.date) -> bool:
    """True for about 1 date in 10: crc32 of the ISO string mod 10 == 0 (stable everywhere)."""
    _check_date(date)
    return zlib.crc32(date.isoformat().encode("ascii")) % 10 == 0


@functools.lru_cache(maxsize=None)
def _split_ordinals(split: str) -> np.ndarray:
    """int64 [num_dates]: proleptic ordinals of every date in `split`, ascending."""
    ordinals = np.arange(MIN_DATE.toordinal(), MAX_DATE.toordinal() + 1)
    held = np.array([is_held_out(datetime.date.fromordinal(int(o))) for o in ordinals])
    return ordinals[held] if split == "held_out" else ordinals[~held]


def sample_pairs(
    n: int, *, split: Split, seed: int, step: int = 0
) -> list[tuple[str, str]]:
    """`n` random (source text, ISO target) pairs from one split.

    Dates are uniform over the split's dates in 1900..2099; the format is uniform over the
    formats that can write the date; the case is as-is (60%), lower (20%) or upper (20%).
    The result is a pure function of (n, split, seed, step).

    Args:
      n: number of pairs, >= 1.
      split: "train" or "held_out".
      seed: non-negative int.
      step: non-negative int, so a training loop can draw a fresh batch per step.

    Returns:
      a list of n (source, target) str pairs; target is "YYYY-MM-DD".
    """
    _check_int("n", n, 1)
    split_index = _check_split(split)
    _check_int("seed", seed, 0)
    _check_int("step", step, 0)
    rng = np.random.default_rng([int(seed), int(step), split_index])
    pool = _split_ordinals(split)
    picks = pool[rng.integers(0, pool.size, size=n)]  # [n]
    fmt_draws = rng.random(size=n)  # [n] in [0, 1), scaled to each date's applicable formats
    case_draws = rng.choice(len(CASES), size=n, p=_CASE_PROBS)  # [n]
    pairs = []
    for ordinal, u, case_index in zip(picks.tolist(), fmt_draws.tolist(), case_draws.tolist()):
        date = datetime.date.fromordinal(ordinal)
        fmts = formats_for(date)
        fmt = fmts[int(u * len(fmts))]
        pairs.append((format_date(date, fmt, case=CASES[case_index]), date.isoformat()))
    return pairs


def encode_pairs(
    pairs: list[tuple[str, str]],
    *,
    source_len: int,
    target_len: int,
    tokenizer: ByteTokenizer = ByteTokenizer(),
) -> dict[str, np.ndarray]:
    """Encodes (source, target) pairs as padded int32 arrays for an encoder-decoder.

    Args:
      pairs: B >= 1 (source, target) str pairs.
      source_len: S, the padded source length; every source must fit in S bytes.
      target_len: the longest target in bytes; tokens get 2 more for BOS and EOS.
      tokenizer: the byte tokenizer (its PAD_ID pads).

    Returns:
      "source": int32 [B, S], source bytes right-padded with PAD_ID;
      "source_lengths": int32 [B], bytes per source;
      "tokens": int32 [B, target_len + 2], BOS + target bytes + EOS right-padded with PAD_ID
        (the decoder reads tokens[:, :-1] and predicts tokens[:, 1:]);
      "lengths": int32 [B], real tokens per row of "tokens" (BOS..EOS inclusive).
    """
    _check_int("source_len", source_len, 1)
    _check_int("target_len", target_len, 1)
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(f"pairs must be a non-empty list of (source, target), got {pairs!r}")
    for pair in pairs:
        if (
            not isinstance(pair, (list, tuple)) or len(pair) != 2
            or not all(isinstance(s, str) for s in pair)
        ):
            raise ValueError(f"each pair must be (source: str, target: str), got {pair!r}")
    encoded = []
    for source, target in pairs:
        src = tokenizer.encode(source)
        tgt = tokenizer.encode(target, bos=True, eos=True)
        if src.size > source_len:
            raise ValueError(
                f"source of pair {(source, target)!r} is {src.size} bytes, more than "
                f"source_len={source_len}"
            )
        if tgt.size > target_len + 2:
            raise ValueError(
                f"target of pair {(source, target)!r} is {tgt.size - 2} bytes, more than "
                f"target_len={target_len}"
            )
        encoded.append((src, tgt))

    batch = len(pairs)
    out = {
        "source": np.full((batch, source_len), PAD_ID, np.int32),  # [B, S]
        "source_lengths": np.zeros(batch, np.int32),  # [B]
        "tokens": np.full((batch, target_len + 2), PAD_ID, np.int32),  # [B, target_len + 2]
        "lengths": np.zeros(batch, np.int32),  # [B]
    }
    for row, (src, tgt) in enumerate(encoded):
        out["source"][row, : src.size] = src
        out["source_lengths"][row] = src.size
        out["tokens"][row, : tgt.size] = tgt
        out["lengths"][row] = tgt.size
    return out


def sample_batch(
    *,
    batch_size: int,
    split: Split,
    seed: int,
    step: int,
    source_len: int,
    target_len: int = TARGET_BYTES,
) -> dict[str, np.ndarray]:
    """encode_pairs(sample_pairs(batch_size, split=split, seed=seed, step=step), ...).

    A pure function of (batch_size, split, seed, step, source_len, target_len): a resumed run
    sees the same batches. See encode_pairs for the arrays returned.
    """
    pairs = sample_pairs(batch_size, split=split, seed=seed, step=step)
    return encode_pairs(pairs, source_len=source_len, target_len=target_len)


@functools.lru_cache(maxsize=None)
def max_source_bytes() -> int:
    """The longest source any format can produce, in UTF-8 bytes (choose source_len >= this).

    A source's length depends only on (month, day, weekday, digits of the year), and case
    changes do not alter byte lengths. 2000..2027 is a full 28-year Gregorian cycle with no
    skipped leap year, so it holds every (month, day, weekday) combination, including Feb 29
    on every weekday; all years here have 4 digits and lie in the two-digit-year window.
    """
    longest = 0
    date = datetime.date(2000, 1, 1)
    end = datetime.date(2027, 12, 31)
    one_day = datetime.timedelta(days=1)
    while date <= end:
        for fmt in DATE_FORMATS:
            longest = max(longest, len(_FORMATTERS[fmt](date).encode("utf-8")))
        date += one_day
    return longest
