//! How a task ended: a closed set of stop codes and the figures that go
//! with them. Stop codes are spelled as in the design's CLI contract.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a task stopped. The control plane adds `ScaledDown` and `NodeLost`
/// for stops that happen outside the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StopCode {
    /// The guest ran to completion with exit code 0.
    Completed,
    /// The guest exited with a non-zero exit code.
    NonZeroExit,
    /// The task used up its fuel budget.
    OutOfFuel,
    /// The task tried to grow memory past its limit.
    MemoryLimit,
    /// The task ran past its wall-clock timeout.
    Timeout,
    /// The guest trapped (unreachable, stack overflow, bad memory access, ...).
    Trap,
    /// Someone asked the task to stop.
    UserStopped,
    /// A service scaled in and stopped the task.
    ScaledDown,
    /// The node running the task went away.
    NodeLost,
    /// The task never started: not Wasm, cannot compile or link, bad grant.
    FailedToStart,
}

impl StopCode {
    /// Every stop code, in declaration order (for metrics and tables).
    pub const ALL: [StopCode; 10] = [
        StopCode::Completed,
        StopCode::NonZeroExit,
        StopCode::OutOfFuel,
        StopCode::MemoryLimit,
        StopCode::Timeout,
        StopCode::Trap,
        StopCode::UserStopped,
        StopCode::ScaledDown,
        StopCode::NodeLost,
        StopCode::FailedToStart,
    ];

    /// The code's name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            StopCode::Completed => "Completed",
            StopCode::NonZeroExit => "NonZeroExit",
            StopCode::OutOfFuel => "OutOfFuel",
            StopCode::MemoryLimit => "MemoryLimit",
            StopCode::Timeout => "Timeout",
            StopCode::Trap => "Trap",
            StopCode::UserStopped => "UserStopped",
            StopCode::ScaledDown => "ScaledDown",
            StopCode::NodeLost => "NodeLost",
            StopCode::FailedToStart => "FailedToStart",
        }
    }
}

impl fmt::Display for StopCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The record of one finished task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Why it stopped.
    pub stop_code: StopCode,
    /// The guest's exit code when it exited by itself (0 for `Completed`);
    /// `None` when a trap, a limit or a stop ended it first.
    pub exit_code: Option<i32>,
    /// Fuel units consumed (0 when the engine does not meter fuel).
    pub fuel_consumed: u64,
    /// Wall-clock time from the start of instantiation to the stop.
    pub duration_ms: f64,
    /// Of that, the time to instantiate (`None` if instantiation did not
    /// finish).
    pub instantiate_ms: Option<f64>,
    /// The largest total linear memory the task held, in bytes.
    pub peak_memory_bytes: u64,
    /// What happened, for a person: empty for `Completed`, otherwise the
    /// trap kind, the missing import, the limit that was hit, ...
    pub message: String,
}

impl Outcome {
    /// An outcome for a task that stopped before any guest code ran.
    pub fn not_started(stop_code: StopCode, message: impl Into<String>) -> Self {
        Outcome {
            stop_code,
            exit_code: None,
            fuel_consumed: 0,
            duration_ms: 0.0,
            instantiate_ms: None,
            peak_memory_bytes: 0,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_codes_serialize_as_their_names() {
        for code in StopCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(code.to_string(), code.as_str());
        }
    }
}
