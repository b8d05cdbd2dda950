//! Human formatting of the quantities the node plane deals in.

/// Formats bytes with binary units: `512 B`, `1.5 KiB`, `16.0 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// Formats CPU millicores as Kubernetes does: `500m`, `2`, `2500m`.
pub fn format_cpu_millis(millis: u64) -> String {
    if millis % 1000 == 0 { format!("{}", millis / 1000) } else { format!("{millis}m") }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {text:?} is not a quantity: {hint}")]
pub struct QuantityError {
    pub what: &'static str,
    pub text: String,
    pub hint: &'static str,
}

/// Parses CPU as Kubernetes writes it: `2`, `1.5`, `500m`.
pub fn parse_cpu_millis(text: &str) -> Result<u64, QuantityError> {
    let err =
        || QuantityError { what: "cpu", text: text.to_string(), hint: "write cores (2, 1.5) or millicores (500m)" };
    let t = text.trim();
    if let Some(millis) = t.strip_suffix('m') {
        return millis.parse().map_err(|_| err());
    }
    let cores: f64 = t.parse().map_err(|_| err())?;
    if !cores.is_finite() || !(0.0..=1e9).contains(&cores) {
        return Err(err());
    }
    Ok((cores * 1000.0).round() as u64)
}

/// Parses bytes as Kubernetes writes them: `512Mi`, `4Gi`, `1G`, `1000`.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError { what: "memory", text: text.to_string(), hint: "write e.g. 512Mi, 4Gi, 1G or bytes" };
    const SUFFIXES: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
    ];
    let t = text.trim();
    let (number, multiplier) = SUFFIXES.iter().find_map(|(s, m)| t.strip_suffix(s).map(|n| (n, *m))).unwrap_or((t, 1));
    let value: f64 = number.parse().map_err(|_| err())?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_quantities() {
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert_eq!(parse_cpu_millis("1.5"), Ok(1500));
        assert_eq!(parse_cpu_millis("250m"), Ok(250));
        assert!(parse_cpu_millis("two").unwrap_err().to_string().contains("millicores"));
        assert_eq!(parse_bytes("4Gi"), Ok(4 << 30));
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("4 GB").is_err());
        assert!(parse_bytes("-1").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(16 << 30), "16.0 GiB");
        assert_eq!(format_cpu_millis(2000), "2");
        assert_eq!(format_cpu_millis(2500), "2500m");
    }
}
