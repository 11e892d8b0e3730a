//! Compile-time rules: each `tests/ui/fail/<attr>-<problem>.rs` must fail with its `.stderr`, each
//! `tests/ui/pass/*.rs` must compile and run.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
