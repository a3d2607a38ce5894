//! A long-running worker: prints `heartbeat N` every interval (first
//! argument, milliseconds, default 100) until stopped, or N beats (second
//! argument) if given. Between beats it is blocked in a WASI sleep.
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let interval: u64 = args.next().map(|a| a.parse().expect("interval ms")).unwrap_or(100);
    let beats: Option<u64> = args.next().map(|a| a.parse().expect("beat count"));
    let mut n = 0u64;
    loop {
        println!("heartbeat {n}");
        n += 1;
        if Some(n) == beats {
            return;
        }
        std::thread::sleep(Duration::from_millis(interval));
    }
}
