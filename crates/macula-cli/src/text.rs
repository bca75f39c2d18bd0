//! Text forms the CLI prints.

use std::time::Duration;

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` for a time since the Unix epoch.
pub fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00"),
            (1_795_468_887, "2026-11-23T21:21:27"),
            (951_782_400, "2000-02-29T00:00:00"),
            (4_102_444_799, "2099-12-31T23:59:59"),
        ] {
            assert_eq!(
                rfc3339(Duration::from_secs(secs)),
                format!("{want}.000000Z")
            );
        }
        assert_eq!(
            rfc3339(Duration::from_micros(1_500_001)),
            "1970-01-01T00:00:01.500001Z"
        );
    }
}
