//! A benchmark as a task (`wharf bench run --nodes`): the same artifact
//! run many times on one node, each run's phases written to the task's
//! output as one line ([`BenchRun::line`]), so the client computes the
//! statistics of every node the same way. The guest's own output is
//! dropped (it would mix with the records).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{
    Artifact, Executor, LogBuffer, Outcome, Stdio, StopCode, StopSignal, Stream, TaskSpec,
};

/// The prefix of a run's line in a benchmark task's output.
pub const BENCH_LINE: &str = "wharf-bench-run";

/// The most measured runs (and warm-up runs) of one benchmark task: its
/// output must fit a task's retained log.
pub const MAX_BENCH_RUNS: u32 = 500;

/// Output a run keeps (dropped after the run).
const RUN_LOG_BYTES: usize = 16 << 10;

/// One measured run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRun {
    /// Finding the compiled artifact (in memory, by digest).
    pub load_ms: f64,
    pub instantiate_ms: Option<f64>,
    pub execute_ms: f64,
    pub total_ms: f64,
    pub fuel: u64,
    pub peak_memory_bytes: u64,
    pub stop_code: StopCode,
    pub exit_code: Option<i32>,
}

impl BenchRun {
    /// The run as one output line (microseconds; `-` for none).
    pub fn line(&self) -> String {
        let us = |ms: f64| format!("{:.1}", ms * 1000.0);
        format!(
            "{BENCH_LINE} {} {} {} {} {} {} {} {}",
            us(self.load_ms),
            self.instantiate_ms.map_or("-".into(), us),
            us(self.execute_ms),
            us(self.total_ms),
            self.fuel,
            self.peak_memory_bytes,
            self.stop_code.as_str(),
            self.exit_code.map_or("-".into(), |c| c.to_string()),
        )
    }

    /// Reads a line [`line`](Self::line) wrote; `None` for other lines.
    pub fn parse(line: &str) -> Option<BenchRun> {
        let mut f = line.strip_prefix(BENCH_LINE)?.split_whitespace();
        let mut ms = || -> Option<Option<f64>> {
            match f.next()? {
                "-" => Some(None),
                v => Some(Some(v.parse::<f64>().ok()? / 1000.0)),
            }
        };
        let load_ms = ms()??;
        let instantiate_ms = ms()?;
        let execute_ms = ms()??;
        let total_ms = ms()??;
        let fuel = f.next()?.parse().ok()?;
        let peak_memory_bytes = f.next()?.parse().ok()?;
        let stop_code = StopCode::ALL
            .iter()
            .copied()
            .find(|c| Some(c.as_str()) == f.clone().next())?;
        f.next();
        let exit_code = match f.next()? {
            "-" => None,
            c => Some(c.parse().ok()?),
        };
        Some(BenchRun {
            load_ms,
            instantiate_ms,
            execute_ms,
            total_ms,
            fuel,
            peak_memory_bytes,
            stop_code,
            exit_code,
        })
    }
}

impl Executor {
    /// Runs `artifact` `warmup` times unrecorded, then `runs` times,
    /// writing each measured run's line to `out`, while holding one slot
    /// and the spec's memory reservation (waiting for them if the node is
    /// busy). The outcome is `Completed` when every run ended by itself,
    /// with the fuel and time of all of them.
    pub async fn bench(
        &self,
        artifact: Arc<Artifact>,
        spec: &TaskSpec,
        runs: u32,
        warmup: u32,
        stop: &Arc<StopSignal>,
        out: &LogBuffer,
    ) -> Outcome {
        let admission = loop {
            match self.try_admit(spec.limits.memory) {
                Ok(a) => break a,
                Err(_) => {
                    tokio::select! {
                        () = stop.wait() => {
                            return Outcome::not_started(StopCode::UserStopped, "stopped before the benchmark started");
                        }
                        () = tokio::time::sleep(Duration::from_millis(10)) => {}
                    }
                }
            }
        };
        let runtime = self.runtime().clone();
        let began = Instant::now();
        let (mut fuel, mut failed, mut peak) = (0u64, 0u32, 0u64);
        for i in 0..warmup.min(MAX_BENCH_RUNS) + runs.min(MAX_BENCH_RUNS) {
            if stop.is_stopped() {
                let mut o =
                    Outcome::not_started(StopCode::UserStopped, "stopped during the benchmark");
                o.fuel_consumed = fuel;
                o.duration_ms = began.elapsed().as_secs_f64() * 1000.0;
                return o;
            }
            let t = Instant::now();
            let found = runtime
                .cached(artifact.digest())
                .unwrap_or_else(|| artifact.clone());
            let load_ms = t.elapsed().as_secs_f64() * 1000.0;
            let mut s = spec.clone();
            s.stdio = Stdio::Capture(LogBuffer::new(RUN_LOG_BYTES));
            let outcome = runtime.run_with_stop(&found, &s, stop).await;
            let total_ms = t.elapsed().as_secs_f64() * 1000.0;
            fuel = fuel.saturating_add(outcome.fuel_consumed);
            peak = peak.max(outcome.peak_memory_bytes);
            if i < warmup.min(MAX_BENCH_RUNS) {
                continue;
            }
            if !matches!(
                outcome.stop_code,
                StopCode::Completed | StopCode::NonZeroExit
            ) {
                failed += 1;
            }
            let run = BenchRun {
                load_ms,
                instantiate_ms: outcome.instantiate_ms,
                execute_ms: (outcome.duration_ms - outcome.instantiate_ms.unwrap_or(0.0)).max(0.0),
                total_ms,
                fuel: outcome.fuel_consumed,
                peak_memory_bytes: outcome.peak_memory_bytes,
                stop_code: outcome.stop_code,
                exit_code: outcome.exit_code,
            };
            out.write(Stream::Stdout, format!("{}\n", run.line()).as_bytes());
        }
        drop(admission);
        let mut outcome = Outcome::not_started(
            StopCode::Completed,
            if failed == 0 {
                String::new()
            } else {
                format!("{failed} of {runs} benchmark runs did not complete")
            },
        );
        outcome.exit_code = Some(0);
        outcome.fuel_consumed = fuel;
        outcome.peak_memory_bytes = peak;
        outcome.duration_ms = began.elapsed().as_secs_f64() * 1000.0;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_line_reads_back() {
        let run = BenchRun {
            load_ms: 0.0012,
            instantiate_ms: Some(0.0154),
            execute_ms: 1.5,
            total_ms: 1.52,
            fuel: 1477,
            peak_memory_bytes: 1 << 20,
            stop_code: StopCode::NonZeroExit,
            exit_code: Some(3),
        };
        let back = BenchRun::parse(&run.line()).unwrap();
        assert_eq!(back.fuel, 1477);
        assert_eq!(back.stop_code, StopCode::NonZeroExit);
        assert_eq!(back.exit_code, Some(3));
        assert!((back.execute_ms - 1.5).abs() < 1e-9);
        assert!((back.instantiate_ms.unwrap() - 0.0154).abs() < 1e-9);
        assert!(BenchRun::parse("hello").is_none());
        assert!(BenchRun::parse("wharf-bench-run 1 2").is_none());
    }
}
