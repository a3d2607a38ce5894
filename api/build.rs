//! `sqlx::migrate!` embeds the migration directories at compile time;
//! without this, a new migration file alone would not rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=migrations-postgres");
}
