//! caremsgd binary.
fn main() {}
