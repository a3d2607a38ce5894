//! Per-task resource limits and the human spellings of sizes and durations
//! that the CLI and task definitions accept (`64MiB`, `1GiB`, `500ms`, `5s`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What one task may consume. `None` means "no limit of this kind" (memory
/// is still capped by the engine's [`crate::RuntimeConfig::max_task_memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Fuel units (roughly one per Wasm instruction) before `OutOfFuel`.
    pub fuel: Option<u64>,
    /// Bytes of linear memory, summed over all of the task's memories.
    pub memory: Option<u64>,
    /// Wall-clock time from start to `Timeout`, including time blocked in
    /// WASI calls.
    pub timeout: Option<Duration>,
}

/// Parses a byte size: plain bytes (`1048576`) or a number with a binary
/// (`KiB`, `MiB`, `GiB`) or decimal (`KB`, `MB`, `GB`) unit; `B` is optional.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let invalid = || {
        Error::InvalidInput(format!(
            "invalid size {text:?}: expected e.g. 64MiB, 1GiB or 1048576"
        ))
    };
    let number: u64 = digits.replace('_', "").parse().map_err(|_| invalid())?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| Error::InvalidInput(format!("size {text:?} is too large")))
}

/// Parses a duration: a number followed by `ms`, `s`, `m` or `h`
/// (`500ms`, `5s`, `2m`). A bare number is rejected: the unit is the part
/// people get wrong.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let invalid = || {
        Error::InvalidInput(format!(
            "invalid duration {text:?}: expected e.g. 500ms, 5s or 2m"
        ))
    };
    let value: f64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "ms" => value / 1_000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3_600.0,
        _ => return Err(invalid()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| invalid())
}

/// Table elements a task may hold: far above what real programs use, low
/// enough that a hostile `table.grow` cannot exhaust host memory.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Enforces a task's memory limit over *all* its memories together and
/// remembers what happened: the peak, and whether a grow was denied (so a
/// guest that aborts after a failed allocation is reported as
/// `MemoryLimit`, not as the trap it died of).
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit: u64,
    used: u64,
    denied: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: u64) -> Self {
        MemoryLimiter {
            limit,
            used: 0,
            denied: false,
        }
    }

    /// Linear memory never shrinks, so what is held now is the peak.
    pub(crate) fn peak(&self) -> u64 {
        self.used
    }

    pub(crate) fn denied(&self) -> bool {
        self.denied
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grow = desired.saturating_sub(current) as u64;
        let total = self.used.saturating_add(grow);
        if total > self.limit {
            self.denied = true;
            return Ok(false);
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(text: &str, expected: Option<u64>) {
        assert_eq!(parse_size(text).ok(), expected, "parse_size({text:?})");
    }

    fn duration(text: &str, expected: Option<Duration>) {
        assert_eq!(
            parse_duration(text).ok(),
            expected,
            "parse_duration({text:?})"
        );
    }

    #[test]
    fn limiter_counts_all_memories_and_remembers_denials() {
        use wasmtime::ResourceLimiter;
        let mut limiter = MemoryLimiter::new(100);
        assert!(limiter.memory_growing(0, 60, None).unwrap());
        assert!(limiter.memory_growing(0, 30, None).unwrap());
        assert_eq!(limiter.peak(), 90);
        assert!(!limiter.denied());
        assert!(!limiter.memory_growing(60, 80, None).unwrap());
        assert!(limiter.denied());
        assert_eq!(limiter.peak(), 90);
        assert!(limiter.memory_growing(60, 70, None).unwrap());
        assert_eq!(limiter.peak(), 100);
    }

    #[test]
    fn sizes() {
        size("1048576", Some(1 << 20));
        size("64MiB", Some(64 << 20));
        size("1GiB", Some(1 << 30));
        size("512KiB", Some(512 << 10));
        size("10MB", Some(10_000_000));
        size("4096B", Some(4096));
        size("1_000", Some(1000));
        size("", None);
        size("MiB", None);
        size("64 parsecs", None);
        size("-1", None);
        size("99999999999999GiB", None);
    }

    #[test]
    fn durations() {
        duration("500ms", Some(Duration::from_millis(500)));
        duration("5s", Some(Duration::from_secs(5)));
        duration("2m", Some(Duration::from_secs(120)));
        duration("1.5s", Some(Duration::from_millis(1500)));
        duration("1h", Some(Duration::from_secs(3600)));
        duration("5", None);
        duration("s", None);
        duration("-5s", None);
        duration("5 fortnights", None);
    }
}
