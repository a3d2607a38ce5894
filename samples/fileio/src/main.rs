//! Writes a file into the directory granted at `/data`, reads it back and
//! lists the directory. Fails with exit code 2 when no directory is granted.
use std::fs;

fn main() {
    let text = std::env::args().nth(1).unwrap_or_else(|| "hello from wasm".into());
    let path = "/data/out.txt";
    if let Err(e) = fs::write(path, &text) {
        eprintln!("cannot write {path}: {e}");
        std::process::exit(2);
    }
    let back = fs::read_to_string(path).expect("read back what was written");
    println!("read back: {back}");
    let mut names: Vec<String> = fs::read_dir("/data")
        .expect("list /data")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    println!("listing: {}", names.join(","));
}
