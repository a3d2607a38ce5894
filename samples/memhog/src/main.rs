//! Grows memory 1 MiB at a time, touching every page, until the host says
//! no (or, with an argument N, stops after N MiB and reports).
fn main() {
    let limit: Option<usize> = std::env::args().nth(1).map(|a| a.parse().expect("MiB must be an integer"));
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        if Some(chunks.len()) == limit {
            println!("memhog held {} MiB", chunks.len());
            return;
        }
        let mut chunk = vec![0u8; 1 << 20];
        for page in chunk.chunks_mut(4096) {
            page[0] = 1;
        }
        chunks.push(chunk);
        if chunks.len() % 16 == 0 {
            println!("memhog at {} MiB", chunks.len());
        }
    }
}
