//! Traps on purpose: `unreachable` (default) executes the Wasm instruction;
//! `panic` panics, which with `panic = "abort"` prints the message and then
//! aborts through the same instruction.
fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "unreachable".into());
    println!("trapping: {mode}");
    match mode.as_str() {
        "panic" => panic!("the guest gave up"),
        _ => core::arch::wasm32::unreachable(),
    }
}
