//! Recurses without end until the stack overflows.
#[allow(unconditional_recursion)] // the point of this sample
fn depth(n: u64, pad: [u64; 16]) -> u64 {
    let pad = std::hint::black_box(pad);
    depth(n + 1, pad) + pad[(n % 16) as usize]
}

fn main() {
    println!("recursing");
    println!("{}", depth(0, [1; 16]));
}
