//! Prints a greeting: the smallest useful task, used to measure start-up.
fn main() {
    println!("Hello, world!");
}
