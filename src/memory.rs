//! The host-memory budget every command checks its big allocations against (the machine's
//! available memory, its cgroup limit, or `CPS3D_MAX_MEMORY`), so that a run that cannot fit
//! is refused with its numbers instead of being killed part-way.

use std::path::Path;

/// Environment variable that replaces the memory the machine reports: bytes, or with a
/// K, M, G, T or P suffix (powers of 1000); "off" turns the memory checks off.
pub const MEMORY_ENV: &str = "CPS3D_MAX_MEMORY";

/// Memory a command may plan to use, and where the number comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryBudget {
    pub bytes: f64,
    pub source: String,
}

/// `CPS3D_MAX_MEMORY` when set, else MemAvailable of /proc/meminfo lowered to the
/// headroom under the cgroup's memory.max; `None` when checks are off or nothing is known.
pub fn memory_budget() -> std::result::Result<Option<MemoryBudget>, String> {
    if let Some(v) = std::env::var_os(MEMORY_ENV) {
        let v = v.to_string_lossy().trim().to_string();
        if v.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let bytes = parse_bytes(&v)
            .ok_or_else(|| format!("{MEMORY_ENV}={v:?}: expected a size such as 64G, 512M or 1000000, or off"))?;
        return Ok(Some(MemoryBudget { bytes, source: format!("{MEMORY_ENV}={v}") }));
    }
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        let kb = t.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
        kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok().map(|kb| kb * 1024.0)
    });
    let cgroup = cgroup_headroom();
    Ok(match (available, cgroup) {
        (Some(a), Some(c)) if c < a => Some(MemoryBudget { bytes: c, source: "cgroup memory.max".into() }),
        (Some(a), _) => Some(MemoryBudget { bytes: a, source: "MemAvailable in /proc/meminfo".into() }),
        (None, Some(c)) => Some(MemoryBudget { bytes: c, source: "cgroup memory.max".into() }),
        (None, None) => None,
    })
}

/// memory.max − memory.current of this process's cgroup (v2), when limited.
fn cgroup_headroom() -> Option<f64> {
    let rel = std::fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string()))?;
    let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok()?.trim().parse::<f64>().ok();
    let max = read("memory.max")?; // "max" (no limit) does not parse
    Some((max - read("memory.current").unwrap_or(0.0)).max(0.0))
}

/// "64G", "512M", "1.5T", "1000000" → bytes.
fn parse_bytes(s: &str) -> Option<f64> {
    let s = s.trim_end_matches(['B', 'b']);
    let (num, unit) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, ' '),
    };
    let scale = match unit {
        ' ' => 1.0,
        'K' => 1e3,
        'M' => 1e6,
        'G' => 1e9,
        'T' => 1e12,
        'P' => 1e15,
        _ => return None,
    };
    let v: f64 = num.trim().parse().ok()?;
    (v >= 0.0 && v.is_finite()).then_some(v * scale)
}

/// Bytes in decimal units, e.g. "24.3 GB".
pub fn format_bytes(bytes: f64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Refuses `need` bytes beyond the memory budget, with the numbers: `what` says what
/// needs them, `hint` what to change.
pub fn check_memory(need: f64, what: &str, hint: &str) -> std::result::Result<(), String> {
    let Some(budget) = memory_budget()? else {
        return Ok(());
    };
    if need <= budget.bytes {
        return Ok(());
    }
    Err(format!(
        "{what} needs about {} of memory, more than the {} available ({}); {hint}, or set {MEMORY_ENV} \
         (e.g. 64G, or off) to override",
        format_bytes(need),
        format_bytes(budget.bytes),
        budget.source
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_and_print_in_decimal_units() {
        assert_eq!(parse_bytes("64G"), Some(64e9));
        assert_eq!(parse_bytes("1.5TB"), Some(1.5e12));
        assert_eq!(parse_bytes("1000"), Some(1000.0));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("-1G"), None);
        assert_eq!(format_bytes(1e6), "1.0 MB");
        assert_eq!(format_bytes(8e9), "8.0 GB");
        assert_eq!(format_bytes(512.0), "512 B");
    }
}
