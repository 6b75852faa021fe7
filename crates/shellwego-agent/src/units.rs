//! Parsing of human-written quantities: CPU ("500m", "0.5", "2"), sizes ("512Mi", "1Gi",
//! "128MB"), durations ("2s", "500ms", "1m") and bit rates ("50Mbit", "1Gbit").
//!
//! Pure functions; each error says what was wrong with the text. Callers add the field name.

use std::time::Duration;

/// Why a quantity did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("is empty")]
    Empty,
    #[error("{0:?} is not a number with an optional unit")]
    NotANumber(String),
    #[error("{value:?} has an unknown unit {unit:?} (expected one of {expected})")]
    UnknownUnit {
        value: String,
        unit: String,
        expected: &'static str,
    },
    #[error("{0:?} is too large")]
    Overflow(String),
    #[error("{0:?} must be greater than zero")]
    Zero(String),
    #[error("{value:?} is finer than the smallest unit ({smallest})")]
    TooPrecise {
        value: String,
        smallest: &'static str,
    },
}

/// A decimal number split into integer digits and fraction digits, no sign, no exponent.
struct Decimal<'a> {
    int: &'a str,
    frac: &'a str,
}

/// Splits "12.5Mi" into ("12.5", "Mi").
fn split_number(text: &str) -> Result<(Decimal<'_>, &str), UnitError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(UnitError::Empty);
    }
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(end);
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(UnitError::NotANumber(text.to_string()));
    }
    Ok((Decimal { int, frac }, unit.trim()))
}

/// Multiplies a decimal by `scale` exactly. Fails on overflow, or when the result has a
/// fractional part (it would be finer than the smallest unit).
fn scale_exact(
    d: &Decimal<'_>,
    scale: u128,
    original: &str,
    smallest: &'static str,
) -> Result<u64, UnitError> {
    let overflow = || UnitError::Overflow(original.to_string());
    if d.int.len() + d.frac.len() > 30 {
        return Err(overflow());
    }
    let digits: u128 = format!("{}{}", d.int, d.frac)
        .parse()
        .map_err(|_| UnitError::NotANumber(original.to_string()))?;
    let denom = 10u128.pow(d.frac.len() as u32);
    let scaled = digits.checked_mul(scale).ok_or_else(overflow)?;
    if scaled % denom != 0 {
        return Err(UnitError::TooPrecise {
            value: original.to_string(),
            smallest,
        });
    }
    u64::try_from(scaled / denom).map_err(|_| overflow())
}

/// CPU in thousandths of a core: "500m" = 500, "0.5" = 500, "2" = 2000.
pub fn parse_cpu_milli(text: &str) -> Result<u64, UnitError> {
    let (d, unit) = split_number(text)?;
    let scale = match unit {
        "m" => 1,
        "" => 1000,
        _ => {
            return Err(UnitError::UnknownUnit {
                value: text.to_string(),
                unit: unit.to_string(),
                expected: "\"m\" (millicores) or none (cores)",
            })
        }
    };
    let milli = scale_exact(&d, scale, text, "1m")?;
    if milli == 0 {
        return Err(UnitError::Zero(text.to_string()));
    }
    Ok(milli)
}

const SIZE_UNITS: &str =
    "B, K/KB, M/MB, G/GB, T/TB (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024)";

/// A size in bytes: binary units ("Ki", "Mi", "Gi", "Ti", also with a trailing "B"),
/// decimal units ("K"/"KB", "M"/"MB", "G"/"GB", "T"/"TB"), or plain bytes.
pub fn parse_bytes(text: &str) -> Result<u64, UnitError> {
    let (d, unit) = split_number(text)?;
    let scale: u128 = match unit {
        "" | "B" => 1,
        "k" | "K" | "KB" | "kB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        _ => {
            return Err(UnitError::UnknownUnit {
                value: text.to_string(),
                unit: unit.to_string(),
                expected: SIZE_UNITS,
            })
        }
    };
    let bytes = scale_exact(&d, scale, text, "1 byte")?;
    if bytes == 0 {
        return Err(UnitError::Zero(text.to_string()));
    }
    Ok(bytes)
}

/// A duration: "500ms", "2s", "1.5s", "1m", "1h".
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let (d, unit) = split_number(text)?;
    let scale_ms: u128 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(UnitError::UnknownUnit {
                value: text.to_string(),
                unit: unit.to_string(),
                expected: "ms, s, m, h",
            })
        }
    };
    let ms = scale_exact(&d, scale_ms, text, "1ms")?;
    if ms == 0 {
        return Err(UnitError::Zero(text.to_string()));
    }
    Ok(Duration::from_millis(ms))
}

/// A bit rate in bits per second: "50Mbit", "1Gbit", "500kbit", "100mbps".
pub fn parse_bitrate(text: &str) -> Result<u64, UnitError> {
    let (d, unit) = split_number(text)?;
    let scale: u128 = match unit.to_ascii_lowercase().as_str() {
        "bit" | "bps" => 1,
        "kbit" | "kbps" => 1_000,
        "mbit" | "mbps" => 1_000_000,
        "gbit" | "gbps" => 1_000_000_000,
        _ => {
            return Err(UnitError::UnknownUnit {
                value: text.to_string(),
                unit: unit.to_string(),
                expected: "bit, kbit, mbit, gbit (or bps, kbps, mbps, gbps)",
            })
        }
    };
    let bits = scale_exact(&d, scale, text, "1 bit/s")?;
    if bits == 0 {
        return Err(UnitError::Zero(text.to_string()));
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cpu_forms() {
        assert_eq!(parse_cpu_milli("500m"), Ok(500));
        assert_eq!(parse_cpu_milli("0.5"), Ok(500));
        assert_eq!(parse_cpu_milli("2"), Ok(2000));
        assert_eq!(parse_cpu_milli(".25"), Ok(250));
        assert!(matches!(
            parse_cpu_milli("0.0005"),
            Err(UnitError::TooPrecise { .. })
        ));
        assert!(matches!(parse_cpu_milli("0"), Err(UnitError::Zero(_))));
        assert!(matches!(
            parse_cpu_milli("2 cores"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_cpu_milli("-1"),
            Err(UnitError::NotANumber(_))
        ));
        assert!(matches!(parse_cpu_milli(""), Err(UnitError::Empty)));
        assert!(matches!(
            parse_cpu_milli("1.2.3"),
            Err(UnitError::NotANumber(_))
        ));
    }

    #[test]
    fn size_forms() {
        assert_eq!(parse_bytes("512Mi"), Ok(536_870_912));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("128MB"), Ok(128_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(matches!(
            parse_bytes("1.5"),
            Err(UnitError::TooPrecise { .. })
        ));
        assert!(matches!(
            parse_bytes("99999999999Ti"),
            Err(UnitError::Overflow(_))
        ));
        assert!(matches!(
            parse_bytes("12XB"),
            Err(UnitError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn duration_and_rate_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert_eq!(parse_bitrate("50Mbit"), Ok(50_000_000));
        assert_eq!(parse_bitrate("1gbit"), Ok(1_000_000_000));
        assert!(parse_bitrate("50MB").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,24}") {
            let _ = parse_cpu_milli(&s);
            let _ = parse_bytes(&s);
            let _ = parse_duration(&s);
            let _ = parse_bitrate(&s);
        }

        #[test]
        fn mebibytes_round_trip(n in 1u64..(1 << 20)) {
            prop_assert_eq!(parse_bytes(&format!("{n}Mi")), Ok(n << 20));
        }

        #[test]
        fn millicores_round_trip(n in 1u64..1_000_000) {
            prop_assert_eq!(parse_cpu_milli(&format!("{n}m")), Ok(n));
        }
    }
}
