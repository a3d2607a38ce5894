//! Prints its arguments (one per line, after `args:`) and its environment
//! (sorted `K=V` lines, after `env:`), to show what a sandbox grants.
fn main() {
    println!("args:");
    for arg in std::env::args().skip(1) {
        println!("{arg}");
    }
    println!("env:");
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.sort();
    for (k, v) in vars {
        println!("{k}={v}");
    }
}
