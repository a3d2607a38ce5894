//! Copies stdin to stdout; blocks in a WASI read while stdin stays open.
fn main() {
    let n = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::stdout().lock())
        .expect("copy stdin to stdout");
    eprintln!("copied {n} bytes");
}
