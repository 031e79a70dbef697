//! Sizes the way qemu spells them: parsing `64k`, `1.5G`, `0x1000` (qemu's `qemu_strtosz`),
//! and printing `64 MiB` (qemu's `size_to_str`).

use std::fmt;

/// A size argument that is not a number qemu would accept.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum SizeError {
    /// Not a size at all (`1X`, `abc`, `1.5` without a suffix).
    Invalid,
    /// A size beyond what 64 bits hold.
    TooLarge,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid => f.write_str("invalid size"),
            Self::TooLarge => f.write_str("size too large"),
        }
    }
}

/// The multiplier of a size suffix (`b`, `k`, `M`, `G`, `T`, `P`, `E`; case-insensitive,
/// 1024-based).
fn suffix_mul(c: u8) -> Option<u64> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 1,
        b'K' => 1 << 10,
        b'M' => 1 << 20,
        b'G' => 1 << 30,
        b'T' => 1 << 40,
        b'P' => 1 << 50,
        b'E' => 1 << 60,
        _ => return None,
    })
}

/// Parses a size in bytes: a decimal or `0x` hexadecimal integer, or a decimal with a
/// fraction, optionally followed by one suffix letter. A fraction needs a suffix other than
/// `B`, as in qemu.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bytes = s.as_bytes();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let digits = hex.bytes().take_while(u8::is_ascii_hexdigit).count();
        if digits == 0 {
            return Err(SizeError::Invalid);
        }
        let value = u64::from_str_radix(&hex[..digits], 16).map_err(|_| SizeError::TooLarge)?;
        let mul = match &hex.as_bytes()[digits..] {
            [] => 1,
            [c] => suffix_mul(*c).ok_or(SizeError::Invalid)?,
            _ => return Err(SizeError::Invalid),
        };
        return value.checked_mul(mul).ok_or(SizeError::TooLarge);
    }
    let int_len = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut pos = int_len;
    let mut frac_len = 0;
    if bytes.get(pos) == Some(&b'.') {
        frac_len = bytes[pos + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if frac_len == 0 {
            return Err(SizeError::Invalid);
        }
        pos += 1 + frac_len;
    }
    if int_len == 0 {
        return Err(SizeError::Invalid);
    }
    let mul = match &bytes[pos..] {
        [] => 1,
        [c] => suffix_mul(*c).ok_or(SizeError::Invalid)?,
        _ => return Err(SizeError::Invalid),
    };
    let int: u64 = s[..int_len].parse().map_err(|_| SizeError::TooLarge)?;
    let whole = int.checked_mul(mul).ok_or(SizeError::TooLarge)?;
    if frac_len == 0 {
        return Ok(whole);
    }
    if mul == 1 {
        return Err(SizeError::Invalid);
    }
    // The fraction, exactly: digits * mul / 10^len, truncated like qemu's double maths
    // for every value a human writes.
    let frac_digits = &s[int_len + 1..int_len + 1 + frac_len.min(18)];
    let frac: u128 = frac_digits.parse().map_err(|_| SizeError::Invalid)?;
    let scale = 10u128.pow(frac_digits.len() as u32);
    let extra = (frac * u128::from(mul) / scale) as u64;
    whole.checked_add(extra).ok_or(SizeError::TooLarge)
}

/// Formats `value` like C's `printf("%0.3g", value)`: three significant digits, trailing
/// zeros dropped, exponent form when the exponent is below -4 or at least 3.
pub fn fmt_g3(value: f64) -> String {
    if value == 0.0 {
        return "0".into();
    }
    // Round to three significant digits first; the exponent is the rounded one's.
    let sci = format!("{value:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let m = trim_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    trim_zeros(&format!("{value:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// Formats a byte count like qemu's `size_to_str`: `0 B`, `512 KiB`, `1.5 MiB`, `2.19 MiB`.
pub fn size_to_str(value: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(value / (1000 / 1024)) gives exponent e with 2^(e-1) <= x < 2^e.
    let x = value as f64 / (1000.0 / 1024.0);
    let e = if x == 0.0 {
        0
    } else {
        x.log2().floor() as i32 + 1
    };
    // C integer division truncates toward zero.
    let i = ((e - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(value as f64 / div), SUFFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("1E"), Ok(1 << 60));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0x10k"), Ok(16 << 10));
    }

    #[test]
    fn rejects_what_qemu_rejects() {
        for bad in [
            "", "1X", "k", "-1", "1.5", "1.5b", "1..5M", "1.M", "1kk", " 1", "0x", "1 k",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError::Invalid), "{bad:?}");
        }
        assert_eq!(parse_size("16E"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("99999999999999999999"), Err(SizeError::TooLarge));
    }

    #[test]
    fn g3_matches_printf() {
        assert_eq!(fmt_g3(0.0), "0");
        assert_eq!(fmt_g3(64.0), "64");
        assert_eq!(fmt_g3(1.5), "1.5");
        assert_eq!(fmt_g3(2.1875), "2.19");
        assert_eq!(fmt_g3(396.0), "396");
        assert_eq!(fmt_g3(999.6), "1e+03");
        assert_eq!(fmt_g3(0.25), "0.25");
        assert_eq!(fmt_g3(10.0), "10");
        assert_eq!(fmt_g3(1.25), "1.25");
    }

    #[test]
    fn size_to_str_matches_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(405504), "396 KiB");
        assert_eq!(size_to_str(524800), "512 KiB");
        assert_eq!(size_to_str(1311232), "1.25 MiB");
        assert_eq!(size_to_str(2297856), "2.19 MiB");
        assert_eq!(size_to_str(64 << 20), "64 MiB");
        assert_eq!(size_to_str(10 << 30), "10 GiB");
        assert_eq!(size_to_str(1572864), "1.5 MiB");
    }
}
