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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(16 << 30), "16.0 GiB");
        assert_eq!(format_cpu_millis(2000), "2");
        assert_eq!(format_cpu_millis(2500), "2500m");
    }
}
