//! Time without a time crate: everything is stored and compared as UTC milliseconds since the Unix epoch.
//!
//! Parses mihomo's RFC 3339 `start` (0-9 fraction digits, any offset) and the API's time parameters, formats
//! UTC RFC 3339 for answers, and computes the calendar buckets of the time series (minute, hour, day,
//! SQLite-style `%Y-%W` week, month). Civil-date arithmetic after Howard Hinnant's public-domain algorithms.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds in a minute, hour and day.
pub const MINUTE_MS: i64 = 60_000;
/// Milliseconds in an hour.
pub const HOUR_MS: i64 = 3_600_000;
/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;

/// 2020-01-01T00:00:00Z. A clock earlier than this is not set yet (routers boot at 1970 until NTP runs):
/// nothing is recorded with such a time.
pub const SANE_MS: i64 = 1_577_836_800_000;

/// True when the wall clock looks set.
pub fn clock_is_sane(ms: i64) -> bool {
    ms >= SANE_MS
}

/// Wall-clock now, UTC milliseconds (debug builds: plus the tests' clock offset, [`crate::test_hooks`]).
pub fn now_ms() -> i64 {
    let ms = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    };
    ms + crate::test_hooks::get("clock_offset_ms").unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `(year, month 1-12, day 1-31)` of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Broken-down UTC time of a millisecond timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub millis: u32,
}

impl Civil {
    /// Splits a UTC millisecond timestamp.
    pub fn from_ms(ms: i64) -> Civil {
        let days = ms.div_euclid(DAY_MS);
        let rem = ms.rem_euclid(DAY_MS);
        let (year, month, day) = civil_from_days(days);
        Civil {
            year,
            month,
            day,
            hour: (rem / HOUR_MS) as u32,
            minute: (rem % HOUR_MS / MINUTE_MS) as u32,
            second: (rem % MINUTE_MS / 1000) as u32,
            millis: (rem % 1000) as u32,
        }
    }
}

/// Formats UTC RFC 3339: `2026-07-14T13:03:17.482Z` (with `millis`) or `2026-07-14T13:03:17Z`.
pub fn format_rfc3339(ms: i64, millis: bool) -> String {
    let c = Civil::from_ms(ms);
    if millis {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
        )
    } else {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            c.year, c.month, c.day, c.hour, c.minute, c.second
        )
    }
}

/// A small cursor over ASCII digits and separators.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn digits(&mut self, n: usize) -> Option<u32> {
        let end = self.i.checked_add(n)?;
        let part = self.s.get(self.i..end)?;
        let mut v = 0u32;
        for &b in part {
            if !b.is_ascii_digit() {
                return None;
            }
            v = v * 10 + (b - b'0') as u32;
        }
        self.i = end;
        Some(v)
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    /// `YYYY-MM-DD`.
    fn date(&mut self) -> Option<(u32, u32, u32)> {
        let y = self.digits(4)?;
        self.eat(b'-').then_some(())?;
        let mo = self.digits(2)?;
        self.eat(b'-').then_some(())?;
        Some((y, mo, self.digits(2)?))
    }
    /// `HH:MM`.
    fn hour_minute(&mut self) -> Option<(u32, u32)> {
        let h = self.digits(2)?;
        self.eat(b':').then_some(())?;
        Some((h, self.digits(2)?))
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn done(&self) -> bool {
        self.i == self.s.len()
    }
}

fn date_ms(y: u32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Option<i64> {
    if !(1..=12).contains(&mo)
        || d == 0
        || d > days_in_month(y as i64, mo)
        || h > 23
        || mi > 59
        || s > 60
    {
        return None;
    }
    let days = days_from_civil(y as i64, mo, d);
    Some(days * DAY_MS + h as i64 * HOUR_MS + mi as i64 * MINUTE_MS + s.min(59) as i64 * 1000)
}

/// Parses RFC 3339 with any number of fraction digits and a `Z` or `±HH:MM` offset into UTC milliseconds.
/// Also accepts a space instead of `T`. Returns `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let mut c = Cursor {
        s: s.trim().as_bytes(),
        i: 0,
    };
    let (y, mo, d) = c.date()?;
    if !(c.eat(b'T') || c.eat(b't') || c.eat(b' ')) {
        return None;
    }
    let (h, mi) = c.hour_minute()?;
    if !c.eat(b':') {
        return None;
    }
    let sec = c.digits(2)?;
    let mut ms = date_ms(y, mo, d, h, mi, sec)?;
    if c.eat(b'.') {
        let mut scale = 100i64;
        let mut any = false;
        while let Some(b) = c.peek().filter(u8::is_ascii_digit) {
            ms += (b - b'0') as i64 * scale;
            scale /= 10;
            c.i += 1;
            any = true;
        }
        if !any {
            return None;
        }
    }
    match c.peek()? {
        b'Z' | b'z' => c.i += 1,
        sign @ (b'+' | b'-') => {
            c.i += 1;
            let oh = c.digits(2)?;
            c.eat(b':');
            let om = c.digits(2)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh as i64 * HOUR_MS + om as i64 * MINUTE_MS;
            ms -= if sign == b'+' { off } else { -off };
        }
        _ => return None,
    }
    c.done().then_some(ms)
}

/// Parses a time parameter of the API: RFC 3339, `YYYY-MM-DD[ HH:MM[:SS]]` (UTC; `T` also accepted) or
/// Unix seconds. Returns UTC milliseconds.
pub fn parse_user_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if !s.is_empty() && s.len() <= 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().ok().map(|v| v * 1000);
    }
    if let Some(ms) = parse_rfc3339(s) {
        return Some(ms);
    }
    let mut c = Cursor {
        s: s.as_bytes(),
        i: 0,
    };
    let (y, mo, d) = c.date()?;
    if c.done() {
        return date_ms(y, mo, d, 0, 0, 0);
    }
    if !(c.eat(b' ') || c.eat(b'T')) {
        return None;
    }
    let (h, mi) = c.hour_minute()?;
    let sec = if c.eat(b':') { c.digits(2)? } else { 0 };
    c.done().then_some(())?;
    date_ms(y, mo, d, h, mi, sec)
}

/// A time-series bucket size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interval {
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

impl Interval {
    /// Each interval with its name.
    pub const NAMES: &'static [(&'static str, Interval)] = &[
        ("minute", Interval::Minute),
        ("hour", Interval::Hour),
        ("day", Interval::Day),
        ("week", Interval::Week),
        ("month", Interval::Month),
    ];

    /// Parses `minute|hour|day|week|month`.
    pub fn parse(s: &str) -> Option<Interval> {
        Interval::NAMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, i)| *i)
    }
}

/// SQLite `%W`: week of the year 00-53, weeks starting on Monday, days before the first Monday in week 00.
fn week_of_year(days: i64, year: i64) -> (i64, u32) {
    let jan1 = days_from_civil(year, 1, 1);
    let yday = days - jan1;
    let wday_mon0 = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday
    (jan1, ((yday + 7 - wday_mon0) / 7) as u32)
}

/// The start (UTC ms) of the bucket that holds `ms`. Week buckets are `%Y-%W` weeks: they start on a Monday,
/// or on January 1st for week 00.
pub fn bucket_start(ms: i64, interval: Interval) -> i64 {
    match interval {
        Interval::Minute => ms.div_euclid(MINUTE_MS) * MINUTE_MS,
        Interval::Hour => ms.div_euclid(HOUR_MS) * HOUR_MS,
        Interval::Day => ms.div_euclid(DAY_MS) * DAY_MS,
        Interval::Week => {
            let days = ms.div_euclid(DAY_MS);
            let (year, _, _) = civil_from_days(days);
            let jan1 = days_from_civil(year, 1, 1);
            let monday = days - (days + 3).rem_euclid(7);
            monday.max(jan1) * DAY_MS
        }
        Interval::Month => {
            let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
            days_from_civil(y, m, 1) * DAY_MS
        }
    }
}

/// The start of the bucket after the one that starts at `start`.
pub fn next_bucket(start: i64, interval: Interval) -> i64 {
    match interval {
        Interval::Minute => start + MINUTE_MS,
        Interval::Hour => start + HOUR_MS,
        Interval::Day => start + DAY_MS,
        Interval::Week => bucket_start(start + 7 * DAY_MS, interval).min({
            let (y, _, _) = civil_from_days(start.div_euclid(DAY_MS));
            days_from_civil(y + 1, 1, 1) * DAY_MS
        }),
        Interval::Month => {
            let (y, m, _) = civil_from_days(start.div_euclid(DAY_MS));
            let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            days_from_civil(y, m, 1) * DAY_MS
        }
    }
}

/// The label the earlier tool used for a bucket: `2025-04-28 10:00:00` (hour), `2025-04-28 10:05:00`
/// (minute), `2025-04-28` (day), `2025-17` (week, `%Y-%W`), `2025-04` (month).
pub fn bucket_label(ms: i64, interval: Interval) -> String {
    let c = Civil::from_ms(ms);
    match interval {
        Interval::Minute | Interval::Hour => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:00",
            c.year,
            c.month,
            c.day,
            c.hour,
            if interval == Interval::Minute {
                c.minute
            } else {
                0
            }
        ),
        Interval::Day => format!("{:04}-{:02}-{:02}", c.year, c.month, c.day),
        Interval::Week => {
            let (_, w) = week_of_year(ms.div_euclid(DAY_MS), c.year);
            format!("{:04}-{:02}", c.year, w)
        }
        Interval::Month => format!("{:04}-{:02}", c.year, c.month),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mihomo_start_with_offset_and_seven_fraction_digits() {
        let ms = parse_rfc3339("2026-07-14T21:03:17.4829152+08:00").unwrap();
        assert_eq!(format_rfc3339(ms, true), "2026-07-14T13:03:17.482Z");
        assert_eq!(
            parse_rfc3339("2021-06-30T10:11:12+08:00"),
            parse_rfc3339("2021-06-30T02:11:12Z")
        );
        assert_eq!(
            parse_rfc3339("2021-06-30T02:11:12-01:30").unwrap(),
            parse_rfc3339("2021-06-30T03:41:12Z").unwrap()
        );
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "2026",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00Zx",
            "2026-01-01T00:00:00.Z",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s}");
        }
    }

    #[test]
    fn user_time_forms() {
        let t = parse_rfc3339("2025-04-28T10:05:00Z").unwrap();
        assert_eq!(parse_user_time("2025-04-28 10:05"), Some(t));
        assert_eq!(parse_user_time("2025-04-28 10:05:00"), Some(t));
        assert_eq!(parse_user_time("2025-04-28T10:05:00Z"), Some(t));
        assert_eq!(parse_user_time(&(t / 1000).to_string()), Some(t));
        assert_eq!(
            parse_user_time("2025-04-28"),
            Some(t - 10 * HOUR_MS - 5 * MINUTE_MS)
        );
        assert_eq!(parse_user_time("yesterday"), None);
        assert_eq!(parse_user_time("1' OR '1'='1"), None);
    }

    #[test]
    fn sane_epoch_is_2020() {
        assert_eq!(format_rfc3339(SANE_MS, false), "2020-01-01T00:00:00Z");
        assert!(!clock_is_sane(0) && clock_is_sane(now_ms()));
    }

    #[test]
    fn civil_round_trip() {
        for days in [-800_000i64, -1, 0, 1, 10_957, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn buckets_and_labels() {
        let t = parse_rfc3339("2025-04-28T10:35:12Z").unwrap();
        assert_eq!(bucket_label(t, Interval::Hour), "2025-04-28 10:00:00");
        assert_eq!(bucket_label(t, Interval::Minute), "2025-04-28 10:35:00");
        assert_eq!(bucket_label(t, Interval::Day), "2025-04-28");
        assert_eq!(bucket_label(t, Interval::Week), "2025-17"); // sqlite: strftime('%Y-%W','2025-04-28') = 2025-17
        assert_eq!(bucket_label(t, Interval::Month), "2025-04");
        assert_eq!(
            format_rfc3339(bucket_start(t, Interval::Week), false),
            "2025-04-28T00:00:00Z"
        );
        assert_eq!(
            format_rfc3339(bucket_start(t, Interval::Month), false),
            "2025-04-01T00:00:00Z"
        );
        let jan2 = parse_rfc3339("2025-01-02T00:00:00Z").unwrap(); // a Thursday: week 00 starts on Jan 1
        assert_eq!(bucket_label(jan2, Interval::Week), "2025-00");
        assert_eq!(
            format_rfc3339(bucket_start(jan2, Interval::Week), false),
            "2025-01-01T00:00:00Z"
        );
        assert_eq!(
            format_rfc3339(
                next_bucket(bucket_start(jan2, Interval::Week), Interval::Week),
                false
            ),
            "2025-01-06T00:00:00Z"
        );
        let dec30 = parse_rfc3339("2024-12-30T00:00:00Z").unwrap(); // Monday; next bucket is Jan 1
        assert_eq!(
            format_rfc3339(next_bucket(dec30, Interval::Week), false),
            "2025-01-01T00:00:00Z"
        );
        assert_eq!(
            format_rfc3339(
                next_bucket(bucket_start(t, Interval::Month), Interval::Month),
                false
            ),
            "2025-05-01T00:00:00Z"
        );
    }
}
