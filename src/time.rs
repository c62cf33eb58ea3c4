//! Calendar arithmetic and the timestamps kiln writes and reads (RFC 3339 in messages and
//! annotations, Debian Release dates, FAT and kernel build stamps): days since 1970-01-01 to and
//! from a civil date, without a clock or a time zone database. Howard Hinnant's algorithms.

/// Seconds in a (UTC, leap-second-free) day.
pub const SECS_PER_DAY: i64 = 86_400;

/// The proleptic Gregorian date `(year, month 1-12, day 1-31)` of a day number (days since
/// 1970-01-01; negative before).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1-12, day 1-31).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A UTC second split into calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    /// 1-12.
    pub month: i64,
    /// 1-31.
    pub day: i64,
    pub hour: i64,
    pub minute: i64,
    pub second: i64,
    /// 0 = Sunday … 6 = Saturday.
    pub weekday: i64,
}

impl Civil {
    /// The calendar fields of `secs` seconds since the epoch (negative before).
    pub fn from_epoch(secs: i64) -> Civil {
        let days = secs.div_euclid(SECS_PER_DAY);
        let rem = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Civil {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
            weekday: (days + 4).rem_euclid(7),
        }
    }
}

/// How much of a second [`rfc3339`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    Seconds,
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    Millis,
}

/// RFC 3339 UTC time of `unix_ms` milliseconds since the epoch, to `precision`.
/// Now, in Unix milliseconds (0 before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn rfc3339(unix_ms: i64, precision: Precision) -> String {
    let c = Civil::from_epoch(unix_ms.div_euclid(1000));
    let date = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    );
    match precision {
        Precision::Seconds => format!("{date}Z"),
        Precision::Millis => format!("{date}.{:03}Z", unix_ms.rem_euclid(1000)),
    }
}

/// Unix milliseconds of an RFC 3339 UTC time as [`rfc3339`] writes it
/// (`YYYY-MM-DDTHH:MM:SS[.fff]Z`); `None` for anything else.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t = text.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let num = |s: &str, len: usize| -> Option<i64> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
    };
    let mut d = date.split('-');
    let (y, mo, day) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut h = hms.split(':');
    let (hh, mm, ss) = (num(h.next()?, 2)?, num(h.next()?, 2)?, num(h.next()?, 2)?);
    if d.next().is_some()
        || h.next().is_some()
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 60
    {
        return None;
    }
    let ms = match frac.len() {
        0 => 0,
        1..=9 if frac.bytes().all(|b| b.is_ascii_digit()) => {
            frac[..frac.len().min(3)].parse::<i64>().ok()? * 10i64.pow(3 - frac.len().min(3) as u32)
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, day) * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(secs * 1000 + ms)
}

/// The ISO 8601 basic form `YYYYMMDDTHHMMSSZ` of `unix_ms` (milliseconds dropped): a stamp that
/// sorts by time and is a valid subject token.
pub fn basic_stamp(unix_ms: i64) -> String {
    rfc3339(unix_ms, Precision::Seconds)
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn rfc3339_parses_back_what_it_writes() {
        for ms in [0i64, 1_700_000_000_123, 951_782_400_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms, Precision::Millis)), Some(ms));
            assert_eq!(
                parse_rfc3339(&rfc3339(ms, Precision::Seconds)),
                Some(ms - ms % 1000)
            );
        }
        for bad in [
            "",
            "2026-12-06",
            "2026-12-06T10:00:00",
            "2026-13-01T00:00:00Z",
            "2026-12-06T10:00:00.x1Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        for (y, m, d) in [(1970, 1, 1), (1969, 12, 31), (2000, 2, 29), (1980, 1, 1)] {
            assert_eq!(civil_from_days(days_from_civil(y, m, d)), (y, m, d));
        }
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(Civil::from_epoch(0).weekday, 4, "1970-01-01 was a Thursday");
    }

    #[test]
    fn formats_rfc3339() {
        let cases = [
            (0, Precision::Seconds, "1970-01-01T00:00:00Z"),
            (0, Precision::Millis, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, Precision::Seconds, "2000-02-29T00:00:00Z"),
            (
                951_782_400_123,
                Precision::Millis,
                "2000-02-29T00:00:00.123Z",
            ),
            (
                1_700_000_000_000,
                Precision::Seconds,
                "2023-11-14T22:13:20Z",
            ),
            (
                1_795_919_047_000,
                Precision::Millis,
                "2026-11-29T02:24:07.000Z",
            ),
            (
                4_102_444_799_999,
                Precision::Seconds,
                "2099-12-31T23:59:59Z",
            ),
        ];
        for (ms, precision, want) in cases {
            assert_eq!(rfc3339(ms, precision), want, "{ms} {precision:?}");
        }
        assert_eq!(basic_stamp(1_795_919_047_123), "20261129T022407Z");
    }
}
