//! Compile-time rules: each `tests/ui/fail/<attr>-<problem>.rs` must fail with its `.stderr`, each
//! `tests/ui/pass/*.rs` must compile and run.

#[test]
fn ui() {
    // trybuild builds its cases in a project of its own that does not inherit the workspace's
    // profiles; with full debug info its binaries alone took 3 GB of disk. Cargo reads profile
    // settings from the environment, and trybuild passes the environment on to the cargo it runs.
    std::env::set_var("CARGO_PROFILE_DEV_DEBUG", "false");
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
