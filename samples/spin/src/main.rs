//! Loops forever without calling the host: only an interrupt stops it.
fn main() {
    println!("spinning");
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}
