//! Writes N MiB (first argument, default 256) of text lines to stdout, to
//! show that a chatty guest does not grow the host's memory. With `empty`
//! as the second argument the lines are empty (a newline each).
use std::io::Write;

fn main() {
    let mib: usize = std::env::args().nth(1).map(|a| a.parse().expect("MiB")).unwrap_or(256);
    let empty = std::env::args().nth(2).as_deref() == Some("empty");
    let line = if empty {
        b"\n".to_vec()
    } else {
        [b"flood ".as_slice(), &[b'x'; 57], b"\n"].concat() // 64 bytes
    };
    let block: Vec<u8> = line.iter().copied().cycle().take(64 * 1024).collect();
    let mut out = std::io::stdout().lock();
    for _ in 0..mib * 16 {
        out.write_all(&block).expect("write stdout");
    }
    out.flush().expect("flush stdout");
    eprintln!("flooded {mib} MiB");
}
