//! A CPU-bound kernel: N rounds (first argument, default 20,000,000) of an
//! xorshift generator folded into an FNV-1a hash. No allocation, no I/O in
//! the loop, so it measures generated code (and fuel metering) alone.
fn main() {
    let rounds: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("rounds must be an integer"))
        .unwrap_or(20_000_000);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for _ in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        hash = (hash ^ (x & 0xFF)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    println!("cpu rounds={rounds} hash={hash:016x}");
}
