//! The benchmark is `examples/bench.rs` of this package: `cargo run --release -p cache-bench --example bench`.
//! It is a package of its own so that the root package's quickstart does not build its peer crates.
