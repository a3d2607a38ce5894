//! Exits with the code given as its first argument (default 3).
fn main() {
    let code = std::env::args()
        .nth(1)
        .map(|a| a.parse::<i32>().expect("exit code must be an integer"))
        .unwrap_or(3);
    eprintln!("exiting with {code}");
    std::process::exit(code);
}
